"""Non-persistent buffers current transformers models hold (memory/hf_buffers.py), against arithmetic from their
sources: transformers 5.20.2 ``GPTBigCodeModel.__init__`` registers ``torch.tril(torch.ones((M, M), dtype=torch.bool))``
(one byte per element) and ``GPTJAttention.__init__`` an fp32 ``create_sinusoidal_positions(M, rotary_dim)`` table in
every layer. Neither is in the state dict, so FSDP does not shard them and every rank holds them whole."""

from __future__ import annotations

import pytest

from memplan.catalog.hf import spec_from_hf_config
from memplan.estimator import estimate
from memplan.memory import hf_buffers
from memplan.memory.breakdown import TRAIN_PHASES, Tier

# bigcode/starcoder config.json: n_positions 8192, multi_query
STARCODER = spec_from_hf_config({"model_type": "gpt_bigcode", "n_embd": 6144, "n_layer": 40, "n_head": 48,
                                 "n_inner": 24576, "n_positions": 8192, "vocab_size": 49152, "multi_query": True},
                                name="starcoder", source="test")
GPTJ_LAYERS, GPTJ_POSITIONS, GPTJ_ROTARY, FP32 = 28, 2048, 64, 4  # EleutherAI/gpt-j-6b config.json
GPU = "h100-sxm-80gb"


def _rows(model, **kw) -> dict[str, object]:
    est = estimate(model, GPU, **{"job": "full", "micro_batch": 1, "seq_len": 512, **kw})
    return {r.component: r for r in est.rows if r.tier is Tier.GPU}


def test_starcoder_causal_bias_is_m_squared_bools() -> None:
    assert hf_buffers.causal_bias_bytes(STARCODER) == 8192 * 8192 == 64 * 2**20
    row = _rows(STARCODER)["weights/model_buffers"]
    assert row.bytes == 8192 * 8192
    assert set(TRAIN_PHASES) <= row.phases  # resident for the whole step


def test_gptj_tables_are_fp32_per_layer() -> None:
    assert _rows("gpt-j-6b")["weights/model_buffers"].bytes == GPTJ_LAYERS * GPTJ_POSITIONS * GPTJ_ROTARY * FP32


@pytest.mark.parametrize("model", ["llama-3.1-8b", "gpt2"])
def test_families_without_large_buffers_have_no_row(model: str) -> None:
    assert "weights/model_buffers" not in _rows(model)


def test_buffers_are_replicated_under_fsdp2_and_kept_when_serving_with_transformers() -> None:
    sharded = _rows(STARCODER, engine="fsdp2", gpus_per_node=8)["weights/model_buffers"]
    assert sharded.bytes == 8192 * 8192
    served = estimate(STARCODER, GPU, job="infer", micro_batch=1, infer={"context": 1024}).rows
    assert sum(r.bytes for r in served if r.component == "weights/model_buffers") == 8192 * 8192


def test_megatron_layout_has_no_hf_buffers() -> None:
    assert "weights/model_buffers" not in _rows(STARCODER, engine="megatron", gpus_per_node=8)


def test_the_training_ilp_states_include_the_buffers() -> None:
    """The planner's states factor (``planner.train_phases.phased``) holds the buffers in every phase, as estimate."""
    from memplan.arch.build import build_architecture
    from memplan.catalog.schema import HostSpec
    from memplan.catalog.store import catalog_gpu
    from memplan.estimator import make_config
    from memplan.memory.context import Context
    from memplan.planner import train_phases

    ctx = Context(build_architecture(STARCODER), make_config(None, job="full", micro_batch=1, seq_len=512),
                  catalog_gpu(GPU), HostSpec())
    rows = [r for r in train_phases.phased(ctx) if r.component == "weights/model_buffers"]
    assert [r.bytes for r in rows] == [8192 * 8192] and set(TRAIN_PHASES) <= rows[0].phases
