"""FSDP2's size-dependent rows in the training ILP's shape factor: what ``components.job_rows`` adds beside the
memoized state rows for engine fsdp2, per stage, so that the ILP's bytes for a layout are at least ``estimate``'s.

Under a pipeline (torch.distributed.pipelining) those are the stage outputs and receive buffers
(``memory.pp_stage_buffers``), the cool-down's gradients (``engine_buffers.fsdp2_cooldown_rows``) and the part of the
accumulated gradients alive at the in-flight peak, which grows with the step's micro-batches m
(``engine_buffers.fsdp2_pipeline_rows``; the states factor evaluates its state rows at m = 1,
``train_phases.phased``, so the shape row adds the difference). Without a pipeline: FSDP2's no-reshard all-gather
output kept through the loss (``engine_fsdp2_backward.kept_at_loss_rows``) and the first block's reduce-scatter
(``first_reduce_scatter_rows``). Where the exact row depends on the per-layer recompute modes, which the shape factor
does not know, the bound is taken on the safe side: the activations a cool-down frees and those a block's backward
frees are the leanest mode's (a lower bound, so the row is an upper bound), and the receive buffers the saved
activations already count are subtracted only where that count does not depend on the modes.
"""

from __future__ import annotations

from memplan.config import Engine, JobConfig, Recompute
from memplan.errors import MemplanError
from memplan.memory import components
from memplan.memory.breakdown import Row, Tier
from memplan.memory.context import Context
from memplan.planner.ilp_model import LayerBlock
from memplan.planner.setting import SAVINGS

AT_PEAK = "gradients/fsdp_pp_accumulated_at_peak"


def extra_rows(ctx: Context, shape_rows: list[Row], layers: LayerBlock | None, key: tuple,
               modes: tuple[str, ...]) -> list[Row]:
    """The stage's FSDP2 rows that the states factor (size-free, m = 1) leaves out (phases not yet set); ``shape_rows``:
    the stage's activation rows outside the blocks; ``layers``/``key``: the recompute block and this shape's key
    (per-layer saved bytes per micro-batch by mode); ``modes``: the recompute modes the plan may choose."""
    cfg = ctx.cfg
    if cfg.effective_engine is not Engine.FSDP2 or not cfg.job.trains:
        return []
    try:
        return _pipeline_rows(ctx, layers, key) if cfg.pp > 1 else _unpipelined_rows(ctx, shape_rows, modes)
    except (MemplanError, ValueError):  # a combination the exact model rejects: the states factor has no row for it
        return []


def _states(ctx: Context, grad_accum: int) -> list[Row]:
    one = ctx.cfg.model_copy(update={"grad_accum": grad_accum})
    return components.phased_state_rows(Context(ctx.arch, one, ctx.gpu, ctx.host, ctx.stage_override))


def _pipeline_rows(ctx: Context, layers: LayerBlock | None, key: tuple) -> list[Row]:
    """Stage buffers, the at-peak gradients beyond m = 1's, and the cool-down row with the leanest per-chunk bytes."""
    from memplan.memory import engine_buffers, pp_stage_buffers

    cfg = ctx.cfg
    rows = _states(ctx, cfg.grad_accum)
    at_m = sum(r.bytes for r in rows if r.tier is Tier.GPU and r.component == AT_PEAK)
    at_one = sum(r.bytes for r in _states(ctx, 1) if r.tier is Tier.GPU and r.component == AT_PEAK)
    out = [Row(AT_PEAK, Tier.GPU, max(0, at_m - at_one), engine_buffers.FSDP2_PP, "at-peak gradients beyond one micro-batch's")]
    if layers is not None:
        out += engine_buffers.fsdp2_cooldown_rows(ctx, rows, unit_activations=_leanest_chunks(ctx, layers, key))
    return out + _stage_buffer_rows(ctx, pp_stage_buffers)


def _leanest_chunks(ctx: Context, layers: LayerBlock, key: tuple) -> tuple[int, ...]:
    """One micro-batch's saved bytes of each chunk of the stage with every layer in its leanest mode at ``key``."""
    from memplan.arch.interleaved import chunk_layer_counts

    per_layer = [min((keyed[key] for keyed in layers.gpu[i].values() if key in keyed), default=0)
                 for i, _ in ctx.layers]
    v = max(1, ctx.cfg.perf.virtual_stages)
    out, start = [], 0
    for size in chunk_layer_counts(len(per_layer), v, first_stage=ctx.stage == 0):
        out.append(sum(per_layer[start:start + size]))
        start += size
    return tuple(out)


def _stage_buffer_rows(ctx: Context, pp_stage_buffers) -> list[Row]:
    """``pp_stage_buffers.rows``, with the receive buffers the activations already save taken off only under 1F1B
    (v = 1: their count, the in-flight micro-batches, does not depend on the modes); the interleaved count does, so
    there every buffer counts (over by at most those saved inputs)."""
    cfg = ctx.cfg
    rows = pp_stage_buffers.rows(ctx)
    if not pp_stage_buffers.applies(ctx) or not pp_stage_buffers.input_saved(ctx) or cfg.perf.virtual_stages <= 1:
        return rows
    from memplan.memory.activations_block import block_input_bytes

    x = block_input_bytes(ctx.arch.spec, cfg)
    recv = pp_stage_buffers.recv_buffer_counts(cfg.pp, ctx.stage, cfg.perf.virtual_stages, cfg.grad_accum)[0]
    kept = [r for r in rows if r.component != "activations/pp_recv_buffers"]
    return kept + ([Row("activations/pp_recv_buffers", Tier.GPU, recv * x, pp_stage_buffers.SOURCE,
                        "every receive buffer (the saved inputs depend on the recompute modes)")] if recv else [])


def _unpipelined_rows(ctx: Context, shape_rows: list[Row], modes: tuple[str, ...]) -> list[Row]:
    """No-reshard all-gather output kept through the loss, and the first block's reduce-scatter, with the last
    block's saved bytes in the leanest of ``modes`` (what that block frees, at least)."""
    from memplan.memory import engine_fsdp2_backward as bwd

    states = components.phased_state_rows(ctx)
    kept = sum(r.bytes for r in states if r.component == "weights/fsdp_kept_all_gather")
    out = bwd.kept_at_loss_rows(ctx, kept=kept)
    if bwd.splits_backward(ctx) and ctx.stage == ctx.cfg.pp - 1 and modes:
        lean = max((Recompute(m) for m in modes), key=lambda m: SAVINGS[m.value])
        cfg: JobConfig = ctx.cfg.model_copy(update={"recompute": lean, "recompute_layers": None,
                                                    "recompute_map": (lean,) * len(ctx.arch.layers)})
        leanest = Context(ctx.arch, cfg, ctx.gpu, ctx.host, ctx.stage_override)
        out += bwd.first_reduce_scatter_rows(leanest, shape_rows + states + out)
    return out
