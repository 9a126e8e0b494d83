"""llama.cpp's attention graph inputs in the compute buffers (memplan.engines.llamacpp_inputs).

Since llama.cpp PR #14959 (Aug 2025) KV writes are ``ggml_set_rows`` with I64 index inputs (src/llama-kv-cache.cpp
``build_input_k_idxs``: n_ubatch; ``build_input_v_idxs``: n_ubatch × n_embd_v_gqa when the V cache is transposed, i.e.
without flash attention, else n_ubatch). Interleaved sliding-window models (Gemma-2/3) have a second KQ mask of
n_kv_swa × pad64(n_ubatch) and a second pair of index inputs (src/llama-graph.cpp ``build_attn_inp_kv_iswa``); the
SWA cache has min(n_ctx, pad256(n_swa + n_ubatch)) cells (src/llama-kv-cache-iswa.cpp), n_ctx with --swa-full.
Every graph input sits on the host and is copied into each GPU split that reads it, n_copies = 4 times under
pipeline parallelism (ggml/src/ggml-backend.cpp ``ggml_backend_sched_split_graph``).
"""

from __future__ import annotations

import json

import pytest
from conftest import run_cli

from memplan.engines import llamacpp, llamacpp_compute
from memplan.errors import MemplanError
from memplan.estimator import estimate
from memplan.memory.context import Context
from memplan.units import MiB

COPIES = 4  # GGML_SCHED_MAX_COPIES's default
UB = 512  # llama.cpp's default n_ubatch
I64, F32, F16 = 8, 4, 2


def _rows(est, device: int = 0) -> dict[str, int]:
    ctx = Context(est.arch, est.config, est.gpu, est.host).at_stage(device)
    return {r.component: r.bytes for r in llamacpp.rows(ctx)}


def _command_r(**serve: object):
    # The Command-R layer split of tests/test_llamacpp_pipeline.py (PR #6122's log), on a build with ggml_set_rows.
    return estimate("command-r", "rtx-4090", job="infer", engine="llamacpp", quant="q4_k_m", pp=2, gpus_per_node=2,
                    infer={"context": 4096}, serve={"flash_attn": False, "tensor_split": (12.0, 29.0), **serve})


def test_command_r_two_gpus_without_flash_attention_holds_four_v_idxs() -> None:
    new, old = _rows(_command_r(), 0), _rows(_command_r(llama_set_rows=False), 0)
    # Command-R has no GQA: n_embd_v_gqa = 64 KV heads × 128 = 8192. v_idxs: 512 × 8192 I64 = 32 MiB, k_idxs 4 KiB,
    # four copies each on each GPU with layers.
    v_idxs, k_idxs = UB * 8192 * I64, UB * I64
    assert COPIES * v_idxs == 128 * MiB
    for device in range(2):
        a, b = _rows(_command_r(), device), _rows(_command_r(llama_set_rows=False), device)
        assert a["activations/llamacpp_compute"] - b["activations/llamacpp_compute"] == COPIES * (v_idxs + k_idxs)
        assert a["activations/llamacpp_host_compute"] - b["activations/llamacpp_host_compute"] == \
            COPIES * (v_idxs + k_idxs)
    # The 2024 log's 672.01 MiB (PR #6122) plus the copies: 800.02 MiB on a current build.
    assert round(old["activations/llamacpp_compute"] / MiB, 2) == 672.01
    assert round(new["activations/llamacpp_compute"] / MiB, 2) == 800.02


def test_flash_attention_keeps_one_index_per_token() -> None:
    # With flash attention the V cache is not transposed: v_idxs is 512 I64 like k_idxs; 4 copies of both.
    a, b = _rows(_command_r(flash_attn=True), 1), _rows(_command_r(flash_attn=True, llama_set_rows=False), 1)
    assert a["activations/llamacpp_compute"] - b["activations/llamacpp_compute"] == COPIES * 2 * UB * I64


def test_single_gpu_holds_one_copy_through_the_layers() -> None:
    # Llama-3.1-8B at n_ctx 16384 without flash attention, one GPU: the attention working set binds (KQ 16384 × 512 ×
    # 32 heads f32 > logits 512 × (128256 + 4096) f32) and the index inputs are alive next to it: 512 × 1024 + 512 I64.
    kw = {"job": "infer", "engine": "llamacpp", "quant": "q4_k_m", "infer": {"context": 16384}}
    new = estimate("llama-3.1-8b", "rtx-4090", **kw, serve={"flash_attn": False})
    old = estimate("llama-3.1-8b", "rtx-4090", **kw, serve={"flash_attn": False, "llama_set_rows": False})
    attention = 16384 * UB * 32 * F32 + 16384 * UB * F32 + 4 * 4096 * UB * F32
    assert _rows(old)["activations/llamacpp_compute"] == attention
    assert _rows(new)["activations/llamacpp_compute"] == attention + UB * 1024 * I64 + UB * I64


