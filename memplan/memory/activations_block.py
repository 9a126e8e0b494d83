"""One transformer block's saved-for-backward bytes, term by term, for each model family.

The block is taken apart the way its Hugging Face module runs (transformers 5.x
``modeling_<family>.py``): norms, the attention input, the attention kernel, the MLP or the
mixture of experts, dropout masks. Each term is a function of ``activations_terms``; this module
only decides, per family and attention kernel, which terms occur and with which widths.

Tensor and sequence parallelism follow Megatron-LM (Korthikanti et al. 2022, Sec. 4.2):
head- and ffn-wide tensors are split over ``tp`` ranks (``Dims.tokens`` rows of per-rank widths);
hidden-wide tensors (norms, block inputs, dropout masks) are replicated, or split along the
sequence with sequence parallelism (``Dims.seq_tokens`` rows).
"""

from __future__ import annotations

from dataclasses import dataclass

from memplan.arch.tensors import Layer
from memplan.catalog.schema import Family, ModelSpec
from memplan.config import JobConfig
from memplan.dtypes import Dtype
from memplan.memory import activations_terms as t
from memplan.units import ceil_div

COMPUTE_BITS_16 = 16
"""Activations of 16-bit, fp8 and weight-quantized jobs are bf16/fp16: quantized weights are
dequantized to the 16-bit compute dtype (bitsandbytes, QLoRA Sec. 3), fp8 recipes keep activations
saved for backward in bf16 (Transformer Engine)."""

ACT_SAVED = {
    "gelu": 1, "gelu_pytorch_tanh": 1, "silu": 1, "swish": 1, "relu2": 1,
    "quick_gelu": 2, "gelu_python": 3, "gelu_new": 4, "gelu_accurate": 4, "gelu_fast": 7,
    "relu": 0, "tanh": 0, "sigmoid": 0,
}
"""F-wide tensors an activation saves besides its output, for transformers ``ACT2FN`` names: fused
kernels save their input (1), ReLU/tanh/sigmoid their output (0), Python formulas their intermediates.
Measured with ``memplan.measure.saved`` on transformers 5.x; other names count as 1."""

_NO_SOFTMAX_UPCAST = frozenset({Family.GPT2, Family.FALCON})
"""Eager attention softmax in the dtype (transformers GPT-2, Falcon); the others use dtype=float32."""
_HIDDEN_DROPOUTS = {Family.GPT2: 2, Family.OPT: 2, Family.PHI3: 2, Family.FALCON: 1}
"""Hidden-wide dropouts per block: after attention and after the MLP (GPT-2 resid_dropout, OPT
dropout, Phi-3 resid_*_dropout); Falcon's parallel block has one (hidden_dropout)."""
_Q_HEAD_MAJOR = frozenset({Family.PHI3, Family.FALCON})
"""Families whose q reaches attention contiguous as (B, N, S, H) (Phi-3's partial-rotary ``cat``, Falcon's
``reshape``), so a flash kernel's output (laid out like q: ``empty_like(q)``) needs a contiguous copy
for o_proj; elsewhere q keeps the projection's (B, S, N, H) layout and the output is o_proj's input."""
_MOE_WEIGHTS_FP32 = frozenset({Family.MIXTRAL, Family.DEEPSEEK})
"""Routers whose top-k weights stay fp32 (Mixtral, DeepSeek-V3); Qwen3-MoE casts them to the dtype."""


@dataclass(frozen=True)
class Counting:
    """How saved tensors are counted: the kernels' widths on the target device, or a paper's rules.

    ``paper``: Korthikanti et al. 2022's accounting: norms save their input only, activations
    their input only, softmax in 16 bits, no statistics, logsumexp, int64 indices or rotary tables.
    """

    mask_bits: int = t.CUDA_DROPOUT_MASK_BITS
    stats_bits: int = t.CUDA_NORM_STATS_BITS
    paper: bool = False
    cpu: bool = False


CUDA = Counting()
"""PyTorch on CUDA, the target of every estimate."""
PAPER = Counting(stats_bits=0, paper=True)


def cpu_counting(bits: int) -> Counting:
    """PyTorch's CPU kernels: dropout multiplies by a noise tensor of the dtype, LayerNorm keeps its
    statistics in the dtype (ATen ``Dropout.cpp`` ``_dropout_impl``; ``layer_norm_cpu``)."""
    return Counting(mask_bits=bits, stats_bits=bits, cpu=True)


@dataclass(frozen=True)
class Term:
    """Saved bytes of one part of a block; ``core`` marks S×S attention tensors (selective recompute)."""

    name: str
    bytes: int
    core: bool = False


@dataclass(frozen=True)
class Dims:
    """A block's sizes on one rank: per-rank heads and ffn, rows of split and of replicated tensors."""

    b: int
    s: int
    tokens: int
    seq_tokens: int
    d: int
    n: int
    k: int
    h: int
    f: int
    tp: int
    bits: int


