"""FSDP2's gradients during backward: which sharded gradients exist while a unit's buffers are in flight.

The backward of ``fully_shard`` (one unit per block plus the root) reduce-scatters unit by unit, in reverse order
(torch 2.13 torch/distributed/fsdp/_fully_shard/_fsdp_param_group.py ``post_backward``: reshard the unit, then
``foreach_reduce``, whose output becomes the unit's sharded gradients, _fsdp_collectives.py). The root's
``post_backward`` runs last (_fsdp_state.py ``_root_post_backward_final_callback``): until then the root's
unsharded gradients of the modules that ran after the blocks (final norm, lm_head; all of the root's when the
embedding is tied) stay alive, and the root's sharded gradient does not exist yet. So while a block is in flight
(gathered, running, its reduce-scatter input and output) the sharded gradients present are those of the blocks
reduced before it, not the root's; at the root's reduce-scatter every shard exists, but no block is gathered.

The step's ``gradients`` row (every shard) is therefore left out of the backward phase (``splits_backward``) and
``gradients/fsdp_backward_held`` stands for what the binding backward moment holds beside the in-flight rows.
"""

from __future__ import annotations

from memplan.arch.parallel import sharded_numel
from memplan.arch.tensors import Role
from memplan.config import Accounting, Engine, Job
from memplan.memory.breakdown import Row, Tier
from memplan.memory.context import Context
from memplan.memory.engine_states import compute_dtype, mixed, param_dtype
from memplan.memory.fsdp2_shard import padded_shard_numel
from memplan.units import bits_to_bytes

SOURCE = ("torch/distributed/fsdp/_fully_shard/_fsdp_param_group.py post_backward (reshard, then foreach_reduce); "
          "_fsdp_state.py _root_post_backward_final_callback (the root last)")


def splits_backward(ctx: Context) -> bool:
    """Whether ``gradients/fsdp_backward_held`` replaces the ``gradients`` row in backward: FSDP2 full-weight
    training sharded over more than one rank, blocks known, one micro-batch per step and no pipeline (with
    accumulation or a pipeline every shard exists from an earlier micro-batch on, ``components.gradients_persist``)."""
    from memplan.memory.zero import shard_degree

    cfg = ctx.cfg
    return (cfg.effective_engine is Engine.FSDP2 and cfg.job in (Job.FULL, Job.PRETRAIN)
            and cfg.accounting is Accounting.DEEPSPEED  # the engine's own layout (training.engine_layout)
            and cfg.pp <= 1 and cfg.grad_accum <= 1 and shard_degree(cfg) > 1 and bool(ctx.layers))


