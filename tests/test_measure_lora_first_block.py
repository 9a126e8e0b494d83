"""LoRA over a frozen embedding: the first block's input does not require grad, so autograd saves nothing for
what reads it through frozen weights (its input norm; in a parallel block the whole adapter-less MLP, which reads
the same norm output as attention). Measured with ``memplan.measure.job.measure_job`` on tiny random models of
each layout (parallel: Phi, GPT-NeoX, Falcon; sequential: Llama; post-norms only: OLMo-2; embedding norm: BLOOM)
against memplan's saved-activation prediction, with peft's default fp32 adapters on q, k, v, o."""

from __future__ import annotations

import pytest

pytest.importorskip("torch", reason="measuring saved tensors needs torch (the measure extra)")
pytest.importorskip("transformers", reason="measuring HF models needs transformers (the measure extra)")
pytest.importorskip("peft", reason="LoRA measurements need peft (the measure extra)")

from memplan.catalog.store import catalog_gpu
from memplan.config import Recompute
from memplan.estimator import make_config
from memplan.measure.job import measure_job
from memplan.measure.tiny import seq_len, tiny_spec
from memplan.memory import activations_lora as lora

pytestmark = pytest.mark.measure

BOUND_PCT = 0.5
"""Saved activations within 0.5% (before the first-block rule: Phi +22%, Falcon +9%, Llama +2.6%)."""


def _saved_line(family: str, **extra: object):
    cfg = make_config(None, job="lora", dtype="bf16", micro_batch=2, seq_len=seq_len(family), attention="sdpa",
                      **extra)
    report = measure_job(tiny_spec(family), cfg, catalog_gpu("h100-sxm-80gb"), device="cpu")
    return next(line for line in report.lines if line.component == "activations/saved")


@pytest.mark.parametrize("family", ["phi", "falcon", "gpt_neox", "llama", "olmo2", "bloom"])
def test_lora_saved_activations_match_measurement(family: str) -> None:
    line = _saved_line(family)
    print(f"{family}: predicted {line.predicted:,}, measured {line.measured:,} ({line.error_pct:+.2f}%)")
    assert abs(line.error_pct) <= BOUND_PCT


def test_recompute_or_qlora_keep_the_first_block_conservative() -> None:
    """Gradient checkpointing and k-bit training make peft call ``enable_input_require_grads``: no discount."""
    base = {"job": "lora", "dtype": "bf16", "micro_batch": 2, "seq_len": 64}
    assert not lora.first_block_input_grad(make_config(None, **base))
    assert lora.first_block_input_grad(make_config(None, **base, recompute=Recompute.FULL))
    assert lora.first_block_input_grad(make_config(None, **{**base, "job": "full"}))
