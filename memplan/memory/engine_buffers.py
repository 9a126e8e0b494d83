"""Communication and engine buffers of the training engines, as visible rows under the engines' knob names
(``JobConfig.engine_config``). DeepSpeed's ZeRO-3 live parameters/gradients of its estimator stay in
``memory.model_states.deepspeed_gpu_buffers``; the rows here are what the estimator leaves out.

GPU rows are bytes per GPU. Phases are declared in ``memory.registry``.
"""

from __future__ import annotations

from memplan.arch.parallel import chunks_with_gradients_at_peak, cooldown_gradient_excess, sharded_numel
from memplan.config import Engine, ZeroStage
from memplan.memory import engine_fsdp2_backward, pp_schedule_flight
from memplan.memory.breakdown import Row, Tier
from memplan.memory.context import Context
from memplan.memory.engine_states import compute_dtype, mixed, param_dtype
from memplan.units import bits_to_bytes

DDP = "torch/nn/parallel/distributed.py (Reducer buckets; gradient_as_bucket_view=False keeps param.grad apart)"
FSDP2 = "torch/distributed/fsdp/_fully_shard/_fsdp_collectives.py (foreach_all_gather, foreach_reduce)"
FSDP2_PP = ("torch/distributed/pipelining/stage.py backward_maybe_with_nosync (set_requires_gradient_sync(False), "
            "set_reshard_after_backward(False) until the last backward); torch/distributed/fsdp/_fully_shard/"
            "_fsdp_param.py to_accumulated_grad_if_needed, accumulate_unsharded_grad_if_needed")
DS_AT = "DeepSpeed 0.16.5 (38327e0)"
DS12 = (f"{DS_AT} deepspeed/runtime/zero/stage_1_and_2.py:2049-2061 backward(): ipg_buffer of reduce_bucket_size "
        "(×2 with overlap_comm), released in the epilogue (:802)")
DS3 = f"{DS_AT} deepspeed/runtime/zero/stage3.py:537-540 __ipg_bucket_flat_buffer of reduce_bucket_size, allocated at init"
DS3_PREFETCH = (f"{DS_AT} deepspeed/runtime/zero/partitioned_param_coordinator.py:380-382 (prefetch = min(max live − "
                "available, prefetch_bucket_sz)); zero/config.py:208,231 defaults 5e7 and 1e9")
DS3_PERSIST = (f"{DS_AT} deepspeed/runtime/zero/parameter_offload.py:135-138, 256 mark_persistent_parameters; "
               "zero/config.py:214 default 1e5")


def rows(ctx: Context, *, grad_bytes: int) -> list[Row]:
    """The engine's buffers for a full-weight training job; ``grad_bytes``: the unsharded gradients of the stage."""
    engine = ctx.cfg.effective_engine
    if engine is Engine.PYTORCH:
        return ddp_rows(ctx, grad_bytes=grad_bytes)
    if engine is Engine.FSDP2:
        return fsdp2_rows(ctx)
    if engine is Engine.DEEPSPEED:
        return deepspeed_rows(ctx)
    return []


def ddp_rows(ctx: Context, *, grad_bytes: int) -> list[Row]:
    """DDP's gradient buckets: one flat copy of every gradient, in ``bucket_cap_mb`` pieces.

    Formula: the gradients' bytes when Nd > 1 and ``gradient_as_bucket_view`` is False, else 0. ``bucket_cap_mb``
    (default 25) sets how the copy is split (and the first bucket is 1 MB), not its total.
    Source: torch/nn/parallel/distributed.py (``DistributedDataParallel`` docstring, gradient_as_bucket_view:
    "the saved memory size will be equal to the total gradients size").
    """
    knobs = ctx.cfg.engine_config
    if ctx.cfg.dp <= 1 or knobs.gradient_as_bucket_view:
        return []
    return [Row("gradients/ddp_buckets", Tier.GPU, grad_bytes, DDP,
                f"DDP buckets of bucket_cap_mb={knobs.bucket_cap_mb}: a second copy of the gradients")]


