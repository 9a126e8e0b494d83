"""llama.cpp: the buffers it allocates and prints, on the GPU and in host memory.

llama.cpp has no PyTorch: no caching allocator, no torch CUDA context. At load and context creation it
allocates and logs (src/llama-model.cpp ``load_tensors``, src/llama-kv-cache.cpp, src/llama-context.cpp):

- "CUDA0 model buffer size" / "CPU_Mapped model buffer size": the weights of the layers offloaded with
  ``-ngl`` (the last ngl repeating layers; the output layer too when ngl > n_layer) and the rest, with the
  input embedding always on the host (``dev_input`` is the CPU);
- "CUDA0 KV buffer size": n_ctx cells × L_gpu × (row_size(type_k, n_embd_k_gqa) + row_size(type_v,
  n_embd_v_gqa)) for the offloaded layers (``offload_kqv``), the rest in a host KV buffer; a sliding-window model's
  SWA layers hold the SWA cache's cells instead (``llamacpp_inputs.layer_cells``);
- "CUDA0 compute buffer size": the graph allocator's worst case for one ubatch
  (``memplan.engines.llamacpp_compute``), with its graph inputs (the KQ masks, a second one for sliding-window
  models, and ``ggml_set_rows``' KV index inputs: ``memplan.engines.llamacpp_inputs``); with several GPUs of a full
  layer split, the scheduler's pipeline-parallel input copies on each GPU (``memplan.engines.llamacpp_sched``);
  under -ngl partial offload, the CPU ops the first GPU runs with their weights copied in
  (``memplan.engines.llamacpp_offload``);
- "CUDA_Host compute buffer size": the graph inputs on the host (``llamacpp_sched.host_compute_bytes``);
- "CUDA_Host output buffer size": n_vocab fp32 logits per sequence.

``micro_batch`` is the number of parallel sequences (``-np``); they share one KV buffer of n_ctx cells,
so B sequences of S tokens need n_ctx = B·S (llama-server splits n_ctx over its slots).
"""

from __future__ import annotations

import bisect
import struct

from memplan.arch.tensors import Tensor
from memplan.config import JobConfig
from memplan.engines.llamacpp_sched import gpu_layers, output_on_gpu
from memplan.errors import MemplanError
from memplan.memory import weights
from memplan.memory.breakdown import Row, Tier
from memplan.memory.context import Context
from memplan.units import ceil_div, counted, round_up

F32_BYTES = 4
KV_TYPES: dict[str, tuple[int, int]] = {
    "f32": (1, 4), "f16": (1, 2), "bf16": (1, 2), "q8_0": (32, 34), "q4_0": (32, 18), "q4_1": (32, 20),
    "iq4_nl": (32, 18), "q5_0": (32, 22), "q5_1": (32, 24),
}
"""-ctk/-ctv types -> (elements per block, bytes per block): ggml/src/ggml.c ``type_traits``; the list is
common/arg.cpp ``kv_cache_types``."""
FLOAT_KV_TYPES = ("f32", "f16", "bf16")
N_CTX_PAD = 256
"""llama.cpp pads n_ctx to a multiple of 256 cells (src/llama-context.cpp: ``GGML_PAD(cparams.n_ctx, 256)``)."""
CUDA_RUNTIME_CONTEXT_BYTES = 287_047_680
"""A CUDA runtime context with lazy module loading after its first allocation: 274 MiB (pytorch/pytorch
PR #86509's measurement, taken before any PyTorch kernel runs). llama.cpp does not print it; it is real.
Override: ``JobConfig.cuda_context_bytes``."""
SOURCE = "llama.cpp src/llama-model.cpp load_tensors, src/llama-kv-cache.cpp, src/llama-context.cpp"


