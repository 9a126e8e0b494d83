"""Inference activations and workspace, and the search for the largest context or batch that fits.

Serving engines size this memory by measuring it: vLLM's ``Worker.determine_available_memory``
runs a dummy forward of ``max_num_batched_tokens`` tokens (``profile_run``) and takes the peak;
what is left becomes KV cache. memplan computes the same peak from the shapes: the largest forward
is one prefill step of T = ``prefill_chunk`` tokens (the whole context without chunking), and the
transient peak of one decoder layer is the larger of its attention and its MLP stage. Layers run
one after another, so only one layer's workspace is live at a time; the residual stream is live
throughout. Logits are computed after the last layer, for the last token only (transformers
``generate`` passes ``logits_to_keep=1``; vLLM ``LogitsProcessor`` selects the sampled positions),
or for every token with ``all_logits`` (scoring, perplexity).

Per tensor-parallel rank N, K and F are divided by tp (Megatron-LM Sec. 3); the residual stream and
the gathered logits are whole on every rank (conservative: vLLM gathers logits to one rank).
The rows are summed, which overstates the peak slightly: logits and layer workspace are not live
at the same time.

Per-layer CPU offload (``infer.offload_map``, HF accelerate): see ``offload_rows``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from memplan.arch.tensors import Layer
from memplan.catalog.schema import Family, ModelSpec
from memplan.config import Job
from memplan.errors import MemplanError
from memplan.memory import hf_masks
from memplan.memory import hf_prefill as hf
from memplan.memory.activations_block import attention_impl, sdpa_mask_materialized
from memplan.memory.breakdown import Row, Tier
from memplan.memory.context import Context
from memplan.memory.cpu_flash import CpuKernels, cpu_flash_bytes
from memplan.memory.kv_cache import cached_shapes, compute_dtype, elements_per_token, expands_kv, hf_cache_layout, step_tokens
from memplan.units import bits_to_bytes, ceil_div

RESIDUAL_TENSORS = 2
"""Live across a decoder layer: the residual and the hidden states (transformers ``LlamaDecoderLayer.forward``)."""
GATED_MLP_TENSORS = 3
"""Gated MLP peak: act(gate), up and their product, each B·T·F (transformers ``LlamaMLP.forward``;
vLLM ``MergedColumnParallelLinear`` gate_up (2F) + ``SiluAndMul`` output (F))."""
FUSED_GATED_MLP_TENSORS = 4
"""Fused gate_up projection kept alive while act(gate) and the product exist (transformers ``Phi3MLP``)."""
PLAIN_MLP_TENSORS = 2
"""Ungated MLP (GPT-2, OPT): fc1 output and its activation."""
SOFTMAX_BITS = 32
"""Eager attention runs softmax in fp32 (transformers ``eager_attention_forward``)."""
LOGITS_FP32_BITS = 32
"""Sampling upcasts logits to fp32 (transformers ``generate``: ``.to(dtype=torch.float32)``;
vLLM ``Sampler``: ``logits.to(torch.float32)``), next to the lm_head output in the compute dtype."""
ROUTER_LOGITS_BITS = 32
"""MoE routing probabilities are fp32 (transformers Mixtral router: ``softmax(router_logits, dtype=torch.float)``)."""
EAGER_SCORE_COPIES = 2
"""Eager attention holds two score tensors in the compute dtype at its peak (pre-softmax and cast back)."""


def hidden_states_bytes(*, batch: int, tokens: int, hidden: int, bits: int) -> int:
    """Bytes of the residual stream during one forward: 2·B·T·D × bits/8 (residual + hidden states).

    Source: transformers ``LlamaDecoderLayer.forward`` (``residual = hidden_states`` around each block);
    vLLM's fused add-RMSNorm keeps the same two tensors. Assumption: no sequence parallelism (D whole per rank).
    """
    return bits_to_bytes(RESIDUAL_TENSORS * batch * tokens * hidden, bits)


def scores_bytes(*, batch: int, heads: int, tokens: int, kv_tokens: int, bits: int) -> int:
    """Bytes of eager attention scores: B·N·T·S_kv × (2·bits + 32)/8 (two compute-dtype copies + fp32 softmax).

    Source: transformers ``eager_attention_forward`` (matmul, softmax(dtype=float32), ``.to(query.dtype)``).
    Flash attention and SDPA's memory-efficient kernels never hold these (Dao et al. 2022, Sec. 3).
    """
    return bits_to_bytes(batch * heads * tokens * kv_tokens, EAGER_SCORE_COPIES * bits + SOFTMAX_BITS)


def attention_workspace_bytes(*, batch: int, tokens: int, kv_tokens: int, heads: int, kv_heads: int,
                              head_dim: int, hidden: int, bits: int, flash: bool, new_kv: bool = True) -> int:
    """Peak bytes of one GQA/MQA attention block in a forward of T tokens attending to S_kv keys.

    Formula: B·T·(D + 2·N·H + 2·K·H) × bits/8 (normed input, q, new k and v, output); without flash
    add repeat_kv's 2·B·N·S_kv·H (when N ≠ K) and the eager scores. ``new_kv`` False leaves out the new k and v
    where they already are the cache's tensors (transformers 5.x ``DynamicLayer.update`` returns the concatenated
    cache and the layer rebinds ``key_states, value_states`` to it; measured at the CPU SDPA kernel: only the cache's
    ``cat`` outputs).
    Source: transformers ``LlamaAttention.forward`` / ``repeat_kv``; vLLM ``Attention`` (flash kernels).
    """
    elems = batch * tokens * (hidden + 2 * heads * head_dim + (2 * kv_heads * head_dim if new_kv else 0))
    out = bits_to_bytes(elems, bits)
    if not flash:
        if heads != kv_heads:
            out += bits_to_bytes(2 * batch * heads * kv_tokens * head_dim, bits)
        out += scores_bytes(batch=batch, heads=heads, tokens=tokens, kv_tokens=kv_tokens, bits=bits)
    return out


def mla_workspace_bytes(*, batch: int, tokens: int, kv_tokens: int, heads: int, qk_nope: int, qk_rope: int,
                        v_head: int, hidden: int, bits: int, flash: bool) -> int:
    """Peak bytes of one MLA block: the latent is expanded to per-head K and V for every attended token.

    Formula: B·T·(D + N·(d_nope + d_rope) + N·d_v) + B·S_kv·N·(2·d_nope + d_rope + d_v), × bits/8
    (kv_b_proj output and the assembled keys coexist), plus eager scores without flash.
    Source: transformers 5.x ``DeepseekV3Attention.expand_kv``; DeepSeek-V2 paper Sec. 2.1.2.
    """
    elems = batch * tokens * (hidden + heads * (qk_nope + qk_rope) + heads * v_head)
    elems += batch * kv_tokens * heads * (2 * qk_nope + qk_rope + v_head)
    out = bits_to_bytes(elems, bits)
    if not flash:
        out += scores_bytes(batch=batch, heads=heads, tokens=tokens, kv_tokens=kv_tokens, bits=bits)
    return out


def kv_concat_bytes(*, batch: int, old_tokens: int, elements: int, bits: int) -> int:
    """Bytes of one layer's previous cache, alive while ``torch.cat`` builds the longer one: B·(S − T)·e × bits/8.

    Source: transformers ``DynamicLayer.update`` (``torch.cat([self.keys, key_states])``). Paged caches
    (vLLM) write new tokens in place, so this is 0 for them.
    """
    return bits_to_bytes(batch * old_tokens * elements, bits)


def mlp_workspace_bytes(*, batch: int, tokens: int, ffn: int, hidden: int, bits: int, gated: bool,
                        fused_gate_up: bool = False) -> int:
    """Peak bytes of one dense MLP: B·T·(D + c·F) × bits/8, c = 3 gated, 4 fused gate_up, 2 ungated.

    Source: transformers ``LlamaMLP`` / ``Phi3MLP`` / ``GPT2MLP`` forward; vLLM ``LlamaMLP``.
    """
    copies = FUSED_GATED_MLP_TENSORS if fused_gate_up else GATED_MLP_TENSORS if gated else PLAIN_MLP_TENSORS
    return bits_to_bytes(batch * tokens * (hidden + copies * ffn), bits)


def moe_workspace_bytes(*, batch: int, tokens: int, experts: int, experts_per_token: int, expert_ffn: int,
                        hidden: int, bits: int) -> int:
    """Peak bytes of one routed-expert block (vLLM fused MoE).

    Formula: B·T·(2·D + k·(max(2·F_e, D) + F_e)) × bits/8 + B·T·E × 4 (fp32 router logits).
    Source: vLLM ``fused_moe.TritonExperts.apply``: ``intermediate_cache1`` (M·k·2F_e) and
    ``intermediate_cache3`` (M·k·D) share workspace2, ``intermediate_cache2`` (M·k·F_e) is workspace13.
    Assumption: every token's k experts are computed on this rank (no expert-parallel split).
    """
    m = batch * tokens
    elems = m * (2 * hidden + experts_per_token * (max(2 * expert_ffn, hidden) + expert_ffn))
    return bits_to_bytes(elems, bits) + bits_to_bytes(m * experts, ROUTER_LOGITS_BITS)


def logits_bytes(*, rows: int, vocab: int, bits: int) -> int:
    """Bytes of logits for ``rows`` positions: rows·V × (bits + 32)/8 (lm_head output + fp32 copy).

    rows = B (last token: transformers ``logits_to_keep=1`` in ``generate``) or B·S (``all_logits``).
    Source: transformers ``GenerationMixin._sample`` (fp32 copy of the last position's logits);
    vLLM ``LogitsProcessor`` + ``Sampler``. Assumption: the whole vocabulary on the sampling rank.
    """
    return bits_to_bytes(rows * vocab, bits + LOGITS_FP32_BITS)


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


def rows(ctx: Context, *, cpu: CpuKernels | None = None) -> list[Row]:
    """Inference activation rows: ``activations/hidden_states``, ``activations/prefill_workspace``
    (the largest layer's transient peak) and, on the last pipeline stage, ``activations/logits``.

    Under transformers with its own contiguous cache (``kv_cache.hf_cache_layout``, not ``paged``) the rows add
    its forward's own transients (``hf_prefill``); ``cpu``: counted with PyTorch's CPU kernels on a host with these
    threads and packing (the measured tiny models, ``memplan measure``); None (GPU answers) leaves them out."""
    cfg = ctx.cfg
    if cfg.job is not Job.INFER:
        return []
    spec, inf = ctx.arch.spec, cfg.infer
    bits = compute_dtype(cfg.dtype).bits
    tokens = step_tokens(context=inf.context, prefill_chunk=inf.prefill_chunk)
    step = _Step(batch=cfg.micro_batch, tokens=tokens, kv_tokens=inf.context, bits=bits, tp=cfg.tp,
                 kv_bits=(inf.kv_dtype or compute_dtype(cfg.dtype)).bits, cpu=cpu, dtype=compute_dtype(cfg.dtype).value,
                 hf=hf_cache_layout(cfg) and not inf.paged,
                 eager=attention_impl(spec, cfg) == "eager")
    attention = (_hf_attention_max(ctx, step) if step.hf else _attention_bytes(ctx, step)) if ctx.layers else 0
    mlp = max((_mlp_bytes(spec, layer, step) for _, layer in ctx.layers), default=0)
    masks = hf_masks.loop_mask_bytes(spec, ctx.arch.layers, impl=attention_impl(spec, cfg), batch=cfg.micro_batch,
                                     tokens=tokens, kv_tokens=inf.context, bits=bits) if step.hf and ctx.layers else 0
    note = f"prefill step of {tokens} tokens × batch {cfg.micro_batch}"
    if step.hf:
        stream = hf.stream_bytes(batch=cfg.micro_batch, tokens=tokens, hidden=spec.hidden_size or 0, bits=bits,
                                 first_stage=ctx.stage == 0, layers=len(ctx.layers), family=spec.family)
        stream += _rotary_tables(ctx, cfg.micro_batch, tokens, bits)
        formula = "(1 + embeds)·B·T·D + rotary cos/sin (layer input, transformers' kept inputs_embeds)"
    else:
        stream = hidden_states_bytes(batch=cfg.micro_batch, tokens=tokens, hidden=spec.hidden_size or 0, bits=bits)
        formula = "2·B·T·D (residual + hidden states)"
    out = [
        Row("activations/hidden_states", Tier.GPU, stream, formula, note),
        Row("activations/prefill_workspace", Tier.GPU, max(attention, mlp) + masks,
            "max(attention, MLP) of one layer + the masks kept through the loop; see memplan explain inference",
            note),
    ]
    if ctx.stage == cfg.pp - 1:
        positions = cfg.micro_batch * (inf.context if inf.all_logits else 1)
        logits = logits_bytes(rows=positions, vocab=spec.vocab_size or 0, bits=bits)
        out.append(Row("activations/logits", Tier.GPU, logits, "rows·V × (compute + fp32) bytes",
                       "all tokens" if inf.all_logits else "last token"))
    return out


def largest_fitting(fits: Callable[[int], bool], *, lo: int, hi: int) -> int:
    """The largest n in [lo, hi] with ``fits(n)``, or 0 when ``fits(lo)`` is False.

    ``fits`` must be monotone (if n fits, every smaller n fits). Exponential probing from ``lo``
    (lo, 2·lo, 4·lo, ... capped at hi) brackets the answer, then a binary search finds it:
    O(log hi) calls of the exact predicate.
    """
    if lo < 1 or hi < lo:
        raise MemplanError(f"search range must satisfy 1 <= lo <= hi, got lo={lo}, hi={hi}.")
    if not fits(lo):
        return 0
    good = lo
    while True:
        probe = min(good * 2, hi)
        if probe == good:
            return good
        if not fits(probe):
            bad = probe
            break
        good = probe
    while bad - good > 1:
        mid = (good + bad) // 2
        if fits(mid):
            good = mid
        else:
            bad = mid
    return good


def max_context(fits: Callable[[int], bool], lo: int = 1, hi: int = 2**20) -> int:
    """The longest context (tokens) in [lo, hi] for which ``fits(context)`` holds; 0 when none does."""
    return largest_fitting(fits, lo=lo, hi=hi)


def max_batch(fits: Callable[[int], bool], lo: int = 1, hi: int = 2**16) -> int:
    """The largest batch (sequences) in [lo, hi] for which ``fits(batch)`` holds; 0 when none does."""
    return largest_fitting(fits, lo=lo, hi=hi)


def forward_peak_bytes(ctx: Context, *, batch: int, tokens: int, kv_tokens: int) -> int:
    """Peak activation bytes of one forward of B·T new tokens over S_kv keys, without logits, on one GPU.

    Formula: 2·B·T·D × bytes (residual stream) + max over the stage's layers of max(attention, MLP) workspace.
    Source: as ``rows`` (vLLM ``profile_run`` measures the same forward; vllm/v1/worker/gpu_model_runner.py
    ``_dummy_run``). Assumption: a paged cache (no concat copy) when ``cfg.infer.paged``.
    """
    spec, cfg = ctx.arch.spec, ctx.cfg
    bits = compute_dtype(cfg.dtype).bits
    step = _Step(batch=batch, tokens=tokens, kv_tokens=kv_tokens, bits=bits, tp=cfg.tp,
                 kv_bits=(cfg.infer.kv_dtype or compute_dtype(cfg.dtype)).bits)
    attention = _attention_bytes(ctx, step) if ctx.layers else 0
    mlp = max((_mlp_bytes(spec, layer, step) for _, layer in ctx.layers), default=0)
    return hidden_states_bytes(batch=batch, tokens=tokens, hidden=spec.hidden_size or 0, bits=bits) + max(attention, mlp)
