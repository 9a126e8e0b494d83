"""A row of the step-time search solved without the MIP when its answer is plain: every layer in its fastest mode.

For one global row (``ilp_search.restrict``: one entry per factor, one key per block, one pipeline degree), no
plan is faster than the one that puts each layer in its cheapest mode; if that plan satisfies every memory row
the ILP would write, it is the row's optimum, and no solver (nor PuLP's import) is needed. The rows are
evaluated here with the ILP's own arithmetic (``ilp.IlpBuilder``: bytes rounded up to ``UNIT`` per term, the
capacity rounded down and one unit off, the allocator reserve as a scale, in-flight micro-batches per stage,
workspace as the largest of a stage's layers, gradients kept across micro-batches when the shape accumulates);
when they do not hold, the caller solves the row's MIP as before. Either way the plan is then re-checked by
``estimate`` with exact bytes.
"""

from __future__ import annotations

import math
from typing import Any

from memplan.planner import ilp_moments
from memplan.planner.ilp_cooldown import fast_units
from memplan.planner.ilp_layers import shared_phases
from memplan.planner.ilp_model import UNIT, LayerBlock, Problem, Solution, ceil_unit, stage_of


def cheapest_modes(lb: LayerBlock) -> list[str] | None:
    """Per layer, the fastest mode available at the block's one key (ties: fewer bytes, then ``lb.modes`` order);
    None when a layer has no mode there."""
    out = []
    for layer, per in enumerate(lb.seconds):
        usable = [(keyed[k], sum(lb.gpu[layer][m].values()), i, m) for i, (m, keyed) in enumerate(per.items())
                  for k in keyed if k in lb.gpu[layer].get(m, {})]  # the MIP offers a mode where it has bytes
        if not usable:
            return None
        out.append(min(usable)[3])
    return out


def _tables(lb: LayerBlock, phase: str | None) -> list:
    """The block's GPU tables alive in ``phase`` (None: every phase): its main table where its phases include
    ``phase``, plus its per-phase tables for that phase."""
    tables = [lb.gpu] if lb.alive(phase, lb.phases) else []
    if lb.phase_gpu is not None:
        tables += [t for ph, t in lb.phase_gpu.items() if phase is None or ph == phase]
    return tables


def _block_units(problem: Problem, lb: LayerBlock, modes: list[str], p: int, s: int, phase: str | None,
                 moment: int | None = None) -> int:
    """GPU units of a block on stage ``s`` in ``phase`` with ``modes`` (``IlpBuilder._block_terms``), the in-flight
    layers at ``moment`` (``ilp_moments``)."""
    if not lb.stages and p != 1:
        return 0
    tables = _tables(lb, phase)
    units, work, held = 0, 0, 0
    split = lb.flight_workspace is not None and lb.workspace_phases != lb.flight_phases
    for layer, m in enumerate(modes):
        if stage_of(layer, problem.num_layers, p, problem.stage_map) != s:
            continue
        for k in lb.gpu[layer][m]:
            flight = problem.key_flight(p, s, lb.key_dims, k)
            mult = problem.layer_flight(p, s, layer, lb.key_dims, k, moment) if lb.in_flight else 1
            nbytes = sum(t[layer][m].get(k, 0) for t in tables)
            units += ceil_unit(nbytes * mult) if nbytes else 0
            if lb.workspace is not None:
                w = lb.workspace[layer][m].get(k, 0)
                h = flight * lb.flight_workspace[layer][m].get(k, 0) if lb.flight_workspace else 0
                if split:
                    work, held = max(work, ceil_unit(w)), max(held, ceil_unit(h))
                else:
                    work = max(work, ceil_unit(w + h))
    if lb.workspace is not None:
        units += work if lb.alive(phase, shared_phases(lb)) else 0
        units += held if split and lb.alive(phase, lb.flight_phases) else 0
    return units


def _least_block_units(problem: Problem, lb: LayerBlock, p: int, s: int, phase: str | None,
                       moment: int | None = None) -> int:
    """A lower bound on a block's GPU units on stage ``s`` in ``phase``, whatever the modes: each layer's leanest
    available mode there, and no workspace (it only adds)."""
    if not lb.stages and p != 1:
        return 0
    tables = _tables(lb, phase)
    units = 0
    for layer, per in enumerate(lb.gpu):
        if stage_of(layer, problem.num_layers, p, problem.stage_map) != s:
            continue
        least = [ceil_unit(sum(t[layer][m].get(k, 0) for t in tables)
                           * (problem.layer_flight(p, s, layer, lb.key_dims, k, moment) if lb.in_flight else 1))
                 for m, keyed in per.items() for k in keyed]
        units += min(least, default=0)
    return units


def proven_infeasible(problem: Problem) -> bool:
    """Whether no mode assignment can fit a one-row problem: some stage's GPU row exceeds the capacity even with
    every layer in its leanest mode (a valid bound of the ILP's row), so the row needs no solver."""
    if any(len(v) != 1 for v in problem.dims.values()):
        return False
    p = problem.dims.get("pp", (1,))[0]
    cap = math.floor(problem.gpu_capacity / UNIT / (1.0 + problem.gpu_scale_pct / 100.0)) - 1
    key = _one_key(problem.layers) if problem.layers is not None else None
    return any(_factor_units(problem, s, phase) + ilp_moments.const_units(problem, p, s, key, t)
               + sum(_least_block_units(problem, lb, p, s, phase, t if i == 0 else None)
                     for i, lb in enumerate(problem.blocks)) > cap
               for s in range(p) for phase in problem.phases or (None,)
               for t in range(ilp_moments.count(problem, p, s, phase)) or (None,))


