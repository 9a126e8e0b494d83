"""Training engine profiles through the Python API: DeepSpeed's estimator reproduced exactly, PyTorch AMP's
16 B/param plus autocast copies, FSDP2's sharding, Megatron's bytes per parameter, and the engines' rules."""

from __future__ import annotations

import itertools

import pytest
from conftest import prefix_sum, run_cli

import memplan
from memplan.config import Engine, JobConfig
from memplan.errors import MemplanError
from memplan.memory import registry
from memplan.memory.breakdown import TRAIN_PHASES, Phase, Tier, peak

STATES = ("weights", "gradients", "optimizer")
BEYOND_ESTIMATOR = ("gradients/reduce_bucket", "gradients/zero3_reduce_bucket", "weights/zero3_prefetch",
                    "weights/zero3_persistent")

# Llama-3.1-8B (config.json): hidden 4096, 32 layers, intermediate 14336, 32 heads, 8 KV heads, vocab 128256, untied.
H, L, F, V, KV_DIM = 4096, 32, 14336, 128256, 8 * 128
BLOCK = H * H + 2 * H * KV_DIM + H * H + 3 * H * F + 2 * H
EMBED = V * H
P = 2 * EMBED + L * BLOCK + H
MATMUL = P - EMBED - (2 * L + 1) * H
"""Elements of the matmul weights: everything but the input embedding and the 2L + 1 RMSNorm weights."""


def gpu_states(est, *, drop=()) -> int:
    comps = {r.component: r.bytes for r in est.rows if r.tier is Tier.GPU and r.component not in drop}
    return prefix_sum(comps, *STATES)


def comp(est, name: str, tier: Tier = Tier.GPU) -> int:
    return sum(r.bytes for r in est.rows if r.component == name and r.tier is tier)


# --- DeepSpeed's estimator, re-implemented as the oracle ------------------------------------------------------
# deepspeed/runtime/zero/stage_1_and_2.py estimate_zero2_model_states_mem_needs and
# deepspeed/runtime/zero/stage3.py estimate_zero3_model_states_mem_needs (microsoft/DeepSpeed 0.16.5,
# commit 38327e07f6cd39b63418f60cedd1651b0be3e7c3; the formulas the brief cites for 0.19.x are the same).

def ds_zero2(total_params, num_gpus_per_node=1, num_nodes=1, cpu_offload=True, additional_buffer_factor=1.5):
    total_gpus = num_nodes * num_gpus_per_node
    if cpu_offload:
        gpu_mem = 2 * total_params
        cpu_mem = total_params * max(4 * total_gpus, 16) * additional_buffer_factor
    else:
        gpu_mem = 2 * total_params + int(18 * total_params / total_gpus)
        cpu_mem = total_params * 4 * num_gpus_per_node * additional_buffer_factor
    return int(cpu_mem), int(gpu_mem)


def ds_zero3(total_params, largest_layer_params, num_gpus_per_node=1, num_nodes=1, cpu_offload=True,
             cpu_offload_params=True, zero_init=True, additional_buffer_factor=1.5):
    total_gpus = num_nodes * num_gpus_per_node
    gpus_factor = 1 / num_nodes
    largest_layer_memory = (4 * largest_layer_params)
    if cpu_offload:
        if cpu_offload_params:
            gpu_mem = largest_layer_memory
            if zero_init:
                cpu_mem = total_params * 18 * gpus_factor * additional_buffer_factor
            else:
                cpu_mem = total_params * max(4 * num_gpus_per_node, 18 * gpus_factor) * additional_buffer_factor
        else:
            gpu_mem = largest_layer_memory + int(2 * total_params / total_gpus)
            if zero_init:
                cpu_mem = total_params * 16 * gpus_factor * additional_buffer_factor
            else:
                cpu_mem = total_params * max(4 * num_gpus_per_node, 16 * gpus_factor) * additional_buffer_factor
    else:
        gpu_mem = largest_layer_memory + int(18 * total_params / total_gpus)
        if zero_init:
            cpu_mem = largest_layer_params * 4 * num_gpus_per_node * additional_buffer_factor
        else:
            cpu_mem = total_params * 4 * num_gpus_per_node * additional_buffer_factor
    return int(cpu_mem), int(gpu_mem), largest_layer_memory


