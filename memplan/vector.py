"""Vectorized sweeps: the scalar memory model's rows as exact, runtime-verified functions of (batch, size).

The scalar model (``memplan.estimator``) stays the reference and is never re-implemented here. For one
group, a (model, job, GPU count) with every other choice fixed, each record column is fitted to the
scalar model's own output and then CHECKED against it (``vector_fit``: probes, share columns, checks):

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
from itertools import groupby
from typing import Any

import numpy as np

from memplan.errors import MemplanError
from memplan.grid import METRIC_COLUMN, Cell, CellResult, SweepSpec, cells, default_workers, evaluate, iter_results, pooled
from memplan.vector_fit import (
    MAX_COEFFICIENT_DENOMINATOR,
    SHARE_DENOMINATOR,
    Fit,
    build_fit,
    check,
    check_on_gpu,
    find_share,
    fitted_arrays,
    lagrange,
    poly,
    predict,
    verdict,
)
from memplan.vector_group import Member, Solved, group_results, members, scalar_or_predicted, size_key_of, solve_group
from memplan.vector_probe import NotExact, context_results, shared_evaluate

__all__ = [
    "MAX_COEFFICIENT_DENOMINATOR", "PROCESS_RUNS", "SHARE_DENOMINATOR", "UNIT_CELLS", "Chunk", "Fit", "Member",
    "NotExact", "Solved", "build_fit", "cells", "check", "check_on_gpu", "columnar_chunk", "evaluate", "evaluate_group",
    "find_share", "fitted_arrays", "group_results", "iter_vector", "lagrange", "members", "model_units", "poly",
    "predict", "run_chunk", "run_model", "scalar_or_predicted", "size_key_of", "solve_group", "verdict",
]


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
