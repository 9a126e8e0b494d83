"""Sweep speed and memory: vectorized grids (memplan.vector) against the issue-15 targets, and the scalar path.

Run: taskset -c 0,1 python benchmarks/sweep.py [--workers 2] [--only matrix|cells|rss|scalar]

* matrix: every catalog model × every catalog GPU × full, lora, qlora, infer; the exact largest micro-batch
  per cell (max-batch). Target ≤ 2 s on 2 cores.
* cells: 10^5 grid points (8 models × 10 GPUs × 4 jobs × 25 sizes × 25 batches = 200,000 rows, or the
  count printed), metric fits, streamed to a CSV. Target ≤ 10 s on 2 cores.
* rss: 10^6 grid points streamed to a CSV in a child process; its peak RSS (ru_maxrss). Target ≤ 500 MB.
* scalar: the first 30 models × 20 GPUs × 3 jobs through the scalar path only (the issue-5 baseline, < 30 s).
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

from memplan.catalog.schema import Family
from memplan.catalog.store import all_gpus, all_models
from memplan.config import Job
from memplan.grid import SweepSpec, cells, default_workers, run

warnings.simplefilter("ignore")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as the CLI's main does: one OS thread, so workers are forked
JOBS4 = (Job.FULL, Job.LORA, Job.QLORA, Job.INFER)


def dense_models(n: int) -> tuple[str, ...]:
    return tuple(m.name for m in all_models() if m.family is not Family.PARAMS_ONLY)[:n]


def gpus(n: int | None = None) -> tuple[str, ...]:
    return tuple(sorted(g.name for g in all_gpus()))[:n]


def stream_to_csv(spec: SweepSpec, workers: int, out: Path) -> tuple[int, float]:
    from memplan.report.sweep_stream import csv_sink, stream

    t0 = time.perf_counter()
    done = stream(spec, sink=csv_sink(out), workers=workers)
    return done.rows, time.perf_counter() - t0


def matrix(workers: int) -> None:
    """The matrix's cells (``vector.iter_vector``, the target's measure), then the same matrix as ``memplan.sweep``'s
    DataFrame and as ``memplan sweep --format csv``'s streamed CSV (each in a fresh process: no warm memo)."""
    from memplan.grid import start_method
    from memplan.vector import iter_vector

    spec = SweepSpec(models=tuple(m.name for m in all_models()), gpus=gpus(), jobs=JOBS4, metric="max-batch")
    method = start_method() if workers > 1 else "in-process"
    t0, cpu0 = time.perf_counter(), cpu_seconds()
    n = sum(len(chunk) for chunk in iter_vector(spec, workers=workers))
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    print(f"matrix: {len(spec.models)} models × {len(spec.gpus)} GPUs × 4 jobs = {n:,} cells (max-batch): "
          f"{wall:.2f} s on {workers} worker(s) ({method}), {cpu:.2f} CPU s (load average {os.getloadavg()[0]:.1f}); "
          f"target ≤ 2 s: {'met' if wall <= 2 else 'NOT met'}")
    for what, code in MATRIX_PATHS.items():
        wall, cpu, rows, method = child_seconds(code.format(workers=workers), workers)
        print(f"matrix: {what}: {rows:,} rows, {wall:.2f} s on {workers} worker(s) ({method}), {cpu:.2f} CPU s")


MATRIX_PATHS = {
    "memplan.sweep (DataFrame)": "import memplan; frame = memplan.sweep(models='all', gpus='all', "
                                 "jobs=['full', 'lora', 'qlora', 'infer'], workers={workers}); rows = len(frame)",
    "memplan sweep --format csv (streamed CSV)": (
        "import contextlib, io, sys\nfrom memplan.cli.app import main\n"
        "sys.argv = ['memplan', 'sweep', '-m', 'all', '-g', 'all', '-j', 'full,lora,qlora,infer', '--metric', "
        "'max-batch', '--format', 'csv', '--workers', '{workers}']\nout = io.StringIO()\n"
        "with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):\n"
        "    try:\n        main()\n    except SystemExit:\n        pass\n"
        "rows = out.getvalue().count('\\n') - 1"),
}
"""Code run in a fresh process (imports excluded from the time), setting ``rows``."""

CHILD = """
import os, sys, time
sys.path.insert(0, {root!r})
import memplan, memplan.vector, memplan.cli.app, pandas
from memplan.grid import start_method
method = start_method() if {workers} > 1 else "in-process"
t0, c0 = time.perf_counter(), os.times()
{code}
t = os.times()
print(time.perf_counter() - t0, t.user + t.system + t.children_user + t.children_system - c0.user - c0.system, rows,
      method)
"""


