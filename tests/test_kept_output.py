"""The model output a training loop keeps until after the optimizer step (``JobConfig.kept_output``).

AnswerDotAI fsdp_qlora train.py holds ``output`` through ``loss.backward()`` and ``optimizer.step()`` and drops it
after (``output = None``); early-2024 transformers ``LlamaForCausalLM.forward`` returned ``logits.float()``. The
expected bytes below are the logits' shape times their element size, written out here.
"""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from memplan.errors import MemplanError
from memplan.estimator import estimate
from memplan.memory.breakdown import Phase, Tier

B, S, V = 2, 1024, 32000  # Llama-2-7B's vocabulary
FIELDS = dict(job="lora", micro_batch=B, seq_len=S, dtype="bf16", master_weights=False,
              cuda_context_bytes=0, allocator_reserve_pct=0)  # tensors only: the difference is exact


def _phases(**extra: object) -> dict[Phase, int]:
    return estimate("llama-2-7b", "h100-sxm-80gb", **FIELDS, **extra).phases(Tier.GPU)


@pytest.mark.parametrize(("kept", "element_bytes"), [("logits_fp32", 4), ("logits", 2)])
def test_kept_logits_add_their_bytes_from_backward_to_the_step(kept: str, element_bytes: int) -> None:
    base, held = _phases(), _phases(kept_output=kept)
    logits = B * S * V * element_bytes
    for phase in (Phase.BACKWARD_START, Phase.BACKWARD, Phase.OPTIMIZER):
        assert held[phase] - base[phase] == logits, phase
    assert held[Phase.FORWARD] == base[Phase.FORWARD]  # during forward they are the loss's own logits


def test_no_kept_output_row_by_default_nor_for_inference() -> None:
    rows = estimate("llama-2-7b", "h100-sxm-80gb", **FIELDS).rows
    assert not any(r.component == "activations/kept_output" for r in rows)
    infer = estimate("llama-2-7b", "h100-sxm-80gb", job="infer").rows
    assert not any(r.component == "activations/kept_output" for r in infer)
    with pytest.raises(MemplanError, match="kept_output does not apply to an infer job"):  # not silently ignored
        estimate("llama-2-7b", "h100-sxm-80gb", job="infer", kept_output="logits_fp32")


def test_kept_output_is_a_closed_choice() -> None:
    with pytest.raises((ValidationError, ValueError)):
        estimate("llama-2-7b", "h100-sxm-80gb", **FIELDS, kept_output="everything")