def check(cfg: JobConfig) -> None:
    """Refuse knobs llama.cpp does not have or combinations it rejects, in one sentence each."""
    s = cfg.serve
    if s.enforce_eager:
        raise MemplanError("enforce_eager is a vLLM knob (no CUDA graphs); llama.cpp has no such option. "
                           "Drop it, or choose the vllm engine.")
    if s.cache_type_v not in FLOAT_KV_TYPES and not s.flash_attn:
        raise MemplanError(f"llama.cpp quantizes the V cache ({s.cache_type_v}) only with flash attention; "
                           "set flash_attn (-fa on) or use an f16 V cache.")
    if cfg.infer.kv_dtype is not None:
        raise MemplanError("llama.cpp sizes its KV cache by cache_type_k / cache_type_v (-ctk/-ctv); supported: "
                           f"{', '.join(KV_TYPES)}. Drop kv_dtype.")
    if cfg.tp > 1:
        raise MemplanError("llama.cpp's row split (-sm row) is not modelled; split whole layers over the GPUs with "
                           "--pp N (llama.cpp -sm layer) instead.")
    if s.tensor_split is not None and len(s.tensor_split) != cfg.pp:
        raise MemplanError(f"tensor_split (-ts) gives {len(s.tensor_split)} proportions for {counted(cfg.pp, 'GPU')}; give one "
                           "per GPU of the layer split (--pp).")
    if s.tensor_split is not None and (any(v < 0 for v in s.tensor_split) or not any(s.tensor_split)):
        raise MemplanError("tensor_split (-ts) needs non-negative shares, not all zero.")
    if s.tensor_split is not None and cfg.pp == 1:
        raise MemplanError("tensor_split (-ts) divides layers over several GPUs; with one (--pp 1) it moves no byte.")


def check_effects(cfg: JobConfig, n_layer: int, swa: bool = False) -> None:
    """Refuse the scheduler knobs where they move no byte (no knob silently ignored): ``ggml_sched_max_copies`` without
    pipeline parallelism (one GPU, or -ngl leaving layers on the CPU), ``op_offload`` off with nothing on the CPU,
    ``swa_full`` for a model without a sliding-window cache (``swa`` false)."""
    from memplan.config import ServeConfig
    from memplan.engines import llamacpp_sched

    s, default = cfg.serve, ServeConfig()
    if s.ggml_sched_max_copies != default.ggml_sched_max_copies and cfg.pp > 1 and \
            not llamacpp_sched.pipeline_parallel(cfg, n_layer):
        raise MemplanError("ggml_sched_max_copies sizes pipeline parallelism's copies, which llama.cpp turns on only "
                           f"with every layer offloaded (-ngl > {n_layer}); with layers on the CPU it moves no byte.")
    if s.ggml_sched_max_copies != default.ggml_sched_max_copies and cfg.pp == 1:
        raise MemplanError("ggml_sched_max_copies sizes pipeline parallelism's copies, which llama.cpp uses only over "
                           "several GPUs (--pp N, -sm layer); with one it moves no byte.")
    if s.swa_full and not swa:
        raise MemplanError("swa_full (--swa-full) sizes the sliding-window cache of Gemma-2/3-like models, and this "
                           "model has none in llama.cpp; it moves no byte. Drop it.")
    if not s.op_offload and output_on_gpu(cfg, n_layer):
        raise MemplanError("--no-op-offload keeps the CPU layers' ops on the CPU, and every layer is on the GPU "
                           f"(-ngl > {n_layer}); it moves no byte. Drop it or offload fewer layers.")


def kv_row_bytes(kv_type: str, ncols: int) -> int:
    """``ggml_row_size(type, ncols)``: ncols / block × block bytes (bytes of one cell of one layer's K or V)."""
    blck, size = KV_TYPES[kv_type]
    if ncols % blck:
        raise MemplanError(f"llama.cpp cannot store a {kv_type} KV cache of rows of {ncols} values "
                           f"(not a multiple of {blck}); use f16.")
    return ncols // blck * size


def n_ctx(cfg: JobConfig) -> int:
    """KV cells: -c when set, else micro_batch × infer.context, padded to 256."""
    cells = cfg.serve.n_ctx or cfg.micro_batch * cfg.infer.context
    return round_up(cells, N_CTX_PAD)