def activation_bits(cfg: JobConfig) -> int:
    """Bits of saved activations: 32 for fp32 jobs, else the 16-bit compute dtype."""
    return t.FP32_BITS if cfg.dtype is Dtype.FP32 else COMPUTE_BITS_16


def dims(spec: ModelSpec, cfg: JobConfig) -> Dims:
    """Per-rank sizes; kv heads round up (replicated when tp > K, as Megatron-LM does)."""
    b, s, tp = cfg.micro_batch, cfg.seq_len, cfg.tp
    seq = b * ceil_div(s, tp) if cfg.sequence_parallel else b * s
    return Dims(b=b, s=s, tokens=b * s, seq_tokens=seq, d=spec.hidden_size or 0,
                n=ceil_div(spec.num_attention_heads or 1, tp), k=ceil_div(spec.kv_heads, tp),
                h=spec.dim_per_head, f=ceil_div(spec.intermediate_size or 4 * (spec.hidden_size or 0), tp),
                tp=tp, bits=activation_bits(cfg))


def norm_bytes(spec: ModelSpec, *, tokens: int, width: int, bits: int, counting: Counting) -> int:
    """One norm of the family (Gemma-2 RMSNorm, RMSNorm or LayerNorm); the paper counts its input."""
    if counting.paper:
        return t.tensor_bytes(count=tokens * width, bits=bits)
    if spec.family is Family.GEMMA2:
        return t.gemma_rms_norm_bytes(tokens=tokens, width=width)
    if spec.norm == "layernorm":
        return t.layer_norm_bytes(tokens=tokens, width=width, bits=bits, stats_bits=counting.stats_bits)
    return t.rms_norm_bytes(tokens=tokens, width=width, bits=bits)


def attention_impl(spec: ModelSpec, cfg: JobConfig) -> str:
    """The kernel HF runs: Gemma-2's soft-capping has no SDPA path (transformers refuses it), so eager."""
    impl = cfg.attention_impl
    return "eager" if impl == "sdpa" and spec.family is Family.GEMMA2 else impl


def _norm_terms(spec: ModelSpec, dm: Dims, counting: Counting) -> list[Term]:
    """Block norms, each with the hidden-wide output its consumer saves (attention / MLP input)."""
    one = norm_bytes(spec, tokens=dm.seq_tokens, width=dm.d, bits=dm.bits, counting=counting)
    hidden = t.tensor_bytes(count=dm.seq_tokens * dm.d, bits=dm.bits)
    if spec.family is Family.FALCON:  # one LayerNorm feeds attention and MLP in parallel
        return [Term("norms", one + hidden)]
    if spec.family is Family.GEMMA2:  # post-attention and post-feedforward norms feed the residual add
        return [Term("norms", 4 * one + 2 * hidden)]
    return [Term("norms", 2 * one + 2 * hidden)]


def _qk_norm_terms(spec: ModelSpec, dm: Dims, counting: Counting) -> list[Term]:
    if not spec.qk_norm:
        return []
    q = norm_bytes(spec, tokens=dm.tokens * dm.n, width=dm.h, bits=dm.bits, counting=counting)
    k = norm_bytes(spec, tokens=dm.tokens * dm.k, width=dm.h, bits=dm.bits, counting=counting)
    return [Term("attention/qk_norm", q + k)]


def _eager(spec: ModelSpec, cfg: JobConfig, dm: Dims, counting: Counting, h: int, hv: int) -> list[Term]:
    upcast = spec.family not in _NO_SOFTMAX_UPCAST and not counting.paper
    drop = cfg.dropout and spec.family is not Family.FALCON
    scores = t.eager_scores_bytes(
        b=dm.b, s=dm.s, n=dm.n, bits=dm.bits, softmax_bits=t.FP32_BITS if upcast else dm.bits,
        softcap=spec.family is Family.GEMMA2, mask_bits=counting.mask_bits if drop else None)
    qkvo = t.eager_qkvo_bytes(b=dm.b, s=dm.s, n=dm.n, h=h, hv=hv, bits=dm.bits)
    return [Term("attention/qkv", qkvo), Term("attention/scores", scores, core=True)]


def _fused(dm: Dims, counting: Counting, *, q: int, kv: int, out: int) -> Term:
    """A flash/SDPA kernel's saved tensors; the paper accounting has no logsumexp."""
    total = t.flash_attention_bytes(tokens=dm.tokens, heads=dm.n, q_width=q, kv_width=kv, out_width=out,
                                    bits=dm.bits)
    if counting.paper:
        total -= t.tensor_bytes(count=dm.tokens * dm.n, bits=t.FP32_BITS)
    return Term("attention/qkv", total)


