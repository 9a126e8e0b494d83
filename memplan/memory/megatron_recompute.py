"""Megatron-Core's selective recompute modules (``--recompute-granularity selective --recompute-modules ...``):
what each module leaves saved in a block, as replacements of the block's terms (``activations_block.Term``).

Source: megatron/core/transformer/transformer_config.py ``recompute_modules`` ("moe_act", "layernorm" and
"mla_up_proj" use output-discarding checkpointing, "core_attn" normal checkpointing; default ``["core_attn"]``);
megatron/core/tensor_parallel/random.py ``CheckpointWithoutOutput``: the function runs without saving, its inputs
are saved, and ``discard_output_and_register_recompute`` frees the output's storage (which the next op saved)
once that op has run, refilling it before the backward reads it. So a module under it keeps its inputs and
drops its output, whoever saved it.

Assumptions: 16-bit activations as the block's other terms (with fp8 training, ``memory.te_fp8`` adds what
TransformerEngine stores differently, given the same modules: what they drop is dropped at any dtype);
balanced routing; "mlp", "moe" and "shared_experts" (whole-submodule checkpoints) are not modelled
(``engines.megatron_rules`` refuses them).
"""

from __future__ import annotations

from memplan.catalog.schema import ModelSpec
from memplan.config import Engine, JobConfig
from memplan.memory import activations_terms as t
from memplan.memory.activations_block import Counting, Dims, Term, norm_bytes
from memplan.units import ceil_div

DEFAULT = ("core_attn",)
"""Megatron-Core's default ``recompute_modules`` (transformer_config.py ``__post_init__``)."""
MODELLED = frozenset({"core_attn", "layernorm", "mla_up_proj", "moe_act"})
"""The modules whose effect on the saved tensors memplan models."""


def modules(cfg: JobConfig) -> frozenset[str] | None:
    """The modules Megatron recomputes in the job's ``selective`` layers, or None on another engine (memplan's
    own selective rule: the S×S core)."""
    if cfg.effective_engine is not Engine.MEGATRON:
        return None
    return frozenset(cfg.engine_config.recompute_modules or DEFAULT)


def separate_norms(spec: ModelSpec, *, moe_layer: bool) -> int:
    """How many of a layer's two norms are modules of their own in Megatron's TransformerEngine layer spec, the
    ones ``layernorm`` can recompute: ``input_layernorm`` when the attention is MLA (its q/kv down-projections
    are plain linears), ``pre_mlp_layernorm`` in an MoE layer (router and experts read it). Elsewhere the norm is
    fused into the next linear (``TELayerNormColumnParallelLinear``) and the slot is an ``IdentityOp``, which
    Megatron skips.

    Source: megatron/core/models/gpt/gpt_layer_specs.py (``get_gpt_layer_with_transformer_engine_spec``: TENorm vs
    IdentityOp); transformer_layer.py (``if not isinstance(self.input_layernorm, IdentityOp)``: only such norms
    get ``recompute_input_layernorm`` / ``recompute_pre_mlp_layernorm``).
    """
    return int(spec.is_mla) + int(moe_layer)


def layernorm_dropped_bytes(*, one_norm: int, separate: int) -> int:
    """Bytes ``layernorm`` removes from a block's norms: per separate norm, what the norm saved (``one_norm``: its
    input, plus its statistics where the accounting counts them) plus its output (saved by the next op), less the
    input the checkpoint keeps (the block input or the residual after attention, as large as the output).

    Formula: separate · one_norm. Source: transformer_layer.py (``CheckpointWithoutOutput`` around each separate
    norm, its output discarded after the attention / MLP forward); DeepSeek-AI 2024, Sec. 3.2.3 ("we recompute all
    RMSNorm operations ... eliminating the need to persistently store their output activations").
    """
    return separate * one_norm


def mla_up_proj_dropped_bytes(*, tokens: int, qkv_width: int, rows: int, rope_dim: int, bits: int,
                              latent_width: int = 0) -> int:
    """Bytes an MLA block no longer keeps when its up-projections are recomputed (negative: kept more).

    ``qkv_up_proj_and_rope_apply(q_compressed, kv_compressed, k_pos_emb, ...)`` runs under
    ``CheckpointWithoutOutput``; after the core attention its q, k, v storage is discarded, so the attention
    kernel keeps only its output (and logsumexp) and ``linear_proj`` its input. The latent norms run inside it too:
    in the TransformerEngine layer spec ``q_layernorm``/``kv_layernorm`` are ``IdentityOp`` and the up-projections
    are ``TELayerNormColumnParallelLinear`` (gpt_layer_specs.py, MLA with qk_layernorm), so their normed outputs
    (``ln_out``, R_q + R_kv = ``latent_width`` per row) are not kept. The checkpoint keeps its inputs: the un-normed
    latents (counted as the latent norms' inputs) and the un-roped ``k_pos_emb`` (H_rope per row).
    Formula: b/8·tokens·(q + k + v widths, as the kernel saved them) + b/8·rows·(R_q + R_kv) − b/8·rows·H_rope.
    Source: megatron/core/transformer/multi_latent_attention.py (``recompute_up_proj``, ``qkv_up_checkpoint``,
    ``discard_output_and_register_recompute``); DeepSeek-AI 2024, Sec. 3.2.3 ("Recomputation of RMSNorm and MLA
    Up-Projection").
    """
    kept = t.tensor_bytes(count=rows * rope_dim, bits=bits)
    return (t.tensor_bytes(count=tokens * qkv_width, bits=bits) + t.tensor_bytes(count=rows * latent_width, bits=bits)
            - kept)