def _f32(x: float) -> float:
    """``x`` rounded to a C float, as llama.cpp computes its split points."""
    return struct.unpack("f", struct.pack("f", x))[0]


def split_points(cfg: JobConfig) -> list[float]:
    """Cumulative split points of the layer split over ``pp`` GPUs: -ts proportions (else equal shares, llama.cpp's
    default split by free memory on identical GPUs), summed and divided by their sum in float.
    Source: src/llama-model.cpp ``load_tensors`` (``splits``, ``split_sum``)."""
    shares = cfg.serve.tensor_split or tuple(1.0 for _ in range(cfg.pp))
    total, points = 0.0, []
    for share in shares:
        total = _f32(total + _f32(share))
        points.append(total)
    return [_f32(p / total) for p in points]


def device_layers(cfg: JobConfig, n_layer: int, device: int) -> tuple[list[int], bool]:
    """The repeating layers on GPU ``device`` of the layer split, and whether the output layer is there.

    Formula (src/llama-model.cpp ``load_tensors``, ``get_layer_buft_list``): layers il >= i_gpu_start = n_layer − ngl
    go to the first device whose split point exceeds (il − i_gpu_start) / act_gpu_layers, act_gpu_layers =
    min(ngl, n_layer + 1); the output layer is il = n_layer; the rest stay on the CPU.
    """
    ngl = n_layer + 1 if cfg.serve.n_gpu_layers is None else cfg.serve.n_gpu_layers
    start, act = max(n_layer - ngl, 0), min(ngl, n_layer + 1)
    points = split_points(cfg)

    def on(il: int) -> int | None:
        if il < start or il - start >= act:
            return None
        where = _f32(_f32(float(il - start)) / act)
        return min(bisect.bisect_right(points, where), len(points) - 1)

    return [il for il in range(n_layer) if on(il) == device], on(n_layer) == device


def kv_bytes_per_layer(ctx: Context, cells: int) -> int:
    """cells × (row_size(type_k, K·H_k) + row_size(type_v, K·H_v)) for one layer."""
    spec, s = ctx.arch.spec, ctx.cfg.serve
    width = spec.kv_heads * spec.dim_per_head
    return cells * (kv_row_bytes(s.cache_type_k, width) + kv_row_bytes(s.cache_type_v, width))


MATRIX_ROW_PADDING = 512
"""ggml-cuda pads each quantized tensor whose rows are not a multiple of 512 values by one partial row
(ggml/src/ggml-cuda/ggml-cuda.cu ``ggml_backend_cuda_buffer_type_get_alloc_size``)."""


def cuda_padding_bytes(ctx: Context, layers: range | list[int], with_output: bool) -> int:
    """Σ over quantized GPU tensors with ncols % 512 != 0 of row_size(type, 512 − ncols % 512) (bytes)."""
    from memplan.memory.quant import GGML_TYPES, gguf_tensor_type, mix_traits

    quant = weights.effective_quant(ctx.cfg)
    if quant is None:
        return 0
    arch = ctx.arch
    traits, n = mix_traits(arch), len(arch.layers)
    placed: list[tuple[Tensor, int | None]] = [(t, i) for i in layers for t in arch.layers[i].tensors]
    placed += [(t, None) for t in arch.post] if with_output else []
    out = 0
    for t, i in placed:
        kind = gguf_tensor_type(quant, t, layer_index=i, num_layers=n, traits=traits)
        ncols = t.shape[-1]
        if kind not in ("F32", "F16") and ncols % MATRIX_ROW_PADDING:
            blck, size = GGML_TYPES[kind]
            out += (MATRIX_ROW_PADDING - ncols % MATRIX_ROW_PADDING) // blck * size
    return out