def fsdp_unit_numel(ctx: Context) -> tuple[int, int]:
    """(root unit, largest block unit) elements of the stage per tp rank: ``fully_shard`` on each transformer
    block (the torchtitan/accelerate wrap policy) and on the root, which holds everything outside the blocks."""
    cfg = ctx.cfg
    blocks = [sum(sharded_numel(t, cfg.tp, cfg.ep) for t in layer.tensors) for _, layer in ctx.layers]
    root = sum(sharded_numel(t, cfg.tp, cfg.ep) for t in ctx.tensors) - sum(blocks)
    return root, max(blocks, default=0)


def fsdp2_rows(ctx: Context) -> list[Row]:
    """FSDP2's unsharded parameters and gradients of the units in flight.

    Formula, with R the root unit, B the largest block and p = ``fsdp_prefetch``:
    - all-gather (forward, start of backward, backward): bits(param_dtype)/8 · (R + p · B). The root stays
      gathered from forward to backward (``fully_shard``'s default for the root: ``_lazy_init`` sets its
      ``post_forward_mesh_info`` to None); p units are gathered ahead of the one that runs. At the start of
      backward those are all: the root's ``pre_backward`` (fired by the loss's grad_fn) prefetches the last
      block while the logits' gradients are alive, and no block runs yet;
    - the running unit (forward, backward): bits(param_dtype)/8 · B. In forward it is the running block's
      unsharded parameters while the all-gather output of the same block is kept until the next unit's copy-out
      (``wait_for_unshard``: ``comm_ctx.all_gather_state``, the implicit-prefetch overlap); in backward the
      running block beside the prefetched one;
    - with ``reshard_after_forward=False`` every unit stays gathered: bits/8 · (stage elements), no running row,
      and the all-gather output kept for the copy-out overlap (bits/8 · B, ``weights/fsdp_kept_all_gather``) is
      the only extra: alive in forward and, the last unit's, until the root's post-forward, i.e. through the loss
      (HF computes it inside the root module), counted with the start of backward's logits transients;
    - reduce-scatter (backward): U · (bits(param_dtype) + bits(reduce_dtype))/8, U = max(R, B): one unit's
      unsharded gradient and its copy in ``reduce_dtype`` (fp32 under MixedPrecisionPolicy(reduce_dtype=fp32));
      U = B where ``engine_fsdp2_backward.splits_backward``: the root reduce-scatters last, when no block is
      gathered, and ``gradients/fsdp_backward_held`` covers that moment.
    Source: torch 2.13 torch/distributed/fsdp/_fully_shard/_fsdp_param_group.py (``wait_for_unshard``,
    ``pre_backward`` → ``_backward_prefetch``, ``post_backward``: ``reduce_scatter_states`` keep one input
    buffer), _fsdp_state.py (``_lazy_init``, ``_post_forward`` frees the kept all-gather result),
    _fsdp_collectives.py (``foreach_all_gather``, ``foreach_reduce``). Measured on two CPU gloo processes:
    ``memplan.measure.fsdp2``. Assumptions: one unit per transformer block plus the root.
    """
    cfg = ctx.cfg
    knobs = cfg.engine_config
    if cfg.dp <= 1:
        return []
    root, block = fsdp_unit_numel(ctx)
    gather_dtype = compute_dtype(ctx)
    reduce_dtype = param_dtype(ctx) if mixed(ctx) else gather_dtype
    running = kept = 0
    if not ctx.layers:  # a parameter-count-only model: no blocks known, the whole model is one unit (safe side)
        gathered, note = root, "params-only model: its blocks are unknown, so the whole model counts as one unit"
    elif knobs.reshard_after_forward:
        gathered, running = root + block * knobs.fsdp_prefetch, block
        note = f"root unit + largest block × prefetch {knobs.fsdp_prefetch}"
    else:
        gathered, kept = sum(sharded_numel(t, cfg.tp, cfg.ep) for t in ctx.tensors), block
        note = "reshard_after_forward=False: every unit stays gathered from forward to backward"
    unit = max(root, block)
    rs_unit = block if engine_fsdp2_backward.splits_backward(ctx) else unit  # the root's: held_rows' root moment
    rs = bits_to_bytes(rs_unit, gather_dtype.bits) + bits_to_bytes(rs_unit, reduce_dtype.bits)
    out = [Row("weights/fsdp_all_gather", Tier.GPU, bits_to_bytes(gathered, gather_dtype.bits), FSDP2,
               f"unsharded {gather_dtype.value} parameters: {note}")]
    if running:
        out.append(Row("weights/fsdp_running_unit", Tier.GPU, bits_to_bytes(running, gather_dtype.bits), FSDP2,
                       f"the running block's unsharded {gather_dtype.value} parameters (forward, backward)"))
    if kept and ctx.cfg.pp <= 1:  # pipelined: only the first micro-batch all-gathers (fsdp2_pipeline_rows)
        out.append(Row("weights/fsdp_kept_all_gather", Tier.GPU, bits_to_bytes(kept, gather_dtype.bits), FSDP2,
                       "the last all-gather's output, kept until the next unit's copy-out or the root's post-forward"))
    out.append(Row("gradients/fsdp_reduce_scatter", Tier.GPU, rs, FSDP2,
                   f"largest unit's unsharded gradient ({gather_dtype.value}) and its {reduce_dtype.value} reduce copy"))
    in_flight = sum(r.bytes for r in out if not r.component.startswith("weights/fsdp_kept_all_gather"))
    held = engine_fsdp2_backward.held_rows(ctx, in_flight=in_flight, running=bits_to_bytes(running, gather_dtype.bits))
    return out + held + fsdp2_pipeline_rows(ctx, unit_reduce_bytes=bits_to_bytes(unit, reduce_dtype.bits))