# Gemma-2-9B (google/gemma-2-9b config.json): 42 layers, even ones sliding (window 4096), 16 heads, 8 KV heads of 256,
# hidden 3584, FFN 14336, vocab 256000.
GEMMA2 = {"embd": 3584, "heads": 16, "v_gqa": 8 * 256, "ff": 14336, "vocab": 256000, "window": 4096}


def _gemma(context: int, **serve: object):
    return estimate("gemma-2-9b", "h100-sxm", job="infer", engine="llamacpp", quant="q4_k_m",
                    infer={"context": 4096}, serve={"n_ctx": context, **serve})


def test_gemma2_host_buffer_holds_both_masks() -> None:
    # n_ctx 32768: the SWA cache has min(32768, pad256(4096 + 512)) = 4608 cells. The host compute buffer holds the
    # f32 masks of both caches, the three int32 token inputs, two pairs of index inputs (flash attention: 512 I64
    # each) and token_embd's get_rows output.
    swa = 4608
    assert swa == -(-(GEMMA2["window"] + UB) // 256) * 256
    masks = (32768 + swa) * UB * F32
    idxs = 2 * (UB * I64 + UB * I64)
    expected = masks + 3 * UB * 4 + idxs + GEMMA2["embd"] * UB * F32
    assert _rows(_gemma(32768))["activations/llamacpp_host_compute"] == expected
    # --swa-full: the second mask has n_ctx rows, as on builds before the SWA cache (PR #13194).
    full = 2 * 32768 * UB * F32 + 3 * UB * 4 + idxs + GEMMA2["embd"] * UB * F32
    assert _rows(_gemma(32768, swa_full=True))["activations/llamacpp_host_compute"] == full


def test_gemma2_gpu_attention_without_flash_attention_counts_both_masks() -> None:
    # One GPU, no flash attention, n_ctx 32768: KQ of a full layer (32768 × 512 × 16 heads f32) binds, next to both f32
    # masks, both pairs of index inputs (v_idxs 512 × 2048 I64 each) and 4 hidden-size tensors.
    g = GEMMA2
    idxs = 2 * (UB * I64 + UB * g["v_gqa"] * I64)
    attention = 32768 * UB * g["heads"] * F32 + (32768 + 4608) * UB * F32 + idxs + 4 * g["embd"] * UB * F32
    assert attention > UB * (g["vocab"] + g["embd"]) * F32  # the logits do not bind
    assert _rows(_gemma(32768, flash_attn=False))["activations/llamacpp_compute"] == attention


def test_gemma2_pipeline_parallel_copies_both_f16_masks() -> None:
    # Two GPUs, flash attention: GPU 1 copies GPU 0's f16 casts of both masks, the hidden state, positions, output ids
    # and both pairs of index inputs, 4 times each, next to its largest working set (the logits here).
    g = GEMMA2
    est = estimate("gemma-2-9b", "h100-sxm", job="infer", engine="llamacpp", quant="q4_k_m", pp=2, gpus_per_node=2,
                   infer={"context": 4096}, serve={"n_ctx": 32768})
    held = (32768 + 4608) * UB * F16 + g["embd"] * UB * F32 + 2 * UB * 4 + 2 * (2 * UB * I64)
    logits = UB * (g["vocab"] + g["embd"]) * F32
    ffn = 3 * g["ff"] * UB * F32 + 4 * g["embd"] * UB * F32
    assert logits > ffn
    assert _rows(est, 1)["activations/llamacpp_compute"] == COPIES * held + logits


def test_gemma2_first_gpu_flash_attention_casts_each_mask() -> None:
    # One GPU, flash attention, n_ctx 32768 (SWA cache 4608 cells): the f32 mask copies are allocated at the split's
    # start and each is freed after its f16 cast; the casts stay alive through the layers.
    g = GEMMA2
    est = _gemma(32768)
    ctx = Context(est.arch, est.config, est.gpu, est.host)
    terms = llamacpp_compute.compute_terms(ctx, 32768, with_output=True)
    full, swa = 32768 * UB, 4608 * UB
    idxs = 2 * (2 * UB * I64)
    # Layer 0 slides: at its cast the SWA mask is f32 + f16 and the full mask f32; at layer 1's cast the SWA mask is
    # f16 and the full one f32 + f16 (the larger here).
    at_swa_cast, at_full_cast = swa * (F32 + F16) + full * F32, swa * F16 + full * (F32 + F16)
    assert at_full_cast > at_swa_cast
    assert terms["attention"] == at_full_cast + idxs + 4 * g["embd"] * UB * F32
    assert terms["ffn"] == (full + swa) * F16 + idxs + (3 * g["ff"] + 4 * g["embd"]) * UB * F32
    assert terms["logits"] == UB * (g["vocab"] + g["embd"]) * F32


def test_swa_full_without_a_sliding_window_is_refused() -> None:
    # Mistral-7B-v0.1 has a sliding_window in config.json, but llama.cpp's llama arch has no SWA cache.
    with pytest.raises(MemplanError, match="swa-full"):
        estimate("mistral-7b", "rtx-4090", job="infer", engine="llamacpp", quant="q4_k_m", serve={"swa_full": True})
    mistral = estimate("mistral-7b", "rtx-4090", job="infer", engine="llamacpp", quant="q4_k_m",
                       infer={"context": 8192}, serve={"flash_attn": False, "llama_set_rows": False})
    # One mask only: 8192 × 512 f32 on the host (with the token inputs and get_rows output).
    assert _rows(mistral)["activations/llamacpp_host_compute"] == 8192 * UB * F32 + 3 * UB * 4 + 4096 * UB * F32


def test_cli_knobs(runner) -> None:
    args = ("estimate", "gemma-2-9b", "--gpu", "h100-sxm", "--job", "infer", "--engine", "llamacpp", "--quant",
            "q4_k_m", "--n-ctx", "32768", "--format", "json")
    comp = "activations/llamacpp_host_compute"

    def host(*extra: str) -> int:
        out = json.loads(run_cli(runner, *args, *extra).stdout)
        return out["memory"]["cpu"]["components"][comp]

    assert host("--swa-full") - host() == (32768 - 4608) * UB * F32
    assert host() - host("--no-llama-set-rows") == 2 * (2 * UB * I64)
    vllm = run_cli(runner, "estimate", "llama-3.1-8b", "--gpu", "rtx-4090", "--job", "infer", "--engine", "vllm",
                   "--swa-full", code=2)
    assert "swa_full" in vllm.stderr


# Gemma-3-270M (google/gemma-3-270m config.json, the fields memplan reads): 18 layers, every 6th full, window 512,
# one KV head of 256.
GEMMA3_270M = {
    "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "hidden_size": 640, "intermediate_size": 2048,
    "num_hidden_layers": 18, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
    "vocab_size": 262144, "max_position_embeddings": 32768, "sliding_window": 512, "hidden_activation": "gelu_pytorch_tanh",
    "layer_types": ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(18)],
    "tie_word_embeddings": True, "torch_dtype": "bfloat16",
}


