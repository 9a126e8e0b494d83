"""One transformer block's saved-for-backward bytes, term by term, for each model family.

The block is taken apart the way its Hugging Face module runs (transformers 5.x
``modeling_<family>.py``): norms, the attention input, the attention kernel (here), the MLP or the
mixture of experts and the dropout masks (``activations_ffn``). Each term is a function of
``activations_terms``; these modules only decide, per family and attention kernel, which terms
occur and with which widths. This module also holds the shared records (Counting, Term,
Trainable, Dims).

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
from memplan.memory import hf_legacy, litgpt, sdpa_workspace
from memplan.memory.context_parallel import local_seq_len
from memplan.units import ceil_div

COMPUTE_BITS_16 = 16
"""Activations of 16-bit, fp8 and weight-quantized jobs are bf16/fp16: quantized weights are
dequantized to the 16-bit compute dtype (bitsandbytes, QLoRA Sec. 3); fp8 recipes compute in bf16 between their
GEMMs, and what TransformerEngine saves in fp8 (Linear inputs) is ``memory.te_fp8``'s difference to these terms."""

_NO_SOFTMAX_UPCAST = frozenset({Family.GPT2, Family.FALCON})
"""Eager attention softmax in the dtype (transformers GPT-2, Falcon); the others use dtype=float32."""
GEMMA_RMS_NORM = frozenset({Family.GEMMA, Family.GEMMA2, Family.GEMMA3})
"""``GemmaRMSNorm`` / ``Gemma2RMSNorm`` / ``Gemma3RMSNorm``: normalized in fp32 and scaled by ``1 + weight``
(transformers ``modeling_gemma*.py``), see ``activations_terms.gemma_rms_norm_bytes``."""
FOUR_NORMS = frozenset({Family.GEMMA2, Family.GEMMA3})
"""Blocks with pre- and post-norms around attention and MLP (``Gemma3DecoderLayer``)."""
BLOCK_INPUT_NORMS = {Family.GPT_NEOX: 2}
"""Norms reading the block input of a parallel block where ``ModelSpec.parallel_norms`` does not say it:
GPT-NeoX keeps both of its LayerNorms on the input with ``use_parallel_residual``."""
_V_VIEW_OF_FUSED = frozenset({Family.PHI3, Family.GPT_NEOX})
"""SDPA's v is a view of the fused projection's output (Phi-3 ``qkv_proj``, GPT-NeoX ``query_key_value``),
so that whole (N + 2K)-head tensor stays alive; q and k are new tensors after rotary."""
EAGER_QK_FP32 = frozenset({Family.GPTJ})
"""Eager attention that upcasts q and k before ``q @ k.T`` (``GPTJAttention._attn``: ``query.to(torch.float32)``)."""
QK_NORM_ALL_HEADS = frozenset({Family.OLMO2})
POST_NORMS_ONLY = frozenset({Family.OLMO2})
"""No norm on the block input: both norms read sublayer outputs (``Olmo2DecoderLayer``: post_attention_layernorm,
post_feedforward_layernorm)."""
"""q/k norms over all heads at once, one row per token (``Olmo2Attention``: ``RMSNorm(N·H)``), not per head."""
_Q_HEAD_MAJOR = frozenset({Family.PHI3, Family.FALCON})
"""Families whose q reaches attention contiguous as (B, N, S, H) (Phi-3's partial-rotary ``cat``, Falcon's
``reshape``), so a flash kernel's output (laid out like q: ``empty_like(q)``) needs a contiguous copy
for o_proj; elsewhere q keeps the projection's (B, S, N, H) layout and the output is o_proj's input."""
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
class Trainable:
    """Which weights of a block receive gradients. PyTorch saves a linear layer's input only for its
    weight's gradient, and a norm's normalized tensor only for its weight's, so frozen weights (LoRA,
    QLoRA) save less. ``dense``/``routed``: trained abstract projections (q, k, v, o, gate, up, down,
    ``router``) of ordinary and of routed-expert linears, None for all; ``adapters``: (in_features
    of a separate input copy, 0 when lora_A reads the base input itself; rank) per LoRA module on an
    ordinary linear, in ``adapter_bits``; ``merged_weight_bytes``: weights that adapters on MoE
    parameters materialize each forward (W + B·A) and autograd saves.
    """

    norms: bool = True
    dense: frozenset[str] | None = None
    routed: frozenset[str] | None = None
    adapters: tuple[tuple[int, int], ...] = ()
    adapter_bits: int = 16
    merged_weight_bytes: int = 0
    adapter_mask_width: int = 0
    """Elements per token of the LoRA dropout masks (Σ in_features over the adapted modules; 0 without dropout)."""
    input_grad: bool = True
    """Whether the block input requires grad: False for the first block of a LoRA job over a frozen embedding
    (``activations_lora.block_trainable``), where what reads it through frozen weights saves nothing."""
    adapted: frozenset[str] = frozenset()
    """Projections of ordinary linears that carry a LoRA adapter (their output requires grad)."""

    def trains(self, *projections: str) -> bool:
        return self.dense is None or bool(self.dense.intersection(projections))

    def routed_trains(self, *projections: str) -> bool:
        return self.routed is None or bool(self.routed.intersection(projections))

    def grad_path(self, *projections: str) -> bool:
        """Whether the outputs of these projections require grad: always, unless the block input does not
        and none of them trains or carries an adapter (then autograd saves nothing downstream of them)."""
        return self.input_grad or self.trains(*projections) or bool(self.adapted.intersection(projections))


