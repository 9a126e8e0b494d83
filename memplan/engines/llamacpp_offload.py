"""llama.cpp under -ngl partial offload: CPU weights copied into the first GPU's compute buffer (op offload).

ggml-backend's scheduler (ggml/src/ggml-backend.cpp ``ggml_backend_sched_backend_id_from_cur``) runs an op whose
weight sits in a host buffer on a higher-priority backend when that backend wants it
(``ggml_backend_offload_op``); CUDA wants every op whose batch is at least 32 rows
(ggml/src/ggml-cuda/ggml-cuda.cu ``ggml_backend_cuda_device_offload_op``, ``GGML_OP_OFFLOAD_MIN_BATCH``), which the
worst-case graph of n_ubatch ≥ 32 tokens is. The first GPU (backend 0) then computes the CPU layers and the CPU
output layer, and each such op's weight is a split input copied into that GPU's compute buffer
(``ggml_backend_sched_split_graph`` starts a new split per weight "so that the memory of the previously offloaded
weights can be reused"). The CPU layers' KV views (host buffers CUDA cannot read) are copied in the same way.
llama.cpp's ``--no-op-offload`` (``op_offload`` false) turns it off.

ollama's estimator has the same output-layer term (ollama fs/ggml/ggml.go ``GraphSize``, partial offload:
4·batch·(embedding + vocab) + embedding·vocab·105/128, the output matrix at Q6_K), which corroborates it; memplan
takes the output matrix at its real type.
"""

from __future__ import annotations

from memplan.memory.context import Context

OP_OFFLOAD_MIN_BATCH = 32
"""Rows from which CUDA takes an op whose weight is in host memory (ggml-cuda.cu, ``GGML_OP_OFFLOAD_MIN_BATCH``)."""
F32_BYTES = 4


def applies(ctx: Context, ub: int, device: int) -> bool:
    """Whether GPU ``device`` takes the CPU-resident ops: the first GPU, op offload on, n_ubatch ≥ 32."""
    return device == 0 and ctx.cfg.serve.op_offload and ub >= OP_OFFLOAD_MIN_BATCH


def largest_tensor_bytes(ctx: Context, layer: int) -> int:
    """Bytes of the largest weight tensor of repeating layer ``layer`` in the GGUF file (or memplan's GGUF mix)."""
    from memplan.catalog.gguf_file import gguf_path, read_gguf
    from memplan.memory import weights
    from memplan.memory.quant import DEFAULT_TRAITS, mix_traits

    path = gguf_path(ctx.arch.spec)
    if path is not None:
        return max((t.nbytes for t in read_gguf(path).tensors if t.layer == layer), default=0)
    cfg, arch = ctx.cfg, ctx.arch
    quant = weights.effective_quant(cfg)
    traits = mix_traits(arch) if quant is not None else DEFAULT_TRAITS
    return max((weights.weight_bytes_per_gpu([(t, layer)], dtype=cfg.dtype, quant=quant, tp=1, ep=1,
                                             num_layers=len(arch.layers), traits=traits)
                for t in arch.layers[layer].tensors), default=0)


def offload_bytes(ctx: Context, cells: int, ub: int, terms: dict[str, int], kv_layer: int, output_weights: int) -> int:
    """The first GPU's working set while it runs an offloaded CPU op (bytes); 0 when nothing is offloaded.

    Formula: output layer on the CPU: its weights (final norm + output matrix, as stored) + n_ubatch·(n_vocab +
    n_embd)·4 (logits and their input) + n_embd·n_ubatch·4 (the hidden state copied in); CPU repeating layers: the
    largest of their weight tensors + one layer's K and V (``kv_layer`` bytes) + the larger of the attention and FFN
    working sets (``terms``). Assumption: one weight copy alive at a time (a new split per weight); for MoE the
    whole expert tensor is copied. Bounded from the source, not checked against a printed log.
    """
    from memplan.engines.llamacpp_sched import gpu_layers, output_on_gpu

    cfg, n_layer = ctx.cfg, len(ctx.arch.layers)
    on_gpu = gpu_layers(cfg, n_layer)
    spec = ctx.arch.spec
    embd, vocab = spec.hidden_size or 0, spec.vocab_size or 0
    out = 0
    if not output_on_gpu(cfg, n_layer):
        out = output_weights + ub * (vocab + embd) * F32_BYTES + embd * ub * F32_BYTES
    cpu_layers = [i for i in range(n_layer) if i not in on_gpu]
    layer = 0
    if cpu_layers:
        weight = max(largest_tensor_bytes(ctx, i) for i in cpu_layers)
        layer = weight + kv_layer + max(terms["attention"], terms["ffn"])
    return max(out, layer)
