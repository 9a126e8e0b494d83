"""One inference step's per-layer stages: the attention and MLP workspace of one decoder layer on one GPU, for a
fused serving engine or transformers' own forward (``hf_prefill``'s extra transients), and PyTorch's CPU kernels
(``cpu_flash``) for the measured tiny models. Split out of ``memory.inference``, which re-exports every name.
"""

from __future__ import annotations

from dataclasses import dataclass

from memplan.arch.tensors import Layer
from memplan.catalog.schema import Family, ModelSpec
from memplan.memory import hf_masks
from memplan.memory import hf_prefill as hf
from memplan.memory.activations_block import attention_impl, sdpa_mask_materialized
from memplan.memory.context import Context
from memplan.memory.cpu_flash import CpuKernels, cpu_flash_bytes
from memplan.memory.inference_terms import (
    attention_workspace_bytes,
    kv_concat_bytes,
    mla_workspace_bytes,
    mlp_workspace_bytes,
    moe_workspace_bytes,
    scores_bytes,
)
from memplan.memory.kv_cache import cached_shapes, elements_per_token, expands_kv, hf_cache_layout
from memplan.units import bits_to_bytes, ceil_div


@dataclass(frozen=True)
class _Step:
    """One prefill step on one GPU: B sequences of T new tokens, S_kv keys, widths in bits, tp degree."""

    batch: int
    tokens: int
    kv_tokens: int
    bits: int
    kv_bits: int
    tp: int
    hf: bool = False
    """transformers' own forward (``hf_prefill``'s extra transients), not a fused serving engine."""
    eager: bool = False
    """transformers runs eager attention (``activations_block.attention_impl``): it returns its probabilities."""
    dtype: str = ""
    """The compute dtype's name (``Dtype.value``), for the CPU kernels' packing rules."""
    cpu: CpuKernels | None = None
    """PyTorch's CPU kernels on this host (the measured tiny models): SDPA runs the CPU flash kernel
    (``cpu_flash``), or its math path where no CPU kernel fits."""


def _hf_mlp_extra(spec: ModelSpec, step: _Step, ffn: int) -> int:
    """transformers' MLP-stage extras: Python activation temporaries, the kept attention output and probabilities."""
    b, t, d, bits = step.batch, step.tokens, spec.hidden_size or 0, step.bits
    heads = ceil_div(spec.num_attention_heads or 1, step.tp)
    return (bits_to_bytes(b * t * ffn * hf.activation_extra(spec.hidden_act), bits)
            + hf.mlp_residual_bytes(batch=b, tokens=t, hidden=d, bits=bits, parallel=spec.parallel_attn)
            + hf.kept_normed_input_bytes(batch=b, tokens=t, hidden=d, bits=bits, family=spec.family,
                                         parallel=spec.parallel_attn)
            + hf.kept_attn_output_bytes(batch=b, tokens=t, hidden=d, bits=bits, family=spec.family,
                                        parallel_norms=spec.parallel_norms if spec.parallel_attn else 1)
            + (hf.kept_probs_bytes(batch=b, heads=heads, tokens=t, kv_tokens=step.kv_tokens, bits=bits,
                                   family=spec.family, own=True) if step.eager else 0))


def _hf_moe_bytes(spec: ModelSpec, step: _Step, expert_ffn: int, shared_ffn: int) -> int:
    """transformers' grouped-mm experts, with the shared expert's output (M·D) alive while they run."""
    b, t, d, bits = step.batch, step.tokens, spec.hidden_size or 0, step.bits
    routed = hf.grouped_moe_bytes(batch=b, tokens=t, experts=spec.num_experts or 0, hidden=d, bits=bits,
                                  experts_per_token=spec.num_experts_per_tok or 0, expert_ffn=expert_ffn)
    residual = hf.mlp_residual_bytes(batch=b, tokens=t, hidden=d, bits=bits, parallel=spec.parallel_attn)
    if not shared_ffn:
        return routed + residual
    shared = mlp_workspace_bytes(batch=b, tokens=t, ffn=ceil_div(shared_ffn, step.tp), hidden=d, bits=bits,
                                 gated=spec.mlp_gated)
    return max(routed + bits_to_bytes(b * t * d, bits), shared) + residual


