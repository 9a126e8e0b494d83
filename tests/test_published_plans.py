"""``plan`` on the clusters of the published training runs (``test_published_runs``): for each, a layout at least
as fast as the published one under memplan's own step-time model, at the same global batch, and never one its
engine cannot run (issue 13, "What must show").

The plan keeps each run's model, GPU, cluster, engine, sequence length, global batch and step-time settings
(interleaving, overlap, fp8), and searches everything the run fixed: tp, pp, ep, micro-batch, recompute (per
layer), ZeRO and offload, sequence parallelism. "At least as fast" is the optimum's promise when the published
layout lies in the search space and fits (memplan's exact re-check); where memplan says the published layout does
not fit, the plan must still be one that fits and runs.
"""

from __future__ import annotations

from typing import Any

import pytest
from test_published_runs import RUNS, Run

from memplan.catalog.store import catalog_gpu
from memplan.config import JobConfig
from memplan.engines import rules
from memplan.estimator import estimate
from memplan.memory.breakdown import Tier
from memplan.planner.budget import step_time
from memplan.planner.plan import PlanRequest, plan
from memplan.planner.space import SearchSpace

LAYOUT = ("tp", "pp", "ep", "micro_batch", "grad_accum", "recompute", "zero", "sequence_parallel",
          "offload_optimizer", "offload_params")
"""What a published run chose and the plan searches."""


def clusters() -> list[Any]:
    """One plan per published cluster (Korthikanti's full and selective runs share theirs)."""
    seen: dict[tuple, list[Run]] = {}
    for run in RUNS:
        cfg = run.config()
        key = (run.spec().name, run.gpu, cfg.gpus_per_node, cfg.nodes, cfg.micro_batch * cfg.grad_accum * cfg.dp)
        seen.setdefault(key, []).append(run)
    return [pytest.param(runs, id=runs[0].id.removesuffix("-selective-sp")) for runs in seen.values()]


@pytest.mark.parametrize("runs", clusters())
def test_plan_is_at_least_as_fast_as_the_published_layout(runs: list[Run]) -> None:
    run = runs[0]
    model, gpu = run.spec(), catalog_gpu(run.gpu)
    published = [r.config() for r in runs]
    global_batch = published[0].micro_batch * published[0].grad_accum * published[0].dp
    fixed = {k: v for k, v in published[0].model_dump(exclude_unset=True).items() if k not in LAYOUT}
    result = plan(PlanRequest(model=model, gpu=gpu, host=run.host, base=JobConfig(**fixed),
                              space=SearchSpace(global_batch=global_batch), top_k=1, suggest=False))
    assert result.status == "optimal", f"{run.id}: no plan on the published cluster"
    best = result.best
    rules.check(best.config)  # a combination the engine runs (raises otherwise)
    assert best.config.engine == published[0].engine
    assert best.estimate.fits and best.estimate.peak(Tier.GPU) <= gpu.memory_bytes
    assert best.global_batch == global_batch
    assert best.step_time_s == pytest.approx(step_time(model, gpu, best.config, run.host).step_s, rel=1e-9)
    fitting = [step_time(model, gpu, cfg, run.host).step_s for cfg in published
               if estimate(model, gpu, cfg, host=run.host).fits]
    if fitting:
        assert best.step_time_s <= min(fitting) * (1 + 1e-9), (run.id, best.step_time_s, min(fitting))