def held_rows(ctx: Context, *, in_flight: int, running: int) -> list[Row]:
    """The sharded and root gradients alive at the binding backward moment, beside FSDP2's in-flight rows.

    Formula, with s_i the padded gradient shard of block i (bits(grad dtype)/8 · ``padded_shard_numel``), s_R the
    root's, G = Σ s_i + s_R, E the root's early unsharded gradients (bits(param_dtype)/8 · elements of the root's
    tensors other than an untied input embedding), U_R the root's elements:
    - a block in flight: Σ s_i − min(s_min, running) + E: every other block's shard at most (its own appears at
      its reduce-scatter, once its gathered parameters, ``running`` bytes, are freed);
    - the root's backward and reduce-scatter, every block resharded: Σ s_i + R_h + max(R_h + B_r, R_r + s_R), with
      R_h = U_R·bits(param_dtype)/8 (the root gathered while its last gradients are computed, and those
      gradients), B_r the last block's reduce-scatter input still kept (reduce_scatter_states) until the root's
      ``post_backward`` frees it and allocates its own, R_r = U_R·bits(reduce_dtype)/8; less ``in_flight`` (the
      all-gather, running-unit and reduce-scatter rows already counted in backward);
    the row is the larger, and never negative. Source: module docstring.
    """
    if not splits_backward(ctx):
        return []
    from memplan.memory.model_states import trainable_tensors
    from memplan.memory.zero import shard_degree

    cfg = ctx.cfg
    n = shard_degree(cfg)
    trained = {id(t) for t in trainable_tensors(ctx)}
    gdtype = cfg.grad_dtype or param_dtype(ctx)
    gather = compute_dtype(ctx)
    reduce_bits = param_dtype(ctx).bits if mixed(ctx) else gather.bits
    in_blocks = {id(t) for _, layer in ctx.layers for t in layer.tensors}
    shards = [bits_to_bytes(padded_shard_numel([t for t in layer.tensors if id(t) in trained], n, tp=cfg.tp,
                                               ep=cfg.ep), gdtype.bits) for _, layer in ctx.layers]
    root = [t for t in ctx.tensors if id(t) in trained and id(t) not in in_blocks]
    s_root = bits_to_bytes(padded_shard_numel(root, n, tp=cfg.tp, ep=cfg.ep), gdtype.bits)
    tied = ctx.arch.spec.tie_word_embeddings
    early = sum(sharded_numel(t, cfg.tp, cfg.ep) for t in root if tied or t.role is not Role.EMBEDDING)
    root_numel = sum(sharded_numel(t, cfg.tp, cfg.ep) for t in root)
    block_moment = sum(shards) - min(min(shards), running) + bits_to_bytes(early, gather.bits)
    last = sum(sharded_numel(t, cfg.tp, cfg.ep) for t in ctx.layers[0][1].tensors if id(t) in trained)
    root_h = bits_to_bytes(root_numel, gather.bits)
    root_moment = sum(shards) + root_h + max(root_h + bits_to_bytes(last, reduce_bits),
                                             bits_to_bytes(root_numel, reduce_bits) + s_root)
    held = max(block_moment, root_moment - in_flight, 0)
    return [Row("gradients/fsdp_backward_held", Tier.GPU, held, SOURCE,
                "backward: the blocks' shards already reduced and the root's early unsharded gradients "
                "(the root's shard comes last)")]