def fsdp2_pipeline_rows(ctx: Context, *, unit_reduce_bytes: int) -> list[Row]:
    """FSDP2 under ``torch.distributed.pipelining``: the unsharded gradients accumulated across micro-batches.

    The pipeline stage runs every backward but the step's last with ``set_requires_gradient_sync(False)`` and
    ``set_reshard_after_backward(False)``, then calls each group's ``post_backward`` by hand: no reduce-scatter until
    the last backward. Under ``MixedPrecisionPolicy(reduce_dtype=fp32)`` each unit's first gradient is copied to
    fp32 (``to_accumulated_grad_if_needed``) and later ones are added to it (``accumulate_unsharded_grad_if_needed``):
    the fp32 accumulation Llama 3 describes ("we use FP32 gradients accumulation during backward computation over
    multiple micro-batches", Dubey et al. 2024, Sec. 3.3.2). They exist from a unit's first backward of the step until the
    last backward's reduce-scatter, so they are not there while the stage runs its warm-up forwards.

    Formula, with G = bits(reduce_dtype)/8 · (the stage's trainable elements), c the stage's chunks with gradients
    at its in-flight peak (``arch.parallel.chunks_with_gradients_at_peak``) of v chunks, and U = bits(reduce_dtype)/8 ·
    (largest unit), which ``gradients/fsdp_reduce_scatter`` already counts with the running unit:
    - ``gradients/fsdp_pp_accumulated`` (backward): G;
    - ``gradients/fsdp_pp_accumulated_at_peak`` (forward, start of backward): max(0, ⌈G·c/v⌉ − U).
    Without master weights (pure bf16) the gradients accumulate in ``.grad`` in bf16: the same rows in bf16.
    With ``reshard_after_forward=False`` the units stay gathered across micro-batches, so only the step's first
    forward all-gathers: the kept all-gather output of ``fsdp2_rows`` is gone before the stage's peak.
    """
    cfg = ctx.cfg
    if cfg.pp <= 1 or not cfg.job.trains:
        return []
    reduce_dtype = param_dtype(ctx) if mixed(ctx) else compute_dtype(ctx)
    numel = sum(sharded_numel(t, cfg.tp, cfg.ep) for t in ctx.tensors)
    total = bits_to_bytes(numel, reduce_dtype.bits)
    v = max(1, cfg.perf.virtual_stages)
    chunks = chunks_with_gradients_at_peak(cfg.pp, ctx.stage, v, cfg.grad_accum)
    if pp_schedule_flight.named(cfg):  # a named torch schedule: every chunk's gradients counted at the peak (over
        # where a chunk has had no backward yet), so no later moment of its cool-down exceeds it
        v = chunks = pp_schedule_flight.chunks(cfg)
    at_peak = max(0, -(-total * chunks // v) - unit_reduce_bytes)
    out = [Row("gradients/fsdp_pp_accumulated", Tier.GPU, total, FSDP2_PP,
               f"unsharded {reduce_dtype.value} gradients accumulated over the step's micro-batches")]
    if at_peak:
        out.append(Row("gradients/fsdp_pp_accumulated_at_peak", Tier.GPU, at_peak, FSDP2_PP,
                       f"{chunks} of {v} chunks' accumulated gradients exist at the in-flight peak"))
    return out + fsdp2_kept_after_backward(ctx, numel)


def fsdp2_kept_after_backward(ctx: Context, numel: int) -> list[Row]:
    """FSDP2 under a pipeline with ``reshard_after_forward=True``: the units a backward gathered stay gathered.

    ``set_reshard_after_backward(False)`` on every backward but the step's last (pipelining/stage.py
    ``backward_maybe_with_nosync``) skips ``post_backward``'s reshard; the next forward's ``pre_forward`` finds the unit
    unsharded and only its ``post_forward`` reshards it (_fsdp_param_group.py). After a backward the whole stage is
    gathered while all but one micro-batch's activations are alive.
    Formula: bits(param_dtype)/8 · (stage elements − root − ``fsdp_prefetch`` · largest block), what ``fsdp2_rows``
    does not hold gathered already; counted with the in-flight peak (over by that one micro-batch's activations).
    """
    cfg = ctx.cfg
    if not cfg.engine_config.reshard_after_forward or not ctx.layers:
        return []
    root, block = fsdp_unit_numel(ctx)
    kept = max(0, numel - root - block * cfg.engine_config.fsdp_prefetch)
    dtype = compute_dtype(ctx)
    return [Row("weights/fsdp_pp_kept_after_backward", Tier.GPU, bits_to_bytes(kept, dtype.bits), FSDP2_PP,
                f"units gathered by a backward and kept until the next forward reshards them ({dtype.value})")]


def fsdp2_cooldown_rows(ctx: Context, rows: list[Row], *, unit_activations: tuple[int, ...]) -> list[Row]:
    """FSDP2 under an interleaved pipeline: what the cool-down can hold beyond the in-flight peak, when a chunk's first
    backward adds its accumulated gradients faster than the backwards before it freed activations.

    Formula: ``arch.parallel.cooldown_gradient_excess`` with one chunk's gradients ⌈G/v⌉ (G the
    ``gradients/fsdp_pp_accumulated`` row) and one micro-batch's saved bytes of each chunk ``unit_activations``
    (``activations.chunk_saved_bytes``: uneven chunks free unequal bytes; none where the activations are not modelled);
    counted at the start of backward, with every in-flight activation (over by what the cool-down freed). Source: as
    ``fsdp2_pipeline_rows``.
    """
    cfg = ctx.cfg
    v = max(1, cfg.perf.virtual_stages)
    if cfg.effective_engine is not Engine.FSDP2 or cfg.pp <= 1 or v <= 1 or not cfg.job.trains \
            or pp_schedule_flight.named(cfg) \
            or len(unit_activations) != v or not any(unit_activations):
        return []
    total = sum(r.bytes for r in rows if r.tier is Tier.GPU and r.component == "gradients/fsdp_pp_accumulated")
    excess = cooldown_gradient_excess(cfg.pp, ctx.stage, v, cfg.grad_accum, chunk_grad=-(-total // v),
                                      unit_activations=unit_activations)
    if not excess:
        return []
    return [Row("gradients/fsdp_pp_cooldown", Tier.GPU, excess, FSDP2_PP,
                "chunks' first gradients in the cool-down beyond the activations freed by then")]


def deepspeed_rows(ctx: Context) -> list[Row]:
    """DeepSpeed ZeRO's buffers beyond its estimator: the reduce (IPG) bucket, ZeRO-3 prefetch and persistent params.

    Formula: reduce bucket: ``reduce_bucket_size`` · bits(dtype)/8, ×2 in stages 1-2 with ``overlap_comm``
    (double buffer), with ``contiguous_gradients``; stage 3 prefetch: bits/8 · min(``stage3_prefetch_bucket_size``,
    ``stage3_max_live_parameters`` − LL); stage 3 persistent: bits/8 · (elements of the tensors with at most
    ``stage3_param_persistence_threshold`` elements), kept gathered on every rank.
    ``allgather_bucket_size`` adds nothing: the updated partitions are all-gathered in place into the flat 16-bit
    buffer (deepspeed/runtime/utils.py ``all_gather_dp_groups``).
    Source: DeepSpeed stage_1_and_2.py ``backward`` (ipg_buffer), stage3.py (``__ipg_bucket_flat_buffer``,
    ``prefetch_bucket_size``, ``max_live_parameters``, ``param_persistence_threshold``), config.py defaults.
    """
    from memplan.memory.zero import largest_layer_numel

    cfg = ctx.cfg
    knobs = cfg.engine_config
    if cfg.zero is ZeroStage.NONE:
        return []
    bits = compute_dtype(ctx).bits
    out = []
    if knobs.contiguous_gradients:
        overlap = knobs.overlap_comm if knobs.overlap_comm is not None else cfg.zero is ZeroStage.PARAMETERS
        n = 2 if overlap and cfg.zero < ZeroStage.PARAMETERS else 1
        name = "gradients/reduce_bucket" if cfg.zero < ZeroStage.PARAMETERS else "gradients/zero3_reduce_bucket"
        out.append(Row(name, Tier.GPU, n * bits_to_bytes(knobs.reduce_bucket_size, bits),
                       DS3 if cfg.zero is ZeroStage.PARAMETERS else DS12,
                       f"{n} × reduce_bucket_size={knobs.reduce_bucket_size:,} elements"))
    if cfg.zero is ZeroStage.PARAMETERS:
        ll = largest_layer_numel(ctx)
        ahead = min(knobs.stage3_prefetch_bucket_size, max(0, knobs.stage3_max_live_parameters - ll))
        out.append(Row("weights/zero3_prefetch", Tier.GPU, bits_to_bytes(ahead, bits), DS3_PREFETCH,
                       f"stage3_prefetch_bucket_size={knobs.stage3_prefetch_bucket_size:,} within "
                       f"stage3_max_live_parameters={knobs.stage3_max_live_parameters:,}"))
        small = sum(sharded_numel(t, cfg.tp, cfg.ep) for t in ctx.tensors
                    if t.numel_each <= knobs.stage3_param_persistence_threshold)
        out.append(Row("weights/zero3_persistent", Tier.GPU, bits_to_bytes(small, bits), DS3_PERSIST,
                       f"parameters of at most stage3_param_persistence_threshold="
                       f"{knobs.stage3_param_persistence_threshold:,} elements stay gathered"))
    return out