def moe_act_dropped_bytes(*, pairs: int, ffn: int, bits: int) -> int:
    """Bytes the routed experts no longer keep with ``moe_act``: the fused SwiGLU's output (fc2's input, F per
    (token, expert) pair); its 2F input stays as the checkpoint's input.

    Formula: b/8 · pairs · F, pairs = tokens·k. Source: megatron/core/transformer/moe/experts.py
    (``activation_recompute``: ``CheckpointWithoutOutput`` around the activation, output discarded after fc2's
    forward); DeepSeek-AI 2024, Sec. 3.3.3 ("we cache the inputs of the SwiGLU operator and recompute its output").
    """
    return t.tensor_bytes(count=pairs * ffn, bits=bits)


def apply(spec: ModelSpec, dm: Dims, counting: Counting, terms: list[Term], mods: frozenset[str], *,
          moe_layer: bool, pairs: int, expert_ffn: int, down_trains: bool,
          mla_widths: tuple[int, int] | None) -> list[Term]:
    """The block's terms under Megatron's recompute ``mods`` (``core`` terms dropped only with core_attn);
    ``mla_widths``: (q, k + v) per token of a fused MLA kernel (``activations_block.mla_qkv_widths``), None on the
    eager/math paths, whose terms are left whole (an over-count)."""
    out = []
    for term in terms:
        if term.core and "core_attn" in mods:
            continue
        if term.name == "norms" and "layernorm" in mods:
            one = norm_bytes(spec, tokens=dm.seq_tokens, width=dm.d, bits=dm.bits, counting=counting)
            term = Term("norms", term.bytes - layernorm_dropped_bytes(
                one_norm=one, separate=separate_norms(spec, moe_layer=moe_layer)))
        elif spec.is_mla and "mla_up_proj" in mods and term.name == "attention/qkv" and mla_widths is not None:
            term = Term(term.name, term.bytes - mla_up_proj_dropped_bytes(
                tokens=dm.tokens, qkv_width=sum(mla_widths), rows=dm.seq_tokens, rope_dim=spec.qk_rope_head_dim or 0,
                bits=dm.bits, latent_width=(spec.q_lora_rank or 0) + (spec.kv_lora_rank or 0)))
        elif term.name == "moe/experts" and "moe_act" in mods and down_trains:
            term = Term(term.name, term.bytes - moe_act_dropped_bytes(pairs=pairs, ffn=expert_ffn, bits=dm.bits))
        out.append(term)
    return out


def mla_up_proj_weight_numel(spec: ModelSpec, tp: int = 1) -> int:
    """Weight elements (per tensor-parallel rank) of MLA's two up-projections, recomputed with ``mla_up_proj``:
    q_b (R_q → N·(d_nope + d_rope)) and kv_b (R_kv → N·(d_nope + d_v)), the heads split over tp.

    Source: DeepSeek-AI 2024, Sec. 2.1.1 (Eq. 1-9: W^{UQ}, W^{QR}, W^{UK}, W^{UV}); multi_latent_attention.py
    (``linear_q_up_proj``, ``linear_kv_up_proj``, column-parallel)."""
    if not spec.is_mla:
        return 0
    heads = ceil_div(spec.num_attention_heads or 0, tp)
    nope, rope, v = spec.qk_nope_head_dim or 0, spec.qk_rope_head_dim or 0, spec.v_head_dim or 0
    return (spec.q_lora_rank or spec.hidden_size or 0) * heads * (nope + rope) + (spec.kv_lora_rank or 0) * heads * (nope + v)


def recompute_flops(spec: ModelSpec, *, tokens: int, core_flops: float, mods: frozenset[str], tp: int) -> float:
    """FLOPs one layer's Megatron recompute modules add over ``tokens`` (per tensor-parallel rank, as
    ``core_flops``, the attention core's): the core again with core_attn, the MLA up-projections' GEMMs with
    mla_up_proj (2 FLOPs per weight element and token). layernorm and moe_act rerun elementwise ops (memory-bound),
    left out as the op-level policy's elementwise ops are (``planner.steptime.recompute_seconds``)."""
    flops = core_flops if "core_attn" in mods else 0.0
    if "mla_up_proj" in mods:
        flops += 2.0 * tokens * mla_up_proj_weight_numel(spec, tp)
    return flops
