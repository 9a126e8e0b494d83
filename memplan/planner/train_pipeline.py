"""FSDP2's size-dependent rows in the training ILP: what ``components.job_rows`` adds beside the memoized state rows
for engine fsdp2, per stage, so that the ILP's bytes for a layout are at least ``estimate``'s.

Under a pipeline (torch.distributed.pipelining), in the shape factor: the stage outputs and receive buffers
(``memory.pp_stage_buffers``), the last stage's returned outputs (``memory.pp_outputs``) and the part of the
accumulated gradients alive at the in-flight peak, which grows with the step's micro-batches m
(``engine_buffers.fsdp2_pipeline_rows``; the states factor evaluates its state rows at m = 1, ``train_phases.phased``,
so the shape row adds the difference). The interleaved cool-down
(``engine_buffers.fsdp2_cooldown_rows``) depends on the per-layer recompute modes: ``cooldown_terms`` hands it to the
ILP as exact linear rows (``ilp_cooldown``). Without a pipeline: FSDP2's no-reshard all-gather output kept through
the loss (``engine_fsdp2_backward.kept_at_loss_rows``) and the first block's reduce-scatter
(``first_reduce_scatter_rows``, with the last block in the leanest mode: what it frees at least). The receive buffers
the saved activations already count are subtracted only where that count does not depend on the modes.
"""

from __future__ import annotations

from memplan.config import Engine, JobConfig, Recompute
from memplan.errors import MemplanError
from memplan.memory import components
from memplan.memory.breakdown import Row, Tier
from memplan.memory.context import Context
from memplan.memory.memo import size_free
from memplan.planner.ilp_model import LayerBlock
from memplan.planner.setting import SAVINGS

AT_PEAK = "gradients/fsdp_pp_accumulated_at_peak"
ACCUMULATED = "gradients/fsdp_pp_accumulated"


def extra_rows(ctx: Context, shape_rows: list[Row], layers: LayerBlock | None, key: tuple,
               modes: tuple[str, ...], cache: dict | None = None) -> list[Row]:
    """The stage's FSDP2 rows that the states factor (size-free, m = 1) leaves out (phases not yet set); ``shape_rows``:
    the stage's activation rows outside the blocks; ``layers``/``key``: the recompute block and this shape's key
    (per-layer saved bytes per micro-batch by mode); ``modes``: the recompute modes the plan may choose; ``cache``: one
    shape factor's (G, U) by tp, pp and stage kind (``_gradients``)."""
    cfg = ctx.cfg
    if cfg.effective_engine is not Engine.FSDP2 or not cfg.job.trains:
        return []
    try:
        if cfg.pp > 1:
            return _pipeline_rows(ctx, layers, key, {} if cache is None else cache)
        return _unpipelined_rows(ctx, shape_rows, modes)
    except (MemplanError, ValueError):  # a combination the exact model rejects: the states factor has no row for it
        return []


