"""The step-time model's parts, checked against independent arithmetic and the papers' statements."""

from __future__ import annotations

import pytest

from memplan.catalog.store import catalog_gpu, catalog_model
from memplan.config import JobConfig
from memplan.planner import cost, perf_data
from memplan.planner.budget import step_time


def test_ring_collectives_follow_nccl_bus_bandwidth():
    """nccl-tests PERFORMANCE.md: all-reduce moves 2(n−1)/n of the buffer per rank, all-gather (n−1)/n."""
    gb = 1e9
    assert cost.collective_seconds(kind="all_reduce", nbytes=8 * gb, ranks=8, bytes_per_s=100 * gb,
                                   latency_s=0.0) == pytest.approx(2 * 7 / 8 * 8 / 100)
    assert cost.collective_seconds(kind="all_gather", nbytes=8 * gb, ranks=8, bytes_per_s=100 * gb,
                                   latency_s=1e-6) == pytest.approx(7 / 8 * 8 / 100 + 7e-6)
    assert cost.collective_seconds(kind="all_reduce", nbytes=gb, ranks=1, bytes_per_s=gb, latency_s=1.0) == 0.0


def test_micro_batch_size_changes_efficiency():
    """Narayanan et al. 2021, Fig. 7: throughput per GPU grows with the micro-batch size."""
    curve = perf_data.GEMM_CURVES["hopper"]
    small = cost.gemm_efficiency(curve=curve, width=4096, tokens=1 * 256)
    large = cost.gemm_efficiency(curve=curve, width=4096, tokens=8 * 256)
    assert small < large <= curve.peak_fraction


def _st(**kw):
    base = {"job": "full", "gpus_per_node": 8, "seq_len": 2048, "micro_batch": 1, "grad_accum": 4}
    return step_time(catalog_model("llama-3.1-8b"), catalog_gpu("h100-sxm-80gb"), JobConfig(**{**base, **kw}))


def test_lora_skips_weight_gradients_and_the_full_all_reduce():
    """LoRA: forward 2N, backward activation gradients 2N (no weight-gradient GEMMs) → 4/6 of the GEMM work;
    only the adapters are all-reduced."""
    full, lora = _st(perf={"comm_overlap": 0.0}), _st(job="lora", perf={"comm_overlap": 0.0})
    assert lora.pipeline_s < full.pipeline_s
    assert lora.model_flops_per_step == pytest.approx(full.model_flops_per_step * 2 / 3)
    assert 0 < lora.data_parallel_s < full.data_parallel_s / 10


def test_qlora_pays_dequantization():
    assert _st(job="qlora").pipeline_s > _st(job="lora").pipeline_s


def test_fp8_gemms_run_at_the_fp8_peak():
    bf16, fp8 = _st(), _st(perf={"fp8": True})
    assert fp8.pipeline_s < bf16.pipeline_s
    assert fp8.peak_flops == pytest.approx(2 * bf16.peak_flops, rel=0.01)  # H100 datasheet: 1,979 vs 989


def test_mfu_override_and_fabric_override_are_used():
    assert _st(perf={"mfu": 0.2}).pipeline_s > _st(perf={"mfu": 0.6}).pipeline_s
    slow = _st(gpus_per_node=8, nodes=2, perf={"inter_node_gbps": 1.0})
    fast = _st(gpus_per_node=8, nodes=2, perf={"inter_node_gbps": 100.0})
    assert slow.data_parallel_s > fast.data_parallel_s


def test_cluster_presets_are_the_fabric_table():
    """The config accepts exactly the fabric presets ``perf_data`` defines (an unknown name is a validation
    error at the boundary, for estimate as well as plan)."""
    from typing import get_args

    from memplan.config import PerfConfig

    names = {a for arg in get_args(PerfConfig.model_fields["cluster"].annotation) for a in get_args(arg)}
    assert names == set(perf_data.FABRICS)
    with pytest.raises(ValueError):
        PerfConfig(cluster="nope")
