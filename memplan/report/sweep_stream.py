"""A sweep streamed through pandas: chunks of records become typed frames, spilled to a scratch folder,
then written as one CSV (or returned as one DataFrame) with the columns of ``memplan sweep --format csv``.

Memory holds one chunk of records at a time (``grid.MAX_CHUNK_CELLS`` cells) or one run's columns, the rows not
yet made a frame (``FRAME_ROWS``), plus each cell's fit value for the matrices, so it stays bounded however large
the grid. The columns are only known at the end (a model may add a component), so the chunks are written once
every chunk is done, each given the columns it lacks (a tier component 0 bytes, anything else empty), which is
what the stdlib writer wrote.

Interrupted (Ctrl-C): the rows finished so far are still written, with one more last column, ``partial``,
true on every row, so a partial file can never pass for a complete one; the DataFrame has
``frame.attrs["partial"] = True``. The output path is checked for writability before any work.
"""

from __future__ import annotations

import pickle
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from memplan.errors import MemplanError
from memplan.grid import CellResult, SweepResult, SweepSpec, iter_results
from memplan.report.frame import absent, columns_of, concat_frames, frame_csv, typed
from memplan.vector_frame import FRAME_ROWS

PARTIAL_COLUMN = "partial"
CSV_SLICE_ROWS = 8192
"""Rows formatted to CSV text at a time (``Spill.csv_slices``)."""


def block_rows(chunk: Any) -> Any:
    """The rows of a columnar chunk (``vector.iter_vector(columnar=True)``), typed loosely: the chunk is a list
    of cell results that also carries its block's rows."""
    return chunk.rows


def check_out(path: Path) -> None:
    """A MemplanError unless ``path`` can be written (its folder exists and accepts files), before any work."""
    if path.is_dir():
        raise MemplanError(f"--out: {path} is a folder; give a file name such as sweep.csv.")
    if path.suffix.lower() == ".parquet":
        import importlib.util

        if importlib.util.find_spec("pyarrow") is None:
            raise MemplanError(f"--out: writing Parquet ({path.name}) needs pyarrow; pip install pyarrow, or give a .csv path.")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise MemplanError(f"--out: the folder {parent} does not exist; create it or choose another path.")
    try:
        with open(path, "a", encoding="utf-8"):
            pass
    except OSError as exc:
        raise MemplanError(f"--out: cannot write {path}: {exc.strerror or exc}.") from None


@dataclass
class Spill:
    """Typed frames of finished chunks in a scratch folder, and the union of their columns in first-seen order.
    Rows arrive as columns (``vector_frame.run_block``, or records) and wait in ``pending`` until ``FRAME_ROWS`` of
    them make one frame (``vector_frame.run_frame``), so memory holds at most that many rows and one run."""

    folder: Path
    columns: dict[str, None] = field(default_factory=dict)
    parts: list[Path] = field(default_factory=list)
    rows: int = 0
    pending: list[dict[str, Any]] = field(default_factory=list)
    pending_rows: int = 0

    def add(self, records: list[dict[str, Any]]) -> None:
        """Records (the scalar path's) as one block: each column the records' values, a key a record lacks
        ``frame.absent`` (as ``records_frame`` reads them)."""
        if records:
            self.add_block({col: [rec.get(col, absent(col)) for rec in records] for col in columns_of(records)},
                           len(records))

    def add_block(self, block: dict[str, Any], rows: int) -> None:
        self.pending.append(block)
        self.pending_rows += rows
        self.rows += rows
        if self.pending_rows >= FRAME_ROWS:
            self.flush()

    def add_part(self, part: tuple[str, int]) -> None:
        """A run another process pickled into this folder (``vector_frame.spill_block``): its columns, joined to the
        pending rows, or a long run's frame, kept as a part of its own (after the rows pending before it)."""
        path, rows = part
        with open(path, "rb") as fh:
            obj = pickle.load(fh)
        if isinstance(obj, dict):
            Path(path).unlink()
            self.add_block(obj, rows)
            return
        self.flush()
        self.columns.update(dict.fromkeys(obj.columns))
        self.parts.append(Path(path))
        self.rows += rows

    def flush(self) -> None:
        """The pending rows as one typed frame pickled into the folder."""
        from memplan.vector_frame import run_frame

        if not self.pending:
            return
        frame = run_frame(self.pending)
        self.pending, self.pending_rows = [], 0
        self.columns.update(dict.fromkeys(frame.columns))
        part = self.folder / f"part{len(self.parts):06d}.pkl"
        with open(part, "wb") as fh:
            pickle.dump(frame, fh, protocol=pickle.HIGHEST_PROTOCOL)
        self.parts.append(part)

    def frames(self, *, partial: bool) -> Iterator[pd.DataFrame]:
        """Each part with every column of the sweep, in order (``partial``: plus the partial column)."""
        self.flush()
        cols = list(self.columns)
        for part in self.parts:
            with open(part, "rb") as fh:
                frame = pickle.load(fh)
            missing = {col: absent(col) for col in cols if col not in frame.columns}
            if missing:  # all at once: one concat, not one insert per column (a fragmented frame)
                filler = pd.DataFrame({col: [value] * len(frame) for col, value in missing.items()}, index=frame.index)
                frame = pd.concat([frame, filler], axis=1)
            frame = frame[cols]  # a new frame; the loaded one is freed (one part's copy at a time)
            if partial:
                frame = frame.assign(**{PARTIAL_COLUMN: True})
            yield frame

    def csv_slices(self, *, partial: bool) -> Iterator[str]:
        """The CSV text of every part (header first), ``CSV_SLICE_ROWS`` rows at a time: a whole part's text is
        some 50 MB per 60,000 rows, held twice while pandas joins it."""
        first = True
        for frame in self.frames(partial=partial):
            for start in range(0, max(len(frame), first), CSV_SLICE_ROWS):  # an empty first part: its header
                yield frame_csv(frame.iloc[start:start + CSV_SLICE_ROWS], header=first)
                first = False