def ds_estimate(model, gpn, nodes, **kw):
    return memplan.estimate(model, "a100-sxm-80gb", engine="deepspeed", dtype="fp16", accounting="deepspeed",
                            gpus_per_node=gpn, nodes=nodes, **kw)


SIZES = [(2_851_000_000, 32_000_000), (7_500_000_000, 262_144_000), (1_006_632_960_000, 2_621_440_000)]
"""(params, largest layer): T5-3B as DeepSpeed's docs count it, a 7.5B model, ZeRO-Infinity's 1T model."""
CLUSTERS = [(8, 1), (16, 4), (4, 2)]


@pytest.mark.parametrize(("size", "cluster"), list(itertools.product(SIZES, CLUSTERS)))
def test_deepspeed_zero2_all_cold_exact(size, cluster):
    """estimate_zero2_model_states_mem_needs_all_cold, both rows (offload_optimizer cpu / none), byte for byte.
    The estimator's CPU figure with offload multiplies 4 bytes by all GPUs of all nodes (total_gpus); per node
    that is exact on one node, which is where the test compares it."""
    (params, largest), (gpn, nodes) = size, cluster
    model = f"params:{params},largest={largest}"
    for offload in (True, False):
        est = ds_estimate(model, gpn, nodes, zero=2, offload_optimizer="cpu" if offload else "none")
        cpu, gpu = ds_zero2(params, gpn, nodes, cpu_offload=offload)
        assert gpu_states(est, drop=BEYOND_ESTIMATOR) == gpu
        if nodes == 1 or not offload:
            assert est.total(Tier.CPU) == cpu


@pytest.mark.parametrize(("size", "cluster"), list(itertools.product(SIZES, CLUSTERS)))
def test_deepspeed_zero3_all_cold_exact(size, cluster):
    """estimate_zero3_model_states_mem_needs_all_cold: all five option rows, byte for byte (GPU and CPU)."""
    (params, largest), (gpn, nodes) = size, cluster
    model = f"params:{params},largest={largest}"
    for off_opt, off_par, init in [(True, True, True), (True, True, False), (True, False, True), (True, False, False),
                                   (False, False, True), (False, False, False)]:
        est = ds_estimate(model, gpn, nodes, zero=3, zero_init=init, offload_optimizer="cpu" if off_opt else "none",
                          offload_params="cpu" if off_par else "none")
        cpu, gpu, _ = ds_zero3(params, largest, gpn, nodes, cpu_offload=off_opt, cpu_offload_params=off_par,
                               zero_init=init)
        assert gpu_states(est, drop=BEYOND_ESTIMATOR) == gpu, (off_opt, off_par, init)
        assert est.total(Tier.CPU) == cpu, (off_opt, off_par, init)


def test_llama_8b_deepspeed_zero2_states_equal_the_estimator_plus_visible_buffers():
    est = memplan.estimate("llama-3.1-8b", "a100-sxm-80gb", job="full", engine="deepspeed", zero=2, gpus_per_node=8)
    assert est.engine is Engine.DEEPSPEED
    _, gpu = ds_zero2(P, 8, 1, cpu_offload=False)
    assert gpu_states(est, drop=BEYOND_ESTIMATOR) == gpu
    # stage_1_and_2.py backward(): one bf16 ipg_buffer of reduce_bucket_size = 5e8 elements (overlap_comm off at stage 2)
    assert comp(est, "gradients/reduce_bucket") == 2 * 500_000_000
    assert comp(est, "gradients") == 2 * P // 8


