"""fp8 copies of the matmul weights (``memory.fp8_weights``): the bytes written out here from the model dimensions and
each engine's storage (TransformerEngine's cached or saved row- and column-wise copies, torchao's one per-GEMM cast),
never from memplan's output."""

from __future__ import annotations

import pytest

import memplan
from memplan.memory.breakdown import Phase

# Llama-3.1-8B (config.json): hidden 4096, 32 layers, intermediate 14336, 8 KV heads of 128, vocab 128256, untied.
H, L, F, V, KV = 4096, 32, 14336, 128256, 8 * 128
SHAPES = [(H, H), (KV, H), (KV, H), (H, H), (F, H), (F, H), (H, F)]
"""q, k, v, o, gate, up, down of one block: (out, in)."""
LINEAR = L * sum(r * c for r, c in SHAPES)
SCALE = 4
"""One fp32 scale_inv (Float8Tensor) or one fp32 scale per 128 x 128 block (Float8BlockwiseQTensor)."""


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _row(est, name: str = "weights/fp8_copies"):
    return next((r for r in est.rows if r.component == name), None)


def _llama(**kw):
    return memplan.estimate("llama-3.1-8b", "h100-sxm-80gb", **{"job": "full", **kw})


def test_megatron_perf_fp8_counts_te_cached_weights_like_dtype_fp8() -> None:
    """``perf.fp8`` (fp8 GEMMs over bf16 weights) and ``dtype: fp8`` are the same TE run: each TE linear's cached
    workspace holds the data and its transpose (Hopper) and one scale: 2n + 4 per weight; the output layer has none."""
    expected = 2 * LINEAR + SCALE * 7 * L
    by_flag = _row(_llama(engine="megatron", perf={"fp8": True}))
    by_dtype = _row(_llama(engine="megatron", dtype="fp8"))
    assert by_flag.bytes == by_dtype.bytes == expected
    assert Phase.OPTIMIZER in by_flag.phases  # the workspace is a module attribute: alive through the step


@pytest.mark.parametrize(("recipe", "per_weight"), [
    ("mxfp8", lambda r, c: 2 * (r * c + _cdiv(r * c, 32))),  # row- and column-wise data, one E8M0 byte per 32
    ("blockwise", lambda r, c: 2 * r * c + 2 * SCALE * _cdiv(r, 128) * _cdiv(c, 128)),  # 128 x 128 weight blocks
    ("tensorwise", lambda r, c: 2 * r * c + SCALE),
])
def test_megatron_recipes_store_their_weight_scales(recipe, per_weight) -> None:
    est = _llama(engine="megatron", perf={"fp8": True}, engine_config={"fp8_recipe": recipe})
    assert _row(est).bytes == L * sum(per_weight(r, c) for r, c in SHAPES)


def test_megatron_tp_splits_the_copies() -> None:
    """tp 2: every weight's elements halve (all of llama's dims are even), one scale per weight each rank."""
    est = _llama(engine="megatron", perf={"fp8": True}, tp=2, gpus_per_node=2)
    assert _row(est).bytes == LINEAR + SCALE * 7 * L


def test_deepspeed_accelerate_saves_te_linear_weights_but_not_the_experts() -> None:
    """Qwen3-30B-A3B (config.json: hidden 2048, 48 layers, 32 heads and 4 KV heads of 128, 128 experts, vocab 151936)
    under deepspeed: accelerate swaps q, k, v, o, the router and lm_head (every dim a multiple of 16) for te.Linear;
    the grouped experts are parameters and stay 16-bit. Each te.Linear saves its quantized weight (2n + 4) for
    backward: alive until backward, not in the optimizer step."""
    d, heads, kv, experts, layers, vocab = 2048, 32 * 128, 4 * 128, 128, 48, 151936
    shapes = [(heads, d), (kv, d), (kv, d), (d, heads), (experts, d)]
    expected = layers * sum(2 * r * c + SCALE for r, c in shapes) + 2 * vocab * d + SCALE
    for kw in ({"perf": {"fp8": True}}, {"dtype": "fp8"}):
        est = memplan.estimate("qwen3-30b-a3b", "h100-sxm-80gb", job="full", engine="deepspeed", zero=3,
                               gpus_per_node=8, seq_len=4096, **kw)
        row = _row(est)
        assert row.bytes == expected and Phase.OPTIMIZER not in row.phases


