"""Columnar rows of vectorized sweep groups: the columns of each (model, job) run built with numpy from the
``vector.Fit`` of each class of GPUs instead of one dict per row (``run_block``), and one DataFrame per batch of
such runs (``run_frame``; pandas is called once per column of a batch, not per run or GPU: a matrix run is one row
per GPU, and per-run frames were most of a fleet sweep's time). Same values, same column order and the same CSV
bytes as the records ``grid.evaluate`` writes (``tests/test_vector.py`` checks it)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from memplan.report.csv_out import absent
from memplan.units import GiB

if TYPE_CHECKING:
    import pandas as pd

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


def fit_columns(fit: Any, sizes: list[int], batches: list[int], size_key: str) -> dict[str, Any]:
    """What the rows of every GPU sharing ``fit`` have alike, for every size × batch (sizes outer, as the grid's cells
    and records run): ``varying`` (the batch and size, the fitted columns and their GiB, the tier totals) and
    ``peaks`` (per tier, the phase peak: fits and headroom are taken on it)."""
    from memplan.vector_fit import fitted_arrays

    ns, nb = len(sizes), len(batches)
    b = np.tile(np.array(batches, dtype=np.int64), ns)
    fitted = fitted_arrays(fit, [s for s in sizes for _ in batches], b)
    totals = {t: np.zeros(ns * nb, dtype=np.int64) for t in TIERS}
    for col, v in fitted.items():
        totals[col.split(":", 1)[0]] += v
    varying: dict[str, Any] = {"micro_batch": b, size_key: np.repeat(np.array(sizes, dtype=np.int64), nb)}
    byte_columns = {**{f"{t}_total_bytes": totals[t] for t in TIERS}, **fitted}
    gibs = np.asarray(gib(np.stack(list(byte_columns.values())).reshape(-1)), dtype=np.float64)  # one pass for all
    for i, (col, v) in enumerate(byte_columns.items()):
        varying[col] = v
        varying[col[:-6] + "_gib"] = gibs[i * ns * nb:(i + 1) * ns * nb]
    return {"varying": varying, "peaks": {t: np.broadcast_to(fit.peak(fitted, t), (ns * nb,)) for t in TIERS},
            "batch": b, "columns": set(fit.columns)}


def gpu_columns(peaks_of: list[dict[str, Any]], templates: list[dict[str, Any]], sizes: list[int], batches: list[int],
                column: str, values_of: list[dict[int, int] | None]) -> dict[str, Any]:
    """The columns that read each entry's GPU capacities (its ``template``): fits, headroom, ok and the metric, for
    every entry at once (its peaks ``peaks_of``, from its fit), entry after entry as the rows run.
    ``values_of``: per entry the metric per size (max-batch), or None: the largest swept batch that fits (fits)."""
    ns, nb = len(sizes), len(batches)
    peaks = {t: np.stack([p[t] for p in peaks_of]) for t in TIERS}  # (entries, rows of an entry)
    cap = {t: np.array([[tp[f"{t}_capacity_bytes"]] for tp in templates], dtype=np.int64) for t in TIERS}
    need = np.array([[tp["required_headroom_bytes"]] for tp in templates], dtype=np.int64)
    rooms = []
    for t in TIERS:
        room = cap[t] - peaks[t]
        rooms.append(room if t == "gpu" else np.where(peaks[t] > 0, room, np.iinfo(np.int64).max))
    headroom = np.minimum.reduce(rooms)
    ok = np.minimum(headroom, cap["gpu"] - peaks["gpu"] - need) >= 0
    best = np.where(ok, np.tile(np.array(batches, dtype=np.int64), ns), 0).reshape(len(templates), ns, nb).max(axis=2)
    given = np.array([[0] * ns if v is None else [v[s] for s in sizes] for v in values_of], dtype=np.int64)
    told = np.array([[v is not None] for v in values_of])
    metric = np.repeat(np.where(told, given, best), nb, axis=1)
    fits = np.logical_and.reduce([peaks[t] <= cap[t] for t in TIERS])
    return {"ok": ok.reshape(-1), "fits": fits.reshape(-1), "headroom_bytes": headroom.reshape(-1),
            column: metric.reshape(-1)}


def run_block(entries: list[tuple[Any, dict[str, Any], dict[int, int] | None]], sizes: list[int], batches: list[int],
              size_key: str, column: str) -> dict[str, Any]:
    """Columns (numpy arrays or lists) of a run's rows: for each entry (fit, record template, metric per size or
    None) in grid order, one per GPU × count, its rows for every size × batch. Built column by column for the whole
    run: what the entries' fit shares is computed once per fit (``fit_columns``), the columns that read the GPU for
    every entry at once (``gpu_columns``), a record column the same over an entry's rows as one value per entry
    (``constants``), and each column is one array where the entries' parts share a numpy dtype, else the list of its
    values, as ``run_frame`` joins such parts (``stacked``). Columns: the union of the entries' record columns in
    first-seen order; an entry lacking one gets ``frame.absent``, as the stdlib writer writes it."""
    n, shared = len(sizes) * len(batches), {}
    for fit, _, _ in entries:
        if id(fit) not in shared:
            shared[id(fit)] = fit_columns(fit, sizes, batches, size_key)
    mine = [shared[id(fit)] for fit, _, _ in entries]
    templates = [template for _, template, _ in entries]
    gpu = gpu_columns([m["peaks"] for m in mine], templates, sizes, batches, column, [v for _, _, v in entries])
    classes = list(shared.values())
    out = {}
    for col in dict.fromkeys(c for fit, _, _ in entries for c in fit.columns):
        everywhere = all(col in c["columns"] for c in classes)
        if everywhere and col in gpu:
            out[col] = gpu[col]
            continue
        if everywhere and all(col not in c["varying"] for c in classes):
            out[col] = constants([template[col] for template in templates], n)  # a record column of every GPU
            if out[col] is not None:
                continue
        parts = []
        for i, (m, template) in enumerate(zip(mine, templates, strict=True)):
            if col not in m["columns"]:
                parts.append(Constant(absent(col)))
            elif col in gpu:
                parts.append(gpu[col][i * n:(i + 1) * n])
            else:
                parts.append(m["varying"][col] if col in m["varying"] else Constant(template[col]))
        out[col] = stacked(parts, n)
    return out


PLAIN = frozenset({bool, int, float, str, type(None)})
"""Types whose numpy kind ``constants`` reads from the type alone."""


def constants(values: list[Any], n: int) -> Any:
    """``stacked`` of one ``Constant`` per value, each for ``n`` rows, read from the values' types at once (C speed);
    None where a value is of another type (``stacked`` then decides value by value)."""
    types = set(map(type, values))
    if not types <= PLAIN:
        return None
    if types == {bool}:
        kind: Any = np.dtype(bool)
    elif types == {int} and min(values) >= -2**63 and max(values) < 2**63:
        kind = np.dtype(np.int64)
    elif types == {float}:
        kind = np.dtype(np.float64)
    else:
        return values if n == 1 else [v for v in values for _ in range(n)]
    column = np.array(values, dtype=kind)
    return column if n == 1 else np.repeat(column, n)


class Constant:
    """One value for all of an entry's rows."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