def test_zero3_params_only_model_follows_deepspeed_granularity():
    """ZeRO Fig. 1's 7.5B model at N = 64: the whole model is no longer a live buffer (29.9 GiB before). With a largest
    layer given, the estimator's 4·LL + 18Ψ/N; without it, the live set is bounded by stage3_max_live_parameters."""
    psi, n = 7_500_000_000, 64
    known = ds_estimate("params:7.5B,largest=100M", 16, 4, zero=3)
    assert gpu_states(known, drop=BEYOND_ESTIMATOR) == ds_zero3(psi, 100_000_000, 16, 4, cpu_offload=False)[1]
    unknown = ds_estimate("zero-7.5b", 16, 4, zero=3)
    assert gpu_states(unknown, drop=BEYOND_ESTIMATOR) == 4 * 1_000_000_000 + 18 * psi // n
    assert gpu_states(unknown) < 8 * 2**30


def test_zero_infinity_1t_fits_on_32gb_v100s(runner):
    """ZeRO-Infinity Sec. 1/Fig. 2a: a 1T-parameter model trains on one DGX-2 (16 × V100-32GB) with NVMe offload."""
    result = run_cli(runner, "check", "recipes/zero-infinity-1t-nvme-dgx2.yaml")
    assert "PASS" in result.stdout


# --- PyTorch AMP ---------------------------------------------------------------------------------------------------

def test_llama_8b_pytorch_amp_is_16_bytes_per_param_plus_autocast_copies():
    """HF Trainer bf16=True over an fp32 model: fp32 params, grads and Adam m, v (4 + 4 + 8 = 16 B/param), plus autocast's
    bf16 copies of the matmul weights (2 B per matmul element) while forward/backward run."""
    est = memplan.estimate("llama-3.1-8b", "a100-sxm-80gb", job="full", engine="pytorch", seq_len=1024)
    assert est.arch.params == P
    assert comp(est, "weights/params") == 4 * P and comp(est, "gradients") == 4 * P
    assert comp(est, "optimizer/adam_m") + comp(est, "optimizer/adam_v") == 8 * P
    assert gpu_states(est, drop=("weights/autocast_copies",)) == 16 * P
    assert comp(est, "weights/autocast_copies") == 2 * MATMUL
    alive = registry.lookup("weights/autocast_copies").phases
    assert Phase.FORWARD in alive and Phase.BACKWARD_START in alive and Phase.OPTIMIZER not in alive
    rows = [registry.with_phases(r) for r in est.rows]
    _, binding = peak(rows, Tier.GPU, TRAIN_PHASES)
    # Independent arithmetic: grads (4P) outweigh autocast copies + saved activations + logits at batch 1 × 1024
    # (at 2048 AMP's fp32 residual stream makes the start of backward bind).
    acts = prefix_sum({r.component: r.bytes for r in est.rows if r.tier is Tier.GPU}, "activations")
    assert 2 * MATMUL + acts < 4 * P
    assert binding in (Phase.BACKWARD, Phase.OPTIMIZER)  # a phase where the gradients are alive


def test_default_engine_is_pytorch_without_zero_and_deepspeed_with_it():
    plain = memplan.estimate("llama-3.2-1b", "a100-sxm-80gb", job="full")
    assert plain.engine is Engine.PYTORCH and "default" in plain.engine_reason
    zero = memplan.estimate("llama-3.2-1b", "a100-sxm-80gb", job="full", zero=1, gpus_per_node=2)
    assert zero.engine is Engine.DEEPSPEED and "DeepSpeed" in zero.engine_reason
    assert JobConfig(job="infer").effective_engine is Engine.TRANSFORMERS


def test_pure_bf16_pytorch_is_8_bytes_per_param():
    """HF torch_dtype=bfloat16 with torch AdamW: bf16 params, bf16 grads, bf16 m and v (zeros_like(p))."""
    est = memplan.estimate("llama-3.1-8b", "a100-sxm-80gb", job="full", engine="pytorch", master_weights=False)
    assert gpu_states(est) == 8 * P
    assert comp(est, "weights/autocast_copies") == 0


