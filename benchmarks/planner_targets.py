"""Planner speed targets of issue 13, measured in one run: wall seconds of ``plan`` for four cluster sizes,
and each as a ratio to a fixed baseline workload timed in the same run (20 ``estimate`` calls of a 70B
model), so a loaded machine shows as a slower baseline, not as a regression.

Run: python benchmarks/planner_targets.py        (prints a table; no assertions)
Targets (seconds on an unloaded machine): one node ≤ 0.5; 70B over 16 GPUs ≤ 2; 405B over 16k GPUs ≤ 5;
1T over 3,072 GPUs ≤ 10, optimal or clearly labelled.
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
warnings.simplefilter("ignore")

from memplan.catalog.schema import HostSpec  # noqa: E402
from memplan.catalog.store import catalog_gpu, catalog_model  # noqa: E402
from memplan.config import JobConfig  # noqa: E402
from memplan.estimator import estimate  # noqa: E402
from memplan.planner.plan import PlanRequest, plan  # noqa: E402
from tests.test_published_runs import gpt  # noqa: E402

BASELINE_CALLS = 20
QUIET_BASELINE_S = 0.086
"""The baseline's seconds on the 2-core development machine when it was quiet (load 0.2, 2026-12-03): a target in
seconds is that many baselines there, so ``target ×`` is the target as a ratio, comparable on any machine."""


def baseline_seconds() -> float:
    model, gpu = catalog_model("llama-3.1-70b"), catalog_gpu("h100-sxm-80gb")
    cfg = JobConfig(job="full", gpus_per_node=8, tp=8, zero=1, recompute="full")
    t0 = time.perf_counter()
    for _ in range(BASELINE_CALLS):
        estimate(model, gpu, cfg)
    return time.perf_counter() - t0


CASES = [
    ("one node: 8B full, 8 H100", lambda: catalog_model("llama-3.1-8b"), "h100-sxm-80gb",
     {"job": "full", "gpus_per_node": 8}, 0.5),
    ("70B full, 16 H100", lambda: catalog_model("llama-3.1-70b"), "h100-sxm-80gb",
     {"job": "full", "gpus_per_node": 8, "nodes": 2}, 2.0),
    ("405B pretrain, 16,384 H100", lambda: catalog_model("llama-3.1-405b"), "h100-sxm-80gb",
     {"job": "pretrain", "gpus_per_node": 8, "nodes": 2048, "seq_len": 8192}, 5.0),
    ("1T pretrain, 3,072 A100", lambda: gpt(25600, 160, 128), "a100-sxm-80gb",
     {"job": "pretrain", "gpus_per_node": 8, "nodes": 384}, 10.0),
]


def main() -> None:
    base = baseline_seconds()
    print(f"baseline: {BASELINE_CALLS} estimates of a 70B model in {base:.3f} s")
    print(f"{'case':<30} {'seconds':>8} {'× baseline':>10} {'target s':>8} {'target ×':>8}  status / best plan")
    for name, model, gpu, cfg, target in CASES:
        t0 = time.perf_counter()
        try:
            result = plan(PlanRequest(model=model(), gpu=catalog_gpu(gpu), host=HostSpec(), base=JobConfig(**cfg),
                                      top_k=3))
            best = result.best
            what = f"{result.status}, {result.solver_status}"
            if best is not None:
                c = best.config
                what += (f": tp{c.tp} pp{c.pp} dp{c.dp} zero{int(c.zero)} mb{c.micro_batch} "
                         f"{best.step_time_s:.2f} s/step")
        except Exception as exc:  # a time limit without any plan is reported, not raised
            what = f"error: {exc}"
        seconds = time.perf_counter() - t0
        print(f"{name:<30} {seconds:>8.2f} {seconds / base:>10.1f} {target:>8.1f} {target / QUIET_BASELINE_S:>8.1f}  "
              f"{what}")


if __name__ == "__main__":
    main()