@pytest.mark.parametrize(("slots", "measured_mib"), [(1, 39), (2, 54), (4, 84)])
def test_gemma3_270m_kv_matches_llama_server(tmp_path, slots: int, measured_mib: int) -> None:
    # unsloth PR #7530 measured llama-server's KV (f16) for Gemma-3-270M at n_ctx 8192: 24 + 15 × slots MiB. Per cell
    # and layer K + V are 2 × 256 × 2 B = 1 KiB: 3 full layers × 8192 cells = 24 MiB; each slot's SWA stream holds
    # pad256(min(8192 / slots, 512 + 512)) = 1024 cells in 15 layers = 15 MiB.
    path = tmp_path / "config.json"
    path.write_text(json.dumps(GEMMA3_270M))
    est = estimate(str(path), "rtx-4090", job="infer", engine="llamacpp", quant="q8_0", micro_batch=slots,
                   infer={"context": 8192 // slots}, serve={"n_ctx": 8192})
    assert _rows(est)["kv_cache"] == measured_mib * MiB
    assert (3 * 8192 + 15 * slots * 1024) * 1024 == measured_mib * MiB
    full = estimate(str(path), "rtx-4090", est.config, serve={**est.config.serve.model_dump(), "swa_full": True})
    assert _rows(full)["kv_cache"] == 18 * 8192 * 1024  # --swa-full: every layer holds n_ctx cells


def test_gemma2_kv_cache_splits_into_full_and_sliding_layers() -> None:
    # Gemma-2-9B at n_ctx 32768: 21 full layers of 32768 cells, 21 sliding ones of 4608; K + V of 8 heads × 256 f16
    # = 8 KiB per cell and layer.
    per_cell = 2 * GEMMA2["v_gqa"] * 2
    assert _rows(_gemma(32768))["kv_cache"] == (21 * 32768 + 21 * 4608) * per_cell
    assert _rows(_gemma(32768, swa_full=True))["kv_cache"] == 42 * 32768 * per_cell
