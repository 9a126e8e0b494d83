"""Training activations: the bytes kept for backward on the reported GPU, and the transient peaks.

Per block, ``activations_block`` counts what PyTorch autograd saves in the Hugging Face module
(or, with ``activation_accounting="paper"``, what Korthikanti et al. 2022 count). This module adds
the model around the blocks and the schedule:

- recompute (Korthikanti et al. 2022, Sec. 5): ``selective`` drops the S×S attention-core tensors,
  ``full`` keeps only each checkpointed block's input; ``recompute_layers = k`` checkpoints k of
  the L layers (the first ones of each stage, Megatron-LM's "block" method), the rest keep
  everything; during backward one checkpointed block's tensors are live again (workspace row);
- pipeline 1F1B (Narayanan et al. 2021, Sec. 2.2): stage ``i`` of ``pp`` holds ``pp - i``
  micro-batches in flight, so the first stage holds ``pp`` (Korthikanti et al. 2022, Sec. 4.2.3);
- the first stage adds the embedding lookup, the last the final norm, the loss and the logits peak.

Inference activations are ``memplan.memory.inference``'s; a params-only model is not modelled.
"""

# The definitions live in smaller modules, every name importable from here: ``activations_layers`` (recompute modes,
# counting, one block's bytes, the recompute workspace), ``activations_model`` (embedding, rotary, layer kwargs, final
# norm, loss, logits, kept output), ``activations_flight`` (micro-batches in flight, per-chunk counts). This module
# assembles the rows.

from __future__ import annotations

from memplan.catalog.schema import Family
from memplan.config import Recompute
from memplan.memory import activations_block as blk
from memplan.memory import activations_terms as t
from memplan.memory import bnb_workspace, flash_workspace, hf_legacy, litgpt, sdpa_workspace
from memplan.memory.activations_flight import chunk_saved_bytes, in_flight_saved, layer_flights, peak_chunk_counts
from memplan.memory.activations_layers import (
    _amp,
    _block_terms,
    _core_bytes,
    _kept_bytes,
    _litgpt_adapter,
    _trainables,
    block_terms,
    checkpointed,
    counting_for,
    interleave_knobs,
    layer_bytes,
    layer_micro_bytes,
    layer_modes,
    micro_batches_in_flight,
    modelled,
    stage_layers_bytes,
    workspace_bytes,
)
from memplan.memory.activations_model import (
    NO_ROTARY,
    ROPE_PER_LAYER_TYPE,
    _loss_bits,
    _tokens,
    embedding_bytes,
    final_norm_bytes,
    kept_output_bytes,
    layer_kwargs_bytes,
    logits_peak_bytes,
    loss_bytes,
    rotary_table_bytes,
)
from memplan.memory.breakdown import Phase, Row, Tier
from memplan.memory.context import Context
from memplan.memory.context_parallel import exchange_bytes

__all__ = [
    "NO_ROTARY", "ROPE_PER_LAYER_TYPE", "SAVED_ROWS", "SRC_BLOCK", "_amp", "_attention_backward_rows", "_block_terms",
    "_core_bytes", "_flash_kernel", "_flash_workspace_rows", "_kept_bytes", "_litgpt_adapter", "_loss_bits",
    "_sdpa_workspace_rows", "_tokens", "_trainables", "block_terms", "breakdown", "checkpointed", "chunk_saved_bytes",
    "counting_for", "embedding_bytes", "final_norm_bytes", "in_flight_saved", "interleave_knobs", "kept_output_bytes",
    "layer_bytes", "layer_flights", "layer_kwargs_bytes", "layer_micro_bytes", "layer_modes", "logits_peak_bytes",
    "loss_bytes", "micro_batches_in_flight", "modelled", "peak_chunk_counts", "rotary_table_bytes", "rows",
    "saved_bytes_estimate", "stage_layers_bytes", "workspace_bytes",
]


SRC_BLOCK = "autograd saved tensors of the HF block (activations_block); Korthikanti et al. 2022"
SAVED_ROWS = ("activations/embeddings", "activations/rotary", "activations/layer_kwargs", "activations/layers",
              "activations/final_norm", "activations/loss")
"""Rows made of tensors saved for backward (what ``memplan.measure.saved`` measures); the others are peaks."""


