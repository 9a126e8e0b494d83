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

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

UNIT = 1024
"""ILP memory unit in bytes (KiB): demand is rounded up to it, capacity down."""

SECONDS_SCALE = 1e3
"""Seconds objectives are solved in milliseconds: HiGHS treats objective values within about 1e-6 of the
incumbent as no better (an absolute tolerance), which in seconds would merge plans of a 10 ms step that
differ by a microsecond (0.01%); ``Solution.objective`` is reported in seconds again."""

ERROR_SCALE = 1e6
"""``min_error``: errors (mean relative MSE, one layer's share about 1e-6 for a 70B model) are scaled so that
the solver's absolute and relative MIP gaps (1e-6, 1e-4) stay far below one layer's difference."""
ERROR_TIE_REL = 1e-9
ERROR_TIE_ABS = 1e-15
"""Second ``min_error`` stage: plans within this of the least error are ties, broken by step seconds."""

SOLVER_MAX_COEFF = 10**15
"""HiGHS refuses a model with a matrix value of magnitude 1e15 or more (its ``large_matrix_value``);
in ``UNIT``s that is about 10^18 bytes."""


@dataclass(frozen=True)
class Entry:
    """One row of a factor: bytes per pipeline stage on the GPU, bytes per node on CPU/NVMe, seconds."""

    gpu: tuple[int, ...] = ()
    cpu: int = 0
    nvme: int = 0
    seconds: float = 0.0
    value: float = 0.0
    error: float = 0.0
    """Quality loss (the ``min_error`` objective), e.g. of the tensors outside the blocks."""
    cpu_floor: int = 0
    """CPU bytes per node this row needs whatever the per-layer blocks add (a second, separate constraint)."""


@dataclass
class Factor:
    name: str
    dims: tuple[str, ...]
    entries: dict[tuple, Entry]


@dataclass
class LayerBlock:
    """One per-layer decision (recompute, optimizer placement, weight format and placement): a mode per layer.

    ``gpu[l][m][key]`` bytes on the layer's GPU (per in-flight micro-batch when ``in_flight``), ``cpu``
    bytes per node, ``seconds`` step time, ``error`` quality loss; ``key`` ranges over ``key_dims``.
    """

    modes: tuple[str, ...]
    key_dims: tuple[str, ...]
    gpu: list[dict[str, dict[tuple, int]]]
    seconds: list[dict[str, dict[tuple, float]]]
    cpu: list[dict[str, dict[tuple, int]]] | None = None
    classes: list[int] | None = None
    workspace: list[dict[str, dict[tuple, int]]] | None = None
    """Bytes live once, while one layer in this mode runs (the largest such layer of the stage counts)."""
    flight_workspace: list[dict[str, dict[tuple, int]]] | None = None
    """Like ``workspace`` but held per micro-batch in flight (the checkpoint's saved keyword arguments)."""
    in_flight: bool = True
    """Multiply a layer's GPU bytes by the micro-batches in flight on its stage (1F1B: p − s)."""
    savings_rank: dict[str, int] = field(default_factory=dict)
    key_bounds: dict[tuple, float] = field(default_factory=dict)
    """A valid lower bound on the layers' seconds for each key (a cut that tightens the relaxation)."""
    name: str = "recompute"
    error: list[dict[str, dict[tuple, float]]] | None = None
    """Quality loss per layer, mode and key (the ``min_error`` objective)."""
    contiguous: bool = False
    """Group only runs of adjacent identical layers (needed when the layer order matters, ``suffix_mode``)."""
    stages: bool = True
    """Whether the block spans pipeline stages; False: its bytes are nonzero only under pp = 1 (the ILP groups
    its layers over the whole model and adds them to the pp = 1 memory row alone)."""
    suffix_mode: str | None = None
    """The layers in this mode form a suffix of the layer order (DeepSpeed's partial offload: the last
    sub-groups go to the CPU); the ILP orders the groups and ``modes()`` puts it on each group's last layers."""


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
    extra_blocks: list[LayerBlock] = field(default_factory=list)
    """Further per-layer decisions beside ``layers``; their bytes, seconds and errors add up per layer."""

    @property
    def blocks(self) -> list[LayerBlock]:
        return ([self.layers] if self.layers is not None else []) + list(self.extra_blocks)


