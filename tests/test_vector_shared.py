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


@pytest.mark.parametrize(("job", "base"), [(Job.FULL, {}), (Job.QLORA, {}), (Job.INFER, {}),
                                           (Job.LORA, {"module_layout": "litgpt"}), (Job.FULL, {"tp": 2, "gpus_per_node": 2}),
                                           (Job.FULL, {"tp": 3, "gpus_per_node": 3})])
def test_probes_validated_once_are_the_estimates_at_each_size(job: Job, base: dict) -> None:
    """``Prober.exact`` validates the group's configuration once and sets each size on the validated one: the
    configuration (fields set included, which ``preflight.gpu_default_dtype`` reads) and the rows are those of
    ``estimator.estimate`` at that size, and a configuration that does not validate (tp 3 on a model of 32 heads)
    raises ``estimate``'s own error."""
    from memplan.config import JobConfig
    from memplan.errors import MemplanError
    from memplan.estimator import estimate
    from memplan.search import with_size
    from memplan.vector_probe import Prober

    spec = SweepSpec(models=("llama-3.1-8b",), gpus=("t4",), jobs=(job,), base=JobConfig.model_validate(base))
    prober = Prober(spec, Cell("llama-3.1-8b", "t4", job, base.get("gpus_per_node", 1), 1000, None))
    for b, s in ((1, 1000), (3, 4096), (17, 333)):
        cfg = with_size(with_size(prober.ev.cfg, "context", s), "micro_batch", b)
        try:
            want = estimate(prober.ev.model, prober.ev.gpu, cfg)
        except MemplanError as exc:
            with pytest.raises(MemplanError, match=str(exc)[:40]):
                prober.exact(b, s)
            continue
        got = prober.exact(b, s)
        assert got.config == want.config and got.config.model_fields_set == want.config.model_fields_set
        assert got.rows == want.rows and got.assumptions == want.assumptions and got.warnings == want.warnings


def test_the_grid_base_is_retargeted_once_per_job() -> None:
    """``grid.retargeted`` is ``config.retarget``, computed once per (base, job): a new base (even an equal one) is
    retargeted anew."""
    from memplan.config import JobConfig, retarget
    from memplan.grid import retargeted

    base = JobConfig(job="lora", lora={"rank": 8})
    for job in (Job.FULL, Job.QLORA, Job.INFER, Job.LORA):
        assert retargeted(base, job) == retarget(base, job)
        assert retargeted(base, job) is retargeted(base, job)
    assert retargeted(JobConfig(job="lora", lora={"rank": 8}), Job.QLORA) is not retargeted(base, Job.QLORA)
