"""Per-chunk in-flight activations as exact linear rows of the training ILP: the interleaved schedules (Megatron's,
torch's ``Interleaved1F1B``) and the named torch.distributed.pipelining schedules, V-shaped ones included.

``estimate`` counts a pipelined stage's saved activations per model chunk (``memory.activations_flight``): at each
moment right after a forward (or an input backward, I) of the rank's schedule, chunk c holds h_c micro-batches whose
backward has not finished and w_c whose I ran but whose weight backward (W) has not; the stage holds
Σ_c h_c·(a_c + e_c) + w_c·g_c, a_c = Σ over chunk c's layers of one micro-batch's saved bytes in the layer's recompute
mode, e_c the embedding (chunk 0 of rank 0) and the final norm and loss (the output chunk) of one micro-batch, g_c what
one micro-batch keeps from its I to its W (``memory.pp_schedule_flight.weight_grad_bytes``, independent of the
recompute modes). Its peak is the largest such sum over the moments (``arch.interleaved.peak_chunk_bytes``,
``arch.pp_schedules.peak_chunk_bytes``).

Each moment's sum is linear in the per-layer choices, so the ILP writes one memory row per moment instead of one row
with a whole-stage count rounded up: a layer's bytes weighted by its chunk's h_c at that moment, and the moment's
constant Σ_c h_c·e_c + w_c·g_c on the layer key's selector. The largest row is then exactly ``estimate``'s figure.
Moments that another moment matches or exceeds chunk by chunk (h and w) are dropped: bytes are non-negative, so they
are never the largest. V schedules also place the layers as the V does (``arch.parallel.v_chunk_ranges``): rank s
holds stages s and 2p − 1 − s, so rank 0 holds both ends (``v_stage_index``).

``Problem.moments``: (pp, stage, layer key) → ((h per chunk, constant bytes), ...); ``Problem.chunk_map``: the local
chunk of every layer under a pipeline degree with moments (the per-layer groups do not span chunks).
"""

from __future__ import annotations

from typing import Any

from memplan.arch import pp_schedules as ps
from memplan.arch.interleaved import chunk_counts_after_forwards
from memplan.arch.parallel import stage_index, v_chunk_ranges
from memplan.config import JobConfig
from memplan.planner.ilp_model import LayerBlock, Problem, ceil_unit

ROWS = ("activations/embeddings", "activations/final_norm", "activations/loss", "activations/pp_weight_grad_pending")
"""``estimate``'s in-flight rows besides ``activations/layers`` that the moment rows hold (the shape factor leaves them
out where moments apply)."""


def applies(cfg: JobConfig) -> bool:
    """Whether ``cfg`` (a training job with its pp) counts its stage's activations per chunk at several moments: pp > 1
    with the interleaved schedule (v > 1) or a named multi-chunk schedule (``memory.pp_schedule_flight.named``; the
    single-chunk ones, 1F1B and GPipe, are exact with one whole-stage count)."""
    from memplan.memory import pp_schedule_flight as psf

    if not cfg.job.trains or cfg.pp <= 1:
        return False
    name = psf.named(cfg)
    if name is not None:
        return name not in ps.SINGLE
    return cfg.perf.virtual_stages > 1


def v_stage_index(arch: Any, pp: int) -> tuple[int, ...]:
    """The pipeline rank of every layer under a V-shaped schedule (``arch.parallel.v_chunk_ranges``)."""
    out = [0] * len(arch.layers)
    for rank, ranges in enumerate(v_chunk_ranges(arch, pp)):
        for rng in ranges:
            for i in rng:
                out[i] = rank
    return tuple(out)


def stage_maps(arch: Any, base: JobConfig, pps: tuple[int, ...]) -> dict[int, tuple[int, ...]]:
    """Per pipeline degree, the rank of every layer: the V layout under a V schedule (``base``'s
    ``engine_config.pp_schedule``, engine fsdp2), else the balanced contiguous stages (``arch.parallel.stage_index``)."""
    from memplan.memory import pp_schedule_flight as psf

    v_shape = psf.named(base.model_copy(update={"pp": 2})) in ps.V_SHAPE
    return {p: v_stage_index(arch, p) if v_shape and p > 1 else stage_index(arch, p) for p in pps}


