"""vLLM capacity: exact max concurrency / context, agreement with estimate's fit, and the issue-12 cases."""

from __future__ import annotations

from fractions import Fraction

import pytest

from memplan.estimator import estimate
from memplan.memory.breakdown import Tier
from memplan.search import largest_fitting
from memplan.units import GiB, MiB

BIG_SEQS = {"max_num_seqs": 4096}  # lift max_num_seqs so the KV pool binds (the sampler keeps 4096 x V int32 penalty counts)


def test_exact_max_concurrency_fits_and_one_more_does_not() -> None:
    for model, gpu, context in (("llama-3.1-8b", "h100-sxm-80gb", 3000), ("qwen2.5-7b", "a100-sxm-80gb", 1000),
                                ("mistral-7b", "l40s", 777)):
        est = estimate(model, gpu, job="infer", engine="vllm", infer={"context": context}, serve=BIG_SEQS)
        c = largest_fitting(est, "micro_batch")
        assert c > 0
        assert estimate(model, gpu, est.config, micro_batch=c).fits
        assert not estimate(model, gpu, est.config, micro_batch=c + 1).fits


def test_exact_max_context_fits_and_one_more_does_not() -> None:
    est = estimate("llama-3.1-8b", "rtx-4090", job="infer", engine="vllm", micro_batch=3, infer={"context": 16})
    s = largest_fitting(est, "context")
    assert 16 < s < 131072 and s % 16 == 0  # whole blocks of 16 tokens per sequence
    assert estimate("llama-3.1-8b", "rtx-4090", est.config, infer={"context": s}).fits
    assert not estimate("llama-3.1-8b", "rtx-4090", est.config, infer={"context": s + 1}).fits


def test_concurrency_capped_by_max_num_seqs() -> None:
    est = estimate("llama-3.2-1b", "h100-sxm-80gb", job="infer", engine="vllm", infer={"context": 128},
                   serve={"max_num_seqs": 37})
    assert largest_fitting(est, "micro_batch") == 37


