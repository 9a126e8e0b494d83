"""The masks a transformers model builds before its layer loop (``memory.hf_masks``), rule by rule from transformers
5.20's ``masking_utils.py`` and each model's forward; the byte counts are B·T·S elements at the mask's width."""

from __future__ import annotations

import pytest

from memplan.arch.build import build_architecture
from memplan.catalog.schema import Family, ModelSpec
from memplan.memory import hf_masks

BASE = {"source": "test", "hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 4,
        "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 2048}
LLAMA = ModelSpec(name="llama", family=Family.LLAMA, **BASE)
MISTRAL = ModelSpec(name="mistral", family=Family.LLAMA, sliding_window=64, **BASE)
"""Mistral v0.1: one window on every layer, no ``layer_types``: ``MistralModel`` builds only the sliding mask."""
QWEN2_SLIDING = ModelSpec(name="qwen2", family=Family.LLAMA, sliding_window=64, **BASE,
                          layer_types=("full_attention", "full_attention", "sliding_attention", "sliding_attention"))
"""Qwen2 with ``use_sliding_window``: ``Qwen2Model`` builds the full mask, and the sliding one for its sliding layers."""
QWEN2_MOE = ModelSpec(name="qwen2-moe", family=Family.QWEN2_MOE, num_experts=8, num_experts_per_tok=2,
                      moe_intermediate_size=48, shared_expert_intermediate_size=96, **BASE)
GEMMA2 = ModelSpec(name="gemma2", family=Family.GEMMA2, sliding_window=64, **BASE)
FALCON = ModelSpec(name="falcon", family=Family.FALCON, **BASE)


def _count(spec: ModelSpec, impl: str, kv_tokens: int) -> int:
    return hf_masks.materialised_masks(spec, build_architecture(spec).layers, impl, kv_tokens)


@pytest.mark.parametrize(("spec", "impl", "kv_tokens", "expected"), [
    (LLAMA, "eager", 512, 1),          # create_causal_mask -> eager_mask, always materialised
    (LLAMA, "sdpa", 512, 0),           # is_causal: no mask
    (LLAMA, "flash_attention_2", 512, 0),
    (MISTRAL, "eager", 512, 1),        # only the sliding mask
    (MISTRAL, "sdpa", 512, 1),         # S >= window: never skipped
    (MISTRAL, "sdpa", 64, 1),          # kv_length >= local_attention_size at equality too
    (MISTRAL, "sdpa", 63, 0),          # a window longer than S: is_causal
    (QWEN2_SLIDING, "eager", 512, 2),  # full and sliding
    (QWEN2_SLIDING, "sdpa", 512, 1),   # the sliding one
    (QWEN2_MOE, "eager", 512, 2),      # both, the sliding one unused
    (QWEN2_MOE, "sdpa", 8, 1),         # window 0 (use_sliding_window false) is never skipped
    (GEMMA2, "eager", 512, 2),
    (GEMMA2, "sdpa", 32, 0),           # S below the window: both skipped
    (FALCON, "sdpa", 512, 1),          # allow_is_causal_skip=False for ALiBi
])
def test_masks_each_model_keeps(spec: ModelSpec, impl: str, kv_tokens: int, expected: int) -> None:
    assert _count(spec, impl, kv_tokens) == expected


def test_loop_mask_bytes_width_follows_the_kernel() -> None:
    """eager: B·T·S in the compute dtype per mask; SDPA: B·T·S bool."""
    layers = build_architecture(QWEN2_MOE).layers
    b, t, s = 2, 100, 128
    eager = hf_masks.loop_mask_bytes(QWEN2_MOE, layers, impl="eager", batch=b, tokens=t, kv_tokens=s, bits=16)
    sdpa = hf_masks.loop_mask_bytes(QWEN2_MOE, layers, impl="sdpa", batch=b, tokens=t, kv_tokens=s, bits=16)
    assert eager == 2 * (2 * 100 * 128) * 2
    assert sdpa == 1 * (2 * 100 * 128) * 1
    assert hf_masks.additive_mask_bytes(batch=b, tokens=t, kv_tokens=s, bits=16) == 2 * 100 * 128 * 2