def _pareto(states: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """The states no other state matches or exceeds in every count (the first of equal ones kept)."""
    flat = [h + w for h, w in states]
    keep = []
    for i, a in enumerate(flat):
        if not any(j != i and all(x >= y for x, y in zip(b, a, strict=True)) and (b != a or j < i)
                   for j, b in enumerate(flat)):
            keep.append(states[i])
    return keep


def stage_moments(ctx: Any) -> tuple[tuple[int, ...], list[tuple[tuple[int, ...], int]]]:
    """(local chunk of each of the stage's layers, in ``ctx.layers`` order; per undominated moment (h per chunk, the
    constant Σ_c h_c·e_c + w_c·g_c in bytes)) for the stage ``ctx`` reports (``memory.activations_flight``'s split)."""
    from memplan.arch.interleaved import chunk_layer_counts
    from memplan.memory import activations as act
    from memplan.memory import pp_schedule_flight as psf

    cfg = ctx.cfg
    counting = act.counting_for(cfg)
    name = psf.named(cfg)
    if name is not None:
        v, sizes, last = psf.chunks(cfg), psf.chunk_sizes(ctx), psf.output_chunk(ctx)
        states = list(ps.flight_states(name, cfg.pp, ctx.stage, v, cfg.grad_accum))
        grads = psf.weight_grad_bytes(ctx)
    else:
        v, last = cfg.perf.virtual_stages, cfg.perf.virtual_stages - 1
        sizes = chunk_layer_counts(len(ctx.layers), v, first_stage=ctx.stage == 0)
        states = [(h, (0,) * v) for h in chunk_counts_after_forwards(cfg.pp, ctx.stage, v, cfg.grad_accum)]
        grads = (0,) * v
    ends = [0] * v
    if ctx.stage == 0:
        ends[0] += act.embedding_bytes(ctx, counting)
    if ctx.holds_output:
        ends[last] += act.final_norm_bytes(ctx, counting) + act.loss_bytes(ctx, counting)
    chunks = tuple(c for c, size in enumerate(sizes) for _ in range(size))
    out = [(h, sum(n * e for n, e in zip(h, ends, strict=True)) + sum(n * g for n, g in zip(w, grads, strict=True)))
           for h, w in _pareto(states)]
    return chunks, out


def build(setting: Any, dims: dict[str, tuple], layers: LayerBlock | None) -> tuple[dict, dict[int, tuple[int, ...]]]:
    """(``Problem.moments``, the chunk map) for every pipeline degree and layer key of ``layers`` where ``applies``."""
    from memplan.memory import activations as act
    from memplan.memory.context import Context
    from memplan.planner.setting import config_for

    moments: dict[tuple[int, int, tuple], tuple] = {}
    chunk_map: dict[int, tuple[int, ...]] = {}
    if layers is None:
        return moments, chunk_map
    keys = sorted({k for per in layers.gpu for m in per.values() for k in m}, key=repr)
    for key in keys:
        choice = dict(zip(layers.key_dims, key, strict=True))
        try:
            cfg = config_for(setting.base, choice, global_batch=setting.global_batch)
        except ValueError:
            continue
        if not applies(cfg):
            continue
        ctx0 = Context(setting.arch, cfg, setting.gpu, setting.host, stage_override=0)
        if not act.modelled(ctx0):
            continue
        chunks = [0] * len(setting.arch.layers)
        for s in range(cfg.pp):
            ctx = ctx0.at_stage(s)
            local, rows = stage_moments(ctx)
            for (i, _), c in zip(ctx.layers, local, strict=True):
                chunks[i] = c
            moments[cfg.pp, s, key] = tuple(rows)
        chunk_map[cfg.pp] = tuple(chunks)
    return moments, chunk_map


def count(problem: Problem, p: int, s: int, phase: str | None) -> int:
    """Moment rows of stage ``s`` under pp = ``p`` in ``phase``: the most moments of any layer key there where the
    recompute block's bytes are alive (0: one row, no moments)."""
    lb = problem.layers
    if lb is None or not problem.moments or not lb.alive(phase, lb.phases):
        return 0
    return max((len(rows) for (pp, st, _), rows in problem.moments.items() if pp == p and st == s), default=0)


def moment(problem: Problem, p: int, s: int, key: tuple, t: int) -> tuple[tuple[int, ...], int] | None:
    """Moment ``t`` of (p, s, key) (its last one when it has fewer; None without moments)."""
    rows = problem.moments.get((p, s, key))
    return rows[min(t, len(rows) - 1)] if rows else None


def const_terms(builder: Any, p: int, s: int, t: int | None) -> list[Any]:
    """The moment's constant bytes (ends and I-to-W) on each layer key's selector."""
    if t is None:
        return []
    out = []
    for (pp, st, key), rows in builder.p.moments.items():
        sel = builder.z.get(("layerkey0", key))
        if pp == p and st == s and sel is not None:
            c = ceil_unit(rows[min(t, len(rows) - 1)][1])
            if c:
                out.append(c * sel)
    return out


def const_units(problem: Problem, p: int, s: int, key: tuple | None, t: int | None) -> int:
    """``const_terms`` at one layer key (``ilp_fast``)."""
    if t is None or key is None:
        return 0
    m = moment(problem, p, s, key, t)
    return ceil_unit(m[1]) if m else 0
