"""One vectorized group, a (model, job, GPU count) over the sweep's GPUs: each GPU with the fit of its class
(``vector_fit``), the ``max-batch`` search over the fit (``vector_search``), and the group's records
(``memplan.vector``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from memplan.config import Job
from memplan.grid import METRIC_COLUMN, Cell, CellResult, SweepSpec
from memplan.vector_fit import Fit, build_fit, check, check_on_gpu, predict
from memplan.vector_probe import NotExact, Prober


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
