"""fp8 training's saved activations (``memory.te_fp8``): each difference to the 16-bit count is written out here from
the model dimensions and TransformerEngine's/Megatron-Core's rules (a quantized Linear input: 1 byte per element plus
its scales, in place of 2 bytes; linear_proj's quantized copy beside the attention's 16-bit output under the delayed
recipe; the SwiGLU input cast to float8_e4m3fn), never from memplan's output."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from memplan.arch.build import build_architecture
from memplan.catalog.store import catalog_gpu, catalog_model
from memplan.config import JobConfig, Recompute
from memplan.engines.rules import violation
from memplan.errors import MemplanError
from memplan.estimator import estimate
from memplan.memory import activations as act
from memplan.memory.context import Context

sys.path.insert(0, str(Path(__file__).parent))
from test_published_runs import DEEPSEEK_MEGATRON, RUNS

SCALE = 4
"""One fp32 scale_inv per Float8Tensor (delayed/tensorwise recipes)."""
BLOCK = 128
"""Blockwise recipe: one fp32 scale per 128 elements."""

# llama-3.1-8b (config.json): hidden 4,096, 32 heads of 128, 8 kv heads, intermediate 14,336, 32 layers.
D8, F8, T8, L8 = 4096, 14336, 4096, 32
# DeepSeek-V3 (DeepSeek-AI 2024, Sec. 4.2): hidden 7,168, 128 heads, v 128, q_lora 1,536, kv_lora 512, routed experts
# of 2,048 (top-8 of 256 over EP 64) and one shared expert of 2,048; one 4,096-token sequence per micro-batch.
H, N, V, QL, KL, F, TOP_K, EXPERTS, EP, T = 7168, 128, 128, 1536, 512, 2048, 8, 256, 64, 4096
PAIRS, LOCAL = T * TOP_K, EXPERTS // EP


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _layers(model: str, **cfg: object) -> int:
    est = estimate(catalog_model(model), catalog_gpu("h100-sxm-80gb"), JobConfig(**cfg))
    return next(r.bytes for r in est.rows if r.component == "activations/layers")


LLAMA = {"job": "pretrain", "engine": "megatron", "tp": 1, "micro_batch": 1, "seq_len": T8, "recompute": "none"}


def test_dense_block_keeps_te_fp8_linear_inputs() -> None:
    """llama-3.1-8b, tp 1, S = 4,096, micro-batch 1, delayed recipe (Megatron's default): linear_qkv's and fc1's ln_out
    (D wide) and fc2's input (F) become 1-byte Float8Tensors with a scale; linear_proj adds a quantized copy of the
    attention output (N·H = D wide) that the fused attention keeps in 16 bits. Per layer:
    −(T·D − 4) − (T·D − 4) − (T·F − 4) + (T·D + 4)."""
    per_layer = -(T8 * D8 - SCALE) - (T8 * D8 - SCALE) - (T8 * F8 - SCALE) + (T8 * D8 + SCALE)
    bf16 = _layers("llama-3.1-8b", **LLAMA)
    assert _layers("llama-3.1-8b", **LLAMA, perf={"fp8": True}) - bf16 == L8 * per_layer
    assert _layers("llama-3.1-8b", **LLAMA, dtype="fp8") - bf16 == L8 * per_layer


def test_dense_block_tensorwise_recipe_and_fp8_swiglu_store() -> None:
    """Any recipe but delayed: Megatron calls set_save_original_input on linear_proj (no copy). With
    --activation-func-fp8-input-store the SwiGLU's 2F input is a plain float8_e4m3fn cast, 1 byte instead of 2."""
    per_layer = -(T8 * D8 - SCALE) - (T8 * D8 - SCALE) - (T8 * F8 - SCALE) - T8 * 2 * F8
    bf16 = _layers("llama-3.1-8b", **LLAMA)
    fp8 = _layers("llama-3.1-8b", **LLAMA, perf={"fp8": True},
                  engine_config={"fp8_recipe": "tensorwise", "activation_func_fp8_input_store": True})
    assert fp8 - bf16 == L8 * per_layer
    store_only = _layers("llama-3.1-8b", **LLAMA, engine_config={"activation_func_fp8_input_store": True})
    assert store_only - bf16 == -L8 * T8 * 2 * F8  # the store acts without fp8 GEMMs too


def test_checkpointed_core_attention_leaves_linear_proj_the_only_copy() -> None:
    """Megatron's default selective module core_attn checkpoints the core attention (attention.py
    ``_checkpointed_attention_forward``): it keeps no output, so under the delayed recipe linear_proj's quantized copy
    replaces the 16-bit one instead of adding to it."""
    per_layer = -(T8 * D8 - SCALE) - (T8 * D8 - SCALE) - (T8 * F8 - SCALE) - (T8 * D8 - SCALE)
    cfg = {**LLAMA, "recompute": "selective"}
    assert _layers("llama-3.1-8b", **cfg, perf={"fp8": True}) - _layers("llama-3.1-8b", **cfg) == L8 * per_layer


def test_sequence_parallel_saves_the_local_shard() -> None:
    """tp 2 with sequence parallelism: linear_qkv and fc1 quantize and save their local S/2 rows (rowwise, re-gathered
    in backward: layernorm_linear.py ``ln_out_needs_gather``); linear_proj's input is N/2 heads, fc2's F/2 wide."""
    tp, half = 2, T8 // 2
    per_layer = -(half * D8 - SCALE) - (half * D8 - SCALE) - (T8 * F8 // tp - SCALE) + (T8 * D8 // tp + SCALE)
    cfg = {**LLAMA, "tp": tp, "sequence_parallel": True, "gpus_per_node": tp}
    assert _layers("llama-3.1-8b", **cfg, perf={"fp8": True}) - _layers("llama-3.1-8b", **cfg) == L8 * per_layer


def test_torchao_saves_high_precision_inputs() -> None:
    """torchao float8 (fsdp2): matmul_with_hp_or_float8_args saves input_hp: the saved activations do not change."""
    cfg = {"job": "pretrain", "engine": "fsdp2", "micro_batch": 1, "seq_len": 2048, "recompute": "none"}
    assert _layers("llama-3.1-8b", **cfg, perf={"fp8": True}) == _layers("llama-3.1-8b", **cfg)


def _moe_layer_bytes(cfg: JobConfig, mode: Recompute) -> int:
    run = next(r for r in RUNS if r.id == "deepseek-v3")
    ctx = Context(build_architecture(run.spec()), cfg, catalog_gpu(run.gpu), run.host).at_stage(1)
    layer = ctx.layers[0][0]
    assert ctx.arch.layers[layer].moe
    return act.layer_micro_bytes(ctx, layer, mode)


def _deepseek(fp8: bool, **engine: object) -> JobConfig:
    run = next(r for r in RUNS if r.id == "deepseek-v3")
    return JobConfig(**{**run.cfg, "perf": {**run.cfg["perf"], "fp8": fp8},
                        "engine_config": {**DEEPSEEK_MEGATRON, **engine}})


def test_moe_layer_delayed_recipe_without_recompute() -> None:
    """A DeepSeek-V3 MoE layer, no recompute, delayed recipe: q_down and kv_down each quantize the norm output (two
    copies for one 16-bit tensor); q_up/kv_up's ln_out; linear_proj's copy (N·V); the routed experts' fc1 and fc2
    inputs (one Float8Tensor per local expert); the shared expert's fc1 copy of the norm output the router keeps, and
    its fc2 input."""
    two_copies = 2 * (T * H + SCALE) - 2 * T * H
    latents = (T * QL + SCALE - 2 * T * QL) + (T * KL + SCALE - 2 * T * KL)
    proj = T * N * V + SCALE
    routed = (PAIRS * H + LOCAL * SCALE - 2 * PAIRS * H) + (PAIRS * F + LOCAL * SCALE - 2 * PAIRS * F)
    shared = (T * H + SCALE) + (T * F + SCALE - 2 * T * F)
    knobs = {"fp8_recipe": "delayed", "activation_func_fp8_input_store": False}
    diff = (_moe_layer_bytes(_deepseek(True, **knobs), Recompute.NONE)
            - _moe_layer_bytes(_deepseek(False, **knobs), Recompute.NONE))
    assert diff == two_copies + latents + proj + routed + shared


def test_moe_layer_published_knobs() -> None:
    """The published run's knobs (blockwise, fp8 SwiGLU store, layernorm and mla_up_proj recompute): the down/up
    projections save originals that the recompute discards, linear_proj and the shared fc1 save originals; left are
    the routed fc1 and fc2 inputs and the shared fc2 input (fp32 scale per 128 elements) and the SwiGLU inputs (2F,
    1 byte less each)."""
    def swap(count: int) -> int:
        return count + SCALE * _ceil(count, BLOCK) - 2 * count
    expected = swap(PAIRS * H) + swap(PAIRS * F) + swap(T * F) - PAIRS * 2 * F - T * 2 * F
    off = {"fp8_recipe": "delayed", "activation_func_fp8_input_store": False}
    diff = (_moe_layer_bytes(_deepseek(True), Recompute.SELECTIVE)
            - _moe_layer_bytes(_deepseek(False, **off), Recompute.SELECTIVE))
    assert diff == expected


def test_moe_act_keeps_the_sixteen_bit_swiglu_input() -> None:
    """With moe_act the checkpoint saves the 16-bit SwiGLU input and fc2 the original it discards (experts.py
    set_save_original_input): the routed experts change by their fc1 input only."""
    mods = {"recompute_modules": ("moe_act",), "fp8_recipe": "blockwise", "activation_func_fp8_input_store": True}
    off = {**mods, "fp8_recipe": "delayed", "activation_func_fp8_input_store": False}
    routed_fc1 = PAIRS * H + SCALE * _ceil(PAIRS * H, BLOCK) - 2 * PAIRS * H
    shared = T * F + SCALE * _ceil(T * F, BLOCK) - 2 * T * F - T * 2 * F
    two_copies = 2 * (T * H + SCALE * _ceil(T * H, BLOCK)) - 2 * T * H
    latents = sum(T * r + SCALE * _ceil(T * r, BLOCK) - 2 * T * r for r in (QL, KL))
    diff = (_moe_layer_bytes(_deepseek(True, **mods), Recompute.SELECTIVE)
            - _moe_layer_bytes(_deepseek(False, **off), Recompute.SELECTIVE))
    assert diff == routed_fc1 + shared + two_copies + latents


@pytest.mark.parametrize(("model", "cfg", "words"), [
    ("llama-3.1-8b", {"engine": "megatron", "engine_config": {"fp8_recipe": "blockwise"}}, "acts with fp8"),
    ("llama-3.1-8b", {"engine": "fsdp2", "perf": {"fp8": True}, "engine_config": {"fp8_recipe": "mxfp8"}},
     "knob of megatron"),
    ("gpt2", {"engine": "megatron", "engine_config": {"activation_func_fp8_input_store": True}}, "not a SwiGLU"),
])
def test_fp8_knobs_are_refused_where_they_do_not_act(model: str, cfg: dict, words: str) -> None:
    job = JobConfig(**{"job": "pretrain", "micro_batch": 1, "seq_len": 1024, **cfg})
    reason = violation(job)
    if reason is None:
        with pytest.raises(MemplanError, match=words):
            estimate(catalog_model(model), catalog_gpu("h100-sxm-80gb"), job)
    else:
        assert words in reason
