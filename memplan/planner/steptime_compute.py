"""The compute side of the step-time model: FLOPs of a layer, the attention core and the head, the GPU's peak and
the GEMM efficiency of the shape, and the dequantization a quantized base adds.

Part of ``planner.steptime`` (which re-exports every name). Seconds are floats.
"""

from __future__ import annotations

from memplan.arch.tensors import Architecture, Layer
from memplan.catalog.schema import GpuSpec
from memplan.config import Job, JobConfig
from memplan.dtypes import Dtype
from memplan.planner import cost, perf_data

FORWARD_PASSES = 1
BACKWARD_PASSES_FULL = 2
"""A backward pass costs two forwards: activation gradients and weight gradients (Kaplan et al. 2020)."""
BACKWARD_PASSES_FROZEN = 1
"""LoRA/QLoRA: a frozen base needs the activation gradients only (no weight-gradient GEMMs)."""
ACTIVATION_BYTES = 2
"""Activations and gradients exchanged in 16-bit."""


def generation(gpu: GpuSpec) -> str:
    """The GPU generation of a catalog GPU, by name prefix (``perf_data.GPU_GENERATION``)."""
    names = (gpu.name.lower(), *(a.lower() for a in gpu.aliases))
    for prefix, gen in perf_data.GPU_GENERATION:
        if any(n.startswith(prefix) for n in names):
            return gen
    return perf_data.DEFAULT_GENERATION


def peak_flops(gpu: GpuSpec, cfg: JobConfig) -> float:
    """Dense peak FLOP/s of the job's GEMMs: the fp8 peak for fp8 GEMMs (``perf.fp8`` or ``dtype: fp8``) on a
    GPU that has one, else the bf16/fp16 peak (GPU datasheets, ``catalog/gpus``)."""
    fp8 = cfg.perf.fp8 or cfg.dtype is Dtype.FP8
    if fp8 and gpu.fp8_dense_tflops:
        return gpu.fp8_dense_tflops * 1e12
    return gpu.bf16_dense_tflops * 1e12


def attention_peak_flops(gpu: GpuSpec) -> float:
    """Peak FLOP/s of the attention core: the 16-bit peak even in fp8 training (TransformerEngine runs
    dot-product attention in bf16 unless fp8 attention is asked for: ``fp8_dpa=False`` in
    transformer_engine/common/recipe; DeepSeek-V3 keeps attention in bf16, Sec. 3.3.1)."""
    return gpu.bf16_dense_tflops * 1e12


def efficiency(gpu: GpuSpec, cfg: JobConfig, hidden: int) -> float:
    """The GEMM efficiency of the job's shape (``cost.gemm_efficiency``), or ``perf.mfu`` when given."""
    if cfg.perf.mfu is not None:
        return cfg.perf.mfu
    curve = perf_data.GEMM_CURVES[generation(gpu)]
    return cost.gemm_efficiency(curve=curve, width=max(1, hidden) / cfg.tp, tokens=_tokens_micro(cfg))


def attention_widths(arch: Architecture) -> tuple[int, int]:
    """(query-key width, value width) summed over heads: N·H each, MLA: N·(d_nope + d_rope) and N·d_v."""
    spec = arch.spec
    heads = spec.num_attention_heads or 0
    if spec.is_mla:
        return heads * ((spec.qk_nope_head_dim or 0) + (spec.qk_rope_head_dim or 0)), heads * (spec.v_head_dim or 0)
    return heads * spec.dim_per_head, heads * spec.dim_per_head


def layer_forward_flops(arch: Architecture, layer: Layer, seq_len: int, tokens: int) -> float:
    """Forward FLOPs of one layer over ``tokens`` tokens of sequences of ``seq_len``: GEMMs + attention core.

    Formula: (2·N_active + 2·S'·(d_qk + d_v)) · tokens, S' = min(S, window) on sliding layers.
    Source: Narayanan et al. 2021, Eq. 3 (24·B·s·h² + 4·B·s²·h per layer: 2 FLOPs per weight per token and
    the two s×s attention products); MoE layers count the top-k experts (Layer.active_params).
    Assumption: causal masking's halving of the attention products is not credited (the slower side).
    """
    return linear_forward_flops(layer, tokens) + attention_forward_flops(arch, layer, seq_len, tokens)


_ACTIVE: dict[int, tuple[Layer, int]] = {}


def _active_params(layer: Layer) -> int:
    """``layer.active_params``, memoized (a sum over its tensors the planner asks for thousands of times); the
    entry keeps the layer and is compared by identity, so a recycled ``id`` never answers for another."""
    return _memo(_ACTIVE, layer, "active_params")


_PARAMS: dict[int, tuple[Layer, int]] = {}


