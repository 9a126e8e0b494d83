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

Coefficients are bytes scaled to ``UNIT`` bytes, demand rounded up and capacity rounded down,
so a solver's tolerance can never admit a plan that the exact integer re-check would reject.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

UNIT = 1024
"""ILP memory unit in bytes (KiB): demand is rounded up to it, capacity down."""


@dataclass(frozen=True)
class Entry:
    """One row of a factor: bytes per pipeline stage on the GPU, bytes per node on CPU/NVMe, seconds."""

    gpu: tuple[int, ...] = (0,)
    cpu: int = 0
    nvme: int = 0
    seconds: float = 0.0
    value: float = 0.0


@dataclass
class Factor:
    name: str
    dims: tuple[str, ...]
    entries: dict[tuple, Entry]


@dataclass
class LayerBlock:
    """Per-layer modes. ``gpu[l][m][key]`` bytes per in-flight micro-batch; ``cpu`` per node; ``seconds[l][m][key]``."""

    modes: tuple[str, ...]
    key_dims: tuple[str, ...]
    gpu: list[dict[str, dict[tuple, int]]]
    seconds: list[dict[str, dict[tuple, float]]]
    cpu: list[dict[str, dict[tuple, int]]] | None = None
    classes: list[int] | None = None
    workspace: list[dict[str, dict[tuple, int]]] | None = None
    """Bytes live once, while one layer in this mode is recomputed (the largest such layer counts)."""
    in_flight: bool = True
    """Multiply a layer's GPU bytes by the micro-batches in flight on its stage (1F1B: p − s)."""
    savings_rank: dict[str, int] = field(default_factory=dict)


@dataclass
class Problem:
    dims: dict[str, tuple]
    factors: list[Factor]
    layers: LayerBlock | None
    num_layers: int
    gpu_capacity: int
    cpu_capacity: int
    nvme_capacity: int
    objective: str = "min_seconds"
    """``min_seconds``, ``max_value`` (Σ entry.value, ties by seconds) or ``min_gpu_bytes``."""
    gpu_scale_pct: float = 0.0
    """The GPU demand is multiplied by (1 + pct/100): the allocator reserve row."""
    cuts: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Solution:
    status: str
    choice: dict[str, Any]
    modes: list[str]
    objective: float
    seconds: float


