"""Exact best-first search over the global choices of a step-time ILP (``Problem.objective == "min_seconds"``).

The global part of a training plan (tp, pp, ZeRO/offload placement, micro-batch, ...) has a few hundred valid
combinations, while the per-layer part (recompute, optimizer placement, weight formats) is what needs integer
programming. One monolithic MIP over both has a weak relaxation (any convex mix of global choices satisfies the
memory rows on average), so HiGHS spends seconds proving optimality, and every no-good cut for the next
alternative starts that proof again. Here instead:

1. every valid combination of the global dimensions (a *row*: one entry of every factor and one key of every
   per-layer block) is listed (``joint_rows``);
2. each row gets a lower bound on its step time: the seconds of its factor entries plus, per block, the layers'
   cheapest mode, or the block's ``key_bounds`` (the recompute knapsack bound) where larger;
3. rows are taken in ascending bound; a row is evaluated exactly by the same ILP restricted to it (``restrict``:
   one entry per factor, one key per block, a model of a few hundred variables solved to optimality), or without
   any solver when every layer's fastest mode satisfies that ILP's rows (``ilp_fast.cheapest_plan``);
4. the best evaluated row is returned once no unevaluated row's bound is below its value. ``exclude`` (the
   no-good cut of the re-check loop) removes a row, and the next ``solve`` continues the same search, so
   alternatives cost a few more row evaluations, not a new MIP.

This is branch and bound with the global choice as the only branching variable, so the answer is the ILP's
optimum (ties: equal step times, to 12 significant digits, go to the row listed first; ``plan.rank_candidates``
then orders the verified ties by its documented key). When the time limit stops the search early, the best row
found is returned as ``feasible`` with ``Solution.gap``: its distance to the smallest bound left.
"""

from __future__ import annotations

import heapq
import math
import time
from dataclasses import replace
from typing import Any, TypeVar

from memplan.planner.ilp import IlpBuilder
from memplan.planner.ilp_fast import cheapest_plan, proven_infeasible
from memplan.planner.ilp_model import Factor, LayerBlock, Problem, Solution

JOINT_LIMIT = 50_000
"""At most this many global rows are listed; a larger space is solved as one MIP (``ilp.IlpBuilder``)."""


def joint_rows(problem: Problem, limit: int = JOINT_LIMIT) -> list[dict[str, Any]] | None:
    """Every combination of the global dimensions that has an entry in each factor and a key in each per-layer
    block (a natural join of their tables), in a deterministic order; None when more than ``limit``."""
    tables: list[tuple[tuple[str, ...], list[tuple]]] = [(f.dims, list(f.entries)) for f in problem.factors]
    for lb in problem.blocks:
        keys = sorted({k for per in lb.gpu for m in per.values() for k in m}, key=repr)
        tables.append((lb.key_dims, keys))
    tables.sort(key=lambda t: -len(t[1]))
    rows: list[dict[str, Any]] = [{}]
    for dims, keys in tables:
        shared = [d for d in dims if d in rows[0]] if rows else []
        index: dict[tuple, list[tuple]] = {}
        for k in keys:
            index.setdefault(tuple(k[dims.index(d)] for d in shared), []).append(k)
        rows = [{**r, **dict(zip(dims, k, strict=True))} for r in rows for k in index.get(tuple(r[d] for d in shared), ())]
        if len(rows) > limit:
            return None
    for d in problem.dims:
        if rows and d not in rows[0]:
            rows = [{**r, d: v} for r in rows for v in problem.dims[d]]
            if len(rows) > limit:
                return None
    return [r for r in rows if all(r[d] in problem.dims[d] for d in problem.dims)]


def _key(dims: tuple[str, ...], row: dict[str, Any]) -> tuple:
    return tuple(row[d] for d in dims)