def child_seconds(code: str, workers: int) -> tuple[float, float, int, str]:
    """(wall s, CPU s of the process and its workers, rows, how workers start there) of ``code`` run in a fresh
    Python process (it inherits ``OPENBLAS_NUM_THREADS``: a notebook whose numpy runs more threads spawns)."""
    root = str(Path(__file__).resolve().parents[1])
    proc = subprocess.run([sys.executable, "-c", CHILD.format(root=root, code=code, workers=workers)],
                          capture_output=True, text=True, check=True, cwd=root)
    wall, cpu, rows, method = proc.stdout.split()[-4:]
    return float(wall), float(cpu), int(rows), method


def cpu_seconds() -> float:
    """CPU seconds of this process and of its finished children (spawned workers): on a machine shared with
    other work, the figure that wall time hides."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def many_cells(workers: int) -> None:
    from memplan.report.sweep_stream import sweep_frame

    sizes = tuple(range(512, 512 * 26, 512))
    spec = SweepSpec(models=dense_models(8), gpus=gpus(10), jobs=JOBS4, seq_lens=sizes, contexts=sizes,
                     batches=tuple(range(1, 26)), metric="fits")
    t0, cpu0 = time.perf_counter(), cpu_seconds()
    frame = sweep_frame(spec, workers=workers)
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    per = wall / len(frame) * 1e5
    print(f"cells: {len(frame):,} grid points × {frame.shape[1]} columns as a DataFrame (memplan.sweep, fits): "
          f"{wall:.2f} s, {per:.2f} s per 10^5 on {workers} worker(s), {cpu:.2f} CPU s; target ≤ 10 s per 10^5: "
          f"{'met' if per <= 10 else 'NOT met'}")
    with tempfile.TemporaryDirectory() as tmp:
        rows, wall = stream_to_csv(spec, workers, Path(tmp) / "sweep.csv")
    print(f"cells: the same grid streamed to a CSV: {wall:.2f} s, {wall / rows * 1e5:.2f} s per 10^5")


RSS_CHILD = """
import resource, sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
from benchmarks.sweep import own_peak_kib, rss_grid, stream_to_csv
rows, wall = stream_to_csv(rss_grid(), {workers}, Path({out!r}))
print(rows, wall, own_peak_kib(), resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def own_peak_kib() -> int:
    """This process's peak RSS in KiB: Linux's VmHWM (/proc/self/status), the high-water mark of this process's own
    memory map, else ``ru_maxrss``. On Linux ``ru_maxrss`` survives exec: a child started by a large parent (this
    benchmark, after its DataFrame runs) reports the parent's RSS at fork (Linux fs/exec.c exec_mmap:
    setmax_mm_hiwater_rss), which measured the benchmark process rather than the sweep."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def rss_grid() -> SweepSpec:
    """10^6 grid points: 8 models × 10 GPUs × 2 jobs × 50 sizes × 125 batches."""
    sizes = tuple(range(256, 256 * 51, 256))
    return SweepSpec(models=dense_models(8), gpus=gpus(10), jobs=(Job.LORA, Job.INFER), seq_lens=sizes,
                     contexts=sizes, batches=tuple(range(1, 126)), metric="fits")


def rss(workers: int) -> None:
    root = str(Path(__file__).resolve().parents[1])
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "million.csv"
        code = RSS_CHILD.format(root=root, workers=workers, out=str(out))
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
        rows, wall, own_kib, kids_kib = proc.stdout.split()[-4:]
        size = out.stat().st_size
    peak_mb = max(int(own_kib), int(kids_kib)) * 1024 / 1e6
    print(f"rss: {int(rows):,} grid points streamed to a {size / 1e9:.2f} GB CSV in {float(wall):.1f} s; peak RSS "
          f"{peak_mb:.0f} MB (largest process); target ≤ 500 MB: {'met' if peak_mb <= 500 else 'NOT met'}")


def scalar(workers: int) -> None:
    spec = SweepSpec(models=dense_models(30), gpus=gpus(20), jobs=(Job.FULL, Job.LORA, Job.INFER))
    t0 = time.perf_counter()
    result = run(spec, workers=workers)
    wall = time.perf_counter() - t0
    print(f"scalar: {len(cells(spec)):,} cells, {result.estimates:,} exact estimates, {wall:.2f} s on {workers} "
          f"worker(s) (issue 5 target < 30 s: {'met' if wall < 30 else 'NOT met'})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: one per CPU)")
    parser.add_argument("--only", choices=("matrix", "cells", "rss", "scalar"), action="append")
    args = parser.parse_args()
    workers = args.workers or default_workers()
    for name in args.only or ("matrix", "cells", "rss", "scalar"):
        {"matrix": matrix, "cells": many_cells, "rss": rss, "scalar": scalar}[name](workers)
    print(f"(this process: peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB)")


if __name__ == "__main__":
    main()