def _memo(cache: dict[int, tuple[Layer, int]], layer: Layer, attr: str) -> int:
    """``getattr(layer, attr)`` kept in ``cache`` by the layer's id; the entry keeps the layer and is compared by
    identity, so a recycled ``id`` never answers for another (cleared when it reaches 65,536 entries)."""
    hit = cache.get(id(layer))
    if hit is not None and hit[0] is layer:
        return hit[1]
    if len(cache) >= 65536:
        cache.clear()
    value: int = getattr(layer, attr)
    cache[id(layer)] = (layer, value)
    return value


def _params(layer: Layer) -> int:
    """``layer.params``, memoized like ``_active_params`` (each stage's weight re-read sums it per plan row)."""
    return _memo(_PARAMS, layer, "params")


def linear_forward_flops(layer: Layer, tokens: int) -> float:
    """Forward FLOPs of a layer's weight GEMMs: 2·N_active per token (Kaplan et al. 2020, Table 1)."""
    return 2.0 * _active_params(layer) * tokens


def attention_forward_flops(arch: Architecture, layer: Layer, seq_len: int, tokens: int) -> float:
    """Forward FLOPs of the attention core (QKᵀ and attention × V): 2·S'·(d_qk + d_v) per token."""
    d_qk, d_v = attention_widths(arch)
    span = min(seq_len, arch.spec.sliding_window) if layer.sliding and arch.spec.sliding_window else seq_len
    return 2.0 * span * (d_qk + d_v) * tokens


def head_forward_flops(arch: Architecture, tokens: int) -> float:
    """Forward FLOPs after the blocks: the output layer, 2·V·D per token (the tied embedding's matrix when
    tied), plus modules in ``extra`` that train with the model (DeepSeek-V3's multi-token prediction block:
    2 FLOPs per active parameter per token; DeepSeek-AI 2024, Sec. 2.2)."""
    spec = arch.spec
    flops = 2.0 * (spec.vocab_size or 0) * (spec.hidden_size or 0) * tokens
    topk = spec.num_experts_per_tok or 0
    active = sum(t.numel_each * min(topk, t.copies) if t.routed else t.numel for t in arch.extra)
    return flops + 2.0 * active * tokens


def _passes(cfg: JobConfig) -> int:
    frozen = cfg.job in (Job.LORA, Job.QLORA)
    return FORWARD_PASSES + (BACKWARD_PASSES_FROZEN if frozen else BACKWARD_PASSES_FULL)


def _tokens_micro(cfg: JobConfig) -> int:
    """Tokens of one micro-batch on one rank: b·s, or b·s/cp with context parallelism."""
    return cfg.micro_batch * cfg.seq_len // cfg.cp


CAUSAL_TILE_SHARE = 0.5
"""Share of the s×s attention products a load-balanced context-parallel attention computes for a causal mask:
TransformerEngine ``AttnFuncWithCPAndKVP2P`` runs, per rank, one causal diagonal tile and cp − 1 half tiles
(``lower-triangle``: the first half of KV; ``upper-triangle``: the second half of Q), torch ``context_parallel``
the same (``_templated_ring_attention``: ``key.chunk(2)[0]`` / ``query.chunk(2)[1]``); Ulysses runs a causal flash
kernel over the whole sequence, which skips the masked blocks (Dao 2023, FlashAttention-2, Sec. 3.1.1)."""


def attention_share(cfg: JobConfig) -> float:
    """Share of the attention products counted by ``attention_forward_flops`` that the job computes: the causal
    half with context parallelism (``CAUSAL_TILE_SHARE``); 1 otherwise (memplan's calibration at cp = 1 does not
    credit causal masking, the slower side)."""
    return CAUSAL_TILE_SHARE if cfg.cp > 1 else 1.0


def dequant_seconds(gpu: GpuSpec, cfg: JobConfig, params: int) -> float:
    """QLoRA/quantized-base training: each pass reads the packed weights and writes a 16-bit copy for the GEMM.

    Formula: passes · P · (bits/8 + 2) / HBM bandwidth. Source: bitsandbytes ``dequantize_4bit`` (a separate
    kernel before ``torch.matmul`` in ``MatMul4Bit``, bitsandbytes/autograd/_functions.py), run in the
    forward and again for the backward's activation gradient. Assumption: memory-bound.
    """
    if cfg.job is not Job.QLORA and not (cfg.quant and cfg.job is Job.LORA):
        return 0.0
    from memplan.memory.quant import get_format
    from memplan.memory.weights import effective_quant

    fmt = effective_quant(cfg)
    if fmt is None:
        return 0.0
    bits = float(get_format(fmt).nominal_bits)
    return _passes(cfg) * params * (bits / 8 + ACTIVATION_BYTES) / (gpu.hbm_bandwidth_gbps * 1e9)