@dataclass
class Streamed:
    """What a streamed sweep keeps: each cell's fit value and error (records dropped), and the row count."""

    result: SweepResult
    rows: int
    partial: bool


def stream(spec: SweepSpec, *, sink: Callable[[Spill, bool], None], workers: int | None = None,
           progress: Callable[[int], None] | None = None, vectorized: bool = True) -> Streamed:
    """Run the sweep chunk by chunk into a Spill, then ``sink(spill, partial)``; Ctrl-C keeps what is done.
    ``vectorized``: through ``memplan.vector`` (the same records, exactly; see there), else the scalar path."""
    import functools

    from memplan.vector import iter_vector

    kept: list[CellResult] = []
    partial = False
    with tempfile.TemporaryDirectory(prefix="memplan-sweep-") as tmp:
        chunks = functools.partial(iter_vector, columnar=True, spill=tmp) if vectorized else iter_results
        spill = Spill(Path(tmp))
        try:
            for chunk in chunks(spec, workers=workers, progress=progress):
                block, part = getattr(chunk, "block", None), getattr(chunk, "part", None)
                if part is not None:
                    spill.add_part(part)
                elif block is not None:
                    spill.add_block(block, block_rows(chunk))
                else:
                    spill.add([r for c in chunk for r in c.records])
                kept += [CellResult(c.cell, c.value, [], c.estimates, c.error) for c in chunk]
        except KeyboardInterrupt:
            partial = True
        sink(spill, partial)
    return Streamed(SweepResult(spec, kept), spill.rows, partial)


def csv_sink(path: Path) -> Callable[[Spill, bool], None]:
    """Write the spilled chunks to ``path`` as one CSV (header once), a chunk at a time; a ``.parquet`` path
    gets Parquet instead (pyarrow; the frame is assembled whole, so memory is not bounded there)."""
    def write(spill: Spill, partial: bool) -> None:
        if path.suffix.lower() == ".parquet":
            frame_of(spill, partial).to_parquet(path, index=False)
            return
        try:
            spill.flush()
            with open(path, "w", encoding="utf-8", newline="") as fh:
                if not spill.parts:
                    return
                for text in spill.csv_slices(partial=partial):
                    fh.write(text)
        except OSError as exc:
            raise MemplanError(f"--out: cannot write {path}: {exc.strerror or exc}.") from None
    return write


def frame_of(spill: Spill, partial: bool) -> pd.DataFrame:
    """Every spilled chunk as one typed DataFrame (``attrs["partial"]`` says whether it was interrupted)."""
    frames = list(spill.frames(partial=partial))
    if not frames:
        return pd.DataFrame()
    frame = concat_frames(frames)
    retyped = {}
    for col in frame.columns:  # a column categorical in some chunks only: concat leaves object or str
        if frame[col].dtype == object or (pd.api.types.is_string_dtype(frame[col].dtype)
                                          and not isinstance(frame[col].dtype, pd.CategoricalDtype)):
            values = [None if v is None or v is pd.NA or v != v else v for v in frame[col].tolist()]
            retyped[col] = typed(col, values)  # what records_frame gives the column
    if retyped:
        frame = frame.assign(**retyped)
    frame.attrs["partial"] = partial
    return frame


def sweep_frame(spec: SweepSpec, *, workers: int | None = None, out: Path | None = None,
                usd_per_hour: float | None = None) -> pd.DataFrame:
    """The sweep as one DataFrame (what ``memplan.sweep`` returns); ``out`` also gets the CSV."""
    from dataclasses import replace

    if usd_per_hour is not None:
        from memplan.report.cost import checked_usd_per_hour

        spec = replace(spec, usd_per_hour=checked_usd_per_hour(usd_per_hour))
    if out is not None:
        check_out(out)
    holder: list[pd.DataFrame] = []

    def sink(spill: Spill, partial: bool) -> None:
        if out is not None:
            csv_sink(out)(spill, partial)
        holder.append(frame_of(spill, partial))

    stream(spec, sink=sink, workers=workers)
    return holder[0]


def streamed_run(*, fmt: str, out: Path | None, pivot: bool = False) -> Callable[..., SweepResult]:
    """A ``grid.run`` replacement for ``memplan sweep`` (table and CSV formats) that streams the rows to
    ``out`` and, with ``--format csv``, to stdout (``pivot``: the fit matrices instead of the rows on stdout).
    The SweepResult keeps no records (``streamed_rows`` counts them; ``partial`` after Ctrl-C)."""
    import sys

    def sink(spill: Spill, partial: bool) -> None:
        if out is not None:
            csv_sink(out)(spill, partial)
            sys.stderr.write(f"memplan: wrote {spill.rows:,} rows to {out}{' (partial: interrupted)' if partial else ''}\n")
        if fmt == "csv" and not pivot:
            for text in spill.csv_slices(partial=partial):
                sys.stdout.write(text)
            sys.stdout.flush()

    def run(spec: SweepSpec, *, workers: int | None = None, progress: Callable[[int], None] | None = None) -> SweepResult:
        done = stream(spec, sink=sink, workers=workers, progress=progress)
        done.result.streamed_rows, done.result.partial = done.rows, done.partial
        return done.result

    return run
