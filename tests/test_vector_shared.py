"""Groups the fit cannot take (a params-only model: nothing grows with the batch; LoRA refused) are answered by the
scalar path with estimates shared by the GPUs that read alike (``vector_probe.shared_evaluate``): the same records,
values and errors as one scalar evaluation per cell, with fewer estimates."""

from __future__ import annotations

import pytest

from memplan.config import Job
from memplan.grid import Cell, SweepSpec, evaluate
from memplan.vector_probe import shared_evaluate

GPUS = ("a100-sxm-80gb", "h100-sxm-80gb", "t4", "v100-32gb", "mi300x", "l4")


@pytest.mark.parametrize("metric", ["max-batch", "fits"])
@pytest.mark.parametrize("job", [Job.FULL, Job.LORA, Job.INFER])
def test_shared_estimates_give_the_scalar_cells(metric: str, job: Job, estimate_calls: list[tuple]) -> None:
    spec = SweepSpec(models=("zero-offload-1.4b",), gpus=GPUS, jobs=(job,), batches=(1, 4), metric=metric)
    group = [Cell("zero-offload-1.4b", gpu, job, 1, spec.sizes(job)[0], None) for gpu in GPUS]
    calls = estimate_calls
    shared = shared_evaluate(spec, group)
    shared_calls, calls[:] = len(calls), []
    scalar = [evaluate(spec, c) for c in group]
    for a, b in zip(scalar, shared, strict=True):
        assert (b.cell, b.value, b.error) == (a.cell, a.value, a.error)
        assert [list(r.items()) for r in b.records] == [list(r.items()) for r in a.records]
    assert shared_calls < len(calls)  # GPUs reading alike (the A100 and H100 at least) shared their estimates


@pytest.mark.parametrize("job", [Job.FULL, Job.QLORA, Job.INFER])
def test_record_on_another_gpu_is_that_gpus_record(job: Job) -> None:
    """``csv_out.record_on_gpu`` (the shared probes' records) recomputes exactly the columns that read the GPU:
    the result is ``estimate_record`` of the same estimate on the other GPU, column for column and in order."""
    from dataclasses import replace

    from memplan.catalog.store import catalog_gpu
    from memplan.estimator import estimate
    from memplan.report.csv_out import estimate_record, record_on_gpu

    est = estimate("llama-3.1-8b", "a100-sxm-80gb", job=job.value)
    for other in ("t4", "h100-sxm-80gb", "mi300x", "rtx-4090"):
        gpu = catalog_gpu(other)
        assert list(record_on_gpu(estimate_record(est), est, gpu).items()) == \
            list(estimate_record(replace(est, gpu=gpu)).items())


def test_config_cells_of_configurations_differing_in_sizes_are_their_own() -> None:
    """The config cells memoized per size-free configuration take each configuration's own sizes."""
    from memplan.config import JobConfig
    from memplan.report import csv_out
    from memplan.search import with_size

    base = JobConfig(job="infer")
    for cfg in (base, with_size(base, "micro_batch", 7), with_size(base, "context", 12345),
                with_size(JobConfig(seq_len=333), "micro_batch", 5)):
        assert csv_out._config_cells(cfg) == csv_out._dump_cells(cfg)