def ceil_unit(n: int) -> int:
    return -(-n // UNIT)


def stage_of(layer: int, num_layers: int, pp: int) -> int:
    return layer // (num_layers // pp)


class IlpBuilder:
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
                self.x[d, v] = pl.LpVariable(f"x_{_safe(d)}_{i}", cat="Binary")
            self.prob += pl.lpSum(self.x[d, v] for v in values) == 1, f"one_{_safe(d)}"
        for f in P.factors:
            self._factor(f)
        self.r: dict[tuple[int, str], Any] = {}
        self.w: dict[tuple[int, str, tuple], Any] = {}
        self.ws: Any = None
        if P.layers is not None:
            self._layers(P.layers)
        self._memory()
        self._objective()

    def _factor(self, f: Factor) -> None:
        pl = self.pulp
        zs = []
        for j, key in enumerate(f.entries):
            var = pl.LpVariable(f"z_{_safe(f.name)}_{j}", lowBound=0, upBound=1)
            self.z[f.name, key] = var
            zs.append(var)
            for d, v in zip(f.dims, key, strict=True):
                self.prob += var <= self.x[d, v], f"zc_{_safe(f.name)}_{j}_{_safe(d)}"
        self.prob += pl.lpSum(zs) == 1, f"one_{_safe(f.name)}"

    def _layers(self, lb: LayerBlock) -> None:
        pl = self.pulp
        keys = sorted({k for per in lb.gpu for m in per.values() for k in m}, key=repr)
        key_factor = Factor("layerkey", lb.key_dims, {k: Entry() for k in keys})
        self._factor(key_factor)
        for layer in range(len(lb.gpu)):
            for m in lb.modes:
                self.r[layer, m] = pl.LpVariable(f"r_{layer}_{_safe(m)}", cat="Binary")
            self.prob += pl.lpSum(self.r[layer, m] for m in lb.modes) == 1, f"mode_{layer}"
            for m in lb.modes:
                for j, k in enumerate(keys):
                    w = pl.LpVariable(f"w_{layer}_{_safe(m)}_{j}", lowBound=0)
                    self.w[layer, m, k] = w
                    self.prob += w >= self.r[layer, m] + self.z["layerkey", k] - 1, f"lin_{layer}_{_safe(m)}_{j}"
        self._symmetry(lb)
        self.ws = None
        if lb.workspace is not None:
            self.ws = pl.LpVariable("workspace_units", lowBound=0)
            for layer, per in enumerate(lb.workspace):
                for m, keyed in per.items():
                    terms = [ceil_unit(n) * self.w[layer, m, k] for k, n in keyed.items() if n]
                    if terms:
                        self.prob += self.ws >= pl.lpSum(terms), f"ws_{layer}_{_safe(m)}"

    def _symmetry(self, lb: LayerBlock) -> None:
        """Identical layers within a segment that no stage boundary cuts take non-increasing savings."""
        if not lb.classes or not lb.savings_rank:
            return
        pps = self.p.dims.get("pp", (1,))
        seg = self.p.num_layers // max(pps)
        pl = self.pulp
        for a, b in pairwise(range(len(lb.gpu))):
            if a // seg != b // seg or lb.classes[a] != lb.classes[b]:
                continue
            rank_a = pl.lpSum(lb.savings_rank[m] * self.r[a, m] for m in lb.modes)
            rank_b = pl.lpSum(lb.savings_rank[m] * self.r[b, m] for m in lb.modes)
            self.prob += rank_a >= rank_b, f"sym_{a}"

    # -- constraints ---------------------------------------------------------------------------
    def _gpu_terms(self, p: int, s: int) -> list[Any]:
        P = self.p
        terms = []
        for f in P.factors:
            has_pp = "pp" in f.dims
            for key, e in f.entries.items():
                if has_pp and key[f.dims.index("pp")] != p:
                    continue
                nbytes = e.gpu[s] if has_pp else e.gpu[0]
                if nbytes:
                    terms.append(ceil_unit(nbytes) * self.z[f.name, key])
        lb = P.layers
        if lb is not None:
            for layer in range(len(lb.gpu)):
                if stage_of(layer, P.num_layers, p) != s:
                    continue
                mult = (p - s) if lb.in_flight else 1
                for m in lb.modes:
                    for k, nbytes in lb.gpu[layer][m].items():
                        if nbytes and ("pp" not in lb.key_dims or k[lb.key_dims.index("pp")] == p):
                            terms.append(ceil_unit(nbytes * mult) * self.w[layer, m, k])
            if self.ws is not None:
                terms.append(self.ws)
        return terms

    def _memory(self) -> None:
        pl, P = self.pulp, self.p
        pps = P.dims.get("pp", (1,))
        scale = 1.0 + P.gpu_scale_pct / 100.0
        cap = math.floor(P.gpu_capacity / UNIT / scale) - 1
        self.gpu_rows: dict[tuple[int, int], Any] = {}
        for p in pps:
            for s in range(p):
                expr = pl.lpSum(self._gpu_terms(p, s))
                self.gpu_rows[p, s] = expr
                big = self._upper(expr) - cap
                if len(pps) > 1 and big > 0:
                    self.prob += expr <= cap + big * (1 - self.x["pp", p]), f"gpu_mem_pp{p}_stage{s}"
                else:
                    self.prob += expr <= cap, f"gpu_mem_pp{p}_stage{s}"
        for tier, capacity in (("cpu", P.cpu_capacity), ("nvme", P.nvme_capacity)):
            terms = [ceil_unit(getattr(e, tier)) * self.z[f.name, k]
                     for f in P.factors for k, e in f.entries.items() if getattr(e, tier)]
            if tier == "cpu" and P.layers is not None and P.layers.cpu is not None:
                terms += [ceil_unit(n) * self.w[layer, m, k] for layer, per in enumerate(P.layers.cpu)
                          for m, keyed in per.items() for k, n in keyed.items() if n]
            if terms:
                self.prob += pl.lpSum(terms) <= math.floor(capacity / UNIT) - 1, f"{tier}_mem"

    @staticmethod
    def _upper(expr: Any) -> int:
        return int(sum(max(0, c) for c in expr.values())) + 1

    def seconds_expr(self) -> Any:
        pl, P = self.pulp, self.p
        terms = [e.seconds * self.z[f.name, k] for f in P.factors for k, e in f.entries.items() if e.seconds]
        if P.layers is not None:
            terms += [sec * self.w[layer, m, k] for layer, per in enumerate(P.layers.seconds)
                      for m, keyed in per.items() for k, sec in keyed.items() if sec]
        return pl.lpSum(terms)

    def _objective(self) -> None:
        pl, P = self.pulp, self.p
        seconds = self.seconds_expr()
        if P.objective == "max_value":
            value = pl.lpSum(e.value * self.z[f.name, k] for f in P.factors for k, e in f.entries.items() if e.value)
            self.prob += -value + 1e-6 * seconds
        elif P.objective == "min_gpu_bytes":
            worst = pl.LpVariable("peak_gpu_units", lowBound=0)
            for (p, s), expr in self.gpu_rows.items():
                self.prob += worst >= expr - self._upper(expr) * (1 - self.x["pp", p]) if "pp" in P.dims else worst >= expr, \
                    f"peak_pp{p}_s{s}"
            self.prob += worst + 1e-6 * seconds
        else:
            self.prob += seconds

    # -- solving -------------------------------------------------------------------------------
    def solve(self, *, time_limit: float | None = None, solver: str | None = None) -> Solution:
        from memplan.planner.solvers import get_solver

        pl = self.pulp
        status = self.prob.solve(get_solver(solver, time_limit=time_limit))
        label = pl.LpStatus[status]
        if label != "Optimal" or self.prob.sol_status not in (pl.LpSolutionOptimal, pl.LpSolutionIntegerFeasible):
            return Solution(_status_name(label, self.prob.sol_status), {}, [], math.nan, math.nan)
        choice = {d: v for (d, v), var in self.x.items() if (var.value() or 0) > 0.5}
        modes = []
        if self.p.layers is not None:
            for layer in range(len(self.p.layers.gpu)):
                modes.append(next(m for m in self.p.layers.modes if (self.r[layer, m].value() or 0) > 0.5))
        sol_status = "optimal" if self.prob.sol_status == pl.LpSolutionOptimal else "feasible"
        return Solution(sol_status, choice, modes, float(pl.value(self.prob.objective) or 0.0),
                        float(pl.value(self.seconds_expr()) or 0.0))

    def exclude(self, choice: dict[str, Any], name: str) -> None:
        """No-good cut: the next solution differs from ``choice`` in at least one global dimension."""
        pl = self.pulp
        self.prob += pl.lpSum(self.x[d, v] for d, v in choice.items()) <= len(choice) - 1, name

    def write_lp(self, path: str) -> None:
        self.prob.writeLP(path)


def _status_name(label: str, sol_status: int) -> str:
    if label == "Infeasible":
        return "infeasible"
    if label == "Unbounded":
        return "unbounded"
    if label == "Not Solved":
        return "time_limit"
    return label.lower().replace(" ", "_")


def _safe(text: Any) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in str(text))
