"""The optimizer step's temporaries against a real step on CPU: torch AdamW with foreach, for-loop and fused.

A tiny Llama-layout model (``memplan.measure.tiny``) with a short sequence, so the parameters dominate and the
step's peak is the optimizer phase; memplan's answer (estimate's phase peak, tensors only) must match the
measured peak within 1% for each implementation, and name the optimizer step as the phase that binds.
"""

from __future__ import annotations

import pytest

pytest.importorskip("torch", reason="measure needs torch (pip install memplan[measure])")
pytest.importorskip("transformers", reason="measure needs transformers (pip install memplan[measure])")

from memplan.catalog.store import catalog_gpu
from memplan.estimator import make_config
from memplan.measure.job import measure_job
from memplan.measure.tiny import tiny_spec

pytestmark = pytest.mark.measure
BOUND_PCT = 1.0


@pytest.mark.parametrize("impl", ["foreach", "for-loop", "fused"])
def test_answer_matches_a_parameter_dominated_step(impl: str) -> None:
    cfg = make_config(None, job="full", dtype="bf16", micro_batch=1, seq_len=16, attention="sdpa", optimizer_impl=impl)
    report = measure_job(tiny_spec("llama"), cfg, catalog_gpu("h100-sxm-80gb"), device="cpu")
    line = next(line for line in report.lines if line.component == "peak/step (phase model)")
    assert line.measured and abs(line.predicted - line.measured) <= BOUND_PCT / 100 * line.measured, line
    assert max(report.phases_predicted, key=report.phases_predicted.get) == "optimizer_step"


def test_foreach_holds_more_than_for_loop_more_than_fused() -> None:
    peaks = {}
    for impl in ("foreach", "for-loop", "fused"):
        cfg = make_config(None, job="full", dtype="fp32", micro_batch=1, seq_len=16, attention="sdpa",
                          optimizer_impl=impl)
        report = measure_job(tiny_spec("llama"), cfg, catalog_gpu("h100-sxm-80gb"), device="cpu")
        peaks[impl] = max(report.phases_measured.values())
    assert peaks["foreach"] > peaks["for-loop"] > peaks["fused"]
