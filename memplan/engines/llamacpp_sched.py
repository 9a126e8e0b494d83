"""llama.cpp's scheduler under a layer split: pipeline parallelism's input copies, and the host compute buffer.

ggml-backend's scheduler (ggml/src/ggml-backend.cpp ``ggml_backend_sched_new``, ``ggml_backend_sched_split_graph``)
cuts the graph into splits, one per run of nodes on one backend. Each split's inputs that live on another backend
(the hidden state from the previous GPU; the KQ masks, positions and KV index inputs from the host,
``memplan.engines.llamacpp_inputs``) are copied into the split's backend, inside that backend's compute buffer. With
``parallel`` true it keeps ``n_copies`` = ``GGML_SCHED_MAX_COPIES`` (4 unless the build sets it) copies of each such
input and of each graph input (``GGML_TENSOR_FLAG_INPUT``: tokens, positions, KQ masks, KV index inputs, output ids)
on its own backend, every copy flagged input and output so that ggml-alloc never frees or reuses it; micro-batch
k + 1's inputs are uploaded while the next GPU
still reads micro-batch k's.

src/llama-context.cpp (``llama_context`` constructor, ``sched_reserve``) passes ``parallel`` = ``pipeline_parallel``:

    model.n_devices() > 1 && model.n_gpu_layers() > hparams.n_layer && split_mode == LLAMA_SPLIT_MODE_LAYER
    && cparams.offload_kqv && !model.has_tensor_overrides()

and every GPU backend supports async compute and events (CUDA does). memplan's llama.cpp runs ``-sm layer`` over
``--pp`` GPUs, offloads the KV cache and has no ``-ot``, so the switch is: pp > 1, all layers and the output
layer offloaded (-ngl > n_layer, llama.cpp's default 999) and ``ggml_sched_max_copies`` > 1.

Since llama.cpp PR #16748 (Oct 2025) a failed compute-buffer allocation is retried without pipeline parallelism;
memplan reports the buffers llama.cpp asks for first (``--ggml-sched-max-copies 1`` gives the fallback's).
"""

from __future__ import annotations

from memplan.config import JobConfig
from memplan.memory.context import Context

F32_BYTES = 4
F16_BYTES = 2
I32_BYTES = 4
KQ_MASK_PAD = 64
"""Rows of the KQ mask are padded to 64 (ggml.h ``GGML_KQ_MASK_PAD``)."""
TOKEN_INPUTS = 3
"""int32 graph inputs of one entry per ubatch token: token ids, positions, output ids (n_outputs = n_ubatch in the
worst-case reserve; src/llama-graph.cpp ``build_inp_embd``, ``build_inp_pos``, ``build_inp_out_ids``)."""


def gpu_layers(cfg: JobConfig, n_layer: int) -> range:
    """Layer indices on the GPU: the last ngl repeating layers (llama-model.cpp ``i_gpu_start = n_layer - ngl``)."""
    ngl = n_layer + 1 if cfg.serve.n_gpu_layers is None else cfg.serve.n_gpu_layers
    return range(max(n_layer - ngl, 0), n_layer)


def output_on_gpu(cfg: JobConfig, n_layer: int) -> bool:
    """The output layer (final norm, lm_head) is offloaded when ngl > n_layer (``n_gpu_layers`` None is llama.cpp's
    default 999)."""
    return cfg.serve.n_gpu_layers is None or cfg.serve.n_gpu_layers > n_layer


def pipeline_parallel(cfg: JobConfig, n_layer: int) -> bool:
    """llama.cpp's ``pipeline_parallel``: several GPUs (pp > 1, -sm layer) and every layer offloaded (-ngl > n_layer,
    ``output_on_gpu``). Source: src/llama-context.cpp (``llama_context``)."""
    return cfg.pp > 1 and output_on_gpu(cfg, n_layer)


def n_copies(cfg: JobConfig, n_layer: int) -> int:
    """The scheduler's ``n_copies``: ``GGML_SCHED_MAX_COPIES`` when llama.cpp enables pipeline parallelism, else 1.

    Source: ggml/src/ggml-backend.cpp ``ggml_backend_sched_new`` (``sched->n_copies = parallel ?
    GGML_SCHED_MAX_COPIES : 1``), ``parallel`` being ``pipeline_parallel``.
    """
    return cfg.serve.ggml_sched_max_copies if pipeline_parallel(cfg, n_layer) else 1


def ubatch(ctx: Context, cells: int) -> int:
    """Tokens of the worst-case graph: min(n_ubatch, n_batch, n_ctx) (llama-context.cpp ``cparams.n_ubatch``)."""
    s = ctx.cfg.serve
    return min(s.n_ubatch, s.n_batch, cells)