ALL_TRAIN = Trainable()
"""Full fine-tuning, pre-training, GaLore: every weight trains."""


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
    b, s, tp = cfg.micro_batch, local_seq_len(cfg), cfg.tp  # s/cp with context parallelism
    seq = b * ceil_div(s, tp) if cfg.sequence_parallel else b * s
    return Dims(b=b, s=s, tokens=b * s, seq_tokens=seq, d=spec.hidden_size or 0,
                n=ceil_div(spec.num_attention_heads or 1, tp), k=ceil_div(spec.kv_heads, tp),
                h=spec.dim_per_head, f=ceil_div(spec.intermediate_size or 4 * (spec.hidden_size or 0), tp),
                tp=tp, bits=activation_bits(cfg))


def cohere_layer_norm_bytes(*, tokens: int, width: int, weight_trains: bool = True) -> int:
    """Bytes ``CohereLayerNorm`` saves: tokens·(2·4·width + 4 [+ 4·width]) + 4·width.

    Formula: ``x − mean`` is computed twice in fp32 (once under ``pow(2)``, once for the normalization),
    each saved; the fp32 rstd per row; the fp32 copy of the weight; and, when the weight trains, the fp32
    normalized tensor it multiplies. Source: transformers ``CohereLayerNorm.forward`` (``modeling_cohere.py``).
    """
    fp32_row = t.tensor_bytes(count=tokens * width, bits=t.FP32_BITS)
    total = 2 * fp32_row + t.tensor_bytes(count=tokens, bits=t.FP32_BITS) + t.tensor_bytes(count=width,
                                                                                            bits=t.FP32_BITS)
    return total + (fp32_row if weight_trains else 0)


def falcon_broadcasts_kv(spec: ModelSpec) -> bool:
    """Falcon's new decoder architecture (1 < K < N): ``_split_heads`` broadcasts k and v to all N heads and
    flattens q, k, v into (B, S, N, H) copies (transformers ``FalconAttention``)."""
    return spec.family is Family.FALCON and 1 < spec.kv_heads < (spec.num_attention_heads or 1)