def model_buffers(ctx: Context, on_gpu: range | list[int], out_gpu: bool) -> tuple[int, int]:
    """(GPU, host) model buffer bytes: from the GGUF file's own tensor table when the model is a .gguf file,
    else from memplan's GGUF mix rules for ``quant`` (memory.quant ``gguf_tensor_type``). The output layer's bytes are
    the last pipeline stage's non-layer tensors whichever GPU (or the host) holds it under -sm layer / -ngl."""
    from memplan.catalog.gguf_file import gguf_path, read_gguf

    path = gguf_path(ctx.arch.spec)
    if path is not None:
        return file_buffers(read_gguf(path).tensors, on_gpu, out_gpu)
    n_layer = len(ctx.arch.layers)
    quant = weights.effective_quant(ctx.cfg)
    layer_bytes = [weights.layer_weight_bytes(ctx, i, quant) for i in range(n_layer)]
    outside = weights.non_layer_weight_bytes(ctx.at_stage(ctx.cfg.pp - 1))  # the output layer, wherever it is
    host_in = weights.context_weight_bytes(ctx)
    host_input = host_in.host_quantized + host_in.host_unquantized
    gpu = sum(layer_bytes[i] for i in on_gpu) + (outside if out_gpu else 0) + cuda_padding_bytes(ctx, on_gpu, out_gpu)
    cpu = sum(b for i, b in enumerate(layer_bytes) if i not in on_gpu) + (0 if out_gpu else outside) + host_input
    return gpu, cpu


def file_buffers(tensors: tuple, on_gpu: range | list[int], out_gpu: bool) -> tuple[int, int]:
    """(GPU, host) bytes of a GGUF file's tensors: blocks by -ngl, token_embd on the host, the rest (output
    norm, output) with the output layer; quantized GPU tensors padded as ggml-cuda pads them."""
    from memplan.memory.quant import GGML_TYPES

    gpu = cpu = 0
    for t in tensors:
        layer = t.layer
        on = layer in on_gpu if layer is not None else (t.name != "token_embd.weight" and out_gpu)
        if not on:
            cpu += t.nbytes
            continue
        gpu += t.nbytes
        ncols = t.shape[0]
        if t.ggml_type in GGML_TYPES and t.ggml_type not in ("F32", "F16") and ncols % MATRIX_ROW_PADDING:
            blck, size = GGML_TYPES[t.ggml_type]
            gpu += (MATRIX_ROW_PADDING - ncols % MATRIX_ROW_PADDING) // blck * size
    return gpu, cpu