@dataclass
class Solution:
    status: str
    choice: dict[str, Any]
    modes: list[str]
    objective: float
    seconds: float
    block_modes: dict[str, list[str]] = field(default_factory=dict)
    """Per-layer modes of every block by name (``modes`` is the first block's)."""


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
        self.n: dict[tuple[int, Any, str], Any] = {}
        self.any: dict[tuple[int, Any, str], Any] = {}
        self.w: dict[tuple[int, Any, str, tuple], Any] = {}
        self.ws: dict[tuple[int, int, int], Any] = {}
        self.groups: list[dict[tuple[int, int], list[int]]] = []
        for bi, lb in enumerate(P.blocks):
            self._layers(bi, lb)
        self._memory()
        self._objective()

    def _factor(self, f: Factor) -> None:
        """Select one row of ``f``: its marginal on each dimension equals that dimension's one-hot."""
        pl = self.pulp
        by_value: dict[tuple[str, Any], list[Any]] = {(d, v): [] for d in f.dims for v in self.p.dims[d]}
        for j, key in enumerate(f.entries):
            var = pl.LpVariable(f"z_{_safe(f.name)}_{j}", lowBound=0, upBound=1)
            self.z[f.name, key] = var
            for d, v in zip(f.dims, key, strict=True):
                by_value[d, v].append(var)
        for (d, v), zs in by_value.items():
            idx = self.p.dims[d].index(v)
            self.prob += pl.lpSum(zs) == self.x[d, v], f"marg_{_safe(f.name)}_{_safe(d)}_{idx}"

    def _groups(self, lb: LayerBlock) -> dict[tuple[int, int], list[int]]:
        """Layers that share a class and a segment no pipeline stage boundary cuts (with ``contiguous``:
        runs of adjacent such layers), in layer order."""
        seg = self.p.num_layers // max(self.p.dims.get("pp", (1,))) if lb.stages else self.p.num_layers
        classes = lb.classes or list(range(len(lb.gpu)))
        groups: dict[tuple[int, int], list[int]] = {}
        run = -1
        for layer in range(len(lb.gpu)):
            if lb.contiguous:
                if layer == 0 or layer % seg == 0 or classes[layer] != classes[layer - 1]:
                    run += 1
                key = (layer // seg, run)
            else:
                key = (layer // seg, classes[layer])
            groups.setdefault(key, []).append(layer)
        return groups

    def _layers(self, bi: int, lb: LayerBlock) -> None:
        """Per-layer modes. Layers that are identical and that no stage boundary separates are
        interchangeable, so a group G takes integer counts ``n[G, m]`` of layers per mode (the
        per-layer binaries with their symmetry removed; ``modes()`` expands them, most-saving mode
        on the earliest layers). The product with the key selector ``y`` is linearized per group in
        the tight transportation form: Σ_m v[G,m,k] = |G|·y[k] and Σ_k v[G,m,k] = n[G,m]."""
        pl = self.pulp
        keys = sorted({k for per in lb.gpu for m in per.values() for k in m}, key=repr)
        self._factor(Factor(f"layerkey{bi}", lb.key_dims, {k: Entry() for k in keys}))
        y = {k: self.z[f"layerkey{bi}", k] for k in keys}
        groups = self._groups(lb)
        self.groups.append(groups)
        for gi, (gkey, members) in enumerate(groups.items()):
            size, tag = len(members), f"{bi}_{gi}"
            for m in lb.modes:
                self.n[bi, gkey, m] = pl.LpVariable(f"n_{tag}_{_safe(m)}", lowBound=0, upBound=size, cat="Integer")
                self.any[bi, gkey, m] = pl.LpVariable(f"any_{tag}_{_safe(m)}", cat="Binary")
                self.prob += self.n[bi, gkey, m] <= size * self.any[bi, gkey, m], f"any_{tag}_{_safe(m)}"
                for j, k in enumerate(keys):
                    allowed = k in lb.gpu[members[0]][m]  # a mode without an entry for a key is not available there
                    self.w[bi, gkey, m, k] = pl.LpVariable(f"v_{tag}_{_safe(m)}_{j}", lowBound=0,
                                                           upBound=None if allowed else 0)
            self.prob += pl.lpSum(self.n[bi, gkey, m] for m in lb.modes) == size, f"count_{tag}"
            for j, k in enumerate(keys):
                self.prob += (pl.lpSum(self.w[bi, gkey, m, k] for m in lb.modes) == size * y[k], f"vk_{tag}_{j}")
            for m in lb.modes:
                self.prob += (pl.lpSum(self.w[bi, gkey, m, k] for k in keys) == self.n[bi, gkey, m],
                              f"vm_{tag}_{_safe(m)}")
        if lb.suffix_mode is not None:
            self._suffix(bi, lb.suffix_mode, groups)
        if lb.workspace is not None:
            self._workspace(bi, lb, y)
        if lb.key_bounds:
            layer_seconds = pl.lpSum(sec * self.w[bi, g, m, k] for g, members in groups.items()
                                     for m, keyed in lb.seconds[members[0]].items() for k, sec in keyed.items() if sec)
            self.prob += (layer_seconds >= pl.lpSum(b * y[k] for k, b in lb.key_bounds.items() if k in y),
                          f"bound_{bi}")

    def _suffix(self, bi: int, mode: str, groups: dict[tuple[int, int], list[int]]) -> None:
        """Layers in ``mode`` form a suffix: a group holding any of them makes every later group all ``mode``."""
        ordered = list(groups.items())
        for (gkey, _), (hkey, later) in itertools.pairwise(ordered):
            self.prob += (self.n[bi, hkey, mode] >= len(later) * self.any[bi, gkey, mode],
                          f"suffix_{bi}_{_safe(gkey)}")

    def _workspace(self, bi: int, lb: LayerBlock, y: dict[tuple, Any]) -> None:
        """``ws[b, p, s]``: bytes live while the largest layer of stage s (under pp = p) in a workspace mode
        runs: ws ≥ Σ_k W(k)·(any[G,m] + y[k] − 1) for every group G of that stage."""
        pl = self.pulp
        assert lb.workspace is not None
        for p in self.p.dims.get("pp", (1,)):
            for s in range(p):
                var = pl.LpVariable(f"ws{bi}_pp{p}_s{s}", lowBound=0)
                self.ws[bi, p, s] = var
                for gi, (gkey, members) in enumerate(self.groups[bi].items()):
                    rep = members[0]
                    if stage_of(rep, self.p.num_layers, p) != s:
                        continue
                    for m, keyed in lb.workspace[rep].items():
                        extra = lb.flight_workspace[rep][m] if lb.flight_workspace else {}
                        coef = {k: ceil_unit(n + (p - s) * extra.get(k, 0)) for k, n in keyed.items()
                                if "pp" not in lb.key_dims or k[lb.key_dims.index("pp")] == p}
                        total = sum(coef.values())
                        if total:
                            expr = total * self.any[bi, gkey, m] + pl.lpSum(c * y[k] for k, c in coef.items()) - total
                            self.prob += var >= expr, f"ws{bi}_{p}_{s}_{gi}_{_safe(m)}"

    def modes(self, bi: int = 0) -> list[str]:
        """Per-layer modes of block ``bi`` in the solution: in each group the most-saving mode on its first
        layers (``suffix_mode`` on its last)."""
        lb = self.p.blocks[bi]
        out = [lb.modes[0]] * len(lb.gpu)
        order = sorted(lb.modes, key=lambda m: (m == lb.suffix_mode, -lb.savings_rank.get(m, 0)))
        for gkey, members in self.groups[bi].items():
            counts = {m: round(self.n[bi, gkey, m].value() or 0) for m in lb.modes}
            queue = [m for m in order for _ in range(counts[m])]
            for layer, m in zip(members, queue, strict=True):
                out[layer] = m
        return out

    # -- constraints ---------------------------------------------------------------------------
    def _block_terms(self, bi: int, lb: LayerBlock, p: int, s: int) -> list[Any]:
        if not lb.stages and p != 1:
            return []
        terms = []
        for gkey, members in self.groups[bi].items():
            rep = members[0]
            if stage_of(rep, self.p.num_layers, p) != s:
                continue
            mult = (p - s) if lb.in_flight else 1
            for m in lb.modes:
                for k, nbytes in lb.gpu[rep][m].items():
                    if nbytes and ("pp" not in lb.key_dims or k[lb.key_dims.index("pp")] == p):
                        terms.append(ceil_unit(nbytes * mult) * self.w[bi, gkey, m, k])
        if (bi, p, s) in self.ws:
            terms.append(self.ws[bi, p, s])
        return terms

    def _gpu_terms(self, p: int, s: int) -> list[Any]:
        P = self.p
        terms = []
        for f in P.factors:
            has_pp = "pp" in f.dims
            for key, e in f.entries.items():
                if has_pp and key[f.dims.index("pp")] != p:
                    continue
                idx = s if has_pp else 0
                nbytes = e.gpu[idx] if idx < len(e.gpu) else 0
                if nbytes:
                    terms.append(ceil_unit(nbytes) * self.z[f.name, key])
        for bi, lb in enumerate(P.blocks):
            terms += self._block_terms(bi, lb, p, s)
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
                if len(pps) > 1 and big > 0 and not self._conditional():
                    self.prob += expr <= cap + big * (1 - self.x["pp", p]), f"gpu_mem_pp{p}_stage{s}"
                else:
                    self.prob += expr <= cap, f"gpu_mem_pp{p}_stage{s}"
        for tier, capacity in (("cpu", P.cpu_capacity), ("nvme", P.nvme_capacity)):
            terms = [ceil_unit(getattr(e, tier)) * self.z[f.name, k]
                     for f in P.factors for k, e in f.entries.items() if getattr(e, tier)]
            if tier == "cpu":
                terms += [ceil_unit(n) * self.w[bi, g, m, k] for bi, lb in enumerate(P.blocks) if lb.cpu is not None
                          for g, members in self.groups[bi].items()
                          for m, keyed in lb.cpu[members[0]].items() for k, n in keyed.items() if n]
            if terms:
                self.prob += pl.lpSum(terms) <= math.floor(capacity / UNIT) - 1, f"{tier}_mem"
        floors = [ceil_unit(e.cpu_floor) * self.z[f.name, k] for f in P.factors for k, e in f.entries.items()
                  if e.cpu_floor]
        if floors:
            self.prob += pl.lpSum(floors) <= math.floor(P.cpu_capacity / UNIT) - 1, "cpu_mem_floor"

    def _conditional(self) -> bool:
        """Whether every GPU term is tied to a pipeline degree (so no big-M is needed)."""
        gpu_factors = [f for f in self.p.factors if any(any(e.gpu) for e in f.entries.values())]
        layers_ok = all("pp" in lb.key_dims for lb in self.p.blocks)
        return layers_ok and all("pp" in f.dims for f in gpu_factors)

    @staticmethod
    def _upper(expr: Any) -> int:
        return int(sum(max(0, c) for c in expr.values())) + 1

    def _block_sum(self, attr: str) -> list[Any]:
        return [v * self.w[bi, g, m, k] for bi, lb in enumerate(self.p.blocks) if getattr(lb, attr) is not None
                for g, members in self.groups[bi].items()
                for m, keyed in getattr(lb, attr)[members[0]].items() for k, v in keyed.items() if v]

    def seconds_expr(self) -> Any:
        P = self.p
        terms = [e.seconds * self.z[f.name, k] for f in P.factors for k, e in f.entries.items() if e.seconds]
        return self.pulp.lpSum(terms + self._block_sum("seconds"))

    def error_expr(self) -> Any:
        P = self.p
        terms = [e.error * self.z[f.name, k] for f in P.factors for k, e in f.entries.items() if e.error]
        return self.pulp.lpSum(terms + self._block_sum("error"))

    def _objective(self) -> None:
        pl, P = self.pulp, self.p
        seconds = self.seconds_expr()
        if P.objective == "max_value":
            value = pl.lpSum(e.value * self.z[f.name, k] for f in P.factors for k, e in f.entries.items() if e.value)
            self.prob += -value + 1e-6 * seconds
        elif P.objective == "min_error":
            self.prob += ERROR_SCALE * self.error_expr()  # ``solve`` then breaks ties by seconds
        elif P.objective == "min_gpu_bytes":
            worst = pl.LpVariable("peak_gpu_units", lowBound=0)
            for (p, s), expr in self.gpu_rows.items():
                relax = 0 if self._conditional() or "pp" not in P.dims else self._upper(expr) * (1 - self.x["pp", p])
                self.prob += worst >= expr - relax, f"peak_pp{p}_s{s}"
            self.prob += worst + 1e-6 * seconds
        else:
            self.prob += SECONDS_SCALE * seconds

    # -- solving -------------------------------------------------------------------------------
    def solve(self, *, time_limit: float | None = None, solver: str | None = None) -> Solution:
        """Solve; ``min_error`` lexicographically: least error first, then the fastest plan of that error."""
        if self.p.objective != "min_error":
            return self._solve(time_limit, solver)
        error = self.error_expr()
        self.prob.setObjective(ERROR_SCALE * error)
        first = self._solve(time_limit, solver)
        if first.status not in ("optimal", "feasible"):
            return first
        best = float(self.pulp.value(error) or 0.0)
        first.objective = best
        self.prob += error <= best * (1 + ERROR_TIE_REL) + ERROR_TIE_ABS, "quality_cap"
        self.prob.setObjective(SECONDS_SCALE * self.seconds_expr())
        second = self._solve(time_limit, solver)
        del self.prob.constraints["quality_cap"]
        if second.status not in ("optimal", "feasible"):
            return first
        second.objective = best
        return second

    def _solve(self, time_limit: float | None, solver: str | None) -> Solution:
        from memplan.planner.solvers import get_solver, quiet_stdout

        pl = self.pulp
        chosen = get_solver(solver, time_limit=time_limit)
        try:
            with quiet_stdout():
                status = self.prob.solve(chosen)
        except (pl.PulpSolverError, IndexError):  # HiGHS refuses |coefficients| >= 1e15; PuLP then indexes an empty model
            from memplan.errors import MemplanError

            limit = f"{SOLVER_MAX_COEFF * UNIT:.0e}"
            raise MemplanError(f"the {type(chosen).__name__} solver rejected the model: a memory figure near or above "
                               f"{limit} bytes is beyond its numeric range; check the sizes given.") from None
        label = pl.LpStatus[status]
        if label != "Optimal" or self.prob.sol_status not in (pl.LpSolutionOptimal, pl.LpSolutionIntegerFeasible):
            highs = self.prob if isinstance(chosen, pl.HiGHS) else None
            return Solution(_status_name(label, highs), {}, [], math.nan, math.nan)
        picked = [(d, v) for (d, v), var in self.x.items() if (var.value() or 0) > 0.5]
        if sorted(d for d, _ in picked) != sorted(self.p.dims):
            # PuLP reports HiGHS's kTimeLimit as integer-feasible even when no incumbent exists.
            return Solution("time_limit", {}, [], math.nan, math.nan)
        choice = dict(picked)
        block_modes = {lb.name: self.modes(bi) for bi, lb in enumerate(self.p.blocks)}
        modes = self.modes(0) if self.p.layers is not None else []
        sol_status = "optimal" if self.prob.sol_status == pl.LpSolutionOptimal else "feasible"
        scale = SECONDS_SCALE if self.p.objective in ("min_seconds", "min_error") else 1.0
        return Solution(sol_status, choice, modes, float(pl.value(self.prob.objective) or 0.0) / scale,
                        float(pl.value(self.seconds_expr()) or 0.0), block_modes)

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


def _status_name(label: str, prob: Any) -> str:
    """The solve's status in memplan's words. PuLP reports HiGHS's kUnboundedOrInfeasible (a MIP whose
    relaxation is unbounded) as Infeasible; memplan keeps HiGHS's own, undecided answer."""
    if label == "Infeasible":
        model = getattr(prob, "solverModel", None)
        if model is not None and getattr(model.getModelStatus(), "name", "") == "kUnboundedOrInfeasible":
            return "infeasible_or_unbounded"
        return "infeasible"
    if label == "Unbounded":
        return "unbounded"
    if label == "Not Solved":
        return "time_limit"
    return label.lower().replace(" ", "_")


def _safe(text: Any) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in str(text))