def _pipeline_rows(ctx: Context, layers: LayerBlock | None, key: tuple, cache: dict) -> list[Row]:
    """Stage buffers and the at-peak gradients beyond m = 1's (the cool-down is ``cooldown_terms``', exact in the ILP).

    The accumulated gradients G and the unit U (``_gradients``); the at-peak row is ``engine_buffers.
    fsdp2_pipeline_rows``' max(0, ⌈G·c/v⌉ − U), c = ``chunks_with_gradients_at_peak`` at m and at 1; none under a named
    schedule, whose c is every chunk at any m (the states factor's m = 1 row holds it)."""
    from memplan.arch.parallel import chunks_with_gradients_at_peak
    from memplan.memory import engine_buffers, pp_outputs, pp_stage_buffers
    from memplan.memory.pp_schedule_flight import named

    cfg = ctx.cfg
    grads, unit = _gradients(ctx, cache)
    out = []
    if grads and cfg.grad_accum > 1 and not named(cfg):  # a named schedule counts every chunk's at any m (m = 1's)
        total, v = grads[0].bytes, max(1, cfg.perf.virtual_stages)
        at_m, at_one = (max(0, -(-total * chunks_with_gradients_at_peak(cfg.pp, ctx.stage, v, m) // v) - unit)
                        for m in (cfg.grad_accum, 1))
        if at_m > at_one:
            out.append(Row(AT_PEAK, Tier.GPU, at_m - at_one, engine_buffers.FSDP2_PP,
                           "at-peak gradients beyond one micro-batch's"))
    return out + _stage_buffer_rows(ctx, pp_stage_buffers) + pp_outputs.rows(ctx)


def cooldown_terms(ctx: Context, cache: dict) -> list[tuple[int, dict[int, int]]]:
    """The stage's cool-down for ``ilp_cooldown`` (``engine_buffers.fsdp2_cooldown_rows`` as linear terms): per chunk j
    without gradients at the peak, (j·⌈G/v⌉ bytes, micro-batches of each of the stage's layers freed by its first
    backward: its chunk's count, ``arch.parallel.cooldown_freed``; chunks by ``chunk_layer_counts``)."""
    from memplan.arch.interleaved import chunk_layer_counts
    from memplan.arch.parallel import cooldown_freed
    from memplan.memory.pp_schedule_flight import named

    cfg = ctx.cfg
    v = max(1, cfg.perf.virtual_stages)
    if cfg.effective_engine is not Engine.FSDP2 or cfg.pp <= 1 or v <= 1 or not cfg.job.trains or named(cfg):
        return []  # a named schedule counts every chunk's gradients at the peak: no cool-down above it
    grads, _ = _gradients(ctx, cache)
    if not grads:
        return []
    chunk_of: list[int] = []
    for c, size in enumerate(chunk_layer_counts(len(ctx.layers), v, first_stage=ctx.stage == 0)):
        chunk_of += [c] * size
    chunk_grad = -(-grads[0].bytes // v)
    return [(j * chunk_grad, {i: freed[chunk_of[n]] for n, (i, _) in enumerate(ctx.layers)})
            for j, freed in cooldown_freed(cfg.pp, ctx.stage, v, cfg.grad_accum)]


def _gradients(ctx: Context, cache: dict) -> tuple[list[Row], int]:
    """(the ``gradients/fsdp_pp_accumulated`` row of the state rows at m = 1, where they hold it: full-weight fsdp2
    sharded over more than one rank; ``fsdp2_rows``' unit U). Both depend on the stage's tensors only, so stages of
    the same kind (first, last, layer classes; ``planner.classes``) share them."""
    from memplan.planner.classes import layer_classes

    cfg = ctx.cfg
    classes = layer_classes(ctx.arch)
    sig = (cfg.tp, cfg.pp, ctx.stage == 0, ctx.stage == cfg.pp - 1, tuple(classes[i] for i, _ in ctx.layers))
    if sig not in cache:
        one = Context(ctx.arch, cfg.model_copy(update={"grad_accum": 1}), ctx.gpu, ctx.host, ctx.stage_override)
        grads = [r for r in components.phased_state_rows(one) if r.tier is Tier.GPU and r.component == ACCUMULATED]
        cache[sig] = (grads, _unit_reduce_bytes(one) if grads else 0)
    return cache[sig]


@size_free
def _unit_reduce_bytes(ctx: Context) -> int:
    """U of ``engine_buffers.fsdp2_rows``: the largest unit's elements in the reduce dtype (bytes); memoized by the
    size-free configuration and stage (``memory.memo.size_free``)."""
    from memplan.memory.engine_buffers import fsdp_unit_numel
    from memplan.memory.engine_states import compute_dtype, mixed, param_dtype
    from memplan.units import bits_to_bytes

    reduce_dtype = param_dtype(ctx) if mixed(ctx) else compute_dtype(ctx)
    return bits_to_bytes(max(fsdp_unit_numel(ctx)), reduce_dtype.bits)


def _stage_buffer_rows(ctx: Context, pp_stage_buffers) -> list[Row]:
    """``pp_stage_buffers.rows``, with the receive buffers the activations already save taken off only under the
    paper's layout and 1F1B (v = 1: their count, the in-flight micro-batches, does not depend on the modes); the
    interleaved count does, and a plan always carries a per-layer ``recompute_map`` (so "full recompute of every layer
    without a map" never holds for it, whatever the base config says): there every buffer counts (over by at most
    those saved inputs)."""
    cfg = ctx.cfg
    rows = pp_stage_buffers.rows(ctx)
    exact = cfg.effective_activation_accounting == "paper" and cfg.perf.virtual_stages <= 1
    if not pp_stage_buffers.applies(ctx) or not pp_stage_buffers.input_saved(ctx) or exact:
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


def chunk_maps(arch, virtual_stages: int, cooldown: dict) -> dict[int, tuple[int, ...]]:
    """Per pipeline degree of ``cooldown`` (``cooldown_terms`` by (pp, stage, key)), the model chunk of every layer on a
    stage with cool-down terms (0 elsewhere): the split ``cooldown_terms`` and ``activations.chunk_saved_bytes`` use
    (``arch.interleaved.chunk_layer_counts``). Stages without terms keep their layers in one group, so the per-layer
    part of the ILP stays as small as before there."""
    from memplan.arch.interleaved import chunk_layer_counts
    from memplan.arch.parallel import arch_stage_ranges

    out: dict[int, tuple[int, ...]] = {}
    for p in sorted({k[0] for k in cooldown}):
        stages = {k[1] for k in cooldown if k[0] == p}
        chunks: list[int] = []
        for s, rng in enumerate(arch_stage_ranges(arch, p)):
            for c, size in enumerate(chunk_layer_counts(len(rng), virtual_stages, first_stage=s == 0)):
                chunks += [c if s in stages else 0] * size
        out[p] = tuple(chunks)
    return out
