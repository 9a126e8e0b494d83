"""The answer is the phase peak: the rows of a breakdown explain it, their sum does not produce it.

Expectations are independent arithmetic on a parameter count (Qwen2.5-0.5B: 494,032,768 parameters, tied
embeddings, from its config.json) and torch AdamW's source, for the pytorch engine's AMP layout (fp32
parameters under bf16 autocast): fp32 parameters 4 B + m 4 + v 4 per parameter alive through the step; at the
optimizer step also the fp32 gradients 4 (the bf16 autocast copies are gone after backward), and the step
temporaries: foreach ``torch._foreach_sqrt(exp_avg_sqs)`` 4 B/param, for-loop two fp32 copies of the
largest tensor (the 151,936 × 896 embedding), fused none (torch/optim/adam.py).
"""

from __future__ import annotations

import pytest

from memplan.catalog.store import catalog_gpu
from memplan.estimator import estimate
from memplan.memory.breakdown import Phase, Tier
from memplan.units import MiB

N = 494_032_768
LARGEST = 151_936 * 896
CONTEXT = 512 * MiB
STEP = {"fused": 0, "foreach": 4 * N, "for-loop": 2 * 4 * LARGEST}
OPTIMIZER_PHASE = (4 + 4 + 4) * N + 4 * N + CONTEXT
"""Bytes alive at the optimizer step, before its temporaries (reserve 0)."""
FLASH_WS = 1 * 14 * 128 * 4 + 1 * 128 * 14 * 64 * 4 + 2 * 1 * 64 * 14 * 64 * 2
"""flash-attention 2's backward workspace of one attention (flash_api.cpp ``mha_bwd``), 14 query heads of 64, 2 kv
heads, 64 tokens rounded to 128: softmax_d (B, N, 128) fp32 + dq_accum (B, 128, N, 64) fp32 + GQA dK/dV over 14
heads (B, 64, N, 64) bf16. Alive in backward, with every gradient, so backward binds when the step adds nothing."""
JOB = {"job": "full", "engine": "pytorch", "dtype": "bf16", "seq_len": 64, "micro_batch": 1, "allocator_reserve_pct": 0}


def gpu_with(capacity: int):
    """An L4 (bf16-capable) whose memory is ``capacity`` rounded up to a MiB."""
    return catalog_gpu("l4").model_copy(update={"memory_mib": -(-capacity // MiB)})


@pytest.mark.parametrize("impl", ["fused", "foreach", "for-loop"])
def test_optimizer_step_phase_is_states_gradients_and_temporaries(impl: str) -> None:
    est = estimate("qwen2.5-0.5b", "h100-sxm-80gb", optimizer_impl=impl, **JOB)
    assert est.phases(Tier.GPU)[Phase.OPTIMIZER] == OPTIMIZER_PHASE + STEP[impl]
    assert est.peak(Tier.GPU) == OPTIMIZER_PHASE + max(STEP[impl], FLASH_WS)
    # fused AdamW adds nothing at the step, so backward (all gradients and one attention's workspace) binds.
    assert est.peak_phase(Tier.GPU) is (Phase.BACKWARD if impl == "fused" else Phase.OPTIMIZER)


def test_summed_rows_over_capacity_but_the_peak_fits() -> None:
    gpu = gpu_with(OPTIMIZER_PHASE + 16 * MiB)
    est = estimate("qwen2.5-0.5b", gpu, optimizer_impl="fused", **JOB)
    assert est.total(Tier.GPU) > est.capacity(Tier.GPU)  # activations and gradients added as if alive together
    assert est.fits, "the step's largest phase fits"
    assert est.headroom_bytes == est.capacity(Tier.GPU) - OPTIMIZER_PHASE - FLASH_WS


def test_foreach_temporaries_push_the_peak_over_capacity() -> None:
    gpu = gpu_with(OPTIMIZER_PHASE + 16 * MiB)
    est = estimate("qwen2.5-0.5b", gpu, optimizer_impl="foreach", **JOB)
    assert not est.fits
    assert est.binding_tier is Tier.GPU and est.peak_phase(Tier.GPU) is Phase.OPTIMIZER
    assert -est.headroom_bytes == OPTIMIZER_PHASE + 4 * N - est.capacity(Tier.GPU)
    assert "optimizer/step_temporaries" in {r.component for r in est.rows}


def test_accumulated_gradients_are_alive_at_the_start_of_backward() -> None:
    one = estimate("qwen2.5-0.5b", "h100-sxm-80gb", **JOB)
    two = estimate("qwen2.5-0.5b", "h100-sxm-80gb", grad_accum=2, **JOB)
    diff = two.phases(Tier.GPU)[Phase.BACKWARD_START] - one.phases(Tier.GPU)[Phase.BACKWARD_START]
    assert diff == 4 * N  # the fp32 gradients of the earlier micro-batch
    assert two.phases(Tier.GPU)[Phase.OPTIMIZER] == one.phases(Tier.GPU)[Phase.OPTIMIZER]


def test_reserve_scales_the_allocated_peak_not_the_sum() -> None:
    est = estimate("qwen2.5-0.5b", "h100-sxm-80gb", optimizer_impl="fused", **{**JOB, "allocator_reserve_pct": 10})
    reserve = next(r.bytes for r in est.rows if r.component == "runtime/allocator_reserve")
    allocated = OPTIMIZER_PHASE + FLASH_WS - CONTEXT  # backward binds (fused: no step temporaries)
    assert reserve == -(-allocated // 10)
    assert est.peak(Tier.GPU) == OPTIMIZER_PHASE + FLASH_WS + reserve


def test_serving_peak_is_the_prefill_step() -> None:
    est = estimate("qwen2.5-0.5b", "h100-sxm-80gb", job="infer")
    phases = est.phases(Tier.GPU)
    assert set(phases) == {Phase.LOAD, Phase.PREFILL, Phase.DECODE}
    weights = sum(r.bytes for r in est.rows if r.tier is Tier.GPU and r.component.startswith("weights"))
    assert phases[Phase.LOAD] == weights + sum(r.bytes for r in est.rows if r.component.startswith("runtime"))
    assert phases[Phase.PREFILL] >= phases[Phase.DECODE] >= phases[Phase.LOAD]


def test_table_shows_the_rows_their_sum_and_the_binding_phase(capsys: pytest.CaptureFixture[str]) -> None:
    from memplan.report.table import Out, render_estimate

    gpu = gpu_with(OPTIMIZER_PHASE + 16 * MiB)
    est = estimate("qwen2.5-0.5b", gpu, optimizer_impl="fused", **JOB)
    render_estimate(est, Out(terminal=False))
    text = capsys.readouterr().out
    assert "optimizer/adam_v" in text and "rows summed" in text
    phase = est.peak_phase(Tier.GPU).value
    assert f"peak ({phase})" in text and "FITS" in text and f"peak at {phase}" in text