def test_torchao_casts_one_weight_at_a_time() -> None:
    """fsdp2 (torchao float8): each GEMM's weight is cast and dropped; the largest cast is llama's lm_head, V x H
    elements with one scale."""
    assert _row(_llama(engine="fsdp2", gpus_per_node=8, perf={"fp8": True})).bytes == V * H + SCALE


def test_no_copies_without_fp8_gemms() -> None:
    assert _row(_llama(engine="megatron")) is None


# --- deepspeed + fp8 (accelerate's te.Linear) saved inputs of an MoE block: memory.accelerate_fp8 -------------------

T = 4096
"""Tokens per micro-batch (one sequence)."""


def _layers_bytes(model: str, **kw) -> int:
    est = memplan.estimate(model, "h100-sxm-80gb", job="full", engine="deepspeed", zero=3, gpus_per_node=8,
                           micro_batch=1, seq_len=T, **kw)
    return next(r.bytes for r in est.rows if r.component == "activations/layers")


def _copy(count: int) -> int:
    """A te.Linear's saved input under accelerate's delayed recipe: 1 byte per element and one fp32 scale_inv."""
    return count + SCALE


def test_deepspeed_fp8_moe_block_keeps_te_linear_input_copies() -> None:
    """Qwen3-30B-A3B, 48 MoE blocks (hidden 2048, 32 heads of 128): q, k and v quantize the norm output apart (three
    copies in place of the shared 16-bit one), o_proj a copy beside SDPA's output (4096 wide), the router a copy beside
    the 16-bit norm output the grouped experts keep."""
    d, nh, layers = 2048, 32 * 128, 48
    per_block = 3 * _copy(T * d) - 2 * T * d + _copy(T * nh) + _copy(T * d)
    assert _layers_bytes("qwen3-30b-a3b", perf={"fp8": True}) - _layers_bytes("qwen3-30b-a3b") == layers * per_block


def test_deepspeed_fp8_mla_moe_block_with_shared_experts() -> None:
    """DeepSeek-V2-Lite: 26 MoE blocks of 27 (the first is dense, its 16-bit count kept). q_proj and
    kv_a_proj_with_mqa read the norm output (two copies for the shared 16-bit one), o_proj reads 16 heads x v 128,
    the router and the shared experts' gate and up each copy the post-attention norm output."""
    d, nv, moe_layers = 2048, 16 * 128, 26
    per_block = 2 * _copy(T * d) - 2 * T * d + _copy(T * nv) + 3 * _copy(T * d)
    assert _layers_bytes("deepseek-v2-lite", perf={"fp8": True}) - _layers_bytes("deepseek-v2-lite") == \
        moe_layers * per_block


def test_deepspeed_fp8_dense_block_keeps_its_16_bit_count() -> None:
    """A dense block's 16-bit count is above what TE saves (B·S·(2D − F) ≤ 0, memory.te_fp8): unchanged."""
    assert _layers_bytes("llama-3.1-8b", perf={"fp8": True}) == _layers_bytes("llama-3.1-8b")


def test_deepspeed_pipeline_saves_one_copy_per_micro_batch_in_flight() -> None:
    """te.Linear quantizes its weight at every forward and saves it for that micro-batch's backward (nothing cached
    without ``is_first_microbatch``): under DeepSpeed's pipeline (1F1B ``TrainSchedule``) stage s holds
    min(p − s, m) micro-batches' copies (Narayanan et al. 2021, Sec. 2.2.1): 2 on the first of p = 2 stages, 1 on
    the last; the step's m alone changes nothing."""
    from memplan.arch.build import build_architecture
    from memplan.catalog.store import catalog_gpu, catalog_model
    from memplan.config import JobConfig
    from memplan.memory.context import Context
    from memplan.memory.engine_states import fp8_rows

    arch = build_architecture(catalog_model("llama-3.1-8b"))

    def copies(stage: int, m: int) -> int:
        cfg = JobConfig(job="pretrain", engine="deepspeed", gpus_per_node=2, pp=2, grad_accum=m, dtype="fp8")
        (row,) = fp8_rows(Context(arch, cfg, catalog_gpu("h100-sxm-80gb"), None).at_stage(stage))
        return row.bytes

    assert copies(0, 4) == 2 * copies(0, 1)
    assert copies(1, 4) == copies(1, 1)
