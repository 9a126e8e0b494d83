"""llama.cpp's pipeline parallelism under a layer split (memplan.engines.llamacpp_sched).

With several GPUs, -sm layer, every layer offloaded and the KV cache offloaded, src/llama-context.cpp passes
``parallel = true`` to ``ggml_backend_sched_new``, which keeps GGML_SCHED_MAX_COPIES (4) copies of each split input
and graph input (ggml/src/ggml-backend.cpp ``ggml_backend_sched_split_graph``), none of them ever freed.

Published logs (llama.cpp prints MiB with two decimals):
(a) ggml-org/llama.cpp PR #6122, Wuzzooy's log (March 2024, before ``ggml_set_rows``): Command-R 35B on an RTX
    4070 Ti + RTX 3090 Ti, 41/41 layers, n_ctx 4096, n_ubatch 512, flash attention off (not in that release),
    "pipeline parallelism enabled (n_copies=4)", CUDA0 KV 1536.00 MiB (12 layers), CUDA1 KV 3584.00 MiB, CUDA0
    compute buffer 672.01 MiB.
(b) ggml-org/llama.cpp PR #16748, LostRuins' log of koboldcpp issue #1882 (Dec 2025): Cydonia-24B (Mistral Small
    24B) Q8_0 on two GPUs, -ts 1,1, n_ctx 150272, n_ubatch 4096, flash attention on, n_copies=4: CUDA0/CUDA1 model
    buffers 11826.45 / 11380.14 MiB, CUDA_Host model buffer 680.00 MiB, KV 12327.00 / 11153.00 MiB, output buffer
    0.50 MiB, and "allocating 12710.31 MiB on device 0" for the CUDA0 compute buffer, 13327728640 bytes.
(c) fedora-copr/logdetective PR #106: Mistral-7B on one GPU, n_ubatch 512, flash attention off: CUDA0 compute
    164.00 / 2144.00 MiB and CUDA_Host compute 12.01 / 72.01 MiB at n_ctx 2048 / 32768.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli

from memplan.engines import llamacpp, llamacpp_sched
from memplan.errors import MemplanError
from memplan.estimator import estimate
from memplan.memory.context import Context
from memplan.units import MiB

COPIES = 4  # GGML_SCHED_MAX_COPIES's default (ggml/src/ggml-backend.cpp)

# Mistral-Small-24B-Base-2501's config.json (the fields memplan reads); Cydonia-24B is a fine-tune of it.
MISTRAL_SMALL_24B = {
    "architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 5120, "intermediate_size": 32768,
    "num_hidden_layers": 40, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "vocab_size": 131072, "max_position_embeddings": 32768, "rope_theta": 100000000.0, "rms_norm_eps": 1e-05,
    "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}


def _device_rows(est, device: int) -> dict[str, int]:
    ctx = Context(est.arch, est.config, est.gpu, est.host).at_stage(device)
    return {r.component: r.bytes for r in llamacpp.rows(ctx)}


def _command_r(**serve: object):
    serve = {"flash_attn": False, "tensor_split": (12.0, 29.0), "llama_set_rows": False, **serve}  # a 2024 build
    return estimate("command-r", "rtx-4090", job="infer", engine="llamacpp", quant="q4_k_m", pp=2, gpus_per_node=2,
                    infer={"context": 4096}, serve=serve)


def test_command_r_two_gpus_log() -> None:
    # -ts 12,29 puts 12 of the 41 offloaded layers on CUDA0, as the log's KV buffers show (llama.cpp split its free memory).
    gpu0, gpu1 = _device_rows(_command_r(), 0), _device_rows(_command_r(), 1)
    assert round(gpu0["kv_cache"] / MiB, 2) == 1536.00 and round(gpu1["kv_cache"] / MiB, 2) == 3584.00
    assert round(gpu0["weights/llamacpp_host"] / MiB, 2) == 1640.62  # "CPU buffer size": token_embd (Q6_K)
    assert abs(gpu0["activations/llamacpp_compute"] / MiB - 672.01) <= 0.01
    # The same figure from the scheduler's rules, written out: 4 copies of the hidden state (8192 × 512 f32), the f32
    # mask (4096 × 512) and the positions (512 int32), next to KQ (4096 × 512 × 64 heads f32) and 4 hidden-size tensors.
    held = COPIES * (8192 * 512 * 4 + 4096 * 512 * 4 + 512 * 4)
    assert gpu0["activations/llamacpp_compute"] == held + 4096 * 512 * 64 * 4 + 4 * 8192 * 512 * 4


def test_mistral_small_24b_flash_attention_log(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(MISTRAL_SMALL_24B))
    est = estimate(str(path), "rtx-4090", job="infer", engine="llamacpp", quant="q8_0", pp=2, gpus_per_node=2,
                   infer={"context": 4096}, serve={"n_ctx": 150272, "n_batch": 4096, "n_ubatch": 4096})
    gpu0, gpu1 = _device_rows(est, 0), _device_rows(est, 1)
    # Deterministic buffers, byte for byte as printed.
    assert round(gpu0["weights/llamacpp_gpu"] / MiB, 2) == 11826.45 and round(gpu1["weights/llamacpp_gpu"] / MiB, 2) == 11380.14
    assert round(gpu0["weights/llamacpp_host"] / MiB, 2) == 680.00
    assert gpu0["kv_cache"] == 12327 * MiB and gpu1["kv_cache"] == 11153 * MiB
    assert round(gpu0["activations/llamacpp_output"] / MiB, 2) == 0.50
    # The compute buffer: ggml-alloc's byte count is not closed-form. Held copies alone are 4 × (f32 mask of 150272 ×
    # 4096 + hidden 5120 × 4096 f32 + positions) = 9712 MiB, next to the f16 mask (1174 MiB) and the FFN's gate, up and
    # swiglu (3 × 32768 × 4096 f32), and 4 × (k_idxs + v_idxs) of 4096 I64 each (0.25 MiB; flash attention, a build
    # with ggml_set_rows); memplan is 32.00 MiB (0.25%) over the printed 13327728640 bytes. Without the copies it
    # would say about 3.4 GiB.
    published = 13_327_728_640
    got = gpu0["activations/llamacpp_compute"]
    held = COPIES * (150272 * 4096 * 4 + 5120 * 4096 * 4 + 4096 * 4)
    assert got > held + 150272 * 4096 * 2 + 3 * 32768 * 4096 * 4
    assert 0.0 <= (got - published) / published <= 0.005


def test_mistral_7b_host_compute_buffer() -> None:
    for context, host, gpu in ((2048, 12.01, 164.00), (32768, 72.01, 2144.00)):
        est = estimate("mistral-7b", "rtx-4090", job="infer", engine="llamacpp", quant="q4_k_m",
                       infer={"context": context}, serve={"flash_attn": False, "llama_set_rows": False})
        got = {r.component: r.bytes for r in est.rows}
        assert round(got["activations/llamacpp_host_compute"] / MiB, 2) == host
        assert abs(got["activations/llamacpp_compute"] / MiB - gpu) <= 0.01


@pytest.mark.parametrize(("pp", "ngl", "copies", "expected"), [
    (2, None, 4, 4), (2, 40, 4, 4), (2, 33, 4, 4), (2, 32, 4, 1), (2, 20, 4, 1), (1, None, 4, 1), (2, None, 1, 1),
    (3, None, 2, 2)])
def test_pipeline_parallel_switch(pp: int, ngl: int | None, copies: int, expected: int) -> None:
    # llama.cpp: n_devices > 1 && n_gpu_layers > n_layer (32 for Llama-3.1-8B) && -sm layer && offload_kqv.
    est = estimate("llama-3.1-8b", "rtx-4090", job="infer", engine="llamacpp", quant="q4_k_m", pp=pp,
                   gpus_per_node=pp, serve={"n_gpu_layers": ngl, "ggml_sched_max_copies": copies})
    assert llamacpp_sched.n_copies(est.config, 32) == expected


def test_partial_offload_over_two_gpus_has_one_copy() -> None:
    # -ngl 20 over two GPUs: 12 layers and the output stay on the CPU, no pipeline parallelism, so GPU 1's compute
    # buffer is the single-copy one, and the host holds the 12 layers' weights and KV.
    est = estimate("llama-3.1-8b", "rtx-4090", job="infer", engine="llamacpp", quant="q4_k_m", pp=2, gpus_per_node=2,
                   infer={"context": 8192}, serve={"n_gpu_layers": 20, "flash_attn": False})
    assert llamacpp_sched.n_copies(est.config, 32) == 1
    rows = _device_rows(est, 1)
    assert rows["kv_cache/host"] == 12 * 8192 * 2 * 1024 * 2
    # No output layer on GPU 1: KQ (8192 × 512 × 32 heads f32) + f32 mask + the I64 KV index inputs (k_idxs 512,
    # v_idxs 512 × 1024 without flash attention) + 4 hidden-size tensors. (GPU 0 also runs the CPU layers' offloaded
    # ops: tests/test_llamacpp_offload.py.)
    idxs = 512 * 8 + 512 * 1024 * 8
    assert rows["activations/llamacpp_compute"] == 8192 * 512 * 32 * 4 + 8192 * 512 * 4 + idxs + 4 * 4096 * 512 * 4


def test_knobs_that_move_no_byte_are_refused() -> None:
    kw = {"job": "infer", "engine": "llamacpp", "quant": "q4_k_m"}
    with pytest.raises(MemplanError, match="with one it moves no byte"):
        estimate("llama-3.1-8b", "rtx-4090", **kw, serve={"ggml_sched_max_copies": 2})
    with pytest.raises(MemplanError, match="layers on the CPU it moves no byte"):
        estimate("llama-3.1-8b", "rtx-4090", **kw, pp=2, gpus_per_node=2,
                 serve={"ggml_sched_max_copies": 2, "n_gpu_layers": 20})
    with pytest.raises(MemplanError, match="no-op-offload"):
        estimate("llama-3.1-8b", "rtx-4090", **kw, serve={"op_offload": False})


def test_copies_raise_every_gpu_and_the_host() -> None:
    kw = {"job": "infer", "engine": "llamacpp", "quant": "q4_k_m", "pp": 2, "gpus_per_node": 2,
          "infer": {"context": 32768}}
    four = estimate("llama-3.1-8b", "rtx-4090", **kw)
    one = estimate("llama-3.1-8b", "rtx-4090", **kw, serve={"ggml_sched_max_copies": 1})
    mask_f32, mask_f16 = 32768 * 512 * 4, 32768 * 512 * 2
    for device in range(2):
        a, b = _device_rows(four, device), _device_rows(one, device)
        assert a["activations/llamacpp_compute"] > b["activations/llamacpp_compute"]
    # GPU 1 takes GPU 0's f16 cast of the mask; its working set is the logits (512 × (128256 + 4096) f32), so the
    # copies add on top: 4 × (f16 mask + hidden + positions + output ids + KV index inputs, I64 k_idxs and v_idxs of
    # 512 tokens each under flash attention).
    idxs = 2 * 512 * 8
    gpu1 = _device_rows(four, 1)["activations/llamacpp_compute"]
    assert gpu1 == COPIES * (mask_f16 + 4096 * 512 * 4 + 2 * 512 * 4 + idxs) + 512 * (128256 + 4096) * 4
    host = _device_rows(four, 0)["activations/llamacpp_host_compute"]
    assert host == COPIES * (mask_f32 + 3 * 512 * 4 + idxs) + 4096 * 512 * 4


def test_cli_sched_copies(runner) -> None:
    args = ("estimate", "llama-3.1-8b", "--gpu", "rtx-4090", "--gpus", "2", "--pp", "2", "--job", "infer", "--engine",
            "llamacpp", "--quant", "q4_k_m", "--format", "json")
    four = json.loads(run_cli(runner, *args).stdout)["memory"]["gpu"]["components"]["activations/llamacpp_compute"]
    one = json.loads(run_cli(runner, *args, "--ggml-sched-max-copies", "1").stdout)
    assert one["memory"]["gpu"]["components"]["activations/llamacpp_compute"] < four
    bad = run_cli(runner, *args, "--ggml-sched-max-copies", "0", code=2)
    assert "ggml_sched_max_copies" in bad.stderr or "ggml-sched-max-copies" in bad.stderr
    vllm = run_cli(runner, "estimate", "llama-3.1-8b", "--gpu", "rtx-4090", "--job", "infer", "--engine", "vllm",
                   "--ggml-sched-max-copies", "2", code=2)
    assert "ggml_sched_max_copies" in vllm.stderr