def test_ddp_buckets_are_a_second_copy_of_the_gradients():
    est = memplan.estimate("llama-3.2-1b", "a100-sxm-80gb", job="full", engine="pytorch", gpus_per_node=4)
    assert comp(est, "gradients/ddp_buckets") == comp(est, "gradients")
    view = memplan.estimate("llama-3.2-1b", "a100-sxm-80gb", job="full", engine="pytorch", gpus_per_node=4,
                            engine_config={"gradient_as_bucket_view": True})
    assert comp(view, "gradients/ddp_buckets") == 0


# --- FSDP2 ---------------------------------------------------------------------------------------------------------

def test_llama_8b_fsdp2_shards_fp32_states_and_gathers_bf16_units():
    """fully_shard + MixedPrecisionPolicy(bf16, fp32) on 8 GPUs: fp32 params, grads, m, v each 4P/8; the bf16
    all-gather holds the root unit (embeddings, final norm, lm_head) and the prefetched block, the running block apart."""
    est = memplan.estimate("llama-3.1-8b", "a100-sxm-80gb", job="full", engine="fsdp2", gpus_per_node=8)
    for name in ("weights/params", "gradients", "optimizer/adam_m", "optimizer/adam_v"):
        assert comp(est, name) == 4 * P // 8, name
    root = 2 * EMBED + H
    assert comp(est, "weights/fsdp_all_gather") == 2 * (root + BLOCK)  # root + the prefetched block
    assert comp(est, "weights/fsdp_running_unit") == 2 * BLOCK  # not alive at the start of backward
    # a block's bf16 gradient and its fp32 reduce copy; the root reduce-scatters last, with no block gathered
    # (gradients/fsdp_backward_held covers that moment)
    assert comp(est, "gradients/fsdp_reduce_scatter") == (2 + 4) * BLOCK


def test_fsdp2_backward_holds_the_reduced_block_shards_and_the_roots_early_gradients():
    """In backward the root reduce-scatters last (_fsdp_state.py _root_post_backward_final_callback): while a block is
    in flight the other 31 blocks' fp32 shards (4·BLOCK/8 each) exist at most, not the root's, and the root's bf16
    unsharded gradients of the final norm and lm_head (2·(H + EMBED)) are alive; ``gradients`` (every shard) only
    from the optimizer step on."""
    from memplan.memory.breakdown import Phase

    est = memplan.estimate("llama-3.1-8b", "a100-sxm-80gb", job="full", engine="fsdp2", gpus_per_node=8)
    block_moment = (L - 1) * 4 * BLOCK // 8 + 2 * (H + EMBED)
    root = 2 * EMBED + H
    # the root's moments, every block resharded: its gathered bf16 params and bf16 gradients beside the last block's
    # kept fp32 reduce-scatter input, or its fp32 input and fp32 shard; less the in-flight rows of backward
    root_moment = L * 4 * BLOCK // 8 + 2 * root + max(2 * root + 4 * BLOCK, 4 * root + 4 * root // 8)
    in_flight = 2 * (root + BLOCK) + 2 * BLOCK + (2 + 4) * BLOCK
    assert comp(est, "gradients/fsdp_backward_held") == max(block_moment, root_moment - in_flight)
    in_backward = {r.component for r in est.rows if r.phases is None or Phase.BACKWARD in r.phases}
    assert "gradients" not in in_backward and "gradients/fsdp_backward_held" in in_backward
    accum = memplan.estimate("llama-3.1-8b", "a100-sxm-80gb", job="full", engine="fsdp2", gpus_per_node=8,
                             grad_accum=2)  # shards from the first micro-batch exist throughout
    assert comp(accum, "gradients/fsdp_backward_held") == 0


