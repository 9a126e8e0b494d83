"""Megatron-Core's knobs for DeepSeek-V3 (``memory.megatron_recompute``, ``memory.megatron_optimizer``): each byte
count derived here from the DeepSeek-V3 technical report's dimensions (DeepSeek-AI 2024, arXiv:2412.19437, Sec. 4.2:
hidden 7,168, 61 layers, first 3 dense, 256 routed + 1 shared experts of 2,048, top-8, MLA q_lora 1,536, kv_lora 512,
128 heads, qk_nope 128, qk_rope 64, v 128) and the run of tests/test_published_runs.py (PP16, EP64, 2,048 GPUs, one
4,096-token sequence per micro-batch), never from memplan's output."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from memplan.arch.build import build_architecture
from memplan.catalog.store import catalog_gpu, catalog_model
from memplan.cli.app import app
from memplan.config import JobConfig, Recompute
from memplan.errors import MemplanError
from memplan.estimator import estimate
from memplan.memory import activations as act
from memplan.memory import megatron_recompute as mr
from memplan.memory.context import Context

sys.path.insert(0, str(Path(__file__).parent))
from test_published_runs import DEEPSEEK_MEGATRON, RUNS

H, QL, KL, N, NOPE, ROPE, V, F, EXPERTS, TOP_K = 7168, 1536, 512, 128, 128, 64, 128, 2048, 256, 8
T = 4096
PAIRS = T * TOP_K
EP, DP = 64, 2048 // 16
LOCAL_EXPERTS = EXPERTS // EP
STAGE_LAYERS = 4
"""Stage 1 of 16 (0-based) holds layers 3-6, all MoE: 61 layers split evenly, the 3 dense ones and the embedding on
stage 0."""
EXPERT_NUMEL = STAGE_LAYERS * LOCAL_EXPERTS * 3 * H * F
DENSE_NUMEL = STAGE_LAYERS * (H * QL + QL + QL * N * (NOPE + ROPE) + H * (KL + ROPE) + KL + KL * N * (NOPE + V)
                              + N * V * H + 2 * H + EXPERTS * H + 3 * H * F)
"""Per MoE layer: q_a, its norm, q_b, kv_a (with the rope key), its norm, kv_b, o; two block norms; the router; the
shared expert's gate, up, down (Sec. 2.1.1, Eq. 1-11)."""
F_DENSE = 18432
"""The dense layers' FFN width (the published config.json's ``intermediate_size``; the paper does not state it)."""
QK = N * (NOPE + ROPE)
"""Per-token width of q and of k, heads × (nope + rope) (Sec. 2.1.1, Eq. 3-5)."""

# One block's saved 16-bit tensors for one 4,096-token micro-batch under the paper's accounting (Korthikanti et al.
# 2022, Sec. 4: every tensor a backward reads, 2 bytes an element; no dropout in DeepSeek-V3, so no masks):
NORMS = 2 * (T * H * 2 + T * H * 2)
"""The block's two RMSNorms: each one's input and its output (the input of the linears after it)."""
LATENT = T * (QL + QL + KL + KL) * 2
"""q_a's output (the q-latent norm's input) and the norm's output (q_b's input); the same for the kv latent."""
QKV = T * (4 * QK + N * V) * 2
"""The fused attention kernel's q, k, v (v padded to the q/k width) and its padded output, 4 × N·192 per token, and
o_proj's input, the unpadded N·v (no S×S tensor: the kernel keeps only a per-row logsumexp, 0 under these rules)."""
EXPERTS_KEPT = PAIRS * (3 * 8 + 2 * H * 2 + 2 * F * 2 + 4) + EXPERTS * 4
"""Routed experts for T·k (token, expert) pairs: three int64 index tensors, the permuted input and un-permuted
output (H each), the SwiGLU's 2F input and an fp32 routing weight per pair; int32 per-expert offsets."""
EXPERTS_ALL = EXPERTS_KEPT + PAIRS * F * 2
"""... and the SwiGLU's output (fc2's input, F per pair), which ``moe_act`` drops."""
SHARED = T * (2 * F + F) * 2
"""The shared expert's SwiGLU input (gate and up, 2F) and output (F): its fc1 input is the norm's output."""
DENSE_MLP = T * (2 * F_DENSE + F_DENSE) * 2
"""A dense layer's SwiGLU input (2F) and output (F); its fc1 input is the norm's output."""


