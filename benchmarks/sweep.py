"""Sweep speed: 30 catalog models × 20 GPUs × 3 jobs = 1,800 cells, each the exact largest batch that
fits (every number an exact ``estimate``), timed end to end as ``memplan sweep`` runs it.

Run: python benchmarks/sweep.py [--workers N] [--metric max-batch|fits]
     taskset -c 0,1 python benchmarks/sweep.py --workers 2      (the 2-core target)
Target: the 1,800-cell sweep in under 30 s of wall time on 2 cores (issue 5).
"""

from __future__ import annotations

import argparse
import resource
import time
import warnings

from memplan.catalog.schema import Family
from memplan.catalog.store import all_gpus, all_models
from memplan.config import Job
from memplan.grid import SweepSpec, cells, default_workers, run

warnings.simplefilter("ignore")
MODELS, GPUS = 30, 20
JOBS = (Job.FULL, Job.LORA, Job.INFER)


def grid(metric: str) -> SweepSpec:
    """The first 30 catalog models that have dimensions (params-only entries cannot be swept over batch
    meaningfully) and the first 20 catalog GPUs, by name."""
    models = tuple(m.name for m in all_models() if m.family is not Family.PARAMS_ONLY)[:MODELS]
    gpus = tuple(sorted(g.name for g in all_gpus()))[:GPUS]
    return SweepSpec(models=models, gpus=gpus, jobs=JOBS, metric=metric)  # type: ignore[arg-type]


def cpu_seconds() -> float:
    """User + system CPU time of this process and of its finished worker processes."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: one per CPU)")
    parser.add_argument("--metric", default="max-batch", choices=("max-batch", "max-context", "fits"))
    args = parser.parse_args()
    spec = grid(args.metric)
    workers = args.workers or default_workers()
    n = len(cells(spec))
    print(f"grid: {len(spec.models)} models × {len(spec.gpus)} GPUs × {len(spec.jobs)} jobs = {n:,} cells, "
          f"metric {spec.metric}, {workers} worker process{'es' if workers > 1 else ''}")
    t0, c0 = time.perf_counter(), cpu_seconds()
    result = run(spec, workers=workers)
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    fitting = sum(1 for c in result.cells if c.value)
    invalid = sum(1 for c in result.cells if c.error)
    print(f"wall time: {wall:.2f} s for {n:,} cells ({result.estimates:,} exact estimates, "
          f"{1e3 * wall / n:.1f} ms per cell); {fitting:,} cells fit, {invalid:,} invalid")
    print(f"CPU time: {cpu:.2f} s over all processes ({1e3 * cpu / max(result.estimates, 1):.2f} ms per estimate); "
          f"wall time on {workers} idle cores would be about {cpu / workers:.1f} s plus worker start-up")
    print("target: < 30 s on 2 cores:", "met" if wall < 30 else "NOT met")


if __name__ == "__main__":
    main()
