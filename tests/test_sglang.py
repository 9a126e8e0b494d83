"""SGLang: the token pool from --mem-fraction-static, its defaults, capacity, knobs and bad input.

Expected values come from a published SGLang log or from SGLang's formulas written out here
(python/sglang/srt/server_args.py ``_handle_gpu_memory_settings``,
python/sglang/srt/model_executor/model_runner_kv_cache_mixin.py ``_profile_available_bytes``).
"""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import pytest
from conftest import run_cli

from memplan.engines import sglang
from memplan.errors import MemplanError
from memplan.estimator import estimate
from memplan.memory.context import Context
from memplan.search import largest_fitting
from memplan.units import GiB, MiB

QWEN3_235B_FP8 = str(Path(__file__).parent / "fixtures" / "serving" / "qwen3-235b-a22b-fp8.json")
LLAMA8B_TOKEN_BYTES = 2 * 32 * 8 * 128 * 2  # K and V, 32 layers, 8 KV heads of 128, bf16


def _pool(model: str, gpu: str, **kw: object):
    est = estimate(model, gpu, job="infer", engine="sglang", **kw)
    return est, sglang.pool(Context(est.arch, est.config, est.gpu, est.host))


def test_qwen3_235b_fp8_tp4_h100_tokens_issue21348() -> None:
    # vllm-project/vllm issue #21348 (2025-07-22): sglang.launch_server Qwen3-235B-A22B-FP8 --tp 4 on 4 × H100
    # --mem-fraction-static 0.93: "KV Cache is allocated. #tokens: 367404, K size: 8.23 GB, V size: 8.23 GB".
    _, p = _pool(QWEN3_235B_FP8, "h100-sxm-80gb", tp=4, gpus_per_node=4, dtype="fp8", infer={"context": 4096},
                 serve={"mem_fraction_static": 0.93})
    assert p.token_bytes == 94 * 2 * 1 * 128 * 2  # 94 layers, K and V, 4 KV heads / tp 4, head 128, bf16
    assert abs(Fraction(p.tokens, 367404) - 1) <= Fraction(5, 100), p.tokens
    assert abs(Fraction(p.tokens * p.token_bytes // 2, GiB) - Fraction("8.23")) <= Fraction("0.42"), p.tokens


@pytest.mark.parametrize(("gpu", "tp", "mib", "chunk", "graph_bs"), [
    ("h100-sxm-80gb", 1, 81559, 8192, 256), ("h100-sxm-80gb", 4, 81559, 8192, 512), ("rtx-4090", 1, 24564, 2048, 24),
    ("l40s", 1, 46068, 4096, 32)])
def test_default_mem_fraction_static(gpu: str, tp: int, mib: int, chunk: int, graph_bs: int) -> None:
    # reserved = 512 + 1.5 max(chunk, 2048) + 2 graph_bs + tp/8 × 1024 MiB, at least 10 GiB above 60 GiB;
    # f = round((gpu_mem - reserved) / gpu_mem, 3) with gpu_mem nvidia-smi's MiB.
    est = estimate("llama-3.1-8b", gpu, job="infer", engine="sglang", tp=tp, gpus_per_node=tp)
    reserved = 512 + 1.5 * max(chunk, 2048) + 2 * graph_bs + tp / 8 * 1024
    if mib > 60 * 1024:
        reserved = max(reserved, 10 * 1024)
    assert sglang.defaults(est.config, est.gpu) == (chunk, graph_bs)
    assert sglang.mem_fraction_static(est.config, est.gpu) == Fraction(str(round((mib - reserved) / mib, 3)))


def test_pool_is_the_static_fraction_of_free_memory_less_the_weights() -> None:
    # free_before = CUDA total - context (300 MiB here); pool = 0.8 × free_before - weights; tokens = pool // cell.
    est, p = _pool("llama-3.1-8b", "h100-sxm-80gb", cuda_context_bytes=300 * MiB, infer={"context": 1024},
                   serve={"mem_fraction_static": 0.8})
    # The H100's CUDA total: deviceQuery's 85,017,755,648 bytes (catalog quote), in whole MiB.
    free_before = 85_017_755_648 // MiB * MiB - 300 * MiB
    weights = 8_030_261_248 * 2  # Llama-3.1-8B parameters in bf16
    assert p.weights == weights
    assert p.kv_bytes == free_before * 4 // 5 - weights
    assert p.token_bytes == LLAMA8B_TOKEN_BYTES
    assert p.tokens == p.kv_bytes // LLAMA8B_TOKEN_BYTES
    assert est.serving["kv_pool_tokens"] == p.tokens


def test_pages_round_the_pool_down() -> None:
    _, p1 = _pool("llama-3.1-8b", "l40s", serve={"mem_fraction_static": 0.85})
    _, p64 = _pool("llama-3.1-8b", "l40s", serve={"mem_fraction_static": 0.85, "page_size": 64})
    assert p64.tokens % 64 == 0 and p1.tokens - 64 < p64.tokens <= p1.tokens


def test_a_step_larger_than_the_reserved_share_comes_off_the_pool() -> None:
    # f = 0.99 leaves about 0.8 GiB on an H100, less than an 8,192-token prefill step and the CUDA graphs need.
    est, p = _pool("llama-3.1-8b", "h100-sxm-80gb", serve={"mem_fraction_static": 0.99})
    ctx = Context(est.arch, est.config, est.gpu, est.host)
    free_before = p.total - sglang.before_load_bytes(est.config, est.gpu)
    step = sglang.step_bytes(ctx, chunk=8192, graph_bs=256) + (p.max_num_seqs + 1) * (131072 + 4) * 4
    assert step > free_before - p.budget
    assert p.kv_bytes == p.budget - p.weights - (step - (free_before - p.budget))


def test_exact_max_concurrency_fits_and_one_more_does_not() -> None:
    est = estimate("llama-3.1-8b", "l40s", job="infer", engine="sglang", infer={"context": 3000})
    c = largest_fitting(est, "micro_batch")
    assert c == est.serving["max_concurrency"] > 0
    assert estimate("llama-3.1-8b", "l40s", est.config, micro_batch=c).fits
    assert not estimate("llama-3.1-8b", "l40s", est.config, micro_batch=c + 1).fits


def test_max_running_requests_caps_concurrency() -> None:
    est = estimate("llama-3.2-1b", "h100-sxm-80gb", job="infer", engine="sglang", infer={"context": 128},
                   serve={"max_running_requests": 37})
    assert largest_fitting(est, "micro_batch") == 37


def test_knobs_belong_to_their_engine() -> None:
    with pytest.raises(MemplanError, match="not a knob of sglang"):
        estimate("llama-3.1-8b", "h100", job="infer", engine="sglang", serve={"gpu_memory_utilization": 0.8})
    with pytest.raises(MemplanError, match="not a knob of vllm"):
        estimate("llama-3.1-8b", "h100", job="infer", engine="vllm", serve={"mem_fraction_static": 0.8})


@pytest.mark.parametrize(("engine", "serve", "owners"), [
    ("vllm", {"mem_fraction_static": 0.8}, "choose sglang, the engine that reads it, or drop it"),
    ("vllm", {"page_size": 16, "n_ctx": 512},
     "choose the engine that reads them (sglang reads page_size, llamacpp reads n_ctx) or drop them"),
    ("sglang", {"max_num_seqs": 8}, "choose vllm, the engine that reads it"),
    (None, {"cache_implementation": "static"}, "not a knob of the default engine; choose transformers"),
    (None, {"n_ctx": 512}, "not a knob of the default engine; choose llamacpp"),
])
def test_a_foreign_knob_names_only_the_engines_that_read_it(engine, serve, owners) -> None:
    """The engine the job runs is not offered as the knob's home (it was, in a fixed list of all four)."""
    with pytest.raises(MemplanError) as err:
        estimate("llama-3.1-8b", "h100", job="infer", engine=engine, serve=serve)
    assert owners in str(err.value), err.value
    if engine is not None:
        assert f", {engine}" not in str(err.value) and f"({engine}" not in str(err.value), err.value


def test_cli_sglang_json_reports_the_pool(runner) -> None:
    result = run_cli(runner, "estimate", "llama-3.1-8b", "--gpu", "l40s", "--job", "infer", "--engine", "sglang",
                     "--mem-fraction-static", "0.85", "--page-size", "16", "--format", "json")
    serving = json.loads(result.stdout)["serving"]
    assert serving["block_size"] == 16 and serving["kv_pool_tokens"] % 16 == 0 and serving["kv_pool_tokens"] > 0


@pytest.mark.parametrize(("args", "needle"), [
    (("--engine", "sglang", "--kv-dtype", "int4"), "supported KV dtypes: bf16, fp16, fp32, fp8"),
    (("--engine", "vllm", "--kv-dtype", "int4"), "supported KV dtypes: bf16, fp16, fp32, fp8"),
    (("--engine", "llamacpp", "--quant", "q4_k_m", "--enforce-eager"), "enforce_eager is a vLLM knob"),
    (("--engine", "sglang", "--enforce-eager"), "not a knob of sglang"),
    (("--engine", "vllm", "--page-size", "16"), "not a knob of vllm"),
])
def test_cli_bad_serving_input_exits_2(runner, args: tuple[str, ...], needle: str) -> None:
    result = run_cli(runner, "estimate", "llama-3.1-8b", "--gpu", "h100", "--job", "infer", *args, code=2)
    err = result.stderr.strip()
    assert needle in err and "Traceback" not in err, err


def test_recipe_with_the_sglang_engine_is_checked(tmp_path: Path) -> None:
    import yaml

    from memplan.check import check_recipe

    recipe = {"model": "llama-3.1-8b", "hardware": {"gpu": "l40s", "cpu_ram": "64GiB"},
              "job": {"type": "infer", "context": 8192, "concurrency": 4},
              "fixed": {"engine": "sglang", "serve": {"mem_fraction_static": 0.85, "page_size": 16}},
              "min_headroom": "1%"}
    path = tmp_path / "sglang.yaml"
    path.write_text(yaml.safe_dump(recipe))
    outcome = check_recipe(path)
    assert outcome.status == "fits", outcome.reason
    serving = outcome.estimate.serving
    assert serving["block_size"] == 16 and serving["max_concurrency"] >= 4