SIXTEEN_BIT = {**DEEPSEEK_MEGATRON, "recompute_modules": ("layernorm", "mla_up_proj", "moe_act"),
               "fp8_recipe": "delayed", "activation_func_fp8_input_store": False}
"""The published run's knobs with 16-bit saved tensors (fp8's are tests/test_te_fp8.py's) and moe_act."""


def _sixteen_bit(**engine_config: object) -> JobConfig:
    """The DeepSeek-V3 run without fp8 GEMMs, under ``SIXTEEN_BIT`` updated by ``engine_config``."""
    run = next(r for r in RUNS if r.id == "deepseek-v3")
    return JobConfig(**{**run.cfg, "perf": {**run.cfg["perf"], "fp8": False},
                        "engine_config": {**SIXTEEN_BIT, **engine_config}})


def _run(**engine_config: object) -> tuple[object, JobConfig]:
    run = next(r for r in RUNS if r.id == "deepseek-v3")
    cfg = {**run.cfg, "engine_config": engine_config} if engine_config else run.cfg
    if engine_config and "recompute_modules" not in engine_config:
        cfg = {**cfg, "recompute": "none"}
    return run, JobConfig(**cfg)


def _rows(run: object, cfg: JobConfig) -> dict[str, int]:
    est = estimate(run.spec(), catalog_gpu(run.gpu), cfg)  # type: ignore[attr-defined]
    assert est.stage == 1
    return {r.component: r.bytes for r in est.rows}


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def test_distributed_optimizer_shards_experts_over_expert_data_parallel() -> None:
    """fp32 main params and Adam moments: dense parameters over dp = 128, routed experts over dp/ep = 2 (Megatron's
    expert data-parallel group, parallel_state.py); before, every state was divided by 128 (0.05 GiB)."""
    run, cfg = _run(use_distributed_optimizer=True)
    rows = _rows(run, cfg)
    expected = _ceil(4 * DENSE_NUMEL, DP) + _ceil(4 * EXPERT_NUMEL, DP // EP)
    assert rows["optimizer/master_fp32"] == rows["optimizer/adam_m"] == rows["optimizer/adam_v"] == expected
    assert rows["gradients/main_grad_buffer"] == 4 * (DENSE_NUMEL + EXPERT_NUMEL)  # whole, fp32 (Sec. 3.3.3)


def test_precision_aware_optimizer_bf16_moments_and_remainders() -> None:
    """--use-precision-aware-optimizer --exp-avg-dtype bf16 --exp-avg-sq-dtype bf16: 2-byte moments; the fp32 main
    params as 16-bit remainders of the bf16 params (store_param_remainders, Megatron's default)."""
    run, cfg = _run(use_distributed_optimizer=True, use_precision_aware_optimizer=True, exp_avg_dtype="bf16",
                    exp_avg_sq_dtype="bf16")
    rows = _rows(run, cfg)
    two_bytes = _ceil(2 * DENSE_NUMEL, DP) + _ceil(2 * EXPERT_NUMEL, DP // EP)
    assert rows["optimizer/adam_m"] == rows["optimizer/adam_v"] == rows["optimizer/master_fp32"] == two_bytes
    run, cfg = _run(use_distributed_optimizer=True, use_precision_aware_optimizer=True, store_param_remainders=False,
                    exp_avg_dtype="bf16")
    rows = _rows(run, cfg)
    assert rows["optimizer/master_fp32"] == rows["optimizer/adam_v"] == _ceil(4 * DENSE_NUMEL, DP) + _ceil(
        4 * EXPERT_NUMEL, DP // EP)
    assert rows["optimizer/adam_m"] == two_bytes


def test_recompute_modules_keep_what_megatron_keeps() -> None:
    """One MoE layer, one micro-batch, the paper's 16-bit rules, with layernorm, mla_up_proj and moe_act: the two
    norms' inputs; the latent path's checkpoint inputs (q_compressed, kv_compressed, un-normed: the latent norms are
    fused into the up-projections, TELayerNormColumnParallelLinear, and rerun with them) and the un-roped k_pos_emb;
    the flash kernel's output (v padded to the q/k width, as memplan's flash path saves it) and o_proj's input
    (the unpadded copy); the routed experts without the SwiGLU output (3 int64 indices, the permuted input and
    un-permuted output, the 2F SwiGLU input, an fp32 routing weight; int32 offsets); the shared expert's 2F + F."""
    run = next(r for r in RUNS if r.id == "deepseek-v3")
    ctx = Context(build_architecture(run.spec()), _sixteen_bit(), catalog_gpu(run.gpu), run.host).at_stage(1)
    norms = 2 * T * H * 2
    latent = T * (QL + KL + ROPE) * 2
    core = T * N * (NOPE + ROPE) * 2 + T * N * V * 2
    kept = norms + latent + core + EXPERTS_KEPT + SHARED
    layer = ctx.layers[0][0]
    assert act.layer_micro_bytes(ctx, layer, Recompute.SELECTIVE) == kept
    full = NORMS + LATENT + QKV + EXPERTS_ALL + SHARED
    assert act.layer_micro_bytes(ctx, layer, Recompute.NONE) == full
    assert act.workspace_bytes(ctx, Recompute.SELECTIVE, {layer}) == full - kept


def test_default_module_is_core_attention_only() -> None:
    """Megatron's default recompute_modules (["core_attn"]) keeps memplan's selective rule: only S×S terms go, and
    the fused attention kernel saves none, so an MoE layer keeps every tensor the paper's rules count (norms,
    latents, q/k/v and the kernel output, routed and shared experts, the SwiGLU outputs included)."""
    run = next(r for r in RUNS if r.id == "deepseek-v3")
    cfg = JobConfig(**{**run.cfg, "engine_config": {"use_distributed_optimizer": True}, "recompute": "selective",
                       "perf": {**run.cfg["perf"], "fp8": False}})
    ctx = Context(build_architecture(run.spec()), cfg, catalog_gpu(run.gpu), run.host).at_stage(1)
    layer = ctx.layers[0][0]
    assert ctx.arch.layers[layer].moe
    assert act.layer_micro_bytes(ctx, layer, Recompute.SELECTIVE) == NORMS + LATENT + QKV + EXPERTS_ALL + SHARED


def test_mla_up_projection_flops() -> None:
    """q_b (1,536 → 128·192) and kv_b (512 → 128·256): the GEMMs mla_up_proj reruns, 2 FLOPs per element."""
    spec = catalog_model("deepseek-v3")
    assert mr.mla_up_proj_weight_numel(spec) == QL * N * (NOPE + ROPE) + KL * N * (NOPE + V)
    flops = mr.recompute_flops(spec, tokens=T, core_flops=1.0, mods=frozenset({"mla_up_proj"}), tp=1)
    assert flops == 2.0 * T * (QL * N * (NOPE + ROPE) + KL * N * (NOPE + V))


@pytest.mark.parametrize(("model", "changes", "words"), [
    ("deepseek-v3", {"recompute": "none"}, "--recompute selective"),
    ("deepseek-v3", {"engine_config": {**DEEPSEEK_MEGATRON, "recompute_modules": ("mlp",)}}, "not modelled"),
    ("deepseek-v3", {"engine_config": {"use_distributed_optimizer": True, "exp_avg_dtype": "bf16"}},
     "--use-precision-aware-optimizer"),
    ("deepseek-v3", {"engine": "fsdp2", "engine_config": {"recompute_modules": ("layernorm",)}}, "knob of megatron"),
    ("deepseek-v3", {"engine_config": {"use_distributed_optimizer": True, "use_precision_aware_optimizer": True,
                                       "store_param_remainders": False}}, "moves no byte"),
    ("llama-3.1-8b", {"engine_config": {"recompute_modules": ("mla_up_proj",)}}, "no MLA"),
    ("llama-3.1-8b", {"engine_config": {"recompute_modules": ("moe_act",)}}, "has none"),
])
def test_bad_knob_combinations_are_errors(model: str, changes: dict, words: str) -> None:
    run = next(r for r in RUNS if r.id == "deepseek-v3")
    cfg = {**run.cfg, **changes}
    if model != "deepseek-v3":
        cfg = {"job": "pretrain", "engine": "megatron", "recompute": "selective", **changes}
    with pytest.raises(MemplanError, match=words):
        estimate(model, "h800-sxm-80gb", JobConfig(**cfg))


def test_cli_flags_reach_the_estimate_and_bad_values_exit_2() -> None:
    base = ["estimate", "deepseek-v3", "--gpu", "h800-sxm-80gb", "--job", "pretrain", "--engine", "megatron",
            "--recompute", "selective", "--gpus", "8", "--nodes", "256", "--pp", "16", "--ep", "64", "--format", "json"]
    runner = CliRunner()
    plain = runner.invoke(app, base)
    knobs = runner.invoke(app, [*base, "--recompute-modules", "layernorm,mla_up_proj,moe_act",
                                "--use-precision-aware-optimizer", "--exp-avg-dtype", "bf16"])
    assert plain.exit_code in (0, 1) and knobs.exit_code in (0, 1), knobs.output
    memory = [json.loads(r.stdout)["memory"] for r in (plain, knobs)]
    assert memory[0] != memory[1]
    assert runner.invoke(app, [*base, "--recompute-modules", "mlp"]).exit_code == 2
    assert runner.invoke(app, [*base, "--exp-avg-dtype", "fp8"]).exit_code == 2


def test_recipe_fixed_section_carries_the_knobs() -> None:
    """A recipe sets the knobs under ``fixed.engine_config``; an unknown module name is a recipe error."""
    from memplan.recipe_load import job_config, parse_recipe

    def recipe(modules: list[str]) -> dict:
        return {"model": "deepseek-v3", "hardware": {"gpu": "h800-sxm-80gb", "gpus_per_node": 8, "nodes": 256},
                "job": {"type": "pretrain", "seq_len": 4096},
                "fixed": {"engine": "megatron", "pp": 16, "ep": 64, "recompute": "selective",
                          "engine_config": {"recompute_modules": modules, "use_precision_aware_optimizer": True,
                                            "exp_avg_dtype": "bf16", "exp_avg_sq_dtype": "bf16"}}}

    cfg = job_config(parse_recipe(recipe(["layernorm", "mla_up_proj", "moe_act"]), name="dsv3"))
    assert cfg.engine_config.recompute_modules == ("layernorm", "mla_up_proj", "moe_act")
    assert cfg.engine_config.exp_avg_dtype == cfg.engine_config.exp_avg_sq_dtype == "bf16"
    with pytest.raises(MemplanError, match="recompute_modules"):
        job_config(parse_recipe(recipe(["attention"]), name="dsv3"))


def test_layernorm_recomputes_only_the_norms_megatron_does_not_fuse() -> None:
    """A dense DeepSeek-V3 layer (stage 0): MLA's input norm is a module of its own (recomputed: its output goes),
    the pre-MLP norm is fused into fc1 (TELayerNormColumnParallelLinear: kept, input and output). Paper rules: the
    block input, the residual and the fused norm's output, 3 hidden-wide 16-bit tensors."""
    run = next(r for r in RUNS if r.id == "deepseek-v3")
    cfg = _sixteen_bit(recompute_modules=("layernorm",))
    ctx = Context(build_architecture(run.spec()), cfg, catalog_gpu(run.gpu), run.host).at_stage(0)
    layer = ctx.layers[0][0]
    assert not ctx.arch.layers[layer].moe
    assert act.layer_micro_bytes(ctx, layer, Recompute.SELECTIVE) == 3 * T * H * 2 + LATENT + QKV + DENSE_MLP
    assert act.layer_micro_bytes(ctx, layer, Recompute.NONE) == NORMS + LATENT + QKV + DENSE_MLP


def test_plan_with_modules_needs_selective_among_its_modes() -> None:
    """``plan`` chooses each layer's mode; Megatron's modules parameterize ``selective``, so a search without it is
    bad input (exit 2), and one with it runs."""
    base = ["plan", "deepseek-v2-lite", "--gpu", "h100-sxm-80gb", "--job", "pretrain", "--engine", "megatron",
            "--gpus", "8", "--recompute-modules", "mla_up_proj,moe_act", "--format", "json"]
    runner = CliRunner()
    assert runner.invoke(app, [*base, "--recompute", "none"]).exit_code == 2
