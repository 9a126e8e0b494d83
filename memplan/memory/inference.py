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

# The definitions live in smaller modules, every name importable from here: ``inference_terms`` (the workspace
# formulas and their constants), ``inference_stage`` (one layer's attention and MLP stages of a step). This module
# assembles the rows and searches for the largest context or batch that fits.

from __future__ import annotations

from collections.abc import Callable

from memplan.config import Job
from memplan.errors import MemplanError
from memplan.memory import hf_masks
from memplan.memory import hf_prefill as hf
from memplan.memory.activations_block import attention_impl
from memplan.memory.breakdown import Row, Tier
from memplan.memory.context import Context
from memplan.memory.cpu_flash import CpuKernels
from memplan.memory.inference_stage import (
    _attention_bytes,
    _cpu_flash,
    _hf_attention_extra,
    _hf_attention_max,
    _hf_mlp_extra,
    _hf_moe_bytes,
    _hf_sdpa_extra,
    _hf_shapes,
    _mlp_bytes,
    _rotary_tables,
    _Step,
)
from memplan.memory.inference_terms import (
    EAGER_SCORE_COPIES,
    FUSED_GATED_MLP_TENSORS,
    GATED_MLP_TENSORS,
    LOGITS_FP32_BITS,
    PLAIN_MLP_TENSORS,
    RESIDUAL_TENSORS,
    ROUTER_LOGITS_BITS,
    SOFTMAX_BITS,
    attention_workspace_bytes,
    hidden_states_bytes,
    kv_concat_bytes,
    logits_bytes,
    mla_workspace_bytes,
    mlp_workspace_bytes,
    moe_workspace_bytes,
    scores_bytes,
)
from memplan.memory.kv_cache import compute_dtype, hf_cache_layout, step_tokens

__all__ = [
    "EAGER_SCORE_COPIES", "FUSED_GATED_MLP_TENSORS", "GATED_MLP_TENSORS", "LOGITS_FP32_BITS", "PLAIN_MLP_TENSORS",
    "RESIDUAL_TENSORS", "ROUTER_LOGITS_BITS", "SOFTMAX_BITS", "_Step", "_attention_bytes", "_cpu_flash",
    "_hf_attention_extra", "_hf_attention_max", "_hf_mlp_extra", "_hf_moe_bytes", "_hf_sdpa_extra", "_hf_shapes",
    "_mlp_bytes", "_rotary_tables", "attention_workspace_bytes", "forward_peak_bytes", "hidden_states_bytes",
    "kv_concat_bytes", "largest_fitting", "logits_bytes", "max_batch", "max_context", "mla_workspace_bytes",
    "mlp_workspace_bytes", "moe_workspace_bytes", "rows", "scores_bytes",
]


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
