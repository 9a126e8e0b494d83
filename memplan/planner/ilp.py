"""A generic integer linear program over one-hot global choices, factor tables and per-layer modes.

Formulation (in the spirit of COSMA's ILP scheduling and PuLP's ``wedding.py``):

- ``x[d, v]`` binary: dimension ``d`` (tp, pp, zero placement, micro-batch, ...) takes value ``v``;
  ``Σ_v x[d, v] = 1``.
- A *factor* is a table over a few dimensions (e.g. model states over tp × pp × placement ×
  optimizer). ``z[f, k]`` (continuous in [0, 1]) selects its row ``k``: ``Σ_k z[f, k] = 1`` and
  ``z[f, k] ≤ x[d, k_d]`` for each of its dimensions. With integral ``x`` exactly one row is
  selectable, so ``z`` is integral too; rows that are invalid combinations simply do not exist.
- Per-layer modes ``r[l, m]`` binary (``Σ_m r[l, m] = 1``), e.g. recompute none/selective/full.
  A layer's bytes depend on its mode *and* on global choices (micro-batch, tp): the product is
  linearized with ``w[l, m, k] ≥ r[l, m] + y[k] − 1``, ``w ≥ 0``, ``y`` the selector of a key factor.
  Memory constraints push ``w`` down to exactly the product.
- Memory per GPU is constrained for every pipeline degree ``p`` and stage ``s < p`` (active only
  when ``x[pp, p] = 1``, by a big-M term); CPU and NVMe per node.

The data lives in ``ilp_model``, the per-layer variables in ``ilp_layers``, the per-chunk in-flight moment rows
(added lazily: row generation in ``_solve``) in ``ilp_moments``, the kept gradients and host rows in ``ilp_rows``;
this module builds the global part, the GPU memory rows and the objective, and solves.

Coefficients are bytes scaled to ``UNIT`` bytes, demand rounded up and capacity rounded down,
so a solver's tolerance can never admit a plan that the exact integer re-check would reject.
"""

from __future__ import annotations

import math
import time
from typing import Any

from memplan.planner import ilp_cooldown, ilp_moments, ilp_rows, solvers
from memplan.planner.ilp_layers import LayerBlocks
from memplan.planner.ilp_model import (
    ERROR_SCALE,
    PRIMARY_TIE_ABS,
    PRIMARY_TIE_REL,
    SECONDS_SCALE,
    SOLVER_MAX_COEFF,
    UNIT,
    Entry,
    Factor,
    LayerBlock,
    Problem,
    Solution,
    ceil_unit,
    safe_name,
    stage_of,
)
from memplan.planner.solvers import _highs_gap, _status_name

__all__ = [
    "SECONDS_SCALE",
    "UNIT",
    "Entry",
    "Factor",
    "IlpBuilder",
    "LayerBlock",
    "Problem",
    "Solution",
    "_highs_gap",
    "ceil_unit",
    "stage_of",
]