def block_bounds(lb: LayerBlock) -> dict[tuple, float]:
    """Per key of a per-layer block: the seconds its layers take at least, the larger of each layer's cheapest mode
    summed and the block's ``key_bounds`` (a valid bound the builder computed, e.g. the recompute knapsack)."""
    cheapest: dict[tuple, float] = {}
    for per in lb.seconds:
        least: dict[tuple, float] = {}
        for keyed in per.values():
            for k, sec in keyed.items():
                least[k] = min(least.get(k, sec), sec)
        for k, sec in least.items():
            cheapest[k] = cheapest.get(k, 0.0) + sec
    return {k: max(sec, lb.key_bounds.get(k, 0.0)) for k, sec in cheapest.items()}


def lower_bound(problem: Problem, row: dict[str, Any], blocks: list[dict[tuple, float]] | None = None) -> float:
    """Seconds no plan with this global row beats: its factor entries' seconds plus each block's ``block_bounds``
    (``blocks``: those bounds, computed once for many rows)."""
    blocks = blocks if blocks is not None else [block_bounds(lb) for lb in problem.blocks]
    total = sum(f.entries[_key(f.dims, row)].seconds for f in problem.factors)
    return total + sum(b.get(_key(lb.key_dims, row), 0.0) for lb, b in zip(problem.blocks, blocks, strict=True))


_T = TypeVar("_T")


def _only(table: list[dict[str, dict[tuple, _T]]], k: tuple) -> list[dict[str, dict[tuple, _T]]]:
    """A per-layer table restricted to key ``k`` (modes without it stay, empty: not available there)."""
    return [{m: ({k: keyed[k]} if k in keyed else {}) for m, keyed in per.items()} for per in table]


def _maybe(table: list[dict[str, dict[tuple, _T]]] | None, k: tuple) -> list[dict[str, dict[tuple, _T]]] | None:
    return None if table is None else _only(table, k)


def _restrict_block(lb: LayerBlock, row: dict[str, Any]) -> LayerBlock:
    k = _key(lb.key_dims, row)
    phase_gpu = None if lb.phase_gpu is None else {ph: _only(t, k) for ph, t in lb.phase_gpu.items()}
    return replace(lb, gpu=_only(lb.gpu, k), seconds=_only(lb.seconds, k), cpu=_maybe(lb.cpu, k),
                   workspace=_maybe(lb.workspace, k), flight_workspace=_maybe(lb.flight_workspace, k),
                   error=_maybe(lb.error, k), phase_gpu=phase_gpu,
                   key_bounds={k: lb.key_bounds[k]} if k in lb.key_bounds else {})


def restrict(problem: Problem, row: dict[str, Any], cache: dict[tuple, LayerBlock] | None = None) -> Problem:
    """The ILP with every global dimension fixed to ``row``: one entry per factor, one key per block (``cache``:
    restricted blocks by block and key, shared by the rows with that key)."""
    cache = {} if cache is None else cache

    def block(i: int, lb: LayerBlock) -> LayerBlock:
        key = (i, _key(lb.key_dims, row))
        if key not in cache:
            cache[key] = _restrict_block(lb, row)
        return cache[key]

    factors = [Factor(f.name, f.dims, {_key(f.dims, row): f.entries[_key(f.dims, row)]}) for f in problem.factors]
    blocks = [block(i, lb) for i, lb in enumerate(problem.blocks)]
    layers = blocks.pop(0) if problem.layers is not None else None
    pp = row.get("pp")
    return replace(problem, dims={d: (row[d],) for d in problem.dims}, factors=factors, layers=layers,
                   extra_blocks=blocks, stage_map={pp: problem.stage_map[pp]} if pp in problem.stage_map else {})


def _same(value: float, best: float) -> bool:
    return float(f"{value:.12g}") <= float(f"{best:.12g}")


