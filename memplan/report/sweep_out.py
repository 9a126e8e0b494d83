"""Presenting a sweep: fit matrices (rows models, columns GPUs) as tables, JSON and CSV."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from memplan.config import Job
from memplan.grid import METRIC_COLUMN, Cell, Metric, SweepResult, SweepSpec
from memplan.report.json_out import SCHEMA_VERSION

NO_FIT = "✗"
INVALID = "n/a"


@dataclass
class Matrix:
    """One fit matrix: rows models, columns GPUs, one cell per (model, GPU) of one job and shape."""

    title: str
    job: Job
    gpus_total: int
    size: int | None
    batch: int | None
    metric: Metric
    models: list[str]
    gpus: list[str]
    values: dict[tuple[str, str], int | None]

    def cell_text(self, model: str, gpu: str) -> str:
        value = self.values.get((model, gpu))
        if value is None:
            return INVALID
        return f"{value:,}" if value else NO_FIT


def matrix_title(spec: SweepSpec, c: Cell) -> str:
    trains = c.job is not Job.INFER
    parts = [c.job.value, f"{c.gpus} GPU{'s' if c.gpus > 1 else ''}"]
    if c.size is not None:
        parts.append(f"{'seq' if trains else 'context'} {c.size:,}")
    if c.batch is not None:
        parts.append(f"{'micro-batch' if trains else 'concurrency'} {c.batch:,}")
    what = {"max-batch": "largest micro-batch" if trains else "largest concurrency",
            "max-context": "longest sequence" if trains else "longest context",
            "fits": "largest swept micro-batch" if trains else "largest swept concurrency"}[spec.metric]
    return f"{' · '.join(parts)}: {what} that fits"


def matrices(result: SweepResult) -> list[Matrix]:
    """One matrix per (job, size or batch, GPU count), in grid order."""
    spec = result.spec
    groups: dict[tuple, Matrix] = {}
    for r in result.cells:
        c = r.cell
        key = (c.job, c.size, c.batch, c.gpus)
        if key not in groups:
            groups[key] = Matrix(matrix_title(spec, c), c.job, c.gpus, c.size, c.batch, spec.metric,
                                 list(spec.models), list(spec.gpus), {})
        groups[key].values[(c.model, c.gpu)] = r.value
    return list(groups.values())


def matrix_table(m: Matrix, gpus: list[str] | None = None) -> Any:
    """The matrix as a table, with the GPU columns ``gpus`` (default: all of them)."""
    from memplan.report.table import Table

    columns = m.gpus if gpus is None else gpus
    table = Table()
    table.add_column("model")
    for gpu in columns:
        table.add_column(gpu, justify="right")
    for model in m.models:
        table.add_row(model, *(m.cell_text(model, gpu) for gpu in columns))
    return table


def gpu_panels(m: Matrix) -> list[list[str]]:
    """The matrix's GPU columns in runs that fit ``PIPE_WIDTH`` columns beside the model column (as ``--pivot``
    splits them: ``memplan.report.fold.panels``)."""
    from memplan.report.fold import PIPE_WIDTH, panels
    from memplan.report.table import GAP

    widths = {g: max(len(g), *(len(m.cell_text(mod, g)) for mod in m.models)) for g in m.gpus}
    first = max(len("model"), *(len(mod) for mod in m.models))
    return panels(list(m.gpus), first, widths, PIPE_WIDTH, len(GAP))


def render_matrices(mats: list[Matrix], out: Any) -> None:
    """Each matrix as a table; names are never cut (they fold on a terminal; a pipe gets a plain layout, its GPU
    columns split over panels of 80 columns, each titled with the GPUs it shows)."""
    for m in mats:
        runs = [list(m.gpus)] if out.terminal else gpu_panels(m)
        for i, run in enumerate(runs):
            more = f" (GPUs {sum(map(len, runs[:i])) + 1}-{sum(map(len, runs[:i + 1]))} of {len(m.gpus)})"
            out.print(m.title + (more if len(runs) > 1 else ""), highlight=False)
            out.print(matrix_table(m, run))
    out.print(f"{NO_FIT}: nothing fits (not even 1); {INVALID}: invalid configuration or not modelled "
              "(reasons on stderr and in the CSV's error column).")


def matrix_dict(m: Matrix) -> dict[str, Any]:
    return {
        "title": m.title, "job": m.job.value, "gpus": m.gpus_total, "size": m.size, "batch": m.batch,
        "metric": m.metric, "models": m.models, "gpu_names": m.gpus,
        "values": [[m.values.get((model, gpu)) for gpu in m.gpus] for model in m.models],
    }


def sweep_dict(result: SweepResult) -> dict[str, Any]:
    """The sweep JSON contract: every record and every fit matrix (``values[i][j]``: model i, GPU j; null: invalid)."""
    errors = sum(1 for c in result.cells if c.error)
    return {
        "schema_version": SCHEMA_VERSION,
        "metric": result.spec.metric,
        "metric_column": METRIC_COLUMN[result.spec.metric],
        "cells": len(result.cells),
        "invalid_cells": errors,
        "estimates": result.estimates,
        "matrices": [matrix_dict(m) for m in matrices(result)],
        "records": result.records,
    }