class IlpBuilder(LayerBlocks):
    """Builds the PuLP model for a Problem, solves it, and adds no-good cuts for alternatives."""

    def __init__(self, problem: Problem) -> None:
        import pulp

        self.pulp = pulp
        self.p = problem
        self.prob = pulp.LpProblem("memplan", pulp.LpMinimize)
        self.x: dict[tuple[str, Any], Any] = {}
        self.z: dict[tuple[str, tuple], Any] = {}
        self._build()

    # -- variables -----------------------------------------------------------------------------
    def _build(self) -> None:
        pl, P = self.pulp, self.p
        for d, values in P.dims.items():
            for i, v in enumerate(values):
                self.x[d, v] = self.prob.add_variable(f"x_{safe_name(d)}_{i}", cat="Binary")
            self.prob += pl.lpSum(self.x[d, v] for v in values) == 1, f"one_{safe_name(d)}"
        for f in P.factors:
            self._factor(f)
        self.n: dict[tuple[int, Any, str], Any] = {}
        self.any: dict[tuple[int, Any, str], Any] = {}
        self.w: dict[tuple[int, Any, str, tuple], Any] = {}
        self.ws: dict[tuple[int, int, int, int], Any] = {}
        self.groups: list[dict[tuple[int, int], list[int]]] = []
        for bi, lb in enumerate(P.blocks):
            self._layers(bi, lb)
        self.cool = ilp_cooldown.add_rows(self)
        self._memory()
        self._objective()

    def _factor(self, f: Factor) -> None:
        """Select one row of ``f``: its marginal on each dimension equals that dimension's one-hot."""
        pl = self.pulp
        by_value: dict[tuple[str, Any], list[Any]] = {(d, v): [] for d in f.dims for v in self.p.dims[d]}
        for j, key in enumerate(f.entries):
            var = self.prob.add_variable(f"z_{safe_name(f.name)}_{j}", lowBound=0, upBound=1)
            self.z[f.name, key] = var
            for d, v in zip(f.dims, key, strict=True):
                by_value[d, v].append(var)
        for (d, v), zs in by_value.items():
            idx = self.p.dims[d].index(v)
            self.prob += pl.lpSum(zs) == self.x[d, v], f"marg_{safe_name(f.name)}_{safe_name(d)}_{idx}"

    # -- constraints ---------------------------------------------------------------------------
    def _gpu_terms(self, p: int, s: int, phase: str | None = None, moment: dict | None = None) -> list[Any]:
        """GPU terms of stage ``s`` under pp = ``p`` alive in ``phase`` (None: every byte of every phase), the in-flight
        activations at ``moment`` (``ilp_moments``)."""
        P = self.p
        terms = []
        for f in P.factors:
            has_pp = "pp" in f.dims
            for key, e in f.entries.items():
                if has_pp and key[f.dims.index("pp")] != p:
                    continue
                idx = s if has_pp else 0
                per_stage = e.gpu_in(phase)
                nbytes = per_stage[idx] if idx < len(per_stage) else 0
                if nbytes:
                    terms.append(ceil_unit(nbytes) * self.z[f.name, key])
        for bi, lb in enumerate(P.blocks):
            terms += self._block_terms(bi, lb, p, s, phase, moment if bi == 0 else None)
        terms += ilp_moments.const_terms(self, p, s, moment)
        if phase in P.persist_phases and (p, s) in self.persist:
            terms.append(self.persist[p, s])
        if phase in (None, ilp_cooldown.PHASE) and (p, s) in self.cool:
            terms.append(self.cool[p, s])
        return terms

    def _memory(self) -> None:
        P = self.p
        scale = 1.0 + P.gpu_scale_pct / 100.0
        self.cap = math.floor(P.gpu_capacity / UNIT / scale) - 1
        self.persist = ilp_rows.persist_rows(self)
        self.gpu_rows: dict[tuple[int, int, str | None], Any] = {}
        self.moment_rows: dict[tuple[int, int, str | None], tuple[str | None, dict] | None] = {}
        self.peak: Any = None
        for p in P.dims.get("pp", (1,)):
            for s in range(p):
                for phase in P.phases or (None,):
                    for j, sel in enumerate(ilp_moments.initial_rows(self, p, s, phase)):
                        label = phase if sel is None else f"{phase}_m{j}"
                        self.gpu_row(p, s, phase, sel, label)
                        if j == 0:
                            self.moment_rows[p, s, phase] = None if sel is None else (label, sel)
        ilp_rows.host_rows(self)

    def gpu_row(self, p: int, s: int, phase: str | None, sel: dict | None, label: str | None,
                probs: tuple | list = ()) -> None:
        """The GPU memory row of stage ``s`` under pp = ``p`` in ``phase`` (the in-flight layers at the moments ``sel``
        selects, ``ilp_moments``), in the model and in ``probs`` (copies being solved), and under the peak objective."""
        pl, P = self.pulp, self.p
        expr = pl.lpSum(self._gpu_terms(p, s, phase, sel))
        self.gpu_rows[p, s, label] = expr
        tag = f"gpu_mem_pp{p}_stage{s}" + (f"_{label}" if label else "")
        big = self._upper(expr) - self.cap
        multi = len(P.dims.get("pp", (1,))) > 1 and big > 0 and not self._conditional()
        row = expr <= self.cap + big * (1 - self.x["pp", p]) if multi else expr <= self.cap
        for prob in (self.prob, *probs):
            prob += row, tag
        if self.peak is not None:
            relax = 0 if self._conditional() or "pp" not in P.dims else self._upper(expr) * (1 - self.x["pp", p])
            for prob in (self.prob, *probs):
                prob += self.peak >= expr - relax, f"peak_pp{p}_s{s}" + (f"_{label}" if label else "")

    def _conditional(self) -> bool:
        """Whether every GPU term is tied to a pipeline degree (so no big-M is needed)."""
        gpu_factors = [f for f in self.p.factors if any(any(e.gpu) for e in f.entries.values())]
        layers_ok = all("pp" in lb.key_dims for lb in self.p.blocks)
        return layers_ok and all("pp" in f.dims for f in gpu_factors)

    @staticmethod
    def _upper(expr: Any) -> int:
        return int(sum(max(0, c) for c in expr.values())) + 1

    def seconds_expr(self) -> Any:
        P = self.p
        terms = [e.seconds * self.z[f.name, k] for f in P.factors for k, e in f.entries.items() if e.seconds]
        return self.pulp.lpSum(terms + self._block_sum("seconds"))

    def error_expr(self) -> Any:
        P = self.p
        terms = [e.error * self.z[f.name, k] for f in P.factors for k, e in f.entries.items() if e.error]
        return self.pulp.lpSum(terms + self._block_sum("error"))

    def _objective(self) -> None:
        """``primary``: the objective solved first (None: seconds alone); ties are then broken by seconds."""
        pl, P = self.pulp, self.p
        self.primary: Any = None
        self.primary_scale = 1.0
        if P.objective == "max_value":
            self.primary = -pl.lpSum(e.value * self.z[f.name, k] for f in P.factors for k, e in f.entries.items()
                                     if e.value)
        elif P.objective == "min_error":
            self.primary, self.primary_scale = ERROR_SCALE * self.error_expr(), ERROR_SCALE  # solver units
        elif P.objective == "min_gpu_bytes":
            worst = self.peak = self.prob.add_variable("peak_gpu_units", lowBound=0)
            for (p, s, phase), expr in self.gpu_rows.items():
                relax = 0 if self._conditional() or "pp" not in P.dims else self._upper(expr) * (1 - self.x["pp", p])
                self.prob += worst >= expr - relax, f"peak_pp{p}_s{s}" + (f"_{phase}" if phase else "")
            self.primary = worst
        self.prob += self.primary if self.primary is not None else SECONDS_SCALE * self.seconds_expr()

    # -- solving -------------------------------------------------------------------------------
    def solve(self, *, time_limit: float | None = None, solver: str | None = None) -> Solution:
        """Solve. With a primary objective (max-batch, max-context, min-memory, max-quality) lexicographically:
        the best primary value first, then the fastest plan of that value (a tie-break weight would sit below
        the solver's gap). ``Solution.objective`` is the primary value of the plan returned (unscaled)."""
        primary = self.primary
        if primary is None:
            return self._solve(time_limit, solver)
        self.prob.setObjective(primary)
        first = self._solve(time_limit, solver)
        if first.status not in ("optimal", "feasible"):
            return first
        best = float(self.pulp.value(primary) or 0.0)
        first.objective = best / self.primary_scale
        capped = self.prob.copy()  # the cap lives on a copy (PuLP 4 has no public way to remove a constraint)
        capped += primary <= best + PRIMARY_TIE_REL * abs(best) + PRIMARY_TIE_ABS, "primary_cap"
        capped.setObjective(SECONDS_SCALE * self.seconds_expr())
        second = self._solve(time_limit, solver, capped)
        if second.status not in ("optimal", "feasible"):
            return first
        second.objective = float(self.pulp.value(primary) or 0.0) / self.primary_scale
        if first.status == "feasible":
            second.status = "feasible"  # the best primary value itself was cut short
        return second

    def _solve(self, time_limit: float | None, solver: str | None, prob: Any = None) -> Solution:
        """Solve ``prob`` (the model itself by default); while the solution exceeds a moment row the model does not
        hold yet, add it and solve again (``ilp_moments.cut``, row generation)."""
        pl, prob = self.pulp, self.prob if prob is None else prob
        end = None if time_limit is None else time.monotonic() + time_limit
        while True:
            left = None if end is None else max(0.1, end - time.monotonic())
            chosen = solvers.get_solver(solver, time_limit=left)
            try:
                with solvers.quiet_stdout():
                    status = prob.solve(chosen)
            except (pl.PulpSolverError, IndexError):  # HiGHS refuses |coefficients| >= 1e15; PuLP then indexes nothing
                from memplan.errors import MemplanError

                limit = f"{SOLVER_MAX_COEFF * UNIT:.0e}"
                raise MemplanError(f"the {type(chosen).__name__} solver rejected the model: a memory figure near or "
                                   f"above {limit} bytes is beyond its numeric range; check the sizes given.") from None
            label = pl.LpStatus[status]
            if label != "Optimal" or prob.sol_status not in (pl.LpSolutionOptimal, pl.LpSolutionIntegerFeasible):
                highs = prob if isinstance(chosen, pl.HiGHS) else None
                return Solution(_status_name(label, highs), {}, [], math.nan, math.nan)
            picked = [(d, v) for (d, v), var in self.x.items() if (var.value() or 0) > 0.5]
            if sorted(d for d, _ in picked) != sorted(self.p.dims):
                # PuLP reports HiGHS's kTimeLimit as integer-feasible even when no incumbent exists.
                return Solution("time_limit", {}, [], math.nan, math.nan)
            if not ilp_moments.cut(self, [] if prob is self.prob else [prob]):
                break
        choice = dict(picked)
        block_modes = {lb.name: self.modes(bi) for bi, lb in enumerate(self.p.blocks)}
        modes = self.modes(0) if self.p.layers is not None else []
        sol_status = "optimal" if prob.sol_status == pl.LpSolutionOptimal else "feasible"
        scale = SECONDS_SCALE if self.p.objective in ("min_seconds", "min_error") else 1.0
        gap = _highs_gap(prob) if sol_status == "feasible" else None
        return Solution(sol_status, choice, modes, float(pl.value(prob.objective) or 0.0) / scale,
                        float(pl.value(self.seconds_expr()) or 0.0), block_modes, gap)

    def cutoff(self, seconds: float) -> None:
        """Only plans no slower than ``seconds`` (a bound from another part of the space; ties kept)."""
        self.prob += SECONDS_SCALE * self.seconds_expr() <= SECONDS_SCALE * seconds * (1 + 1e-9), "cutoff"

    def exclude(self, choice: dict[str, Any], name: str) -> None:
        """No-good cut: the next solution differs from ``choice`` in at least one global dimension."""
        pl = self.pulp
        self.prob += pl.lpSum(self.x[d, v] for d, v in choice.items()) <= len(choice) - 1, name

    def write_lp(self, path: str) -> None:
        from memplan.errors import MemplanError

        try:
            self.prob.writeLP(path)
        except OSError as exc:
            raise MemplanError(f"--debug-lp: cannot write {path}: {exc.strerror or exc}.") from None