def _mlp_bytes(spec: ModelSpec, layer: Layer, step: _Step) -> int:
    b, t, d, bits, tp = step.batch, step.tokens, spec.hidden_size or 0, step.bits, step.tp
    if layer.moe:
        expert_ffn = ceil_div(spec.moe_intermediate_size or spec.intermediate_size or 0, tp)
        shared_ffn = spec.shared_expert_intermediate_size or spec.n_shared_experts * (spec.moe_intermediate_size or 0)
        if step.hf:
            return _hf_moe_bytes(spec, step, expert_ffn, shared_ffn)
        routed = moe_workspace_bytes(batch=b, tokens=t, experts=spec.num_experts or 0, hidden=d, bits=bits,
                                     experts_per_token=spec.num_experts_per_tok or 0, expert_ffn=expert_ffn)
        shared = mlp_workspace_bytes(batch=b, tokens=t, ffn=ceil_div(shared_ffn, tp), hidden=d, bits=bits,
                                     gated=spec.mlp_gated) if shared_ffn else 0
        return max(routed, shared)
    ffn = ceil_div(spec.intermediate_size or 4 * d, tp)
    out = mlp_workspace_bytes(batch=b, tokens=t, ffn=ffn, hidden=d, bits=bits, gated=spec.mlp_gated,
                              fused_gate_up=spec.family is Family.PHI3)
    return out + (_hf_mlp_extra(spec, step, ffn) if step.hf else 0)


def _hf_attention_max(ctx: Context, step: _Step) -> int:
    """transformers' attention stage, the larger over the stage's layers with and without a materialised SDPA mask
    (``sdpa_mask_materialized``: the masked ones add ``repeat_kv``'s copies and the additive mask).

    Layers of a kind that is only the model's first layer hold one hidden-wide tensor less than the stream row counts:
    their input is ``inputs_embeds`` itself (``LlamaModel.forward``: ``hidden_states = inputs_embeds``), which
    ``hf_prefill.stream_bytes`` counts as a second tensor for the later layers."""
    spec = ctx.arch.spec
    impl = attention_impl(spec, ctx.cfg)
    kinds: dict[bool, list[int]] = {}
    for index, layer in ctx.layers:
        kinds.setdefault(sdpa_mask_materialized(spec, layer, impl, step.kv_tokens), []).append(index)
    embeds = bits_to_bytes(step.batch * step.tokens * (spec.hidden_size or 0), step.bits)
    first_only = ctx.stage == 0 and len(ctx.layers) > 1
    return max(_attention_bytes(ctx, step, masked=masked) - (embeds if first_only and indices == [0] else 0)
               for masked, indices in kinds.items())