def rows(ctx: Context) -> list[Row]:
    """llama.cpp's buffers: model, KV and compute buffers on the GPU and the host, and the CUDA context.

    With ``pp`` > 1 the model is split by whole layers over pp GPUs (llama.cpp ``-sm layer``, ``-ts``): the rows are
    those of GPU ``ctx.stage`` (``device_layers``), each GPU with its own KV for its layers, its own compute buffer
    (the logits part only where the output layer is) and its own CUDA context. When every layer is offloaded
    llama.cpp turns on pipeline parallelism and each GPU's compute buffer and the host's hold ``n_copies`` copies of
    their inputs (``memplan.engines.llamacpp_sched``).
    """
    from memplan.engines import llamacpp_compute, llamacpp_inputs, llamacpp_sched

    cfg, arch = ctx.cfg, ctx.arch
    check(cfg)
    n_layer = len(arch.layers)
    check_effects(cfg, n_layer, bool(llamacpp_inputs.swa_layers(ctx)))
    on_gpu = gpu_layers(cfg, n_layer)
    out_gpu = output_on_gpu(cfg, n_layer)
    gpu_w, cpu_w = model_buffers(ctx, on_gpu, out_gpu)
    mine, my_out = list(on_gpu), out_gpu
    if cfg.pp > 1:  # -sm layer: this GPU's share of the offloaded layers; the host part is the same on every GPU
        mine, my_out = device_layers(cfg, n_layer, ctx.stage)
        gpu_w = model_buffers(ctx, mine, my_out)[0]
    cells = n_ctx(cfg)
    per_layer, lc = kv_bytes_per_layer(ctx, cells), llamacpp_inputs.layer_cells(ctx, cells)
    s, swa = cfg.serve, llamacpp_inputs.swa_cells(ctx, cells)
    kv_note = (f"{cells} cells" + (f" ({swa} in the sliding-window cache)" if swa else "") + f", K ({s.cache_type_k})"
               f" + V ({s.cache_type_v}); {len(mine)} of {n_layer} layers on this GPU")
    copies = llamacpp_sched.n_copies(cfg, n_layer)
    pp_note = (f"; pipeline parallelism, {copies} copies of the inputs (if they do not fit, llama.cpp since PR #16748 "
               "retries with one: --ggml-sched-max-copies 1)") if copies > 1 else ""
    vocab = arch.spec.vocab_size or 0
    ctx_bytes = CUDA_RUNTIME_CONTEXT_BYTES if cfg.cuda_context_bytes is None else cfg.cuda_context_bytes
    return [
        Row("weights/llamacpp_gpu", Tier.GPU, gpu_w, SOURCE, f"CUDA{ctx.stage} model buffer: {len(mine)} layers (-ngl"
            + (", -sm layer" if cfg.pp > 1 else "") + ")" + (" + output layer" if my_out else "")),
        Row("weights/llamacpp_host", Tier.CPU, cpu_w, SOURCE, "CPU_Mapped model buffer: input embedding + CPU layers"),
        Row("kv_cache", Tier.GPU, kv_bytes_per_layer(ctx, sum(lc[i] for i in mine)), "llama.cpp src/llama-kv-cache.cpp",
            kv_note),
        Row("kv_cache/host", Tier.CPU, kv_bytes_per_layer(ctx, sum(c for i, c in enumerate(lc) if i not in on_gpu)),
            "llama.cpp src/llama-kv-cache.cpp", "KV of the layers left on the CPU"),
        Row("activations/llamacpp_compute", Tier.GPU, llamacpp_compute.gpu_compute_bytes(
                ctx, cells, mine, my_out, kv_layer=per_layer, output_weights=model_buffers(ctx, [], True)[0]
                if not out_gpu and ctx.stage == 0 else 0),
            "llama.cpp src/llama-context.cpp graph_reserve, ggml-backend.cpp sched; see memplan explain",
            f"n_ubatch {s.n_ubatch}, flash_attn {'on' if s.flash_attn else 'off'}{pp_note}"),
        Row("activations/llamacpp_host_compute", Tier.CPU, llamacpp_sched.host_compute_bytes(ctx, cells)
            + llamacpp_compute.host_working_set(ctx, cells, llamacpp_sched.ubatch(ctx, cells)),
            "llama.cpp ggml-backend.cpp sched graph inputs", "CUDA_Host compute buffer: graph inputs + token "
            "embeddings" + pp_note + ("" if len(on_gpu) == n_layer else " + the CPU layers' ops it keeps")),
        Row("activations/llamacpp_output", Tier.CPU, vocab * F32_BYTES * cfg.micro_batch,
            "llama.cpp src/llama-context.cpp output_reserve", "CUDA_Host output buffer: fp32 logits per sequence"),
        Row("runtime/llamacpp_cuda_context", Tier.GPU, ctx_bytes, "CUDA runtime context (pytorch/pytorch PR #86509)",
            "not printed by llama.cpp (cuda_context_bytes)"),
    ]


def max_context(ctx: Context, capacity: int) -> int:
    """Largest n_ctx (a multiple of 256) whose GPU rows fit in ``capacity`` bytes (binary search on cells)."""
    from memplan.memory.breakdown import tier_total

    def fits(cells: int) -> bool:
        cfg = ctx.cfg.model_copy(update={"serve": ctx.cfg.serve.model_copy(update={"n_ctx": cells})})
        return tier_total(rows(Context(ctx.arch, cfg, ctx.gpu, ctx.host)), Tier.GPU) <= capacity

    lo, hi = 0, ceil_div(2**24, N_CTX_PAD)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid * N_CTX_PAD):
            lo = mid
        else:
            hi = mid - 1
    return lo * N_CTX_PAD