def _factor_units(problem: Problem, s: int, phase: str | None) -> int:
    """GPU units of the factors' one entries on stage ``s`` in ``phase``, with the kept gradients when the shape
    accumulates (``IlpBuilder._gpu_terms`` and ``_persist``)."""
    units = 0
    for f in problem.factors:
        for e in f.entries.values():
            per_stage = e.gpu_in(phase)
            idx = s if "pp" in f.dims else 0
            units += ceil_unit(per_stage[idx]) if idx < len(per_stage) and per_stage[idx] else 0
    entries = [e for f in problem.factors for e in f.entries.values()]
    if phase in problem.persist_phases and any(e.accumulates for e in entries):
        units += sum(ceil_unit(e.persist_gpu[s]) for e in entries if s < len(e.persist_gpu) and e.persist_gpu[s])
    return units


def _host_fits(problem: Problem, chosen: list[tuple[LayerBlock, list[str]]]) -> bool:
    """CPU and NVMe per node, and the CPU floor (``IlpBuilder._memory``): each row only where it has a term."""
    entries = [e for f in problem.factors for e in f.entries.values()]
    cpu = [ceil_unit(e.cpu) for e in entries if e.cpu]
    any_cpu = bool(cpu)  # the MIP writes the row when any mode of any layer has CPU bytes, chosen or not
    for lb, modes in chosen:
        if lb.cpu is not None:
            cpu += [ceil_unit(n) for layer, m in enumerate(modes) for n in lb.cpu[layer][m].values() if n]
            any_cpu = any_cpu or any(n for per in lb.cpu for keyed in per.values() for n in keyed.values())
    rows = [(any_cpu, cpu, problem.cpu_capacity),
            (any(e.nvme for e in entries), [ceil_unit(e.nvme) for e in entries], problem.nvme_capacity),
            (any(e.cpu_floor for e in entries), [ceil_unit(e.cpu_floor) for e in entries], problem.cpu_capacity)]
    return all(not written or sum(terms) <= math.floor(capacity / UNIT) - 1 for written, terms, capacity in rows)


def cheapest_plan(problem: Problem) -> Solution | None:
    """The optimum of a one-row problem when every layer's fastest mode fits (a ``Solution`` as the MIP returns
    it), else None (the caller solves the MIP)."""
    if problem.objective != "min_seconds" or any(len(v) != 1 for v in problem.dims.values()):
        return None
    chosen = []
    for lb in problem.blocks:
        modes = cheapest_modes(lb)
        if modes is None or (lb.suffix_mode is not None and lb.suffix_mode in modes):
            return None  # an unavailable layer, or a suffix order to keep: the MIP decides
        chosen.append((lb, modes))
    p = problem.dims.get("pp", (1,))[0]
    cap = math.floor(problem.gpu_capacity / UNIT / (1.0 + problem.gpu_scale_pct / 100.0)) - 1
    key = _one_key(problem.layers) if problem.layers is not None else None  # the cool-down's, once for every stage
    for s in range(p):
        for phase in problem.phases or (None,):
            if row_units(problem, chosen, p, s, phase, key) > cap:
                return None
    if not _host_fits(problem, chosen):
        return None
    seconds = sum(e.seconds for f in problem.factors for e in f.entries.values())
    for lb, modes in chosen:
        seconds += sum(sum(lb.seconds[layer][m].values()) for layer, m in enumerate(modes))
    choice: dict[str, Any] = {d: v[0] for d, v in problem.dims.items()}
    block_modes = {lb.name: modes for lb, modes in chosen}
    first = chosen[0][1] if problem.layers is not None else []
    return Solution("optimal", choice, first, seconds, seconds, block_modes)


def row_units(problem: Problem, chosen: list[tuple[LayerBlock, list[str]]], p: int, s: int, phase: str | None,
              key: tuple | None) -> int:
    """The ILP's units of stage ``s``'s GPU row in ``phase`` with each block's ``chosen`` modes (the first block the
    recompute block, at layer key ``key``): the largest over its moment rows (``ilp_moments``)."""
    best = 0
    for t in range(ilp_moments.count(problem, p, s, phase)) or (None,):
        units = _factor_units(problem, s, phase) + ilp_moments.const_units(problem, p, s, key, t)
        units += sum(_block_units(problem, lb, m, p, s, phase, t if i == 0 else None) for i, (lb, m) in enumerate(chosen))
        if problem.layers is not None:
            units += fast_units(problem, problem.layers, chosen[0][1], p, s, phase, key)
        best = max(best, units)
    return best


def _one_key(lb: LayerBlock) -> tuple | None:
    """The one layer key of a restricted block (None when it has another count)."""
    keys = {k for per in lb.gpu for keyed in per.values() for k in keyed}
    return next(iter(keys)) if len(keys) == 1 else None
