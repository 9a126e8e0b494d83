"""Columnar rows of vectorized sweep groups: the columns of each (model, job, GPU, GPU count) block built
with numpy from a ``vector.Fit`` instead of one dict per row, and one DataFrame per (model, job) run (pandas
is called once per column of the run, not per block: that was most of a fleet sweep's time). Same values,
same column order and the same CSV bytes as the records ``grid.evaluate`` writes (``tests/test_vector.py`` checks it)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from memplan.report.frame import absent, typed
from memplan.units import GiB

TIERS = ("gpu", "cpu", "nvme")
ROUND_DIGITS = 4
"""``csv_out.estimate_record`` writes GiB as round(bytes / GiB, 4)."""


def gib(values: np.ndarray) -> list[float]:
    """round(v / GiB, 4) for each v, equal to Python's ``round``: numpy's rint(x·10^4)/10^4, and Python's
    own ``round`` wherever x·10^4 lies near a tie (within 10^-6, or 2^-40 of its size: where the two could
differ by the product's rounding)."""
    x = values.astype(np.float64) / GiB
    scaled = x * 10**ROUND_DIGITS
    out = np.rint(scaled) / 10**ROUND_DIGITS
    near = np.abs(scaled - np.floor(scaled) - 0.5) < np.maximum(1e-6, np.abs(scaled) * 2.0**-40)
    result = out.tolist()
    for i in np.flatnonzero(near).tolist():
        result[i] = round(int(values[i]) / GiB, ROUND_DIGITS)
    return result


def block_frame(fit: Any, template: dict[str, Any], sizes: list[int], batches: list[int], size_key: str,
                column: str, values: dict[int, int] | None) -> dict[str, Any]:
    """Columns (numpy arrays or lists) of the rows for every size × batch (sizes outer, as the grid's cells
    and records run) of one GPU's fit.
    ``values``: the metric per size (max-batch); None: the largest swept batch that fits (fits)."""
    ns, nb = len(sizes), len(batches)
    b = np.tile(np.array(batches, dtype=np.int64), ns)
    from memplan.vector import fitted_arrays

    data: dict[str, Any] = {}
    fitted = fitted_arrays(fit, [s for s in sizes for _ in batches], b)
    totals = {t: np.zeros(ns * nb, dtype=np.int64) for t in TIERS}
    for col, v in fitted.items():
        totals[col.split(":", 1)[0]] += v
    peaks = {t: np.broadcast_to(fit.peak(fitted, t), (ns * nb,)) for t in TIERS}  # fits, headroom: the peak
    rooms = []
    for t in TIERS:
        room = template[f"{t}_capacity_bytes"] - peaks[t]
        rooms.append(room if t == "gpu" else np.where(peaks[t] > 0, room, np.iinfo(np.int64).max))
    headroom = np.minimum.reduce(rooms)
    slack = np.minimum(headroom, template["gpu_capacity_bytes"] - peaks["gpu"] - template["required_headroom_bytes"])
    ok = slack >= 0
    if values is None:
        best = np.where(ok, b, 0).reshape(ns, nb).max(axis=1)
        metric = np.repeat(best, nb)
    else:
        metric = np.repeat(np.array([values[s] for s in sizes], dtype=np.int64), nb)
    varying = {"micro_batch": b, size_key: np.repeat(np.array(sizes, dtype=np.int64), nb), "ok": ok,
               "fits": np.logical_and.reduce([peaks[t] <= template[f"{t}_capacity_bytes"] for t in TIERS]),
               "headroom_bytes": headroom, column: metric}
    for t in TIERS:
        varying[f"{t}_total_bytes"] = totals[t]
        varying[f"{t}_total_gib"] = np.asarray(gib(totals[t]), dtype=np.float64)
    for col, v in fitted.items():
        varying[col] = v
        varying[col[:-6] + "_gib"] = np.asarray(gib(v), dtype=np.float64)
    for col in fit.columns:
        data[col] = varying[col] if col in varying else constant(template[col], ns * nb)
    return data


def constant(value: Any, n: int) -> Any:
    """``n`` copies of ``value``: an array where numpy holds the value exactly (flags, int64, floats), else a list."""
    if isinstance(value, bool):
        return np.full(n, value, dtype=bool)
    if isinstance(value, int) and -2**63 <= value < 2**63:
        return np.full(n, value, dtype=np.int64)
    if isinstance(value, float):
        return np.full(n, value, dtype=np.float64)
    return [value] * n


def run_frame(blocks: list[dict[str, Any]]) -> pd.DataFrame:
    """The blocks of one (model, job) in grid order as one frame: the union of their columns in first-seen
    order, a column a block lacks filled as the stdlib writer fills it (0 bytes, 0.0 GiB, else empty). Each
    column gets the dtype ``report.frame.typed`` gives the same values (``records_frame``'s dtypes): arrays
    of one dtype are concatenated as they are, anything else goes through ``typed``."""
    columns = list(dict.fromkeys(c for blk in blocks for c in blk))
    lengths = [len(next(iter(blk.values()))) for blk in blocks]
    data = {}
    for col in columns:
        parts = [blk[col] if col in blk else constant(absent(col), n) for blk, n in zip(blocks, lengths, strict=True)]
        kinds = {p.dtype for p in parts if isinstance(p, np.ndarray)}
        if len(kinds) == 1 and all(isinstance(p, np.ndarray) for p in parts):
            data[col] = np.concatenate(parts)
        else:
            data[col] = typed(col, [v for p in parts for v in (p.tolist() if isinstance(p, np.ndarray) else p)])
    return pd.DataFrame(data, columns=columns, index=pd.RangeIndex(sum(lengths)))


def spill_frame(frame: pd.DataFrame, folder: str) -> tuple[str, list[str], int]:
    """Pickle ``frame`` to a new file in ``folder`` (``report.sweep_stream.Spill`` reads it back):
    (its path, its columns, its row count)."""
    import os
    import pickle
    import tempfile

    fd, path = tempfile.mkstemp(prefix="run", suffix=".pkl", dir=folder)
    with os.fdopen(fd, "wb") as fh:
        pickle.dump(frame, fh, protocol=pickle.HIGHEST_PROTOCOL)
    return path, list(frame.columns), len(frame)