def test_fsdp2_without_resharding_keeps_every_unit_and_one_all_gather_output():
    """reshard_after_forward=False: every unit stays gathered in bf16 (2 bytes × all parameters), no block is gathered
    per use, and the last all-gather's output (one block) is kept for the copy-out overlap (_fsdp_param_group.py
    wait_for_unshard) until the root's post-forward."""
    est = memplan.estimate("llama-3.1-8b", "a100-sxm-80gb", job="full", engine="fsdp2", gpus_per_node=8,
                           engine_config={"reshard_after_forward": False})
    assert comp(est, "weights/fsdp_all_gather") == 2 * P
    assert comp(est, "weights/fsdp_kept_all_gather") == 2 * BLOCK
    assert comp(est, "weights/fsdp_running_unit") == 0


def test_fsdp2_kept_all_gather_meets_the_losss_forward_not_the_logits_gradients():
    """reshard_after_forward=False: the last block's all-gather output (2·BLOCK) is freed by the root's post-forward,
    after HF's loss ran (bf16 logits 2·BSV and their fp32 copy 4·BSV) and before the two fp32 gradients (8·BSV)
    exist: the start of backward holds max(6·BSV + 2·BLOCK, 8·BSV), i.e. 2·BLOCK − 2·BSV beyond the logits row."""
    bsv = 1 * 128 * V
    est = memplan.estimate("llama-3.1-8b", "a100-sxm-80gb", job="full", engine="fsdp2", gpus_per_node=8,
                           micro_batch=1, seq_len=128, engine_config={"reshard_after_forward": False})
    assert comp(est, "activations/logits") == 8 * bsv
    assert comp(est, "weights/fsdp_kept_all_gather_at_loss") == 2 * BLOCK - 2 * bsv


# --- Megatron ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("dtype", "plain", "dist"), [("bf16", 18, (6, 12)), ("fp16", 20, (4, 16)), ("fp32", 16, (8, 8))])
def test_megatron_bytes_per_parameter(dtype, plain, dist):
    """Megatron-LM docs/source/api-guide/dist_optimizer.md (commit 50b073cc): 18 / 6 + 12/d for bf16 params with fp32
    main grads, 20 / 4 + 16/d for fp16 grads, 16 / 8 + 8/d for fp32."""
    d = 8
    kw = {"job": "full", "engine": "megatron", "dtype": dtype, "gpus_per_node": d}
    est = memplan.estimate("llama-3.1-8b", "a100-sxm-80gb", **kw)
    assert gpu_states(est) == plain * P
    sharded = memplan.estimate("llama-3.1-8b", "a100-sxm-80gb", **kw,
                               engine_config={"use_distributed_optimizer": True})
    assert gpu_states(sharded) == dist[0] * P + dist[1] * P // d


# --- Which combinations run ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("kw", "words"), [
    ({"engine": "deepspeed", "zero": 2, "pp": 2, "gpus_per_node": 8}, "incompatible with pipeline parallelism"),
    ({"zero": 3, "pp": 2, "gpus_per_node": 8}, "incompatible with pipeline parallelism"),
    ({"engine": "deepspeed", "zero": 1, "pp": 2, "gpus_per_node": 8, "perf": {"virtual_stages": 2}},
     "one model chunk per stage"),
    ({"zero": 2, "offload_optimizer": "cpu", "optimizer": "adamw-8bit"}, "DeepSpeedCPUAdam"),
    ({"engine": "pytorch", "zero": 1}, "ZeRO stages are DeepSpeed's"),
    ({"engine": "fsdp2", "zero": 3, "gpus_per_node": 2}, "fsdp2 already shards"),
    ({"engine": "pytorch", "tp": 2, "gpus_per_node": 2}, "no tensor, pipeline or expert parallelism"),
    ({"engine": "megatron", "zero": 1, "offload_optimizer": "cpu"}, "ZeRO stages are DeepSpeed's"),
    ({"engine": "megatron", "job": "lora"}, "pretrain and full jobs"),
    ({"engine": "fsdp2", "job": "galore", "gpus_per_node": 2}, "galore job"),
    ({"engine": "megatron", "optimizer": "adamw-8bit"}, "adam and sgd"),
    ({"engine": "megatron", "recompute": "op"}, "engine megatron runs none, selective, full only"),
    ({"engine": "megatron", "recompute_map": ["full"] * 15 + ["op"]}, "engine megatron runs none, selective, full only"),
    ({"dtype": "int8"}, "no training engine updates int8 weights"),
    ({"dtype": "int4", "engine": "deepspeed", "zero": 2}, "no training engine updates int4 weights"),
    ({"engine": "vllm"}, "serves models"),
    ({"engine": "pytorch", "engine_config": {"reduce_bucket_size": 10**8}}, "reduce_bucket_size is a knob of deepspeed"),
    ({"zero": 2, "engine_config": {"bucket_cap_mb": 50}}, "bucket_cap_mb is a knob of pytorch"),
])
def test_estimate_rejects_what_the_engine_cannot_run(kw, words):
    with pytest.raises(MemplanError, match=words):
        memplan.estimate("llama-3.2-1b", "a100-sxm-80gb", **{"job": "full", **kw})


