"""DataFrames of estimates, plans and sweep records, and the CSV written from them.

``records_frame`` is the one place that turns records (``csv_out.estimate_record`` and the sweep's
extra columns) into a typed frame: ``*_bytes`` columns int64 (nullable Int64 only where a
configuration field may be unset, e.g. ``cuda_context_bytes``), configuration text columns
categorical, flags boolean. ``frame_csv`` writes the frame in exactly the bytes of the stdlib writer
(``csv_out.records_to_csv``): the same columns in first-seen order, ints as ints, an absent tier component 0
(``*_gib`` 0.0), an unset value empty, ``\\n`` line ends.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import pandas as pd

from memplan.memory.breakdown import Row
from memplan.report.csv_out import absent
from memplan.units import GiB

FREE_TEXT = frozenset({"error", "not_modelled"})
"""Text columns that are messages, not configuration choices: kept as plain strings."""


def is_component(col: str) -> bool:
    """``gpu:weights_bytes``-style columns: a tier component (0 where a record lacks it)."""
    return ":" in col and (col.endswith("_bytes") or col.endswith("_gib"))


def columns_of(records: Iterable[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(key for rec in records for key in rec))


def records_frame(records: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> pd.DataFrame:
    """The typed frame of ``records`` (columns: ``columns`` or every key in first-seen order)."""
    cols = list(columns) if columns is not None else columns_of(records)
    data = {col: typed(col, [rec.get(col, absent(col)) for rec in records]) for col in cols}
    return pd.DataFrame(data, columns=cols, index=pd.RangeIndex(len(records)))


def typed(col: str, values: list[Any]) -> pd.Series:
    """One column with the dtype its values call for (see the module docstring)."""
    present = [v for v in values if v is not None]
    if not present:
        return pd.Series(values, dtype="Int64" if col.endswith("_bytes") else "object")
    if all(isinstance(v, bool) for v in present):
        return pd.Series(values, dtype="bool" if len(present) == len(values) else "boolean")
    if all(isinstance(v, int) and not isinstance(v, bool) for v in present):
        if len(present) == len(values) and all(-2**63 <= v < 2**63 for v in present):
            return pd.Series(values, dtype="int64")
        return pd.Series(values, dtype="Int64")
    if all(isinstance(v, float) for v in present):
        return pd.Series([float("nan") if v is None else v for v in values], dtype="float64")
    if all(isinstance(v, str) for v in present) and col not in FREE_TEXT:
        return pd.Series(values, dtype="category")
    return pd.Series(values, dtype="object")


def frame_csv(frame: pd.DataFrame, *, header: bool = True) -> str:
    """The CSV text of a records frame, byte-identical to ``csv_out.records_to_csv`` of the same records."""
    return frame.to_csv(index=False, header=header, lineterminator="\n")


def rows_frame(rows: Iterable[Row]) -> pd.DataFrame:
    """One row per (component, tier): bytes int64, GiB, the phases it is alive in (empty: throughout), source."""
    rows = list(rows)
    return pd.DataFrame({
        "component": pd.Series([r.component for r in rows], dtype="category"),
        "tier": pd.Series([r.tier.value for r in rows], dtype="category"),
        "bytes": pd.Series([r.bytes for r in rows], dtype="int64"),
        "gib": [r.bytes / GiB for r in rows],
        "phases": [",".join(sorted(p.value for p in r.phases)) if r.phases else "" for r in rows],
        "source": [r.source for r in rows],
    })


def plan_frame(options: Sequence[Any]) -> pd.DataFrame:
    """One row per plan option (``api.PlanOption``), best first: the estimate's record plus speed and cost."""
    from memplan.report.csv_out import estimate_record

    records = []
    for rank, opt in enumerate(options):
        rec = {"rank": rank, **estimate_record(opt.estimate.detail), "peak_bytes": opt.estimate.peak,
               "step_time_s": opt.step_time_s, "tokens_per_s": opt.tokens_per_s, "layer_map": opt.layer_map}
        rec.update(cost_columns(opt.cost))
        records.append(rec)
    return records_frame(records)


COST_COLUMNS = ("usd_per_hour", "usd_per_step", "usd_per_m_trained_tokens", "usd_per_m_served_tokens")


def cost_columns(cost: Any) -> dict[str, float | None]:
    """The cost columns of a ``report.cost.Cost`` (all None when the price is unknown)."""
    return {col: None if cost is None else getattr(cost, col) for col in COST_COLUMNS}


def concat_frames(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """Frames with the same columns stacked, a categorical column kept categorical (the union of the
    frames' categories) instead of falling back to object as ``pd.concat`` does when they differ."""
    if len(frames) == 1:
        return frames[0]
    for col in frames[0].columns:
        if all(isinstance(f[col].dtype, pd.CategoricalDtype) for f in frames):
            union = list(dict.fromkeys(c for f in frames for c in f[col].cat.categories))
            for f in frames:
                f[col] = f[col].cat.set_categories(union)
    return pd.concat(frames, ignore_index=True)