def norm_bytes(spec: ModelSpec, *, tokens: int, width: int, bits: int, counting: Counting,
               weight_trains: bool = True) -> int:
    """One norm of the family (Gemma-2 RMSNorm, RMSNorm or LayerNorm); the paper counts its input."""
    if counting.paper:
        return t.tensor_bytes(count=tokens * width, bits=bits)
    if spec.family in GEMMA_RMS_NORM:
        return t.gemma_rms_norm_bytes(tokens=tokens, width=width, weight_trains=weight_trains)
    if spec.family is Family.COHERE:
        return cohere_layer_norm_bytes(tokens=tokens, width=width, weight_trains=weight_trains)
    if spec.family is Family.OLMO2:  # (weight * x_normed).to(dtype): the fp32 normalized tensor, no 1 + w vector
        vector = t.tensor_bytes(count=width, bits=t.FP32_BITS)
        return t.gemma_rms_norm_bytes(tokens=tokens, width=width, weight_trains=weight_trains) - vector
    if spec.norm == "layernorm":
        return t.layer_norm_bytes(tokens=tokens, width=width, bits=bits, stats_bits=counting.stats_bits)
    return t.rms_norm_bytes(tokens=tokens, width=width, bits=bits, weight_trains=weight_trains)


NO_SDPA = {Family.GEMMA2: "Gemma-2's soft-capping", Family.GPTJ: "GPT-J", Family.BLOOM: "BLOOM's ALiBi"}
"""Families transformers runs eagerly when SDPA is asked for (it refuses ``attn_implementation="sdpa"``:
``GPTJForCausalLM`` / ``BloomForCausalLM`` have no SDPA path, Gemma-2 none with soft-capping)."""


def attention_impl(spec: ModelSpec, cfg: JobConfig) -> str:
    """The kernel HF runs: eager instead of SDPA for the families in NO_SDPA."""
    impl = cfg.attention_impl
    return "eager" if impl == "sdpa" and spec.family in NO_SDPA else impl


def _parallel_norms(spec: ModelSpec, dm: Dims, one: int, hidden: int, tr: Trainable) -> Term:
    """Parallel blocks: every norm reads the block input, which a LayerNorm saves once for all of them
    (one storage); one norm's output feeds attention and MLP, two norms' outputs feed one each.

    Sources: ``GPTNeoXLayer`` (input_layernorm and post_attention_layernorm both on the block input with
    ``use_parallel_residual``), ``FalconDecoderLayer`` (ln_attn/ln_mlp, or input_layernorm), ``GPTJBlock``
    ``ln_1``, ``PhiDecoderLayer`` / ``StableLmDecoderLayer`` / ``CohereDecoderLayer`` ``input_layernorm``.
    """
    count = BLOCK_INPUT_NORMS.get(spec.family, spec.parallel_norms)
    shared = t.tensor_bytes(count=dm.seq_tokens * dm.d, bits=dm.bits) if spec.norm == "layernorm" else 0
    total = one + (count - 1) * (one - min(shared, one)) if tr.input_grad else 0
    if count == 1:
        return Term("norms", total + (hidden if tr.trains("q", "k", "v", "up", "gate") else 0))
    attn_in = hidden if tr.trains("q", "k", "v") else 0
    return Term("norms", total + attn_in + (hidden if tr.trains("up", "gate") else 0))


def norm_terms(spec: ModelSpec, layer: Layer, dm: Dims, counting: Counting, tr: Trainable) -> list[Term]:
    """Block norms, each with the hidden-wide output its consumers save (attention / MLP input)."""
    one = norm_bytes(spec, tokens=dm.seq_tokens, width=dm.d, bits=dm.bits, counting=counting, weight_trains=tr.norms)
    hidden = t.tensor_bytes(count=dm.seq_tokens * dm.d, bits=dm.bits)
    attn_in = hidden if tr.trains("q", "k", "v") else 0
    if spec.parallel_attn:
        return [_parallel_norms(spec, dm, one, hidden, tr)]
    if layer.moe:  # the router and the shared experts read the norm output; routed experts gather a copy
        mlp_in = hidden if tr.trains("router") or (spec.n_shared_experts and tr.trains("gate", "up")) else 0
    else:
        mlp_in = hidden if tr.trains("gate", "up") else 0
    norms = 4 if spec.family in FOUR_NORMS else 2  # Gemma-2/3's post-norms feed the residual add
    if not tr.input_grad and spec.family not in POST_NORMS_ONLY:
        norms -= 1  # a frozen norm over an input without grad saves nothing
    return [Term("norms", norms * one + attn_in + mlp_in)]