def test_cli_exit_2_on_zero3_with_pipeline(runner):
    result = run_cli(runner, "estimate", "llama-3.2-1b", "--gpu", "a100-sxm-80gb", "--gpus", "8", "--zero", "3",
                     "--pp", "2", code=2)
    assert "pipeline" in (result.stderr or result.stdout)


def test_cli_exit_2_on_megatron_op_recompute(runner):
    """Megatron-LM's --recompute-granularity is full or selective (sub-modules); torchtitan's op-level policy is
    not one of its modes: one sentence, exit 2."""
    result = run_cli(runner, "estimate", "llama-3.2-1b", "--gpu", "a100-sxm-80gb", "--job", "full", "--engine",
                     "megatron", "--recompute", "op", code=2)
    out = result.stderr or result.stdout
    assert "engine megatron runs none, selective, full only" in out and "Traceback" not in out


def test_fp8_training_keeps_16_bit_masters_and_fp32_states():
    """fp8 training (TransformerEngine/torchao) is not cheaper than bf16 in states: it adds fp8 weight copies. Under
    megatron, TE's cached workspace of every TE linear (not Megatron's own output layer): row-wise data plus the
    transpose Hopper's dgrad GEMM reads (2 bytes per element) and one fp32 scale_inv per weight."""
    kw = {"job": "full", "engine": "megatron"}
    bf16 = memplan.estimate("llama-3.1-8b", "h100-sxm-80gb", dtype="bf16", **kw)
    fp8 = memplan.estimate("llama-3.1-8b", "h100-sxm-80gb", dtype="fp8", **kw)
    tensors = 4 * L + 3 * L  # q, k, v, o + gate, up, down per layer: one fp32 scale each
    copies = 2 * (MATMUL - V * H) + 4 * tensors
    assert gpu_states(fp8) == gpu_states(bf16) + copies
    assert comp(fp8, "weights/fp8_copies") == copies


# --- Megatron activations: Korthikanti et al. 2022 Table 2 through engine=megatron ----------------------------------

@pytest.mark.parametrize(("t", "sp", "mode"), [(1, False, "none"), (8, False, "none"), (8, True, "none"),
                                               (8, False, "selective"), (8, True, "selective"), (8, False, "full")])