def breakdown(ctx: Context, counting: blk.Counting | None = None) -> dict[str, int]:
    """Component name -> bytes on the reported GPU; empty when not modelled or for inference."""
    if not modelled(ctx):
        return {}
    counting = counting or counting_for(ctx.cfg)
    cfg, flight = ctx.cfg, micro_batches_in_flight(ctx)
    modes = layer_modes(ctx)
    ckpt = {i for i, mode in modes.items() if mode is not Recompute.NONE}
    saved = in_flight_saved(ctx, modes, counting, flight)
    out = {"activations/layers": saved["activations/layers"]}
    out["activations/recompute_workspace"] = max(
        (workspace_bytes(ctx, modes[i], {i}, counting) for i in ckpt), default=0)
    out["activations/rotary"] = flight * rotary_table_bytes(ctx, counting)
    out["activations/cp_exchange"] = exchange_bytes(ctx.arch.spec, cfg)
    out["activations/layer_kwargs"] = flight * layer_kwargs_bytes(ctx, ckpt, counting)
    out |= {name: b for name, b in saved.items() if name != "activations/layers"}
    if ctx.holds_output:
        out["activations/logits"] = logits_peak_bytes(ctx, counting)
        out["activations/kept_output"] = kept_output_bytes(ctx, counting)
    out["activations/dequant_workspace"] = bnb_workspace.dequant_workspace_bytes(ctx)
    out["activations/bnb_retained_inputs"] = bnb_workspace.retained_input_bytes(ctx)
    previous = litgpt.previous_tokens(cfg)  # litgpt's loop: the previous micro-batch's output, into the next forward
    if previous and ctx.holds_output:
        out["activations/kept_output_previous"] = kept_output_bytes(ctx, counting, previous)
    if previous:
        out["activations/bnb_retained_previous"] = bnb_workspace.retained_input_bytes(ctx, previous)
    return {name: value for name, value in out.items() if value}


def saved_bytes_estimate(ctx: Context, counting: blk.Counting | None = None) -> int:
    """Bytes saved for backward at the end of the forward pass (the rows in SAVED_ROWS)."""
    return sum(v for k, v in breakdown(ctx, counting).items() if k in SAVED_ROWS)


_SOURCES = {
    "activations/layers": SRC_BLOCK,
    "activations/recompute_workspace": "one checkpointed block recomputed in backward (Korthikanti et al. 2022 Sec. 5)",
    "activations/rotary": "cos/sin tables saved by apply_rotary_pos_emb, 2·S·H·b/8",
    "activations/layer_kwargs": "(B, 1, S, S) masks and position ids held by checkpointed blocks",
    "activations/embeddings": "int64 token ids (+ position ids) and embedding dropout mask",
    "activations/final_norm": "final norm + lm_head input (Korthikanti et al. 2022 Sec. 4.3)",
    "activations/loss": "log-softmax output 4·B·S·V/t + int64 targets (HF ForCausalLMLoss)",
    "activations/logits": "logits + fp32 copy, or their two fp32 gradients, whichever is larger",
    "activations/pp_weight_grad_pending": "zero-bubble pipeline schedules: weight ops' output gradients kept from each "
                                          "input backward (I) to its weight backward (W), torch pipelining "
                                          "_backward.py (memory.pp_schedule_flight.weight_grad_bytes)",
    "activations/kept_output": "logits of the model output the training loop holds until after the step",
    "activations/bnb_retained_inputs": "bitsandbytes <= 0.43.1 MatMul4Bit ctx.tensors = (A, B): one micro-batch's "
                                       "quantized-linear inputs, alive while the graph is referenced "
                                       "(memory.bnb_workspace)",
    "activations/bnb_retained_previous": "the previous micro-batch's bitsandbytes <= 0.43.1 quantized-linear inputs, "
                                         "held by litgpt's loop through the next forward (memory.bnb_workspace)",
    "activations/kept_output_previous": "the previous micro-batch's logits, held by litgpt's loop (logits = model(...))"
                                        " until the next forward returns (memory.litgpt)",
    "activations/dequant_workspace": "bitsandbytes MatMul4Bit/MatMul8bitLt: the largest quantized weight dequantized "
                                     "to 16 bits (memory.bnb_workspace)",
    "activations/cp_exchange": "context parallelism: key/value exchange buffers of one attention (context_parallel)",
    "activations/sdpa_backward_workspace": "SDPA memory-efficient kernel's fp32 dQ (and dK/dV) staging and delta "
                                           "of one attention's backward (memory.sdpa_workspace)",
    "activations/flash_backward_workspace": "flash-attention 2 backward's fp32 dq_accum and softmax_d, and the "
                                            "16-bit dK/dV of every query head under GQA/MQA, of one attention's "
                                            "backward (memory.flash_workspace)",
}


def rows(ctx: Context) -> list[Row]:
    """GPU rows of training activations for the reported stage; [] for inference or params-only models."""
    saved = "saved for backward"
    dequant = {"activations/dequant_workspace": bnb_workspace.dequant_phases(ctx),
               "activations/bnb_retained_inputs": bnb_workspace.retained_phases(ctx.cfg)}
    out = [Row(name, Tier.GPU, value, _SOURCES[name], saved if name in SAVED_ROWS else "transient peak",
               dequant.get(name)) for name, value in breakdown(ctx).items()]
    if not out:
        return out
    out += _attention_backward_rows(ctx)
    if ctx.cfg.transformers_version is None:
        return out
    checkpointed = any(mode is not Recompute.NONE for mode in layer_modes(ctx).values())
    return out + hf_legacy.rows(ctx, blk.attention_impl(ctx.arch.spec, ctx.cfg), blk.activation_bits(ctx.cfg),
                                checkpointed)


