"""llama.cpp under -ngl partial offload: the first GPU runs the CPU layers' large-batch ops with their weights copied
into its compute buffer (memplan.engines.llamacpp_offload; ggml-backend.cpp ``ggml_backend_sched_backend_id_from_cur``,
ggml-cuda.cu ``ggml_backend_cuda_device_offload_op``: batches of at least 32 rows).

No printed log of a partial-offload compute buffer was found to reproduce; the output-layer case is checked against
ollama's estimator, which models the same copy (ollama fs/ggml/ggml.go ``GraphSize``, llama partial offload:
4·batch·embedding + 4·batch·(embedding + vocab) + embedding·vocab·105/128, the output matrix at Q6_K).
"""

from __future__ import annotations

from memplan.engines import llamacpp
from memplan.estimator import estimate
from memplan.memory.context import Context

EMBD, VOCAB, UB = 4096, 128256, 512  # Llama-3.1-8B, llama.cpp's default n_ubatch
Q6_K_BYTES_PER_256 = 210  # ggml type traits: 256 values in 210 bytes
KV_IDXS = UB * 8 + UB * (8 * 128) * 8  # ggml_set_rows' I64 k_idxs (n_ubatch) and v_idxs (n_ubatch × n_embd_v_gqa, no FA)


def _compute(device: int = 0, **kw: object) -> int:
    serve = {"flash_attn": False, **kw.pop("serve", {})}  # type: ignore[dict-item]
    est = estimate("llama-3.1-8b", "rtx-4090", job="infer", engine="llamacpp", quant="q4_k_m",
                   infer={"context": 8192}, serve=serve, **kw)
    ctx = Context(est.arch, est.config, est.gpu, est.host).at_stage(device)
    return next(r.bytes for r in llamacpp.rows(ctx) if r.component == "activations/llamacpp_compute")


def test_output_layer_on_the_cpu_is_copied_to_the_gpu() -> None:
    # -ngl 32: every repeating layer on the GPU, the output layer (Q6_K matrix, f32 norm) on the CPU.
    out_matrix = VOCAB * EMBD // 256 * Q6_K_BYTES_PER_256
    expected = out_matrix + EMBD * 4 + UB * (VOCAB + EMBD) * 4 + EMBD * UB * 4
    assert _compute(serve={"n_gpu_layers": 32}) == expected
    ollama = 4 * UB * EMBD + 4 * UB * (EMBD + VOCAB) + EMBD * VOCAB * 105 // 128
    assert abs(expected - ollama) <= EMBD * 4  # the same up to the output norm's f32 weights


def test_no_op_offload_and_small_ubatch_keep_the_cpu_ops_on_the_cpu() -> None:
    # No output layer and no copy: KQ (8192 × 512 × 32 heads f32) + the f32 mask + the KV index inputs + 4 hidden-size
    # tensors.
    attention = 8192 * UB * 32 * 4 + 8192 * UB * 4 + KV_IDXS + 4 * EMBD * UB * 4
    assert _compute(serve={"n_gpu_layers": 32, "op_offload": False}) == attention
    small = 16  # below GGML_OP_OFFLOAD_MIN_BATCH (32)
    small_idxs = small * 8 + small * 1024 * 8
    assert _compute(serve={"n_gpu_layers": 32, "n_ubatch": small}) == \
        8192 * small * 32 * 4 + 8192 * 64 * 4 + small_idxs + 4 * EMBD * small * 4


def test_only_the_first_gpu_takes_the_offloaded_ops() -> None:
    # -ngl 20 over two GPUs: layers 12..31 split between them, 12 layers and the output on the CPU.
    kw = {"pp": 2, "gpus_per_node": 2}
    first = _compute(0, serve={"n_gpu_layers": 20}, **kw)
    second = _compute(1, serve={"n_gpu_layers": 20}, **kw)
    assert second == 8192 * UB * 32 * 4 + 8192 * UB * 4 + KV_IDXS + 4 * EMBD * UB * 4
    assert first == VOCAB * EMBD // 256 * Q6_K_BYTES_PER_256 + EMBD * 4 + UB * (VOCAB + EMBD) * 4 + EMBD * UB * 4


def test_no_gpu_layer_still_runs_the_offloaded_ops() -> None:
    assert _compute(serve={"n_gpu_layers": 0}) == _compute(serve={"n_gpu_layers": 32})


def test_host_holds_the_cpu_output_layer_on_every_gpu_of_a_split() -> None:
    # -ngl 32 over two GPUs: the output layer (Q6_K matrix + f32 norm) is in host memory next to token_embd (Q4_K_M
    # keeps it Q4_K: 128256 × 4096 / 256 × 144 bytes), whichever GPU's rows are reported (it was counted only with the
    # last GPU's).
    est = estimate("llama-3.1-8b", "rtx-4090", job="infer", engine="llamacpp", quant="q4_k_m", pp=2, gpus_per_node=2,
                   serve={"n_gpu_layers": 32})
    ctx = Context(est.arch, est.config, est.gpu, est.host)
    host = VOCAB * EMBD // 256 * 144 + VOCAB * EMBD // 256 * Q6_K_BYTES_PER_256 + EMBD * 4
    for device in range(2):
        rows = {r.component: r.bytes for r in llamacpp.rows(ctx.at_stage(device))}
        assert rows["weights/llamacpp_host"] == host


def test_no_op_offload_keeps_the_cpu_layers_working_set_on_the_host() -> None:
    # --no-op-offload, -ngl 20: the CPU runs its 12 layers itself; its compute buffer holds the graph inputs (f32 mask,
    # 3 int32 token inputs, the KV index inputs, token_embd's get_rows output) next to one layer's attention working
    # set, which reads the mask and the indices in place (the CPU's own inputs, not copies).
    est = estimate("llama-3.1-8b", "rtx-4090", job="infer", engine="llamacpp", quant="q4_k_m", infer={"context": 8192},
                   serve={"flash_attn": False, "n_gpu_layers": 20, "op_offload": False})
    host = next(r.bytes for r in est.rows if r.component == "activations/llamacpp_host_compute")
    inputs = 8192 * UB * 4 + 3 * UB * 4 + KV_IDXS + EMBD * UB * 4
    assert host == inputs + 8192 * UB * 32 * 4 + 4 * EMBD * UB * 4
    offloaded = estimate("llama-3.1-8b", "rtx-4090", est.config, serve={**est.config.serve.model_dump(), "op_offload": True})
    assert next(r.bytes for r in offloaded.rows if r.component == "activations/llamacpp_host_compute") == inputs