class RowSearch:
    """Best-first search over ``joint_rows``; the interface of ``ilp.IlpBuilder`` that the re-check loop uses
    (``solve``, ``exclude``, ``cutoff``, ``write_lp``)."""

    def __init__(self, problem: Problem, rows: list[dict[str, Any]]) -> None:
        self.p = problem
        self.rows = rows
        blocks = [block_bounds(lb) for lb in problem.blocks]
        self.bounds = [lower_bound(problem, r, blocks) for r in rows]
        self.queue = sorted(range(len(rows)), key=lambda i: (self.bounds[i], i))
        self.pos = 0
        self.done: list[tuple[float, int, Solution]] = []  # evaluated rows that fit: (seconds, row, solution)
        self.excluded: set[int] = set()
        self.limit = math.inf
        self.evaluated = 0
        self.odd: str | None = None
        self.plain = 0
        self.blocks: dict[tuple, LayerBlock] = {}
        """Restricted per-layer blocks by (block, key): rows that share a key share them."""
        """Rows answered without a MIP (``ilp_fast``: every layer's fastest mode fits, or its leanest cannot)."""

    def cutoff(self, seconds: float) -> None:
        """Only plans no slower than ``seconds`` (a bound from another part of the space; ties kept)."""
        self.limit = seconds * (1 + 1e-9)

    def exclude(self, choice: dict[str, Any], name: str) -> None:
        """No-good cut: the row ``choice`` describes is not returned again."""
        for i, row in enumerate(self.rows):
            if all(row.get(d) == v for d, v in choice.items()):
                self.excluded.add(i)
        self.done = [t for t in self.done if t[1] not in self.excluded]
        heapq.heapify(self.done)

    def write_lp(self, path: str) -> None:
        IlpBuilder(self.p).write_lp(path)

    def solve(self, *, time_limit: float | None = None, solver: str | None = None) -> Solution:
        """The fastest row not excluded (``Solution`` as ``IlpBuilder.solve`` returns it); ``feasible`` with
        ``gap`` when the time limit stops the search with rows left whose bound is below the best found."""
        stop = None if time_limit is None else time.monotonic() + time_limit
        while self.pos < len(self.queue):
            i = self.queue[self.pos]
            bound = self.bounds[i]
            if bound > self.limit or (self.done and bound > self.done[0][0] and not _same(bound, self.done[0][0])):
                break
            if stop is not None and time.monotonic() >= stop:
                return self._stopped(bound)
            self.pos += 1
            if i in self.excluded:
                continue
            sol = self._evaluate(i, solver, None if stop is None else stop - time.monotonic())
            if sol.status == "time_limit":
                self.pos -= 1
                return self._stopped(bound)
            if sol.status == "unbounded":  # a row's model is unbounded, so is the whole: say so, as the MIP would
                return sol
            if sol.status in ("optimal", "feasible") and sol.objective <= self.limit:
                heapq.heappush(self.done, (sol.objective, i, sol))
            elif sol.status != "infeasible":
                self.odd = self.odd or sol.status  # e.g. HiGHS's "infeasible_or_unbounded": reported if nothing fits
        if not self.done:
            return Solution(self.odd or "infeasible", {}, [], math.nan, math.nan)
        return self.done[0][2]

    def _stopped(self, bound: float) -> Solution:
        if not self.done:
            return Solution("time_limit", {}, [], math.nan, math.nan)
        best = self.done[0][2]
        gap = max(0.0, (best.objective - bound) / best.objective) if best.objective else 0.0
        return replace(best, status="feasible", gap=gap)

    def _evaluate(self, i: int, solver: str | None, time_limit: float | None) -> Solution:
        """Row ``i`` solved exactly: the ILP restricted to it (its per-layer modes)."""
        self.evaluated += 1
        one = restrict(self.p, self.rows[i], self.blocks)
        plain = cheapest_plan(one)  # every layer in its fastest mode fits: the row's optimum, without a solver
        if plain is not None:
            self.plain += 1
            return plain
        if proven_infeasible(one):  # even every layer's leanest mode is over a stage's capacity
            self.plain += 1
            return Solution("infeasible", {}, [], math.nan, math.nan)
        return IlpBuilder(one).solve(time_limit=time_limit, solver=solver)


def searcher(problem: Problem) -> Any:
    """A ``RowSearch`` for a step-time problem whose global rows can be listed, else the monolithic MIP."""
    if problem.objective == "min_seconds":
        rows = joint_rows(problem)
        if rows is not None:
            return RowSearch(problem, rows)
    return IlpBuilder(problem)
