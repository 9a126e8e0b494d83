"""Op-level selective checkpointing measured on CPU: torchtitan's ``op`` policy (every other ``aten.mm`` output
and the fused attention output MUST_SAVE, the rest recomputed) on a tiny Llama-layout model. The outputs the
policy keeps live outside ``saved_tensors_hooks``, so they are checked through the step's peak: memplan's answer
within 1% of the measured peak, and the difference to full checkpointing equal to what op mode keeps beyond the
block input (measured peaks: op − full; memplan: the same difference of its phase-peak answers)."""

from __future__ import annotations

import pytest

pytest.importorskip("torch", reason="measure needs torch (pip install memplan[measure])")
pytest.importorskip("transformers", reason="measure needs transformers (pip install memplan[measure])")

from memplan.catalog.store import catalog_gpu
from memplan.estimator import estimate, make_config
from memplan.measure.job import measure_job
from memplan.measure.tiny import seq_len, tiny_spec

pytestmark = pytest.mark.measure
GPU = catalog_gpu("h100-sxm-80gb")


def run(mode: str):
    cfg = make_config(None, job="full", dtype="bf16", micro_batch=2, seq_len=seq_len("llama"), attention="sdpa",
                      recompute=mode, optimizer_impl="fused")
    report = measure_job(tiny_spec("llama"), cfg, GPU, device="cpu")
    return cfg, report, next(line for line in report.lines if line.component == "peak/step (phase model)")


def test_op_level_checkpointing_matches_a_measured_step():
    op_cfg, op, op_line = run("op")
    full_cfg, _, full_line = run("full")
    assert abs(op_line.predicted - op_line.measured) <= 0.01 * op_line.measured, op_line
    assert op.ok, [line.component for line in op.failures]

    def layers(cfg):
        return next(r.bytes for r in estimate(tiny_spec("llama"), GPU, cfg).rows if r.component == "activations/layers")

    # op keeps more than full: the saved-tensor row grows, and the phase model's peak moves by exactly the measured
    # difference (under AMP the layer inputs op keeps beyond the block input are not all in the layers row)
    assert layers(op_cfg) > layers(full_cfg)
    assert op_line.measured - full_line.measured == op_line.predicted - full_line.predicted