def gpu_inputs(ctx: Context, cells: int, first: bool, has_layers: bool, last_layer: bool) -> tuple[int, int]:
    """(mask bytes, other bytes) a GPU's splits copy in: the KQ masks, the hidden state, the positions and the KV
    index inputs.

    The mask inputs are f32 (``build_attn_inp_kv``; two for an interleaved-SWA model, ``llamacpp_inputs``); with
    flash attention llama.cpp casts each to f16 (``ggml_cast(..., GGML_TYPE_F16)``) in the first layer that reads it,
    on the first GPU, so that GPU copies the f32 masks and every later GPU copies the previous one's f16 casts. The
    hidden state is n_embd × n_ubatch f32; the output ids (int32 per token) go to the GPU of the last repeating layer;
    the KV index inputs (I64, ``llamacpp_inputs.kv_index_bytes``) go to every GPU with layers (their ``set_rows``).
    Assumptions: a GPU with layers of an interleaved-SWA model holds both kinds and copies both masks (over where it
    holds one kind); builds before llama.cpp PR #23764 (May 2026), which creates the mask in f16 under flash
    attention (no f32 copy): for later builds memplan is over by n_copies × n_kv × n_ubatch × 2 bytes on the first GPU
    and the host, the safe direction (unsloth PR #7637 measured 4 f16 masks per GPU on such a build).
    """
    from memplan.engines.llamacpp_inputs import kv_index_bytes, mask_row_counts

    if not has_layers:
        return 0, 0
    ub = ubatch(ctx, cells)
    width = F32_BYTES if first or not ctx.cfg.serve.flash_attn else F16_BYTES
    hidden = (ctx.arch.spec.hidden_size or 0) * ub * F32_BYTES
    other = hidden + ub * I32_BYTES * (2 if last_layer else 1) + kv_index_bytes(ctx, cells)
    return sum(mask_row_counts(ctx, cells)) * width, other


def pp_compute_bytes(ctx: Context, cells: int, held: dict[str, int], placement: tuple[bool, bool, bool]) -> int:
    """A GPU's compute buffer under pipeline parallelism (bytes).

    Formula: n_copies × (masks + hidden + positions (+ output ids) + KV index inputs) held for the whole graph, plus
    the largest of the working sets without those held inputs: attention, FFN, logits. ``held`` holds those working
    sets (``llamacpp_compute.compute_terms`` with ``held``); ``placement`` is (first GPU, has layers, holds the last
    layer). Source: ggml/src/ggml-backend.cpp ``ggml_backend_sched_split_graph`` (copies flagged input and output,
    added as leafs "so that they are allocated first"). Assumption: ggml-alloc's reuse inside the working set is as
    in the single-copy formula; checked against two published logs (tests/test_llamacpp_pipeline.py).
    """
    first, has_layers, last_layer = placement
    mask, other = gpu_inputs(ctx, cells, first, has_layers, last_layer)
    copies = n_copies(ctx.cfg, len(ctx.arch.layers))
    live = max(held["attention"], held["ffn"], held["logits"], 0)
    return copies * (mask + other) + live if has_layers else held["logits"]


def host_compute_bytes(ctx: Context, cells: int) -> int:
    """The host compute buffer ("CUDA_Host compute buffer size") of a fully offloaded model (bytes).

    Formula: n_copies × (f32 KQ masks + token ids + positions + output ids + KV index inputs) + the token
    embeddings' ``get_rows`` output (n_embd × n_ubatch f32), which runs on the CPU where ``token_embd`` lives. Graph
    inputs are allocated first and are alive while get_rows runs. Source: ggml/src/ggml-backend.cpp (inputs assigned
    to the last backend, the CPU, which llama-context.cpp gives the first GPU's host buffer type);
    src/llama-graph.cpp ``build_inp_*``; ``llamacpp_inputs``.
    Checked: Mistral-7B, n_ubatch 512: 12.01 MiB at n_ctx 2048, 72.01 MiB at 32768 (fedora-copr/logdetective PR
    #106, a build before ``ggml_set_rows``). Assumption: an f32 mask, as before llama.cpp PR #23764 (f16 under flash
    attention since; see ``gpu_inputs``); the CPU's own working set under -ngl partial offload is
    ``llamacpp_compute.host_working_set``.
    """
    from memplan.engines.llamacpp_inputs import kv_index_bytes, mask_row_counts

    ub = ubatch(ctx, cells)
    masks = sum(mask_row_counts(ctx, cells)) * F32_BYTES
    inputs = masks + TOKEN_INPUTS * ub * I32_BYTES + kv_index_bytes(ctx, cells)
    embd = (ctx.arch.spec.hidden_size or 0) * ub * F32_BYTES
    return n_copies(ctx.cfg, len(ctx.arch.layers)) * inputs + embd
