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
are never the largest. Deep interleaved pipelines still keep dozens (Llama 3 405B, p = 16, v = 8: 50-64 a stage), so
the rows are generated (``cut``): the MIP starts with a few per stage and phase (``_seeds``), and after each solve the
row of the moment the solution exceeds most is added, for the chosen layer key, until none is exceeded. A row of one
key's moment counts the other keys' in-flight layers as zero, which every plan's true row covers, so no row is ever
tighter than ``estimate``. V schedules also place the layers as the V does (``arch.parallel.v_chunk_ranges``): rank s
holds stages s and 2p − 1 − s, so rank 0 holds both ends (``v_stage_index``).

``Problem.moments``: (pp, stage, layer key) → ((h per chunk, constant bytes), ...); ``Problem.chunk_map``: the local
chunk of every layer under a pipeline degree with moments (the per-layer groups do not span chunks).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from memplan.arch import pp_schedules as ps
from memplan.arch.interleaved import chunk_counts_after_forwards
from memplan.arch.parallel import stage_index, v_chunk_ranges
from memplan.config import JobConfig
from memplan.planner.ilp_model import LayerBlock, Problem, ceil_unit, safe_name, stage_of

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
    """The states no other state matches or exceeds in every count (one of equal ones kept), in schedule order: a
    dominating state has at least the total, so each is checked against the ones kept before it by total."""
    order = sorted(range(len(states)), key=lambda i: -sum(states[i][0]) - sum(states[i][1]))
    kept: list[int] = []
    for i in order:
        a = states[i][0] + states[i][1]
        if not any(all(x >= y for x, y in zip(states[j][0] + states[j][1], a, strict=True)) for j in kept):
            kept.append(i)
    return [states[i] for i in sorted(kept)]


@lru_cache(maxsize=1024)
def _states(name: str | None, pp: int, stage: int, v: int, m: int, group: int | None = None,
            extra: int = 0) -> tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]:
    """The undominated (held, awaiting W) per-chunk counts of a rank's schedule (``_pareto``): a named schedule's
    ``arch.pp_schedules.flight_states``, else Megatron's interleaved ``arch.interleaved.chunk_counts_after_forwards``
    with its group size and extra warm-up forward (``memory.activations_layers.interleave_knobs``)."""
    if name is not None:
        return tuple(_pareto(list(ps.flight_states(name, pp, stage, v, m))))
    counts = chunk_counts_after_forwards(pp, stage, v, m, group=group, extra=extra)
    return tuple(_pareto([(h, (0,) * v) for h in counts]))


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
        grads = psf.weight_grad_bytes(ctx)
    else:
        v, last = cfg.perf.virtual_stages, cfg.perf.virtual_stages - 1
        sizes = chunk_layer_counts(len(ctx.layers), v, first_stage=ctx.stage == 0)
        grads = (0,) * v
    ends = [0] * v
    if ctx.stage == 0:
        ends[0] += act.embedding_bytes(ctx, counting)
    if ctx.holds_output:
        ends[last] += act.final_norm_bytes(ctx, counting) + act.loss_bytes(ctx, counting)
    chunks = tuple(c for c, size in enumerate(sizes) for _ in range(size))
    out = [(h, sum(n * e for n, e in zip(h, ends, strict=True)) + sum(n * g for n, g in zip(w, grads, strict=True)))
           for h, w in _states(name, cfg.pp, ctx.stage, v, cfg.grad_accum, *act.interleave_knobs(cfg))]
    return chunks, out


def build(setting: Any, dims: dict[str, tuple], layers: LayerBlock | None) -> tuple[dict, dict[int, tuple[int, ...]]]:
    """(``Problem.moments``, the chunk map) for every pipeline degree and layer key of ``layers`` where ``applies``
    (the shape factor leaves ``ROWS`` out exactly where a key has them)."""
    from memplan.errors import MemplanError
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
            ctx0 = Context(setting.arch, cfg, setting.gpu, setting.host, stage_override=0)
            if not applies(cfg) or not act.modelled(ctx0):
                continue
            chunks = [0] * len(setting.arch.layers)
            per_stage = {}
            for s in range(cfg.pp):
                ctx = ctx0.at_stage(s)
                local, per_stage[s] = stage_moments(ctx)
                for (i, _), c in zip(ctx.layers, local, strict=True):
                    chunks[i] = c
        except (MemplanError, ValueError):  # a key the exact model rejects keeps the whole-stage rows
            continue
        moments.update({(cfg.pp, s, key): tuple(rows) for s, rows in per_stage.items()})
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