def sdpa_mask_materialized(spec: ModelSpec, layer: Layer, impl: str, s: int) -> bool:
    """SDPA gets an explicit mask (so no is_causal, no GQA) on sliding layers whose window is shorter than S."""
    window = spec.sliding_window
    return impl == "sdpa" and layer.sliding and window is not None and window < s


def _standard_attention(spec: ModelSpec, layer: Layer, cfg: JobConfig, dm: Dims, counting: Counting) -> list[Term]:
    impl = attention_impl(spec, cfg)
    n, k, h = dm.n, dm.k, dm.h
    if impl == "eager":
        return _eager(spec, cfg, dm, counting, h, h)
    if impl == "sdpa" and spec.family is Family.FALCON and spec.kv_heads < (spec.num_attention_heads or 1):
        # multi-query k of one head without enable_gqa: no fused kernel, ATen's fp32 math path
        math = t.math_attention_bytes(b=dm.b, s=dm.s, n=n, h=h, hv=h, bits=dm.bits)
        scores = t.tensor_bytes(count=dm.b * n * dm.s * dm.s, bits=t.FP32_BITS)
        return [Term("attention/qkv", math - scores), Term("attention/scores", scores, core=True)]
    terms = []
    masked = sdpa_mask_materialized(spec, layer, impl, dm.s)
    kv_heads = n if masked else k  # repeat_kv copies k and v to N heads when SDPA cannot use enable_gqa
    if spec.family is Family.GPT2:  # q, k, v are views of c_attn's output, which stays alive whole
        terms.append(_fused(dm, counting, q=0, kv=3 * n * h, out=n * h))
    elif spec.family is Family.PHI3 and not (masked and k < n):  # v is a view of the fused qkv_proj output
        terms.append(_fused(dm, counting, q=n * h, kv=k * h + (n + 2 * k) * h, out=n * h))
    else:
        terms.append(_fused(dm, counting, q=n * h, kv=2 * kv_heads * h, out=n * h))
    # CUDA's memory-efficient SDPA kernel (fp32, or an explicit mask) always writes (B, S, N, H)
    efficient = impl == "sdpa" and not counting.cpu and (dm.bits == t.FP32_BITS or masked)
    if spec.family in _Q_HEAD_MAJOR and not efficient:
        terms.append(Term("attention/o_proj_input", t.tensor_bytes(count=dm.tokens * n * h, bits=dm.bits)))
    if masked:  # SDPA converts the bool mask to an additive (B, 1, S, S) tensor per call and saves it
        terms.append(Term("attention/mask", t.tensor_bytes(count=dm.b * dm.s * dm.s, bits=dm.bits), core=True))
    return terms


def _mla_attention(spec: ModelSpec, cfg: JobConfig, dm: Dims, counting: Counting) -> list[Term]:
    """DeepSeek multi-head latent attention: low-rank q and kv paths, then per-head attention.

    q/k heads are nope + rope wide, v heads v_head_dim; the latent norms' outputs feed q_b / kv_b.
    Source: transformers ``DeepseekV3Attention.forward`` / ``expand_kv``; flash pads v to the q width
    (``integrations/flash_attention.py``); SDPA keeps the kv_b output alive through the v view.
    """
    nope, rope, hv = spec.qk_nope_head_dim or 0, spec.qk_rope_head_dim or 0, spec.v_head_dim or 0
    hqk, n, tok = nope + rope, dm.n, dm.seq_tokens
    latent = 0
    for rank in (spec.q_lora_rank, spec.kv_lora_rank):
        if rank:
            latent += norm_bytes(spec, tokens=tok, width=rank, bits=dm.bits, counting=counting)
            latent += t.tensor_bytes(count=tok * rank, bits=dm.bits)
    if dm.bits == t.FP32_BITS and not counting.paper:  # no upcast copy: kv_a_layernorm saves a view of
        latent += t.tensor_bytes(count=tok * rope, bits=dm.bits)  # kv_a_proj's whole (R_kv + rope) output
    terms = [Term("attention/latent", latent)]
    impl = attention_impl(spec, cfg)
    if impl == "eager":
        return terms + _eager(spec, cfg, dm, counting, hqk, hv)
    if impl == "sdpa" and counting.cpu:  # q/k and v head dims differ: no CPU fused kernel, the fp32 math path
        math = t.math_attention_bytes(b=dm.b, s=dm.s, n=n, h=hqk, hv=hv, bits=dm.bits)
        scores = t.tensor_bytes(count=dm.b * n * dm.s * dm.s, bits=t.FP32_BITS)
        return [*terms, Term("attention/qkv", math - scores), Term("attention/scores", scores, core=True)]
    if impl == "flash":
        o_in = t.tensor_bytes(count=dm.tokens * n * hv, bits=dm.bits)
        fused = _fused(dm, counting, q=n * hqk, kv=2 * n * hqk, out=n * hqk)
        return [*terms, Term(fused.name, fused.bytes + o_in)]
    return [*terms, _fused(dm, counting, q=n * hqk, kv=n * hqk + n * (nope + hv), out=n * hv)]


