"""The fit matrix as a pivot: rows models, columns GPUs, one block per (job, GPU count, size, batch).

``matrix_frame`` pivots the CLI's matrices (``sweep --pivot``: the terminal shows the same tables as
``--format table``; CSV gets one row per model and block). ``fit_matrix`` pivots a ``memplan.sweep``
DataFrame. A cell is the sweep's metric (largest micro-batch, longest context, or largest swept batch
that fits); 0 when nothing fits; empty where the configuration is invalid or not modelled.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from memplan.grid import METRIC_COLUMN
from memplan.report.sweep_out import Matrix

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