def _qk_norm_terms(spec: ModelSpec, dm: Dims, counting: Counting, tr: Trainable) -> list[Term]:
    if not spec.qk_norm:
        return []
    if spec.family in QK_NORM_ALL_HEADS:
        q_rows, k_rows, q_width, k_width = dm.tokens, dm.tokens, dm.n * dm.h, dm.k * dm.h
    else:
        q_rows, k_rows, q_width, k_width = dm.tokens * dm.n, dm.tokens * dm.k, dm.h, dm.h
    q = norm_bytes(spec, tokens=q_rows, width=q_width, bits=dm.bits, counting=counting, weight_trains=tr.norms)
    k = norm_bytes(spec, tokens=k_rows, width=k_width, bits=dm.bits, counting=counting, weight_trains=tr.norms)
    q, k = (q if tr.grad_path("q") else 0), (k if tr.grad_path("k") else 0)  # an adapter-less path of block 0
    return [Term("attention/qk_norm", q + k)]


def _eager(spec: ModelSpec, cfg: JobConfig, dm: Dims, counting: Counting, tr: Trainable, h: int,
           hv: int) -> list[Term]:
    upcast = spec.family not in _NO_SOFTMAX_UPCAST and not counting.paper
    drop = cfg.dropout and spec.family is not Family.FALCON
    scores = t.eager_scores_bytes(
        b=dm.b, s=dm.s, n=dm.n, bits=dm.bits, softmax_bits=t.FP32_BITS if upcast else dm.bits,
        softcap=spec.family is Family.GEMMA2, mask_bits=counting.mask_bits if drop else None)
    qkvo = t.eager_qkvo_bytes(b=dm.b, s=dm.s, n=dm.n, h=h, hv=hv, bits=dm.bits, o_trains=tr.trains("o"))
    if spec.family in EAGER_QK_FP32 and not counting.paper:  # q and k saved as fp32 copies, not in the dtype
        qk = dm.tokens * (dm.n + dm.k) * h
        qkvo += t.tensor_bytes(count=qk, bits=t.FP32_BITS) - t.tensor_bytes(count=qk, bits=dm.bits)
    return [Term("attention/qkv", qkvo), Term("attention/scores", scores, core=True)]


def _fused(dm: Dims, counting: Counting, *, q: int, kv: int, out: int) -> Term:
    """A flash/SDPA kernel's saved tensors; the paper accounting has no logsumexp."""
    total = t.flash_attention_bytes(tokens=dm.tokens, heads=dm.n, q_width=q, kv_width=kv, out_width=out,
                                    bits=dm.bits)
    if counting.paper:
        total -= t.tensor_bytes(count=dm.tokens * dm.n, bits=t.FP32_BITS)
    return Term("attention/qkv", total)


def _math(dm: Dims, tr: Trainable, h: int, hv: int) -> list[Term]:
    """ATen's fp32 math SDPA path: upcast q, k, v and scores; the o_proj input copy if o trains."""
    math = t.math_attention_bytes(b=dm.b, s=dm.s, n=dm.n, h=h, hv=hv, bits=dm.bits)
    scores = t.tensor_bytes(count=dm.b * dm.n * dm.s * dm.s, bits=t.FP32_BITS)
    o_copy = 0 if tr.trains("o") else t.tensor_bytes(count=dm.tokens * dm.n * hv, bits=dm.bits)
    return [Term("attention/qkv", math - scores - o_copy), Term("attention/scores", scores, core=True)]