def _attention_bytes(ctx: Context, step: _Step, masked: bool | None = None) -> int:
    """One layer's attention stage; ``masked``: whether SDPA gets a materialised mask (None: any of the stage's
    layers does)."""
    spec, cfg = ctx.arch.spec, ctx.cfg
    heads, d = ceil_div(spec.num_attention_heads or 1, step.tp), spec.hidden_size or 0
    impl = attention_impl(spec, cfg) if step.hf else cfg.attention_impl
    flash = impl != "eager"  # flash and SDPA's fused kernels keep no S×S score matrix
    if masked is None:
        masked = any(sdpa_mask_materialized(spec, layer, impl, step.kv_tokens) for _, layer in ctx.layers)
    masked = masked and impl == "sdpa"
    if spec.is_mla:
        math = step.cpu is not None and impl == "sdpa"  # no CPU fused kernel takes q/k and v head dims that differ
        out = mla_workspace_bytes(batch=step.batch, tokens=step.tokens, kv_tokens=step.kv_tokens, heads=heads,
                                  qk_nope=spec.qk_nope_head_dim or 0, qk_rope=spec.qk_rope_head_dim or 0,
                                  v_head=spec.v_head_dim or 0, hidden=d, bits=step.bits, flash=flash or math)
        if math:
            out += hf.cpu_math_mla_bytes(batch=step.batch, tokens=step.tokens, kv_tokens=step.kv_tokens, heads=heads,
                                         qk_head=(spec.qk_nope_head_dim or 0) + (spec.qk_rope_head_dim or 0),
                                         v_head=spec.v_head_dim or 0, bits=step.bits, causal=not masked)
    elif step.hf and not flash and spec.family not in hf.UPCAST_QK:
        repeated = heads if expands_kv(spec) else max(1, ceil_div(spec.kv_heads, step.tp))  # Falcon: no repeat_kv
        out = hf.eager_attention_bytes(batch=step.batch, tokens=step.tokens, kv_tokens=step.kv_tokens, heads=heads,
                                       kv_heads=repeated, head_dim=spec.dim_per_head,
                                       hidden=d, bits=step.bits, upcast=spec.family not in hf.SOFTMAX_IN_DTYPE)
        out += hf.partial_rotary_bytes(spec, batch=step.batch, tokens=step.tokens, heads=heads, bits=step.bits,
                                       kv_heads=max(1, ceil_div(spec.kv_heads, step.tp)), head_dim=spec.dim_per_head)
        out += hf.kept_scores_bytes(spec, batch=step.batch, tokens=step.tokens, kv_tokens=step.kv_tokens,
                                    heads=heads, head_dim=spec.dim_per_head, bits=step.bits)
    else:
        kv_heads = max(1, ceil_div(spec.kv_heads, step.tp))
        out = attention_workspace_bytes(batch=step.batch, tokens=step.tokens, kv_tokens=step.kv_tokens, heads=heads,
                                        kv_heads=kv_heads, head_dim=spec.dim_per_head, hidden=d, bits=step.bits,
                                        flash=flash, new_kv=not (step.hf and flash))
        if step.hf and flash:
            out += _hf_sdpa_extra(spec, step, heads, kv_heads, masked=masked)
    kernel = 0
    if step.cpu is not None and impl == "sdpa" and not spec.is_mla:
        kernel = _cpu_flash(spec, step, heads, masked=masked, kernels=step.cpu)
    out += kernel
    if step.hf:
        out += _hf_attention_extra(spec, step, heads, eager=not flash, kernel=kernel)
        if masked:  # the bool mask itself lives through the loop (``hf_masks.loop_mask_bytes``)
            out += hf_masks.additive_mask_bytes(batch=step.batch, tokens=step.tokens, kv_tokens=step.kv_tokens,
                                                bits=step.bits)
    static = cfg.engine is not None and cfg.engine.value == "transformers" and cfg.serve.cache_implementation == "static"
    if not cfg.infer.paged and not static:  # a static cache writes in place (StaticLayer.update, index_copy_)
        shapes = cached_shapes(spec, mla_cache=cfg.infer.mla_cache, tp=step.tp, hf=hf_cache_layout(cfg))
        out += kv_concat_bytes(batch=step.batch, old_tokens=step.kv_tokens - step.tokens,
                               elements=elements_per_token(shapes), bits=step.kv_bits)
    return out


def _hf_sdpa_extra(spec: ModelSpec, step: _Step, heads: int, kv_heads: int, *, masked: bool) -> int:
    """transformers' SDPA-path extras: ``repeat_kv``'s copies of k and v at N heads where a materialised mask stops
    SDPA's ``enable_gqa`` (2·B·N·S·H, ``integrations/sdpa_attention.py`` ``use_gqa_in_sdpa``: a mask means no GQA on
    CUDA and CPU), and partial rotary's copies (``hf_prefill.partial_rotary_bytes``)."""
    b, t, s, h, bits = step.batch, step.tokens, step.kv_tokens, spec.dim_per_head, step.bits
    out = bits_to_bytes(2 * b * heads * s * h, bits) if masked and kv_heads < heads and not expands_kv(spec) else 0
    return out + hf.partial_rotary_bytes(spec, batch=b, tokens=t, heads=heads, kv_heads=kv_heads, head_dim=h,
                                         bits=bits)