def _attention_backward_rows(ctx: Context) -> list[Row]:
    """The attention kernel's backward workspace: the memory-efficient kernel's (masked layers) or flash's
    (the others); where a model has both kinds of layers only the larger, since one layer's backward runs at a
    time."""
    rows = _sdpa_workspace_rows(ctx) + _flash_workspace_rows(ctx)
    return [max(rows, key=lambda r: r.bytes)] if rows else []


def _flash_kernel(ctx: Context) -> tuple[bool, int, int] | None:
    """(Dao-AILab's kernel, query heads, key/value heads) where a 16-bit CUDA job's attention runs flash-attention 2:
    ``attention="flash"`` (transformers' flash_attention_2, the flash_attn package), or SDPA on an Ampere-or-newer
    GPU (flash needs sm80: ``mha_bwd``'s check; T4/V100 are the catalog's GPUs without bf16) with at least one
    unmasked layer (``sdp_utils.cpp``: flash refuses ``attn_mask``), head dims ≤ 256 and equal q/k and v head dims
    (not MLA, not Falcon's multi-query math path); None otherwise. Heads as the kernel sees them: k and v copied
    to N heads by litgpt, ``repeat_kv`` (transformers 4.37-4.40 SDPA), Falcon's new decoder, MLA's expand_kv."""
    spec, cfg = ctx.arch.spec, ctx.cfg
    impl = blk.attention_impl(spec, cfg)
    if (blk.activation_bits(cfg) == t.FP32_BITS or counting_for(cfg) is not blk.CUDA or not ctx.gpu.supports_bf16
            or impl not in ("flash", "sdpa")):
        return None
    dm = blk.dims(spec, cfg)
    n, k = dm.n, dm.k
    if impl == "flash":
        return True, n, (n if spec.is_mla or blk.falcon_broadcasts_kv(spec) else k)
    mqa_math = spec.family is Family.FALCON and spec.kv_heads == 1 < (spec.num_attention_heads or 1)
    if spec.is_mla or mqa_math or hf_legacy.explicit_mask(spec, cfg, impl) or all(
            blk.sdpa_mask_materialized(spec, layer, impl, dm.s) for layer in ctx.arch.layers):
        return None
    expanded = litgpt.applies(cfg) or hf_legacy.repeats_kv(cfg, impl) or blk.falcon_broadcasts_kv(spec)
    return False, n, (n if expanded else k)


def _flash_workspace_rows(ctx: Context) -> list[Row]:
    """Backward-phase row of flash-attention 2's workspace (``flash_workspace.backward_workspace_bytes``) for one
    attention call of one layer; [] where flash does not run (``_flash_kernel``)."""
    spec, cfg = ctx.arch.spec, ctx.cfg
    kernel = _flash_kernel(ctx)
    dm = blk.dims(spec, cfg)
    head_dim = (spec.qk_nope_head_dim or 0) + (spec.qk_rope_head_dim or 0) if spec.is_mla else dm.h
    if kernel is None or not head_dim or head_dim > flash_workspace.MAX_HEAD_DIM:
        return []
    dao, n, kv = kernel
    value = flash_workspace.backward_workspace_bytes(dm.b, n, kv, dm.s, dm.s, head_dim, bits=dm.bits, dao=dao)
    name = "activations/flash_backward_workspace"
    return [Row(name, Tier.GPU, value, _SOURCES[name], "one attention's backward", frozenset({Phase.BACKWARD}))]


def _sdpa_workspace_rows(ctx: Context) -> list[Row]:
    """Backward-phase row of SDPA's memory-efficient kernel workspace, where a 16-bit CUDA job's attention gets an
    explicit mask (transformers 4.38-4.39's 4-D mask, sliding windows shorter than S, Falcon): flash refuses
    ``attn_mask`` (``sdp_utils.cpp``), the cutlass kernel takes it; [] otherwise."""
    spec, cfg = ctx.arch.spec, ctx.cfg
    impl, bits = blk.attention_impl(spec, cfg), blk.activation_bits(cfg)
    if impl != "sdpa" or bits == t.FP32_BITS or counting_for(cfg) is not blk.CUDA:
        return []
    dm = blk.dims(spec, cfg)
    masked = hf_legacy.explicit_mask(spec, cfg, impl) or any(
        blk.sdpa_mask_materialized(spec, layer, impl, dm.s) for layer in ctx.arch.layers)
    if not masked or not dm.n or not dm.h:
        return []
    value = (sdpa_workspace.backward_workspace_bytes(dm.b, dm.n, dm.s, dm.s, dm.h, dm.h)
             + sdpa_workspace.delta_bytes(dm.b, dm.n, dm.s))
    name = "activations/sdpa_backward_workspace"
    return [Row(name, Tier.GPU, value, _SOURCES[name], "one attention's backward", frozenset({Phase.BACKWARD}))]