def sdpa_mask_materialized(spec: ModelSpec, layer: Layer, impl: str, s: int) -> bool:
    """SDPA gets an explicit mask (so no is_causal, no GQA) on sliding layers whose window is shorter than
    S, and always in Falcon (``create_causal_mask(..., allow_is_causal_skip=False)`` for ALiBi)."""
    window = spec.sliding_window
    if impl == "sdpa" and spec.family is Family.FALCON:
        return True
    return impl == "sdpa" and layer.sliding and window is not None and window < s


def _standard_attention(spec: ModelSpec, layer: Layer, cfg: JobConfig, dm: Dims, counting: Counting,
                        tr: Trainable) -> list[Term]:
    impl = attention_impl(spec, cfg)
    n, k, h = dm.n, dm.k, dm.h
    if litgpt.applies(cfg):  # litgpt's own CausalSelfAttention (memory.litgpt), SDPA always
        return [Term(name, value) for name, value in litgpt.attention_terms(
            tokens=dm.tokens, n=n, k=k, h=h, bits=dm.bits, o_saves_input=tr.trains("o"))]
    if impl == "eager":
        return _eager(spec, cfg, dm, counting, tr, h, h)
    if impl == "sdpa" and spec.family is Family.FALCON and spec.kv_heads == 1 < (spec.num_attention_heads or 1):
        # multi-query k of one head without enable_gqa: no fused kernel, ATen's fp32 math path (the new
        # decoder architecture broadcasts k and v to all N heads first: ``FalconAttention._split_heads``)
        return _math(dm, tr, h, h)
    terms = []
    legacy = hf_legacy.explicit_mask(spec, cfg, impl)  # transformers 4.38-4.39 LlamaModel: always a mask
    masked = legacy or sdpa_mask_materialized(spec, layer, impl, dm.s)
    # repeat_kv copies k and v to N heads when SDPA cannot use enable_gqa (and always in transformers 4.37-4.40)
    kv_heads = n if masked or hf_legacy.repeats_kv(cfg, impl) else k
    if spec.family is Family.GPT2:  # q, k, v are views of c_attn's output, which stays alive whole
        terms.append(_fused(dm, counting, q=0, kv=3 * n * h, out=n * h))
    elif spec.family in _V_VIEW_OF_FUSED and not (masked and k < n):  # v is a view of the fused projection
        terms.append(_fused(dm, counting, q=n * h, kv=k * h + (n + 2 * k) * h, out=n * h))
    else:
        terms.append(_fused(dm, counting, q=n * h, kv=2 * kv_heads * h, out=n * h))
    # CUDA's memory-efficient SDPA kernel (fp32, or an explicit mask) always writes (B, S, N, H)
    efficient = impl == "sdpa" and not counting.cpu and (dm.bits == t.FP32_BITS or masked)
    # partial rotary concatenates the rotated and passed-through dims into a new (B, N, S, H) q, as Phi-3 does
    head_major = (spec.family in _Q_HEAD_MAJOR or spec.rotary_dim is not None) and not falcon_broadcasts_kv(spec)
    if efficient and not counting.paper:  # its logsumexp is padded to 32 queries (kernel_forward.h kAlignLSE)
        terms.append(Term("attention/lse_padding", sdpa_workspace.lse_padding_bytes(dm.b, n, dm.s)))
    if head_major and not efficient and tr.trains("o"):
        terms.append(Term("attention/o_proj_input", t.tensor_bytes(count=dm.tokens * n * h, bits=dm.bits)))
    if masked and (not legacy or hf_legacy.mask_copied_per_layer(spec, cfg, impl)):
        # SDPA converts the bool mask to an additive (B, 1, S, S) tensor per call and saves it (4.38: the
        # layer's advanced-indexing slice of the model's mask, a copy)
        terms.append(Term("attention/mask", t.tensor_bytes(count=dm.b * dm.s * dm.s, bits=dm.bits), core=True))
    return terms


