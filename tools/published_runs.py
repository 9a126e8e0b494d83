"""Print published training runs next to memplan's prediction (the table of tests/test_published_runs.py).

Usage: python tools/published_runs.py (markdown on stdout; README.md embeds it through tools/readme_examples.py)
Each row: the run, the paper's figure, memplan's predicted step time, the error, memplan's verdict on memory
(the peak, GiB, of the most loaded GPU at its peak phase) and its MFU. The published figures and their
derivations live in the test.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _load_runs():
    sys.path.insert(0, str(ROOT))
    spec = importlib.util.spec_from_file_location("published_runs", ROOT / "tests" / "test_published_runs.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def rows() -> list[dict]:
    from memplan.catalog.store import catalog_gpu
    from memplan.estimator import estimate
    from memplan.memory.breakdown import Tier
    from memplan.planner.budget import step_time

    mod = _load_runs()
    out = []
    for run in mod.RUNS:
        gpu = catalog_gpu(run.gpu)
        cfg = run.config()
        est = estimate(run.spec(), gpu, cfg, host=run.host)
        st = step_time(run.spec(), gpu, cfg, run.host)
        out.append({"run": run.id, "source": run.source, "gpus": cfg.world_size,
                    "layout": f"tp{cfg.tp} pp{cfg.pp} dp{cfg.batch_dp}" + (f" ep{cfg.ep}" if cfg.ep > 1 else "")
                    + (f" cp{cfg.cp}" if cfg.cp > 1 else ""),
                    "published_s": run.published_step_s, "predicted_s": st.step_s,
                    "error_pct": 100 * (st.step_s / run.published_step_s - 1), "fits": est.fits,
                    "gpu_gib": est.peak(Tier.GPU) / 2**30, "mfu": st.mfu})
    return out


def markdown(table: list[dict] | None = None) -> str:
    """The table as markdown (the README's generated section, ``tools/readme_examples.py``)."""
    table = rows() if table is None else table
    lines = ["| run | GPUs | layout | published step (s) | predicted (s) | error | fits | peak GiB | MFU |",
             "|---|---:|---|---:|---:|---:|---|---:|---:|"]
    for r in table:
        lines.append(f"| {r['run']} | {r['gpus']:,} | {r['layout']} | {r['published_s']:.2f} | {r['predicted_s']:.2f} "
                     f"| {r['error_pct']:+.1f}% | {'yes' if r['fits'] else 'no'} | {r['gpu_gib']:.1f} | {r['mfu']:.1%} |")
    lines += ["", "Sources: " + "; ".join(sorted({r['source'].split(' (')[0] for r in table})) + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    print(markdown(), end="")


if __name__ == "__main__":
    main()
