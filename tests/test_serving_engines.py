"""transformers generate (dynamic/static cache), engine knob checks and bad serving input."""

from __future__ import annotations

import pytest

from memplan.errors import MemplanError
from memplan.estimator import estimate


def _rows(**kw: object) -> dict[str, int]:
    est = estimate("llama-3.1-8b", "h100-sxm-80gb", job="infer", engine="transformers", **kw)
    return {r.component: r.bytes for r in est.rows}


def test_dynamic_cache_holds_one_layers_old_keys_while_growing() -> None:
    got = _rows(micro_batch=4, infer={"context": 4096})
    # transformers 5.x DynamicLayer.update: torch.cat of keys, then of values: B·(S−1)·K·H·2 bytes extra
    assert got["kv_cache/dynamic_growth"] == 4 * 4095 * 8 * 128 * 2
    assert got["kv_cache"] == 4 * 4096 * 32 * 2 * 8 * 128 * 2


def test_static_cache_has_no_concat_copy() -> None:
    dyn = _rows(micro_batch=8, infer={"context": 8192, "prefill_chunk": 16},
                serve={"cache_implementation": "dynamic"})
    sta = _rows(micro_batch=8, infer={"context": 8192, "prefill_chunk": 16},
                serve={"cache_implementation": "static"})
    assert "kv_cache/dynamic_growth" not in sta
    # with 16-token chunks the old cache of one layer (8 × 8176 tokens × 2·8·128 values) dominates the workspace
    concat = 8 * (8192 - 16) * 2 * 8 * 128 * 2
    assert dyn["activations/prefill_workspace"] >= concat > sta["activations/prefill_workspace"]
    assert dyn["activations/prefill_workspace"] - concat <= sta["activations/prefill_workspace"]


def test_vllm_rejects_kv_dtypes_it_lacks_with_the_list() -> None:
    with pytest.raises(MemplanError, match="supported KV dtypes: bf16, fp16, fp32, fp8"):
        estimate("llama-3.1-8b", "h100-sxm-80gb", job="infer", engine="vllm", infer={"kv_dtype": "int4"})


def test_vllm_refuses_context_past_the_model_limit() -> None:
    with pytest.raises(MemplanError, match="max_position_embeddings"):
        estimate("llama-2-7b", "h100-sxm-80gb", job="infer", engine="vllm", serve={"max_model_len": 8192})
    with pytest.raises(MemplanError, match="max_model_len"):
        estimate("llama-2-7b", "h100-sxm-80gb", job="infer", engine="vllm", infer={"context": 5000})


def test_context_past_trained_positions_warns_elsewhere() -> None:
    est = estimate("llama-2-7b", "h100-sxm-80gb", job="infer", engine="transformers", infer={"context": 5000})
    assert est.warnings and "max_position_embeddings" in est.warnings[0]
    est = estimate("llama-2-7b", "rtx-4090", job="infer", engine="llamacpp", quant="q4_k_m", infer={"context": 5000})
    assert est.warnings and "max_position_embeddings of 4,096" in est.warnings[0]
    assert not estimate("llama-2-7b", "h100-sxm-80gb", job="infer", infer={"context": 4096}).warnings


def test_knobs_of_another_engine_are_refused() -> None:
    with pytest.raises(MemplanError, match="n_gpu_layers"):
        estimate("llama-3.1-8b", "h100-sxm-80gb", job="infer", engine="vllm", serve={"n_gpu_layers": 10})
    with pytest.raises(MemplanError, match="gpu_memory_utilization"):
        estimate("llama-3.1-8b", "rtx-4090", job="infer", engine="llamacpp", quant="q4_k_m",
                 serve={"gpu_memory_utilization": 0.8})
    with pytest.raises(MemplanError, match="serve"):
        estimate("llama-3.1-8b", "h100-sxm-80gb", job="full", serve={"max_num_seqs": 8})