def _kv_bytes_per_token(layers: int, kv_heads: int, head_dim: int, tp: int, nbytes: int) -> int:
    return 2 * layers * (kv_heads // tp) * head_dim * nbytes


def _concurrency_band(total_mib: int, params: int, tp: int, per_token: int, context: int) -> tuple[int, int]:
    """Independent arithmetic: 0.9 × total − bf16 weights / tp − 3.58 GiB non-torch − [0, 3] GiB activations."""
    free = Fraction(9, 10) * total_mib * MiB - Fraction(params * 2, tp) - Fraction("3.58") * GiB
    per_seq = per_token * context
    return int((free - 3 * GiB) // per_seq), int(free // per_seq)


def test_llama31_70b_tp4_h100_8k_concurrency() -> None:
    # Issue 12: vLLM's arithmetic gives about 55-60 sequences of 8k on 4 × H100 at tp 4.
    est = estimate("llama-3.1-70b", "h100-sxm-80gb", job="infer", engine="vllm", tp=4, gpus_per_node=4,
                   infer={"context": 8192})
    c = largest_fitting(est, "micro_batch")
    # vLLM multiplies the CUDA runtime's total, 79.22 GiB on an H100 (PR #10511's log) = 81,121 MiB.
    lo, hi = _concurrency_band(81121, 70_553_706_496, 4, _kv_bytes_per_token(80, 8, 128, 4, 2), 8192)
    assert lo <= c <= hi
    assert abs(c - 55) <= Fraction(1, 10) * 55


def test_mixtral_8x22b_h200_32k_concurrency() -> None:
    # Issue 12: about 90 sequences of 32k on 8 × H200 (memplan's old answer: 16).
    est = estimate("mixtral-8x22b", "h200-sxm-141gb", job="infer", engine="vllm", tp=8, gpus_per_node=8,
                   infer={"context": 32768})
    c = largest_fitting(est, "micro_batch")
    lo, hi = _concurrency_band(143771, 140_620_634_112, 8, _kv_bytes_per_token(56, 8, 128, 8, 2), 32768)
    assert lo <= c <= hi
    assert 81 <= c <= 104  # ~90 in the rough arithmetic; 0.9 × 140.4 GiB gives ~101


def test_llama31_8b_h100_256_by_1k_fits_in_about_50_gib() -> None:
    # Issue 12: vLLM serves 256 sequences of 1k tokens on one H100 in about 50 GiB (old answer: infeasible, 82 GiB).
    est = estimate("llama-3.1-8b", "h100-sxm-80gb", job="infer", engine="vllm", micro_batch=256,
                   infer={"context": 1024})
    assert est.fits
    outside = ("runtime/vllm_unbudgeted", "runtime/driver_reserved")
    used = est.total(Tier.GPU) - sum(r.bytes for r in est.rows if r.component in outside)
    kv = 256 * 1024 * _kv_bytes_per_token(32, 8, 128, 1, 2)
    assert kv == 32 * GiB
    assert 45 * GiB <= used <= 55 * GiB


def test_kv_label_names_the_sized_dtype() -> None:
    from memplan.memory.kv_cache import sized_kv_dtype
    from memplan.planner.plan import Candidate
    from memplan.report.plan_out import _choice

    est = estimate("llama-3.1-8b", "h100-sxm-80gb", job="infer", dtype="fp8", infer={"context": 1024})
    kv_row = next(r for r in est.rows if r.component == "kv_cache")
    per_elem_bytes = Fraction(kv_row.bytes, 1024 * 2 * 32 * 8 * 128)
    assert per_elem_bytes == 2  # fp8 weights compute and cache in bf16
    cand = Candidate(est.config, est, 1.0, 1.0, 0.0, "")
    assert "kv=bf16" in _choice(cand) and sized_kv_dtype(est.config).bits == 16
    est8 = estimate("llama-3.1-8b", "h100-sxm-80gb", job="infer", dtype="fp8", infer={"context": 1024, "kv_dtype": "fp8"})
    assert "kv=fp8" in _choice(Candidate(est8.config, est8, 1.0, 1.0, 0.0, ""))


@pytest.mark.parametrize(("ctk", "ctv", "label", "bytes_per_32"), [
    ("f16", "f16", "kv=f16", 2 * 32 * 2), ("q8_0", "q8_0", "kv=q8_0", 2 * 34), ("q8_0", "q4_0", "kv=q8_0/q4_0", 34 + 18)])
def test_llamacpp_kv_label_names_its_cache_types(ctk: str, ctv: str, label: str, bytes_per_32: int) -> None:
    """llama.cpp sizes K and V by -ctk/-ctv (ggml block sizes: f16 2 bytes per element, q8_0 34 bytes and q4_0 18
    bytes per 32 elements, ggml-common.h): the plan line names those types, not the model's compute dtype."""
    from memplan.planner.plan import Candidate
    from memplan.report.plan_out import _choice

    serve = {"cache_type_k": ctk, "cache_type_v": ctv}
    est = estimate("llama-3.1-8b", "rtx-4090", job="infer", engine="llamacpp", quant="q4_k_m",
                   infer={"context": 4096}, serve=serve)
    kv = sum(r.bytes for r in est.rows if r.component.startswith("kv_cache"))
    assert kv == 4096 * 32 * 8 * 128 // 32 * bytes_per_32  # cells × layers × kv width / 32 × block bytes
    assert label + " " in _choice(Candidate(est.config, est, 1.0, 1.0, 0.0, ""))


def test_enforce_eager_drops_graph_memory_and_fp8_kv_doubles_the_pool_tokens() -> None:
    from memplan.engines import vllm
    from memplan.memory.context import Context

    def pool(**serve: object) -> vllm.Pool:
        est = estimate("llama-3.1-8b", "h100-sxm-80gb", job="infer", engine="vllm", serve=serve)
        return vllm.pool(Context(est.arch, est.config, est.gpu, est.host))

    graphs, eager = pool(), pool(enforce_eager=True)
    assert graphs.cudagraphs > 0 and eager.cudagraphs == 0 and eager.kv_bytes == graphs.kv_bytes + graphs.cudagraphs
    est8 = estimate("llama-3.1-8b", "h100-sxm-80gb", job="infer", engine="vllm", infer={"kv_dtype": "fp8"})
    p8 = vllm.pool(Context(est8.arch, est8.config, est8.gpu, est8.host))
    assert p8.token_bytes * 2 == graphs.token_bytes == 32 * 2 * 8 * 128 * 2
    assert p8.blocks == p8.kv_bytes // (16 * p8.token_bytes)


def test_vllm_rows_carry_serving_phases() -> None:
    from memplan.memory.breakdown import Phase
    from memplan.memory.registry import with_phases

    est = estimate("llama-3.1-8b", "h100-sxm-80gb", job="infer", engine="vllm")
    phases = {r.component: with_phases(r).phases for r in est.rows}
    assert Phase.LOAD not in phases["kv_cache"] and Phase.DECODE in phases["kv_cache"]
    assert phases["activations/vllm_profile_peak"] == frozenset({Phase.PREFILL, Phase.DECODE})
    assert Phase.LOAD in phases["runtime/vllm_non_torch"] and Phase.LOAD in phases["weights/params"]
