"""Serving latency/throughput (planner.serve_cost): roofline terms checked by independent arithmetic."""

from __future__ import annotations

import pytest

from memplan.estimator import estimate
from memplan.memory.context import Context
from memplan.planner.serve_cost import HBM_EFFICIENCY, ServeCost, expert_read_fraction, generation, serve_cost


def _cost(model: str, gpu: str, **kw: object) -> ServeCost:
    est = estimate(model, gpu, job="infer", engine="vllm", **kw)
    return serve_cost(Context(est.arch, est.config, est.gpu, est.host))


@pytest.mark.parametrize("replicas", [1, 2, 3, 8])
def test_aggregate_throughput_is_replicas_times_one(replicas: int) -> None:
    one = _cost("llama-3.1-8b", "h100-sxm-80gb", micro_batch=16, infer={"context": 2048})
    many = _cost("llama-3.1-8b", "h100-sxm-80gb", micro_batch=16, gpus_per_node=replicas, infer={"context": 2048})
    assert many.replicas == replicas
    assert many.tokens_per_s == pytest.approx(replicas * one.tokens_per_s, rel=1e-12)
    assert many.tpot_s == pytest.approx(one.tpot_s, rel=1e-12)


def test_batch1_decode_is_memory_bound_weights_plus_kv_over_effective_bandwidth() -> None:
    c = _cost("llama-3.1-8b", "h100-sxm-80gb", micro_batch=1, infer={"context": 1024})
    weights = 8_030_261_248 * 2
    kv = 1024 * 2 * 32 * 8 * 128 * 2
    expected = (weights + kv) / (3350e9 * HBM_EFFICIENCY["hopper"])
    assert c.tpot_s == pytest.approx(expected, rel=0.01)


def test_efficiency_override() -> None:
    a = _cost("llama-3.1-8b", "h100-sxm-80gb", infer={"context": 1024}, serve={"hbm_efficiency": 0.4})
    b = _cost("llama-3.1-8b", "h100-sxm-80gb", infer={"context": 1024}, serve={"hbm_efficiency": 0.8})
    assert a.tpot_s == pytest.approx(2 * b.tpot_s, rel=1e-9)


def test_moe_decode_reads_only_touched_experts() -> None:
    assert expert_read_fraction(experts=8, top_k=2, tokens=1) == pytest.approx(0.25)
    assert expert_read_fraction(experts=8, top_k=2, tokens=1000) == pytest.approx(1.0)
    small = _cost("mixtral-8x7b", "h100-sxm-80gb", micro_batch=1, infer={"context": 128})
    dense_equiv = 46_702_792_704 * 2 / (3350e9 * HBM_EFFICIENCY["hopper"])
    assert small.tpot_s < 0.5 * dense_equiv  # top-2 of 8 experts: about a third of the weights


def test_ttft_is_prefill_flops_over_effective_peak() -> None:
    c = _cost("llama-3.1-8b", "h100-sxm-80gb", infer={"context": 4096}, serve={"compute_efficiency": 0.5})
    active = 8_030_261_248 - 2 * 128256 * 4096  # the decoder layers: embedding is a lookup, lm_head runs for 1 token
    flops = 2 * active * 4096 + 2 * 4096 * 4096 * 32 * 128 * 32
    assert c.ttft_s == pytest.approx(flops / (989e12 * 0.5), rel=0.01)


def test_generations() -> None:
    from memplan.catalog.store import catalog_gpu

    assert generation(catalog_gpu("l40s")) == "ada" and generation(catalog_gpu("l4")) == "ada"
    assert generation(catalog_gpu("h200-sxm-141gb")) == "hopper"
