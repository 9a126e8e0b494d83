"""llama.cpp's printed buffer sizes, reproduced (memplan.engines.llamacpp).

llama.cpp prints MiB with two decimals; deterministic buffers (model, KV) must round to the same figure,
the compute buffer (ggml-alloc's graph allocator, approximated) within 0.01 MiB.
Logs: (a) developer0hye/llama-3-korean-bllossom-8b-q4-docker README: Llama-3-8B Q4_K_M (file type 15), all 33
layers on an RTX 3070, n_ctx 512, n_ubatch 512, flash_attn 0; (b) an ollama server log (Aug 2024):
Llama-3-8B Q4_0, n_ctx 8192, flash_attn 0; (c) a llama-cpp-python log: TheBloke llama-2-7b.Q4_K_M.gguf,
33/33 layers, n_ctx 2048. Llama-3.1-8B has Llama-3-8B's tensor shapes. All three are 2024 builds, before llama.cpp's
``ggml_set_rows`` KV writes (PR #14959, Aug 2025): ``llama_set_rows`` off.
"""

from __future__ import annotations

import pytest

from memplan.errors import MemplanError
from memplan.estimator import estimate
from memplan.search import largest_fitting
from memplan.units import MiB


def _mib(model: str, quant: str, context: int, **serve: object) -> dict[str, float]:
    est = estimate(model, "rtx-4090", job="infer", engine="llamacpp", quant=quant, infer={"context": context},
                   serve={"flash_attn": False, "llama_set_rows": False, **serve})
    return {r.component: r.bytes / MiB for r in est.rows}


def test_llama3_8b_q4_k_m_n_ctx_512() -> None:
    got = _mib("llama-3.1-8b", "q4_k_m", 512)
    assert round(got["weights/llamacpp_gpu"], 2) == 4403.49   # CUDA0 buffer size
    assert round(got["weights/llamacpp_host"], 2) == 281.81   # CPU buffer size (token_embd)
    assert round(got["kv_cache"], 2) == 64.00                 # CUDA0 KV buffer size
    assert round(got["activations/llamacpp_output"], 2) == 0.49  # CUDA_Host output buffer size
    assert abs(got["activations/llamacpp_compute"] - 258.50) <= 0.01  # CUDA0 compute buffer size


def test_llama3_8b_n_ctx_8192() -> None:
    got = _mib("llama-3.1-8b", "q4_0", 8192)
    assert round(got["weights/llamacpp_host"], 2) == 281.81
    assert round(got["kv_cache"], 2) == 1024.00
    assert abs(got["activations/llamacpp_compute"] - 560.00) <= 0.01


def test_llama2_7b_q4_k_m_n_ctx_2048() -> None:
    got = _mib("llama-2-7b", "q4_k_m", 2048)
    assert round(got["weights/llamacpp_gpu"], 2) == 3820.94   # includes ggml-cuda's row padding of ffn_down (11008)
    assert round(got["weights/llamacpp_host"], 2) == 70.31
    assert round(got["kv_cache"], 2) == 1024.00
    assert abs(got["activations/llamacpp_compute"] - 164.01) <= 0.01


def test_kv_bytes_by_cache_type() -> None:
    # q8_0: 34 bytes per 32 values; q4_0: 18 per 32 (ggml type traits); K+V, 32 layers, 1024 values per row.
    f16 = _mib("llama-3.1-8b", "q4_k_m", 4096)["kv_cache"] * MiB
    q8 = _mib("llama-3.1-8b", "q4_k_m", 4096, cache_type_k="q8_0", cache_type_v="q8_0", flash_attn=True)["kv_cache"]
    q4 = _mib("llama-3.1-8b", "q4_k_m", 4096, cache_type_k="q4_0", cache_type_v="q4_0", flash_attn=True)["kv_cache"]
    assert f16 == 4096 * 32 * 2 * 1024 * 2
    assert q8 * MiB == 4096 * 32 * 2 * (1024 // 32) * 34
    assert q4 * MiB == 4096 * 32 * 2 * (1024 // 32) * 18


def test_partial_offload_moves_layers_and_their_kv_to_the_host() -> None:
    full = _mib("llama-3.1-8b", "q4_k_m", 4096)
    part = _mib("llama-3.1-8b", "q4_k_m", 4096, n_gpu_layers=16)
    assert part["kv_cache"] == full["kv_cache"] / 2 and part["kv_cache/host"] == full["kv_cache"] / 2
    assert part["weights/llamacpp_gpu"] < full["weights/llamacpp_gpu"] / 2 + 1  # output layer stays on the host too
    total = full["weights/llamacpp_gpu"] + full["weights/llamacpp_host"]
    assert part["weights/llamacpp_gpu"] + part["weights/llamacpp_host"] == pytest.approx(total, abs=0.02)


def test_no_pytorch_rows() -> None:
    est = estimate("llama-3.1-8b", "rtx-4090", job="infer", engine="llamacpp", quant="q4_k_m")
    names = {r.component for r in est.rows}
    assert "runtime/allocator_reserve" not in names and "runtime/cuda_context" not in names


def test_qwen25_32b_q4_k_m_rtx4090_context() -> None:
    # Issue 12: llama.cpp fits about 18k tokens of f16 KV for Qwen2.5-32B Q4_K_M on an RTX 4090 (memplan said 7,671).
    est = estimate("qwen2.5-32b", "rtx-4090", job="infer", engine="llamacpp", quant="q4_k_m",
                   infer={"context": 4096}, serve={"flash_attn": False})
    s = largest_fitting(est, "context")
    # The "about 18k" budgets nvidia-smi's 24,564 MiB; llama.cpp gets the CUDA runtime's 24,210 MiB (deviceQuery,
    # catalog quote), 354 MiB less: at 64 layers × 8 KV heads × 128 × (K, V) × 2 B per token, that many tokens fewer.
    fewer = (24_564 - 24_210) * 2**20 // (64 * 8 * 128 * 2 * 2)
    assert abs(s - (18_000 - fewer)) <= 1_800, (s, fewer)
    with_fa = largest_fitting(estimate("qwen2.5-32b", "rtx-4090", est.config, serve={"flash_attn": True}), "context")
    assert with_fa > s  # flash attention drops the n_kv × n_ubatch × n_head scores from the compute buffer


def test_bad_llamacpp_knobs() -> None:
    with pytest.raises(MemplanError, match="enforce_eager"):
        estimate("llama-3.1-8b", "rtx-4090", job="infer", engine="llamacpp", quant="q4_k_m", serve={"enforce_eager": True})
    with pytest.raises(MemplanError, match="flash attention"):
        estimate("llama-3.1-8b", "rtx-4090", job="infer", engine="llamacpp", quant="q4_k_m",
                 serve={"cache_type_v": "q4_0", "flash_attn": False})
    with pytest.raises(MemplanError, match="supported"):
        estimate("llama-3.1-8b", "rtx-4090", job="infer", engine="llamacpp", quant="q4_k_m",
                 infer={"kv_dtype": "int8"})