def _mla_attention(spec: ModelSpec, cfg: JobConfig, dm: Dims, counting: Counting, tr: Trainable) -> list[Term]:
    """DeepSeek multi-head latent attention: low-rank q and kv paths, then per-head attention.

    q/k heads are nope + rope wide, v heads v_head_dim; the latent norms' outputs feed q_b / kv_b.
    Source: transformers ``DeepseekV3Attention.forward`` / ``expand_kv``; flash pads v to the q width
    (``integrations/flash_attention.py``); SDPA keeps the kv_b output alive through the v view.
    """
    nope, rope, hv = spec.qk_nope_head_dim or 0, spec.qk_rope_head_dim or 0, spec.v_head_dim or 0
    hqk, n, tok = nope + rope, dm.n, dm.seq_tokens
    latent = 0
    for rank, trains in ((spec.q_lora_rank, tr.trains("q")), (spec.kv_lora_rank, tr.trains("k", "v"))):
        if rank:
            latent += norm_bytes(spec, tokens=tok, width=rank, bits=dm.bits, counting=counting,
                                 weight_trains=tr.norms)
            latent += t.tensor_bytes(count=tok * rank, bits=dm.bits) if trains else 0
    if dm.bits == t.FP32_BITS and not counting.paper:  # no upcast copy: kv_a_layernorm saves a view of
        latent += t.tensor_bytes(count=tok * rope, bits=dm.bits)  # kv_a_proj's whole (R_kv + rope) output
    terms = [Term("attention/latent", latent)]
    impl = attention_impl(spec, cfg)
    if impl == "eager":
        return terms + _eager(spec, cfg, dm, counting, tr, hqk, hv)
    if impl == "sdpa" and counting.cpu:  # q/k and v head dims differ: no CPU fused kernel, the fp32 math path
        return terms + _math(dm, tr, hqk, hv)
    q, kv = mla_qkv_widths(spec, n, impl)
    if impl == "flash":
        o_in = t.tensor_bytes(count=dm.tokens * n * hv, bits=dm.bits) if tr.trains("o") else 0
        fused = _fused(dm, counting, q=q, kv=kv, out=n * hqk)
        return [*terms, Term(fused.name, fused.bytes + o_in)]
    return [*terms, _fused(dm, counting, q=q, kv=kv, out=n * hv)]


def mla_qkv_widths(spec: ModelSpec, n: int, impl: str) -> tuple[int, int]:
    """(q, k + v) elements per token a fused kernel saves for MLA's ``n`` heads: flash pads v to the q/k width;
    SDPA's v is a view that keeps the whole kv_b output (nope + v per head) alive beside k."""
    nope, rope, hv = spec.qk_nope_head_dim or 0, spec.qk_rope_head_dim or 0, spec.v_head_dim or 0
    if impl == "flash":
        return n * (nope + rope), 2 * n * (nope + rope)
    return n * (nope + rope), n * (nope + rope) + n * (nope + hv)


def attention_terms(spec: ModelSpec, layer: Layer, cfg: JobConfig, dm: Dims, counting: Counting,
                    tr: Trainable = ALL_TRAIN) -> list[Term]:
    """Saved tensors of the attention sub-block (its input is counted with the norms)."""
    if spec.is_mla:
        return _mla_attention(spec, cfg, dm, counting, tr)
    return _qk_norm_terms(spec, dm, counting, tr) + _standard_attention(spec, layer, cfg, dm, counting, tr)


def block_input_bytes(spec: ModelSpec, cfg: JobConfig) -> int:
    """The block input kept by full recompute: b/8·B·S·D (b/8·B·S·D/t with sequence parallelism).

    Source: Korthikanti et al. 2022 Table 2, "full activation recompute: 2sbh"; PyTorch
    ``torch.utils.checkpoint`` saves the checkpointed function's tensor inputs.
    """
    dm = dims(spec, cfg)
    return t.tensor_bytes(count=dm.seq_tokens * dm.d, bits=dm.bits)
