"""The fit matrix as a pivot: rows models, columns GPUs, one block per (job, GPU count, size, batch).

``matrix_frame`` pivots the CLI's matrices (``sweep --pivot --format csv``: one row per model and block).
``pivot_tables`` lays them out for people (``sweep --pivot``): compact cells, and the GPU columns split
into panels that fit the screen's width (80 columns in a pipe), the model column repeated in each.
``fit_matrix`` pivots a ``memplan.sweep`` DataFrame. A cell is the sweep's metric (largest micro-batch,
longest context, or largest swept batch that fits); 0 when nothing fits; empty where the configuration is
invalid or not modelled.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from memplan.grid import METRIC_COLUMN
from memplan.report.fold import panels
from memplan.report.sweep_out import INVALID, Matrix
from memplan.report.table import GAP, PIPE_WIDTH, Table

NO_FIT = "-"
FITS = "FITS"
BOX_GAP = 3
"""rich's table: a border and one space either side between two columns."""
BOX_EDGES = 4
"""rich's table: the outer borders and their padding."""

KEYS = ("job", "gpus", "size", "batch", "model")
"""The row key of a pivot CSV: the matrix's block, then the model."""


def matrix_frame(mats: list[Matrix]) -> pd.DataFrame:
    """Every matrix as rows (block keys and model) × GPU columns (nullable Int64 cells)."""
    gpus = list(dict.fromkeys(g for m in mats for g in m.gpus))
    records: list[dict[str, Any]] = []
    for m in mats:
        for model in m.models:
            rec: dict[str, Any] = {"job": m.job.value, "gpus": m.gpus_total, "size": m.size, "batch": m.batch,
                                   "model": model}
            rec.update({g: m.values.get((model, g)) for g in gpus})
            records.append(rec)
    frame = pd.DataFrame.from_records(records, columns=[*KEYS, *gpus])
    for col in ("gpus", "size", "batch", *gpus):
        frame[col] = frame[col].astype("Int64")
    return frame


def pivot_csv(mats: list[Matrix]) -> str:
    """``sweep --pivot --format csv``: the fit matrices as one CSV (``\\n`` line ends, empty: invalid)."""
    return matrix_frame(mats).to_csv(index=False, lineterminator="\n")


def fit_matrix(frame: pd.DataFrame, value: str | None = None, *, job: str | None = None) -> pd.DataFrame:
    """Models × GPUs of a ``memplan.sweep`` DataFrame: the largest ``value`` per cell (default: the
    sweep's metric column), over the rows of ``job`` (all jobs when None)."""
    if value is None:
        value = next((c for c in METRIC_COLUMN.values() if c in frame.columns), None)
        if value is None:
            raise ValueError("no metric column (max_batch, max_context, max_fitting_batch) in this frame")
    rows = frame if job is None else frame[frame["job"] == job]
    return rows.pivot_table(index="model", columns="gpu", values=value, aggfunc="max", observed=True)


def pivot_cell(m: Matrix, model: str, gpu: str, *, yes_no: bool) -> str:
    """A pivot cell: the metric, or ``FITS`` when ``yes_no`` (a fits sweep of one batch); ``-`` when nothing
    fits, ``n/a`` when invalid."""
    value = m.values.get((model, gpu))
    if value is None:
        return INVALID
    if not value:
        return NO_FIT
    return FITS if yes_no else str(value)


def pivot_tables(mats: list[Matrix], width: int = PIPE_WIDTH, *, yes_no: bool = False, boxed: bool = False) -> list[Table]:
    """Each matrix as tables of at most ``width`` columns: models down, GPUs across, GPUs split over panels
    (a GPU name wider than the screen still gets its panel). ``yes_no``: FITS instead of the number;
    ``boxed``: rich's layout (a border and one space of padding each side of every column) instead of the
    plain one (``GAP`` between columns)."""
    tables = []
    for m in mats:
        cells = {g: {mod: pivot_cell(m, mod, g, yes_no=yes_no) for mod in m.models} for g in m.gpus}
        widths = {g: max(len(g), *(len(c) for c in cells[g].values())) for g in m.gpus}
        first = max(len("model"), *(len(mod) for mod in m.models)) + (BOX_EDGES if boxed else 0)
        runs = panels(m.gpus, first, widths, width, BOX_GAP if boxed else len(GAP))
        for i, run in enumerate(runs):
            more = f" (GPUs {sum(map(len, runs[:i])) + 1}-{sum(map(len, runs[:i + 1]))} of {len(m.gpus)})"
            table = Table(title=m.title + (more if len(runs) > 1 else ""))
            table.add_column("model")
            for g in run:
                table.add_column(g, justify="right")
            for mod in m.models:
                table.add_row(mod, *(cells[g][mod] for g in run))
            tables.append(table)
    return tables


def render_pivot(mats: list[Matrix], out: Any, *, yes_no: bool = False) -> None:
    """``sweep --pivot`` in the terminal (its width) or a pipe (80 columns), with the legend. ``yes_no``: a
    ``fits`` sweep of one batch, whose cells say FITS rather than the batch."""
    width = out.console.size.width if out.terminal else PIPE_WIDTH
    for i, table in enumerate(pivot_tables(mats, width, yes_no=yes_no, boxed=out.terminal)):
        if i:
            out.print("")
        out.print(table)
    out.print(f"{FITS + ': the swept batch fits; ' if yes_no else ''}{NO_FIT}: nothing fits; {INVALID}: invalid or "
              "not modelled\n(reasons on stderr and in the CSV's error column).", highlight=False)
