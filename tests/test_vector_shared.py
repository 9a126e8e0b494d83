"""Groups the fit cannot take (a params-only model: nothing grows with the batch; LoRA refused) are answered by the
scalar path with estimates shared by the GPUs that read alike (``vector_probe.shared_evaluate``): the same records,
values and errors as one scalar evaluation per cell, with fewer estimates."""

from __future__ import annotations

import pytest

import memplan.estimator as estimator
import memplan.grid as grid
from memplan.config import Job
from memplan.grid import Cell, SweepSpec, evaluate
from memplan.vector_probe import shared_evaluate

GPUS = ("a100-sxm-80gb", "h100-sxm-80gb", "t4", "v100-32gb", "mi300x", "l4")


@pytest.mark.parametrize("metric", ["max-batch", "fits"])
@pytest.mark.parametrize("job", [Job.FULL, Job.LORA, Job.INFER])
def test_shared_estimates_give_the_scalar_cells(metric: str, job: Job, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = SweepSpec(models=("zero-offload-1.4b",), gpus=GPUS, jobs=(job,), batches=(1, 4), metric=metric)
    group = [Cell("zero-offload-1.4b", gpu, job, 1, spec.sizes(job)[0], None) for gpu in GPUS]
    calls = []
    real = estimator.estimate

    def counting(*args: object, **kwargs: object) -> object:
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(estimator, "estimate", counting)  # the shared probes import it when they estimate
    monkeypatch.setattr(grid, "estimate", counting)  # grid._Evaluator's own estimates
    shared = shared_evaluate(spec, group)
    shared_calls, calls[:] = len(calls), []
    scalar = [evaluate(spec, c) for c in group]
    for a, b in zip(scalar, shared, strict=True):
        assert (b.cell, b.value, b.error) == (a.cell, a.value, a.error)
        assert [list(r.items()) for r in b.records] == [list(r.items()) for r in a.records]
    assert shared_calls < len(calls)  # GPUs reading alike (the A100 and H100 at least) shared their estimates