def attention_terms(spec: ModelSpec, layer: Layer, cfg: JobConfig, dm: Dims, counting: Counting) -> list[Term]:
    """Saved tensors of the attention sub-block (its input is counted with the norms)."""
    if spec.is_mla:
        return _mla_attention(spec, cfg, dm, counting)
    return _qk_norm_terms(spec, dm, counting) + _standard_attention(spec, layer, cfg, dm, counting)


def _act_saved(spec: ModelSpec, counting: Counting) -> int:
    if counting.paper:
        return 1  # Korthikanti et al. 2022 count a GeLU's input (8sbh) and output (8sbh)
    return ACT_SAVED.get(spec.hidden_act, 1)


def _moe_terms(spec: ModelSpec, layer: Layer, dm: Dims, counting: Counting) -> list[Term]:
    """Router, routed experts (top-k copies of each token) and DeepSeek's shared experts."""
    experts, top_k = spec.num_experts or 0, layer.experts_per_token or spec.num_experts_per_tok or 0
    ffn = ceil_div(spec.moe_intermediate_size or spec.intermediate_size or 0, dm.tp)
    fam = spec.family
    router = t.moe_router_bytes(tokens=dm.seq_tokens, experts=experts, top_k=top_k, normalized=True)
    if fam is Family.DEEPSEEK:  # fp32 copy of the router input; bool mask of group-limited routing
        if dm.bits != t.FP32_BITS:
            router += t.tensor_bytes(count=dm.seq_tokens * dm.d, bits=t.FP32_BITS)
        router += t.tensor_bytes(count=dm.seq_tokens * experts, bits=t.BOOL_BITS)
    weight_bits = t.FP32_BITS if fam in _MOE_WEIGHTS_FP32 else dm.bits
    routed = t.moe_experts_bytes(pairs=dm.seq_tokens * top_k, hidden=dm.d, ffn=ffn, experts=experts,
                                 bits=dm.bits, weight_bits=weight_bits)
    terms = [Term("moe/router", 0 if counting.paper else router), Term("moe/experts", routed)]
    if spec.n_shared_experts:
        full = spec.shared_expert_intermediate_size or (
            (spec.moe_intermediate_size or spec.intermediate_size or 0) * spec.n_shared_experts)
        shared = ceil_div(full, dm.tp)
        terms.append(Term("moe/shared", t.mlp_bytes(tokens=dm.tokens, ffn=shared, bits=dm.bits, gated=True,
                                                    act_saved=_act_saved(spec, counting))))
    return terms


def mlp_terms(spec: ModelSpec, layer: Layer, dm: Dims, counting: Counting) -> list[Term]:
    """The MLP's (or MoE's) saved tensors after its input."""
    if layer.moe:
        return _moe_terms(spec, layer, dm, counting)
    gated = spec.mlp_gated and spec.family not in (Family.GPT2, Family.OPT, Family.FALCON)
    return [Term("mlp", t.mlp_bytes(tokens=dm.tokens, ffn=dm.f, bits=dm.bits, gated=gated,
                                    act_saved=_act_saved(spec, counting)))]


def dropout_terms(spec: ModelSpec, cfg: JobConfig, dm: Dims, counting: Counting) -> list[Term]:
    """Hidden-wide dropout masks of the block (attention-probability dropout is in the scores)."""
    sites = _HIDDEN_DROPOUTS.get(spec.family, 0) if cfg.dropout else 0
    if not sites:
        return []
    return [Term("dropout", sites * t.dropout_bytes(count=dm.seq_tokens * dm.d, mask_bits=counting.mask_bits))]


def block_terms(spec: ModelSpec, layer: Layer, cfg: JobConfig, counting: Counting = CUDA) -> list[Term]:
    """Every term one block saves for backward for one micro-batch on one rank (no recompute)."""
    dm = dims(spec, cfg)
    return (_norm_terms(spec, dm, counting) + attention_terms(spec, layer, cfg, dm, counting)
            + mlp_terms(spec, layer, dm, counting) + dropout_terms(spec, cfg, dm, counting))


def block_input_bytes(spec: ModelSpec, cfg: JobConfig) -> int:
    """The block input kept by full recompute: b/8·B·S·D (b/8·B·S·D/t with sequence parallelism).

    Source: Korthikanti et al. 2022 Table 2, "full activation recompute: 2sbh"; PyTorch
    ``torch.utils.checkpoint`` saves the checkpointed function's tensor inputs.
    """
    dm = dims(spec, cfg)
    return t.tensor_bytes(count=dm.seq_tokens * dm.d, bits=dm.bits)
