"""Older transformers releases' buffers and masks (memory/hf_legacy.py), against arithmetic from their sources:
transformers 4.37.2-4.40.0 ``LlamaRotaryEmbedding``/``MistralRotaryEmbedding`` (cos and sin of (M, head_dim) in
torch's default fp32, per attention layer), 4.38.2 ``LlamaModel.causal_mask`` (M² bools) and
``_update_causal_mask`` ((B, 1, M, M) in the compute dtype), 4.39.3's (S, S) mask expanded over the batch."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from memplan.catalog.resolve import load_model
from memplan.config import JobConfig
from memplan.estimator import estimate
from memplan.memory import hf_legacy
from memplan.memory.breakdown import Phase, Tier

LLAMA2_7B = load_model("llama-2-7b")  # config.json: 32 layers, 32 heads of 128, max_position_embeddings 4096
M, LAYERS, HEAD_DIM = 4096, 32, 128
FP32, BF16 = 4, 2


def _cfg(**kw) -> JobConfig:
    return JobConfig(job="qlora", quant="nf4", micro_batch=6, seq_len=2048, attention="sdpa", **kw)


def test_rotary_caches_are_per_layer_fp32_tables_of_max_positions() -> None:
    for version in ("4.37", "4.38.2", "4.39", "4.40"):
        assert hf_legacy.rope_cache_bytes(LLAMA2_7B, _cfg(transformers_version=version)) == LAYERS * 2 * M * HEAD_DIM * FP32
    assert hf_legacy.rope_cache_bytes(LLAMA2_7B, _cfg()) == 0  # current transformers: one rotary module, no caches


def test_only_4_38_registers_the_causal_mask_buffer_and_the_m_by_m_mask() -> None:
    v438, v439 = _cfg(transformers_version="4.38"), _cfg(transformers_version="4.39.3")
    assert hf_legacy.mask_buffer_bytes(LLAMA2_7B, v438) == M * M
    assert hf_legacy.mask_buffer_bytes(LLAMA2_7B, v439) == 0
    assert hf_legacy.model_mask_bytes(LLAMA2_7B, v438, "sdpa", 16) == 6 * M * M * BF16
    assert hf_legacy.model_mask_bytes(LLAMA2_7B, v439, "sdpa", 16) == 2048 * 2048 * BF16  # expand: one (S, S) tensor
    assert hf_legacy.model_mask_bytes(LLAMA2_7B, v438, "flash", 16) == 0  # flash_attention_2 gets no 4-D mask
    assert hf_legacy.model_mask_bytes(LLAMA2_7B, _cfg(transformers_version="4.40"), "sdpa", 16) == 0


@pytest.mark.parametrize("version", ["4.36", "4.41", "5.0", "latest"])
def test_releases_whose_sources_were_not_read_are_refused(version: str) -> None:
    with pytest.raises(ValidationError):
        _cfg(transformers_version=version)


def _rows(**kw) -> dict[str, tuple[int, frozenset[Phase] | None]]:
    est = estimate("llama-2-7b", "h100-sxm-80gb", **_cfg(**kw).model_dump(exclude_defaults=True))
    return {r.component: (r.bytes, r.phases) for r in est.rows if r.tier is Tier.GPU}


def test_the_mask_is_held_through_backward_only_by_checkpointed_layers() -> None:
    held = _rows(transformers_version="4.38", recompute="full")
    assert held["activations/hf_causal_mask"][0] == 6 * M * M * BF16
    assert Phase.BACKWARD in held["activations/hf_causal_mask"][1]
    assert held["weights/hf_buffers"][0] == LAYERS * 2 * M * HEAD_DIM * FP32 + M * M
    plain = _rows(transformers_version="4.38")
    assert plain["activations/hf_causal_mask"][1] == frozenset({Phase.FORWARD})
    assert "activations/hf_causal_mask" not in _rows(recompute="full")


def test_4_38_saves_each_layers_mask_copy_and_repeated_kv() -> None:
    # SDPA saves the (B, 1, S, S) slice ``causal_mask[:, :, cache_position, :S]`` (a copy) per layer
    with_copy = _rows(transformers_version="4.38")["activations/layers"][0]
    no_copy = _rows(transformers_version="4.39")["activations/layers"][0]
    assert with_copy - no_copy == LAYERS * 6 * 2048 * 2048 * BF16
