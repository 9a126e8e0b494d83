"""Vectorized sweeps: the scalar memory model's rows as exact, runtime-verified functions of (batch, size).

The scalar model (``memplan.estimator``) stays the reference and is never re-implemented here. For one
group, a (model, job, GPU count) with every other choice fixed, each record column is fitted to the
scalar model's own output and then CHECKED against it:

* Probes: the scalar model at micro-batch b ∈ {1, 2} × up to three of the grid's sizes s (smallest,
  middle, largest), on a reference GPU. Each tier-component column (``gpu:weights/params_bytes``, ...) is
  fitted as ``b·g(s) + h(s)`` with g, h the exact (rational) polynomials through the probed sizes, whose
  coefficients must have small denominators (``MAX_COEFFICIENT_DENOMINATOR``).
* A column that this form misses may be a share of the other columns of its tier,
  ``ceil(k · Σ others)`` with a small rational k (the allocator reserve is ``ceil(5% of the rest)``).
* Checks: the scalar model at more points (b = 2·b_top + 3 and 7·b_top + 5 with b_top the largest swept
  batch or 4, b_top at the middle and the grid's other sizes, and for ``max-batch`` the batch the search
  finds and the one after, at both ends of the range it extrapolates to: ``vector_search.frontier``) must
  equal the fit exactly, column by column; tier totals must be the sums of their components, ``fits`` and
  ``headroom_bytes`` what the totals and capacities give, and every other column constant.
* GPUs: the estimate reads the GPU only through a few attributes (vendor, bf16 support, a calibration
  profile...). GPUs that answer every attribute the group's estimates read alike get the same bytes by
  construction (``vector_probe``): they share one set of probes and one fit, and only their capacity,
  price and headroom differ (computed per GPU). Other GPUs form classes of their own.
* Anything that fails a check (a component with a ceil or max in b or s, an invalid configuration,
  what is not modelled, numbers beyond int64, ``speed=True``) falls back to the scalar path for the
  whole group, so the answer is the scalar model's answer either way; there too the GPUs that read alike
  share their estimates (``vector_probe.shared_evaluate``; not with ``speed``).
* ``max-context`` is not fitted: each GPU runs the scalar search on estimates its class shares
  (``vector_probe.context_results``).

Each cell is then array arithmetic over (GPU, size, batch); ``max-batch`` is a vectorized bisection over
[1, MAX_BATCH] of the fitted slack (monotone, as the scalar search assumes), one per class of GPUs
(``vector_search``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from itertools import groupby
from typing import Any

import numpy as np

from memplan.config import Job
from memplan.errors import MemplanError
from memplan.grid import METRIC_COLUMN, Cell, CellResult, SweepSpec, cells, default_workers, evaluate, iter_results, pooled
from memplan.units import GiB
from memplan.vector_probe import TIERS, NotExact, Probe, Prober, context_results, is_fitted, shared_evaluate, tier_of


def lagrange(xs: list[int], ys: list[int]) -> list[Fraction]:
    """Coefficients (constant first) of the polynomial through (xs, ys), exact."""
    n = len(xs)
    coef = [Fraction(0)] * n
    for i in range(n):
        basis, denom = [Fraction(1)], Fraction(1)
        for j in range(n):
            if j != i:
                basis = [Fraction(0), *basis]  # multiply by x
                for k in range(len(basis) - 1):
                    basis[k] -= xs[j] * basis[k + 1]
                denom *= xs[i] - xs[j]
        for k in range(n):
            coef[k] += ys[i] * basis[k] / denom
    return coef


def poly(coef: list[Fraction], x: Any) -> Any:
    out = 0
    for c in reversed(coef):
        out = out * x + c
    return out


@dataclass
class Fit:
    """The fitted columns of one reference GPU as exact ints per swept size: value = b·G + H, or for a
    share column ceil(k · the sum of its tier's other fitted columns)."""

    columns: list[str]
    """Every record column, in the scalar record's order."""
    gh: dict[int, dict[str, tuple[int, int]]]
    """size -> column -> (G, H)."""
    share: dict[str, tuple[Fraction, frozenset[str]]]
    """Share columns: (k, the columns of the tier left out of the peak it is a share of)."""
    phases: dict[str, Any]
    """Fitted column -> its phases (None: alive throughout), as the scalar rows carry them."""
    step: tuple
    """The step's phases."""

    alive: dict[tuple[str, frozenset[str]], list[list[str]]] = field(default_factory=dict, repr=False, compare=False)
    """(tier, skip) -> per phase of the step, the tier's columns (but ``skip``) alive in it (``peak``'s memo)."""
    peak_memo: dict[tuple[int, int], dict[str, int]] = field(default_factory=dict, repr=False, compare=False)
    """(b, s) -> each tier's peak (``peaks_at``'s memo; the fit no longer changes once checked)."""

    def peak(self, values: dict[str, Any], tier: str, skip: frozenset[str] = frozenset()) -> Any:
        """The tier's largest phase total over the step, as ``breakdown.peak``: per phase, the sum of the
        tier's columns (but ``skip``) alive in it. ``values``: ints, or numpy arrays (element-wise)."""
        per_phase = self.alive.get((tier, skip))
        if per_phase is None:
            cols = [c for c in self.phases if tier_of(c) == tier and c not in skip]
            per_phase = self.alive[(tier, skip)] = [
                [c for c in cols if self.phases[c] is None or phase in self.phases[c]] for phase in self.step]
        best: Any = None
        for alive in per_phase:
            tot = sum((values[c] for c in alive if c in values), 0)
            if best is None:
                best = tot
            elif isinstance(best, np.ndarray) or isinstance(tot, np.ndarray):
                best = np.maximum(best, tot)
            else:
                best = max(best, tot)
        return best

    def complete(self, out: dict[str, Any]) -> dict[str, Any]:
        """``out`` (the polynomial columns) with each share column added: ceil(k · its tier's peak of the
        columns not left out), as ``runtime.allocator_reserve_bytes`` of ``components.allocated_peak``."""
        for col, (k, left_out) in self.share.items():
            others = self.peak(out, tier_of(col), left_out)
            out[col] = -((-others * k.numerator) // k.denominator)
        return out

    def peaks_at(self, b: int, s: int) -> dict[str, int]:
        """Each tier's peak at (b, s), memoized (every GPU of a class is checked at the same points)."""
        if (b, s) not in self.peak_memo:
            values = self.at(b, s)
            self.peak_memo[(b, s)] = {t: self.peak(values, t) for t in TIERS}
        return self.peak_memo[(b, s)]

    def at(self, b: int, s: int) -> dict[str, int]:
        out = self.complete({c: b * g + h for c, (g, h) in self.gh[s].items()})
        return {c: out[c] for c in self.columns if c in out}


def find_share(p: Prober, fit: Fit, col: str, points: list[tuple[int, int]], top: dict[str, Any]) -> tuple:
    """(k, left out) such that ``col`` = ceil(k · the peak of its tier's other columns but those left out)
    at every point; the columns that may be left out are those constant over the points (a fixed
    overhead the share is not taken of: the runtime rows, the CUDA context). NotExact when no such form fits."""
    same = [c for c in fit.gh[points[0][1]] if c != col and tier_of(c) == tier_of(col)]
    constant = [c for c in same if len({p.at(b, s).record.get(c, 0) for b, s in points}) == 1]
    runtime = frozenset(c for c in constant if c.split(":", 1)[1].startswith("runtime/"))
    tier = tier_of(col)

    def others(rec: dict[str, Any], left_out: frozenset[str]) -> int:
        return fit.peak({c: rec.get(c, 0) for c in same}, tier, left_out)

    for left_out in dict.fromkeys([runtime, frozenset(), *(frozenset([c]) for c in constant), frozenset(constant)]):
        base = others(top, left_out)
        if base <= 0:
            continue
        k = Fraction(top[col], base).limit_denominator(SHARE_DENOMINATOR)
        if all(p.at(b, s).record[col] == -((-others(p.at(b, s).record, left_out) * k.numerator) // k.denominator)
               for b, s in points):
            return k, left_out
    raise NotExact(col)


def predict(fit: Fit, template: dict[str, Any], b: int, s: int, size_key: str) -> tuple[dict[str, Any], int]:
    """The record at (b, s) on the GPU whose record ``template`` is, and its slack (free bytes)."""
    rec = dict(template)
    rec["micro_batch"], rec[size_key] = b, s
    values = fit.at(b, s)
    totals: dict[str, int] = {}
    for col, v in values.items():
        rec[col] = v
        rec[col[:-6] + "_gib"] = round(v / GiB, 4)
        totals[tier_of(col)] = totals.get(tier_of(col), 0) + v
    peaks = {tier: fit.peak(values, tier) for tier in TIERS}  # fits and headroom: the peak (Estimate.fits)
    for tier in TIERS:
        total = totals.get(tier, 0)
        rec[f"{tier}_total_bytes"], rec[f"{tier}_total_gib"] = total, round(total / GiB, 4)
    rec["fits"], rec["headroom_bytes"], slack = verdict(peaks, rec)
    rec["ok"] = slack >= 0
    return rec, slack


def verdict(peaks: dict[str, int], rec: dict[str, Any]) -> tuple[bool, int, int]:
    """(fits, headroom, slack) of the tiers' ``peaks`` against the capacities and required headroom in ``rec``:
    as ``Estimate.fits`` and ``headroom_bytes`` (the GPU and each tier holding something) and the sweep's slack
    (``grid._Evaluator.slack``)."""
    headroom = min(rec[f"{t}_capacity_bytes"] - peaks[t] for t in TIERS if t == "gpu" or peaks[t] > 0)
    fits = all(rec[f"{t}_capacity_bytes"] >= peaks[t] for t in TIERS)
    return fits, headroom, min(headroom, rec["gpu_capacity_bytes"] - peaks["gpu"] - rec["required_headroom_bytes"])


def check_on_gpu(fit: Fit, prober: Prober, gpu: str, b: int, s: int, size_key: str) -> None:
    """``check`` of ``gpu``'s probe at (b, s), where the class's first GPU's probe at (b, s) is already checked:
    another GPU's record is that record with only the columns that read the GPU recomputed
    (``Prober.at``), so only those are checked here, against the fit's peaks."""
    probe, first = prober.at(b, s, gpu), prober.at(b, s)
    if probe is first:
        return
    fits, headroom, slack = verdict(fit.peaks_at(b, s), probe.record)
    rec = probe.record
    if (rec["fits"], rec["headroom_bytes"], rec["ok"], probe.slack) != (fits, headroom, slack >= 0, slack):
        raise NotExact(f"{gpu} at ({b}, {s})")


def check(fit: Fit, probe: Probe, b: int, s: int, size_key: str) -> None:
    """NotExact unless the fit gives this probe's record exactly, every column in the same order."""
    if probe.step != fit.step or any(fit.phases.get(c, ph) != ph for c, ph in probe.phases.items()):
        raise NotExact(f"phases at ({b}, {s})")
    rec, slack = predict(fit, probe.record, b, s, size_key)
    if list(probe.record) != fit.columns or rec != probe.record or slack != probe.slack:
        raise NotExact(f"probe ({b}, {s})")


def build_fit(p: Prober, sizes: list[int], b_top: int, size_key: str) -> Fit:
    """Fit every tier-component column on the prober's GPU and check it (module docstring)."""
    sp = sorted({sizes[0], sizes[len(sizes) // 2], sizes[-1]})
    columns = list(p.at(1, sp[0]).record)
    fitted = [c for c in columns if is_fitted(c)]
    gh: dict[int, dict[str, tuple[int, int]]] = {s: {} for s in sizes}
    off: set[str] = set()
    probes = {(b, s): p.at(b, s).record for b in (1, 2) for s in sp}
    for col in fitted:
        at = {key: rec.get(col, 0) for key, rec in probes.items()}
        if len(sp) == 1:  # one size: the line through b = 1 and 2, integer by construction
            gh[sp[0]][col] = (at[2, sp[0]] - at[1, sp[0]], 2 * at[1, sp[0]] - at[2, sp[0]])
            continue
        g = lagrange(sp, [at[2, s] - at[1, s] for s in sp])
        h = lagrange(sp, [2 * at[1, s] - at[2, s] for s in sp])
        values = [(poly(g, Fraction(s)), poly(h, Fraction(s))) for s in sizes]
        if any(gs.denominator != 1 or hs.denominator != 1 for gs, hs in values) or \
                any(c.denominator > MAX_COEFFICIENT_DENOMINATOR for c in (*g, *h)):
            off.add(col)
        for s, (gs, hs) in zip(sizes, values, strict=True):
            gh[s][col] = (int(gs), int(hs))
    checks = [*([(b_top, sp[1])] if len(sp) > 2 else []), (2 * b_top + 3, sizes[0]), (7 * b_top + 5, sizes[-1]),
              *((b_top, s) for s in sizes if s not in sp)]
    phases: dict[str, Any] = {}
    for b, s in [*((b, s) for b in (1, 2) for s in sp), *checks]:
        for c, ph in p.at(b, s).phases.items():
            if phases.setdefault(c, ph) != ph:
                raise NotExact(f"{c}: phases vary")
    fit = Fit(columns, gh, {}, phases, p.at(1, sp[0]).step)
    top = p.at(7 * b_top + 5, sizes[-1]).record
    for col in fitted:  # a column off the polynomial form may be a share of its tier's other columns
        if col not in off and all(p.at(b, s).record.get(col) == b * gh[s][col][0] + gh[s][col][1] for b, s in checks):
            continue  # a polynomial column is b·G + H whatever the share columns are (``Fit.at``)
        if any(tier_of(c) == tier_of(col) for c in fit.share):
            raise NotExact(col)
        fit.share[col] = find_share(p, fit, col, [*((b, s) for b in (1, 2) for s in sp), *checks], top)
        for s in sizes:
            gh[s].pop(col)
    for b, s in [*((b, s) for b in (1, 2) for s in sp), *checks]:
        check(fit, p.at(b, s), b, s, size_key)
    return fit


MAX_COEFFICIENT_DENOMINATOR = 64
"""A fitted polynomial's coefficients must be fractions with small denominators (a formula's /2 or /tp):
a rounded column (ceil of a share) interpolated through a few points gets large ones, and must not pass
as a polynomial that happens to agree at the check points (hypothesis found one such agreement)."""

SHARE_DENOMINATOR = 100
"""Largest denominator of a share k, found as the fraction nearest to (column / its tier's other columns):
a whole percentage (5% is 1/20), as ``allocator_reserve_pct`` is; any other k fails the checks (scalar path)."""


@dataclass
class Member:
    """One GPU of a group: the fit of its class, its own record template, and its class's prober."""

    gpu: str
    fit: Fit
    template: dict[str, Any]
    prober: Prober


def members(spec: SweepSpec, model: str, job: Job, count: int, sizes: list[int], b_top: int) -> list[Member]:
    """Each GPU with the fit of its class: the GPUs that answer every GPU read of a class's estimates like its
    first GPU share its estimates and fit (``vector_probe``); the template (capacity, price) is each GPU's own,
    checked against the fit at (1, largest size)."""
    size_key = size_key_of(job)
    classes: list[tuple[Prober, Fit]] = []
    out: list[Member] = []
    values: dict[tuple[str, str], Any] = {}
    for gpu in spec.gpus:
        cls = next((c for c in classes if c[0].shares(gpu)), None)
        if cls is None:
            p = Prober(spec, Cell(model, gpu, job, count, sizes[0], None), values)
            cls = (p, build_fit(p, sizes, b_top, size_key))
            classes.append(cls)
        check_on_gpu(cls[1], cls[0], gpu, 1, sizes[-1], size_key)  # the first GPU's probe: checked by build_fit
        out.append(Member(gpu, cls[1], cls[0].at(1, sizes[-1], gpu).record, cls[0]))
    return out


def fitted_arrays(fit: Fit, sizes: list[int], b: np.ndarray) -> dict[str, np.ndarray]:
    """Every fitted column (share columns included) at micro-batch ``b[i]`` and size ``sizes[i]``, int64."""
    out = {}
    for col in fit.gh[sizes[0]]:
        g = np.array([fit.gh[s][col][0] for s in sizes], dtype=np.int64)
        h = np.array([fit.gh[s][col][1] for s in sizes], dtype=np.int64)
        out[col] = b * g + h
    return fit.complete(out)


@dataclass
class Solved:
    """One GPU of a vectorized group: its member (fit and template) and the metric per size (max-batch)."""

    member: Member
    values: dict[int, int] | None


def solve_group(spec: SweepSpec, model: str, job: Job, count: int) -> list[Solved]:
    """Fit and check every GPU of (model, job, count); NotExact or MemplanError when the group is not exact.

    ``max-batch``: one vectorized search per class of GPUs (``vector_search.largest_batches``); the largest
    and the smallest batch it finds beyond the fit's probes, and the batch after each, are checked exactly
    (``vector_search.frontier``). Last, every GPU must still answer every read of its class's estimates,
    those checks' included, like the class's first GPU."""
    from memplan.memory.memo import narrowed_scope

    with narrowed_scope():  # the group's GPU classes that differ in the runtime rows only share the job's rows
        return _solve_group(spec, model, job, count)


def _solve_group(spec: SweepSpec, model: str, job: Job, count: int) -> list[Solved]:
    from memplan.vector_search import frontier, largest_batches

    sizes = sorted(set(spec.sizes(job)))
    b_top = max(4, *spec.batches)
    size_key = size_key_of(job)
    group = members(spec, model, job, count, sizes, b_top)
    best: dict[str, dict[int, int] | None] = {m.gpu: None for m in group}
    if spec.metric == "max-batch":
        for prober in dict.fromkeys(m.prober for m in group):
            mine = [m for m in group if m.prober is prober]
            found = largest_batches(mine[0].fit, [m.template for m in mine], sizes)
            best.update({m.gpu: v for m, v in zip(mine, found, strict=True)})
            for gpu, b, s in frontier(mine, found, b_top):
                check(mine[0].fit, prober.at(b, s, gpu), b, s, size_key)
    if not all(m.prober.shares(m.gpu) for m in group):
        raise NotExact("a GPU read differs")
    return [Solved(m, best[m.gpu]) for m in group]


def size_key_of(job: Job) -> str:
    return "infer_context" if job is Job.INFER else "seq_len"


def group_results(spec: SweepSpec, model: str, job: Job, count: int) -> list[CellResult]:
    """Every cell of (model, job, count) over the GPUs and sizes, with its records, vectorized."""
    column, size_key, batches = METRIC_COLUMN[spec.metric], size_key_of(job), list(spec.batches)
    out = []
    for solved in solve_group(spec, model, job, count):
        m = solved.member
        for s in spec.sizes(job):
            rows = [scalar_or_predicted(m, b, s, size_key) for b in batches]
            value = solved.values[s] if solved.values is not None else \
                max((b for b, (_, sl) in zip(batches, rows, strict=True) if sl >= 0), default=0)
            out.append(CellResult(Cell(model, m.gpu, job, count, s, None), value, [{**r, column: value} for r, _ in rows]))
    return out


def scalar_or_predicted(m: Member, b: int, s: int, size_key: str) -> tuple[dict[str, Any], int]:
    """The record at (b, s) on the member's GPU and its slack: the scalar probe's own where the group probed that
    point (every probe of a solved group was checked equal to the fit), else the fit's prediction."""
    probe = m.prober.memo.get((m.gpu, b, s))
    return (probe.record, probe.slack) if probe is not None else predict(m.fit, m.template, b, s, size_key)


def evaluate_group(spec: SweepSpec, group: list[Cell]) -> list[CellResult]:
    """The group's cells, vectorized when every check passes, else each by the scalar path (its estimates shared
    by the GPUs that read alike, ``vector_probe.shared_evaluate``, where they do)."""
    first = group[0]
    if not spec.speed:
        solve = context_results if spec.metric == "max-context" else group_results
        try:
            done = {(r.cell.gpu, r.cell.size, r.cell.batch): r for r in solve(spec, first.model, first.job, first.gpus)}
            return [done[(c.gpu, c.size, c.batch)] for c in group]
        except (NotExact, MemplanError):
            pass
        try:
            return shared_evaluate(spec, group)
        except (NotExact, MemplanError):
            pass
    return [evaluate(spec, c) for c in group]


PROCESS_RUNS = 16
"""Sweeps of fewer (model, job) runs than this stay in this process: a run takes some 10-50 ms, and a spawned worker
first spends about 0.5 s importing memplan (a forked one, ``grid.start_method``, does not, but still builds its own
memos)."""


class Chunk(list):
    """A run's CellResults without records, and ``block``: all their rows as columns (``vector_frame.run_block``),
    in grid order."""

    block: Any = None
    rows: int = 0
    part: Any = None
    """(path, rows) of ``block`` pickled to a spill folder instead (``run_chunk``'s ``spill``)."""

    @property
    def frame(self) -> Any:
        """The rows as one typed DataFrame (``vector_frame.run_frame``)."""
        from memplan.vector_frame import run_frame

        return None if self.block is None else run_frame([self.block])


def columnar_chunk(spec: SweepSpec, todo: list[Cell]) -> Chunk | None:
    """The run as a Chunk when every group of it is exact, else None (the caller takes the record path, as
    ``max-context`` always does)."""
    from memplan.vector_frame import run_block

    if spec.metric == "max-context":
        return None

    model, job = todo[0].model, todo[0].job
    column, size_key, sizes = METRIC_COLUMN[spec.metric], size_key_of(job), list(spec.sizes(job))
    by_block: dict[tuple[str, int], Solved] = {}
    try:
        for count in spec.gpu_counts:
            for solved in solve_group(spec, model, job, count):
                by_block[(solved.member.gpu, count)] = solved
    except (NotExact, MemplanError):
        return None
    order = [(gpu, count) for gpu in spec.gpus for count in spec.gpu_counts]
    entries = [(by_block[k].member.fit, by_block[k].member.template, by_block[k].values) for k in order]
    chunk = Chunk()
    chunk.block = run_block(entries, sizes, list(spec.batches), size_key, column)
    chunk.rows = len(order) * len(sizes) * len(spec.batches)
    per_cell = np.asarray(chunk.block[column])[:: len(spec.batches)].tolist()
    cells_of = (Cell(model, gpu, job, count, s, None) for gpu, count in order for s in sizes)
    chunk += [CellResult(c, int(v), []) for c, v in zip(cells_of, per_cell, strict=True)]
    return chunk


def run_chunk(spec: SweepSpec, todo: list[Cell], columnar: bool = False, spill: str | None = None) -> list[CellResult]:
    """The cells of one (model, job), in grid order, group by group (one GPU count each); ``columnar``:
    a Chunk with the rows as columns when every group is exact; ``spill`` (a folder): those columns pickled
    there by the process that built them (``Chunk.part``), so a run's rows never travel between processes nor
    wait in the caller's window of runs in flight (memory stays one run per process)."""
    if columnar:
        chunk = columnar_chunk(spec, todo)
        if chunk is not None:
            if spill is not None:
                from memplan.vector_frame import spill_block

                chunk.part, chunk.block = spill_block(chunk.block, chunk.rows, spill), None
            return chunk
    results = {}
    for count in spec.gpu_counts:
        group = [c for c in todo if c.gpus == count]
        if group:
            results.update({(r.cell.gpu, r.cell.gpus, r.cell.size, r.cell.batch): r for r in evaluate_group(spec, group)})
    return [results[(c.gpu, c.gpus, c.size, c.batch)] for c in todo]


def iter_vector(spec: SweepSpec, *, workers: int | None = 1, progress: Callable[[int], None] | None = None,
                columnar: bool = False, spill: str | None = None) -> Iterator[list[CellResult]]:
    """The sweep's results one (model, job) at a time, in the scalar path's grid order (the contract of
    ``grid.iter_results``), vectorized where the checks pass, over ``workers`` processes (at most
    2·workers runs in flight). ``speed`` and grids with a repeated value take the scalar path; ``max-context``
    runs the scalar search on estimates shared by the GPUs that read alike (``vector_probe.context_results``)."""
    repeated = any(len(set(v)) != len(v) for v in (spec.seq_lens, spec.contexts, spec.batches, spec.gpus,
                                                     spec.gpu_counts))
    if spec.speed or repeated:
        yield from iter_results(spec, workers=workers, progress=progress)
        return
    runs = (list(run) for _, run in groupby(cells(spec), key=lambda c: (c.model, c.job)))
    workers = default_workers() if workers is None else workers
    if workers <= 1 or len(spec.models) * len(spec.jobs) < PROCESS_RUNS:
        for todo in runs:
            chunk = run_chunk(spec, todo, columnar)  # in this process: nothing to spill between processes
            if progress:
                progress(len(chunk))
            yield chunk
        return
    work = functools.partial(run_model, spec, columnar=columnar, spill=spill)
    for chunks in pooled(work, model_units(runs), workers=workers):
        for chunk in chunks:
            if progress:
                progress(len(chunk))
            yield chunk


UNIT_CELLS = 1024
"""Most cells in one work item of the pool: consecutive runs of one model, up to this many cells."""


def model_units(runs: Iterator[list[Cell]]) -> Iterator[list[list[Cell]]]:
    """Consecutive runs of one model as one work item (up to ``UNIT_CELLS`` cells): a process then builds the
    model's architecture and size-free memos once for its jobs, not once per job in each process."""
    unit: list[list[Cell]] = []
    for todo in runs:
        if unit and (unit[0][0].model != todo[0].model or sum(map(len, unit)) + len(todo) > UNIT_CELLS):
            yield unit
            unit = []
        unit.append(todo)
    if unit:
        yield unit


def run_model(spec: SweepSpec, unit: list[list[Cell]], columnar: bool = False,
              spill: str | None = None) -> list[list[CellResult]]:
    """``run_chunk`` of each run of a work item (``model_units``), in order."""
    return [run_chunk(spec, todo, columnar, spill) for todo in unit]