def test_megatron_selects_korthikanti_table2(t, sp, mode):
    """GPT-3 175B block (a = 96, h = 12288, s = 2048, b = 1), fp16 with dropout, activation_accounting left at its
    default: the megatron engine counts Table 2 exactly. sbh(10 + 24/t + 5as/(ht)); with sequence parallelism
    sbh/t(34 + 5as/h); selective sbh(10 + 24/t) and 34sbh/t; full 2sbh."""
    from memplan.arch.build import build_architecture
    from memplan.catalog.schema import Family, HostSpec, ModelSpec
    from memplan.catalog.store import catalog_gpu
    from memplan.config import Recompute
    from memplan.memory import activations as act
    from memplan.memory.context import Context

    a, h, s = 96, 12288, 2048
    spec = ModelSpec(name="gpt3-175b", source="Brown et al. 2020", family=Family.GPT2, hidden_size=h,
                     intermediate_size=4 * h, num_hidden_layers=4, num_attention_heads=a, vocab_size=51200,
                     max_position_embeddings=s, hidden_act="gelu", mlp_gated=False, norm="layernorm")
    cfg = JobConfig(job="pretrain", engine="megatron", dtype="fp16", seq_len=s, tp=t, gpus_per_node=t,
                    sequence_parallel=sp, recompute=mode, attention="eager", dropout=True)
    assert cfg.activation_accounting == "autograd" and cfg.effective_activation_accounting == "paper"
    ctx = Context(build_architecture(spec), cfg, catalog_gpu("h100-sxm-80gb"), HostSpec())
    expected = {
        ("none", False): s * h * 10 + s * h * 24 // t + 5 * a * s * s // t,
        ("none", True): (s * h * 34 + 5 * a * s * s) // t,
        ("selective", False): s * h * 10 + s * h * 24 // t,
        ("selective", True): 34 * s * h // t,
        ("full", False): 2 * s * h,
    }[mode, sp]
    assert act.layer_micro_bytes(ctx, 0, Recompute(mode)) == expected
    hf = cfg.model_copy(update={"engine": Engine.DEEPSPEED})
    assert hf.effective_activation_accounting == "autograd"


def test_paged_optimizer_states_count_in_cpu_ram():
    """bitsandbytes PagedAdamW8bit: states in CUDA managed memory, counted paged out (CPU RAM, per node)."""
    kw = {"job": "full", "engine": "pytorch", "optimizer": "adamw-8bit"}
    gpu = memplan.estimate("llama-3.2-1b", "a100-sxm-80gb", **kw)
    paged = memplan.estimate("llama-3.2-1b", "a100-sxm-80gb", **kw, engine_config={"paged_optimizer": True})
    states = comp(gpu, "optimizer/adam8bit_states")
    assert states > 0 and comp(paged, "optimizer/adam8bit_states", Tier.CPU) == states
    assert comp(paged, "optimizer/adam8bit_states") == 0
    with pytest.raises(MemplanError, match="paged_optimizer"):
        memplan.estimate("llama-3.2-1b", "a100-sxm-80gb", job="full", engine="deepspeed",
                         engine_config={"paged_optimizer": True})


def test_json_names_the_engine_and_why(runner):
    from conftest import cli_json

    out = cli_json(runner, "estimate", "llama-3.1-8b", "--gpu", "a100-sxm-80gb", "--job", "full")
    assert out["engine"] == "pytorch" and "default" in out["engine_reason"]
    assert out["config"]["engine"] is None and out["config"]["engine_config"]["bucket_cap_mb"] == 25
    ds = cli_json(runner, "estimate", "llama-3.1-8b", "--gpu", "a100-sxm-80gb", "--job", "full", "--zero", "2",
                  "--gpus", "8")
    assert ds["engine"] == "deepspeed"


def test_zero3_live_buffer_is_the_largest_module():
    """DeepSpeed gathers module by module (stage3.py model_to_params: a module's own parameters): Llama-3.1-8B's largest
    module is the embedding (V·h), not a block; Mixtral's is one layer's fused experts (transformers 5 MixtralExperts:
    8 experts × 3 matrices of 4096 × 14336)."""
    llama = memplan.estimate("llama-3.1-8b", "a100-sxm-80gb", job="full", zero=3, gpus_per_node=8)
    assert comp(llama, "weights/zero3_live_params") == 2 * EMBED
    mixtral = memplan.estimate("mixtral-8x7b", "a100-sxm-80gb", job="full", zero=3, gpus_per_node=8)
    assert comp(mixtral, "weights/zero3_live_params") == 2 * 8 * 3 * 4096 * 14336