def stacked(parts: list[Any], n: int) -> Any:
    """Parts (arrays of ``n`` rows, or ``Constant``) as one column: an array when every part is (or ``constant``
    makes it) an array of one dtype, else the list of every value, as ``run_frame`` joins ``constant`` parts."""
    kinds = {p.dtype if isinstance(p, np.ndarray) else constant_dtype(p.value) for p in parts}
    if len(kinds) == 1 and None not in kinds:
        kind = kinds.pop()
        if all(isinstance(p, Constant) for p in parts):
            return np.repeat(np.array([p.value for p in parts], dtype=kind), n)
        return np.concatenate([p if isinstance(p, np.ndarray) else np.full(n, p.value, dtype=kind) for p in parts])
    return [v for p in parts for v in (p.tolist() if isinstance(p, np.ndarray) else [p.value] * n)]


def constant_dtype(value: Any) -> Any:
    """The dtype ``constant`` holds ``value`` in, or None (a list)."""
    if isinstance(value, bool):
        return np.dtype(bool)
    if isinstance(value, int) and -2**63 <= value < 2**63:
        return np.dtype(np.int64)
    if isinstance(value, float):
        return np.dtype(np.float64)
    return None


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
    """Blocks (``run_block``, or a run's records as columns) in grid order as one frame: the union of their columns in first-seen
    order, a column a block lacks filled as the stdlib writer fills it (0 bytes, 0.0 GiB, else empty). Each
    column gets the dtype ``report.frame.typed`` gives the same values (``records_frame``'s dtypes): arrays
    of one dtype are concatenated as they are, anything else goes through ``typed``."""
    import pandas as pd  # here only: a worker building blocks does not import pandas (some 0.4 s)

    from memplan.report.frame import typed

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


FRAME_ROWS = 8192
"""Rows gathered before they become one typed frame (``report.sweep_stream.Spill``): pandas costs per column of a
frame, and a run of a fleet matrix is one row per GPU. A run at least this long is made a frame by the worker that
built it (``spill_block``)."""


def spill_block(block: dict[str, Any], rows: int, folder: str) -> tuple[str, int]:
    """Pickle a run's rows to a new file in ``folder`` (``report.sweep_stream.Spill.add_part`` reads it): as a typed
    frame (``run_frame``) when the run has at least ``FRAME_ROWS`` rows, so the worker pays for it, else as its
    columns (``run_block``), to be joined with the runs around it into one frame. Returns (its path, its rows)."""
    import os
    import pickle
    import tempfile

    fd, path = tempfile.mkstemp(prefix="run", suffix=".pkl", dir=folder)
    with os.fdopen(fd, "wb") as fh:
        pickle.dump(run_frame([block]) if rows >= FRAME_ROWS else block, fh, protocol=pickle.HIGHEST_PROTOCOL)
    return path, rows