def _cpu_flash(spec: ModelSpec, step: _Step, heads: int, *, masked: bool, kernels: CpuKernels) -> int:
    """``cpu_flash.cpu_flash_bytes`` for this layer's SDPA call: with a materialised mask the key/value heads come
    repeated to N (transformers ``repeat_kv``; Falcon expands its own, ``kv_cache.expands_kv``) and the call is not
    causal; without one,
    ``enable_gqa`` passes the K cached heads and ``is_causal`` (``integrations/sdpa_attention.py``)."""
    kv_heads = heads if masked or expands_kv(spec) else max(1, ceil_div(spec.kv_heads, step.tp))
    return cpu_flash_bytes(batch=step.batch, tokens=step.tokens, kv_tokens=step.kv_tokens, heads=heads,
                           kv_heads=kv_heads, head_dim=spec.dim_per_head, bits=step.bits, dtype=step.dtype,
                           kernels=kernels, causal=not masked)


def _hf_shapes(spec: ModelSpec, step: _Step) -> tuple[tuple[int, int], ...]:
    """One layer's cached (heads, dim) tensors in transformers' cache (MLA: its decompressed heads)."""
    return cached_shapes(spec, mla_cache="decompressed", tp=step.tp, hf=True)


def _hf_attention_extra(spec: ModelSpec, step: _Step, heads: int, *, eager: bool, kernel: int = 0) -> int:
    """transformers' attention-stage extras (``hf_prefill``): the previous block's kept probabilities, eager's
    materialised mask, fp32 q/k copies (GPT-J, Cohere's rotary) and GPT-J's fp32 scores in place of the generic ones."""
    b, t, s, bits = step.batch, step.tokens, step.kv_tokens, step.bits
    out = hf.kept_probs_bytes(batch=b, heads=heads, tokens=t, kv_tokens=s, bits=bits, family=spec.family,
                              own=False) if eager else 0
    kv_heads = max(1, ceil_div(spec.kv_heads, step.tp))
    out += hf.fused_qkv_beside_q_bytes(batch=b, tokens=t, heads=heads, kv_heads=kv_heads, head_dim=spec.dim_per_head,
                                       hidden=spec.hidden_size or 0, bits=bits, family=spec.family,
                                       parallel_norms=spec.parallel_norms if spec.parallel_attn else 1)
    # what the stage holds after the rotary copies are freed: the CPU kernel's buffers, and under eager the new k and
    # v (SDPA's count leaves them to the cache row: ``attention_workspace_bytes`` without ``new_kv``)
    later = kernel + (bits_to_bytes(b * t * elements_per_token(_hf_shapes(spec, step)), step.kv_bits) if eager else 0)
    if eager and spec.family in hf.ROPE_FP32:  # the fp32 rotary copies are gone before the scores exist
        later += scores_bytes(batch=b, heads=heads, tokens=t, kv_tokens=s, bits=bits)
    out += hf.upcast_qk_bytes(spec, batch=b, tokens=t, kv_tokens=s, heads=heads, head_dim=spec.dim_per_head,
                              kv_heads=max(1, ceil_div(spec.kv_heads, step.tp)), later_bytes=later)
    if eager:  # the mask itself lives through the loop (``hf_masks.loop_mask_bytes``)
        if spec.is_mla:  # softmax's fp32 copy of its input, beyond scores_bytes' count
            out += bits_to_bytes(b * heads * t * s, hf.eager_softmax_bits(bits, upcast=True)) \
                - scores_bytes(batch=b, heads=heads, tokens=t, kv_tokens=s, bits=bits)
        if spec.family in hf.UPCAST_QK:
            out += (hf.fp32_scores_bytes(batch=b, heads=heads, tokens=t, kv_tokens=s)
                    - scores_bytes(batch=b, heads=heads, tokens=t, kv_tokens=s, bits=bits))
    return out


def _rotary_tables(ctx: Context, batch: int, tokens: int, bits: int) -> int:
    """``hf_prefill.rotary_tables_bytes`` for the stage's layers: none without rotary, two in Gemma-3 with sliding and
    full layers."""
    spec = ctx.arch.spec
    if spec.family in hf.NO_ROTARY or spec.alibi or not ctx.layers:
        return 0
    dims = spec.qk_rope_head_dim if spec.is_mla else spec.rotary_dim or spec.dim_per_head
    kinds = {layer.sliding for _, layer in ctx.layers}
    tables = len(kinds) if spec.family is Family.GEMMA3 else 1
    return hf.rotary_tables_bytes(batch=batch, tokens=tokens, rotary_dims=dims or 0, tables=tables, bits=bits)