def _seeds(problem: Problem, p: int, s: int, key: tuple) -> list[int]:
    """The moments the MIP starts with for (p, s, key): the one holding the most chunk micro-batches, and the largest
    with every layer in the least- and in the most-saving mode (``cut`` adds any other a solution exceeds)."""
    lb, rows, chunks = problem.layers, problem.moments[p, s, key], problem.chunk_map[p]
    assert lb is not None
    out = {max(range(len(rows)), key=lambda t: sum(rows[t][0]))}
    members = [i for i in range(problem.num_layers) if stage_of(i, problem.num_layers, p, problem.stage_map) == s]
    ranked = sorted(lb.modes, key=lambda m: lb.savings_rank.get(m, 0))
    for m in (ranked[0], ranked[-1]):
        per = [0] * len(rows[0][0])
        for i in members:
            per[chunks[i]] += lb.gpu[i].get(m, {}).get(key, 0)
        out.add(max(range(len(rows)), key=lambda t: sum(h * b for h, b in zip(rows[t][0], per, strict=True))
                    + rows[t][1]))
    return sorted(out)


def initial_rows(builder: Any, p: int, s: int, phase: str | None) -> list[dict[tuple, int] | None]:
    """The moment selections (layer key → moment) of the rows the MIP starts with for (p, s, phase); [None]: one row
    with the whole-stage counts (no moments there)."""
    P = builder.p
    if not count(P, p, s, phase):
        return [None]
    per_key = {k: _seeds(P, p, s, k) for (pp, st, k) in P.moments if pp == p and st == s
               and ("layerkey0", k) in builder.z}
    if not per_key:
        return [None]
    n = max(len(v) for v in per_key.values())
    return [{k: v[min(j, len(v) - 1)] for k, v in per_key.items()} for j in range(n)]


def const_terms(builder: Any, p: int, s: int, sel: dict[tuple, int] | None) -> list[Any]:
    """The constant bytes (ends and I-to-W) of each selected key's moment, on the key's selector."""
    out = []
    for key, t in (sel or {}).items():
        c = ceil_unit(builder.p.moments[p, s, key][t][1])
        if c:
            out.append(c * builder.z["layerkey0", key])
    return out


def const_units(problem: Problem, p: int, s: int, key: tuple | None, t: int | None) -> int:
    """``const_terms`` at one layer key (``ilp_fast``)."""
    if t is None or key is None:
        return 0
    m = moment(problem, p, s, key, t)
    return ceil_unit(m[1]) if m else 0


def _flight_units(builder: Any, p: int, s: int, phase: str | None, key: tuple) -> list[int]:
    """Per moment of (p, s, key), the units of the in-flight terms a row with that moment holds for the current
    solution (``IlpBuilder._block_terms``' in-flight part and ``const_terms``)."""
    P = builder.p
    lb, rows, chunks = P.layers, P.moments[p, s, key], P.chunk_map[p]
    tables = [lb.gpu] if lb.alive(phase, lb.phases) else []
    if lb.phase_gpu is not None:
        tables += [t for ph, t in lb.phase_gpu.items() if phase is None or ph == phase]
    held: dict[tuple[int, int], int] = {}
    for gkey, members in builder.groups[0].items():
        rep = members[0]
        if stage_of(rep, P.num_layers, p, P.stage_map) != s:
            continue
        for m in lb.modes:
            n = round(builder.n[0, gkey, m].value() or 0)
            nbytes = sum(t[rep][m].get(key, 0) for t in tables)
            if n and nbytes:
                held[nbytes, chunks[rep]] = held.get((nbytes, chunks[rep]), 0) + n
    return [sum(n * ceil_unit(nbytes * h[c]) for (nbytes, c), n in held.items()) + ceil_unit(const)
            for h, const in rows]


def cut(builder: Any, probs: list[Any]) -> int:
    """Row generation: for the solution in ``builder``'s variables, each stage and phase whose largest moment row
    (over every moment of the chosen layer key) exceeds the capacity (or the peak under the ``min_gpu_bytes``
    objective) gets that row, in ``builder`` and in each of ``probs`` (the copies being solved); returns how many
    rows were added (0: the solution meets every moment)."""
    P = builder.p
    if not P.moments or P.layers is None:
        return 0
    p = next((v for (d, v), var in builder.x.items() if d == "pp" and (var.value() or 0) > 0.5), 1)
    key = next((k for (f, k), var in builder.z.items() if f == "layerkey0" and (var.value() or 0) > 0.5), None)
    limit = builder.cap  # under the peak objective also the peak the solution claims (no row may exceed it)
    if builder.peak is not None:
        limit = min(limit, builder.pulp.value(builder.peak) or 0.0)
    added = 0
    for (pp, s, phase), first in list(builder.moment_rows.items()):
        if pp != p or key is None or (p, s, key) not in P.moments or first is None:
            continue
        label, sel = first
        units = _flight_units(builder, p, s, phase, key)
        worst = max(range(len(units)), key=units.__getitem__)
        value = builder.pulp.value(builder.gpu_rows[p, s, label]) or 0.0
        if value - units[sel[key]] + units[worst] > limit + 0.5:
            tag = f"{phase}_k{safe_name(key)}_m{worst}"
            if (p, s, tag) not in builder.gpu_rows:
                builder.gpu_row(p, s, phase, {key: worst}, tag, probs)
                added += 1
    return added