def kept_at_loss_rows(ctx: Context, *, kept: int) -> list[Row]:
    """With ``reshard_after_forward=False``: the last all-gather output kept through the loss, beyond what the start
    of backward already holds.

    The kept output (the last block's, ``comm_ctx.all_gather_state``) is freed by the root's post-forward
    (_fsdp_state.py ``_post_forward``), after HF's loss ran inside the root's forward and before the logits'
    gradients exist. So it coexists with the loss's forward transients (the logits and their fp32 copy, F) but not
    with its backward ones (two fp32 gradients, K; ``activations_terms.logits_transient_bytes``), while the start of
    backward counts max(F, K). Formula: max(0, kept − max(0, K − F)), so that the phase holds max(F + kept, K).
    Source: as above; transformers ``ForCausalLMLoss``.
    """
    from memplan.memory import activations as act
    from memplan.memory import activations_block as blk
    from memplan.memory import activations_terms as terms

    cfg = ctx.cfg
    if not kept or not ctx.holds_output:
        return [Row("weights/fsdp_kept_all_gather_at_loss", Tier.GPU, kept, SOURCE,
                    "the last all-gather's output at the start of backward (not the last stage: no loss)")] if kept else []
    tokens = blk.dims(ctx.arch.spec, cfg).tokens
    vocab = -(-(ctx.arch.spec.vocab_size or 0) // cfg.tp)
    bits = blk.activation_bits(cfg)
    loss_bits = terms.FP32_BITS if cfg.loss_fp32 else bits
    forward = terms.tensor_bytes(count=tokens * vocab, bits=bits)
    forward += terms.tensor_bytes(count=tokens * vocab, bits=loss_bits) if loss_bits != bits else 0
    backward = 2 * terms.tensor_bytes(count=tokens * vocab, bits=loss_bits)
    if act.logits_peak_bytes(ctx, blk.Counting()) != max(forward, backward):  # another logits layout: keep it all
        forward = backward
    nbytes = max(0, kept - max(0, backward - forward))
    return [Row("weights/fsdp_kept_all_gather_at_loss", Tier.GPU, nbytes, SOURCE,
                "the last all-gather's output, alive through the loss's forward (not its logits' gradients)")]


def first_reduce_scatter_rows(ctx: Context, rows: list[Row]) -> list[Row]:
    """The first block's reduce-scatter, beyond what the start of backward holds: the moment that binds when a
    block's gradient buffers outweigh its activations and the loss's transients (expert-heavy MoE blocks).

    At the last block's ``post_backward`` (its gradients computed, its parameters resharded) the other blocks'
    activations are still saved, the root and the prefetched block still gathered (as at the start of backward),
    and there are in addition: the block's unsharded gradients (bits(param_dtype)/8 · B), its reduce-scatter input in
    reduce_dtype (bits/8 · B) and output (the block's padded shard s), and the root's early gradients E
    (``held_rows``); gone are the block's own saved activations and the loss's (``activations/logits``,
    ``activations/loss``, ``activations/final_norm``), and with ``reshard_after_forward=False`` the block's gathered
    parameters and the kept all-gather output. Formula: max(0, added − gone). Source: _fsdp_param_group.py
    ``post_backward``, _fsdp_collectives.py ``foreach_reduce``. Size-dependent: built with the activation rows.
    """
    if not splits_backward(ctx) or not ctx.holds_output:
        return []
    from memplan.memory import activations as act
    from memplan.memory.model_states import trainable_tensors
    from memplan.memory.zero import shard_degree

    cfg = ctx.cfg
    index, layer = ctx.layers[-1]
    trained = {id(t) for t in trainable_tensors(ctx)}
    tensors = [t for t in layer.tensors if id(t) in trained]
    numel = sum(sharded_numel(t, cfg.tp, cfg.ep) for t in tensors)
    gather = compute_dtype(ctx)
    reduce_bits = param_dtype(ctx).bits if mixed(ctx) else gather.bits
    shard = bits_to_bytes(padded_shard_numel(tensors, shard_degree(cfg), tp=cfg.tp, ep=cfg.ep),
                          (cfg.grad_dtype or param_dtype(ctx)).bits)
    added = bits_to_bytes(numel, gather.bits) + bits_to_bytes(numel, reduce_bits) + shard + _early_bytes(ctx, trained)
    gone = act.layer_bytes(ctx, index, act.layer_modes(ctx)[index]) if act.modelled(ctx) else 0
    gone += sum(r.bytes for r in rows if r.component in ("activations/logits", "activations/loss",
                                                        "activations/final_norm", "weights/fsdp_kept_all_gather_at_loss"))
    if not cfg.engine_config.reshard_after_forward:
        gone += bits_to_bytes(sum(sharded_numel(t, cfg.tp, cfg.ep) for t in layer.tensors), gather.bits)
    return [Row("gradients/fsdp_first_reduce_scatter", Tier.GPU, max(0, added - gone), SOURCE,
                "the last block's gradients, reduce-scatter input and output beside the other blocks' activations, "
                "beyond the start of backward")]


def _early_bytes(ctx: Context, trained: set[int]) -> int:
    """E: the root's unsharded gradients computed before the blocks' backward (all but an untied input embedding)."""
    cfg = ctx.cfg
    in_blocks = {id(t) for _, layer in ctx.layers for t in layer.tensors}
    tied = ctx.arch.spec.tie_word_embeddings
    early = sum(sharded_numel(t, cfg.tp, cfg.ep) for t in ctx.tensors if id(t) in trained and id(t) not in in_blocks
                and (tied or t.role is not Role.EMBEDDING))
    return bits_to_bytes(early, compute_dtype(ctx).bits)
