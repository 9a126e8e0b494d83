"""Hybrid sharding (issue 13): fsdp2 HSDP, DeepSpeed MiCS and ZeRO++ hpZ in estimate, the engine rules, the step
time and the plan dimension. Expected bytes are independent arithmetic on a parameter-count model (params:1B) or
the unchanged full-sharding answer; step times are worked by hand from the ring formulas."""

from __future__ import annotations

import pytest
from conftest import run_cli

import memplan
from memplan.config import Engine, JobConfig
from memplan.engines import rules
from memplan.memory.breakdown import Tier
from memplan.planner import shard_comm

N = 10**9  # params:1B
TWO_NODES = {"gpus_per_node": 8, "nodes": 2}  # dp = 16


def rows(est, tier: Tier = Tier.GPU) -> dict[str, int]:
    return {r.component: r.bytes for r in est.rows if r.tier is tier}


@pytest.mark.parametrize(("engine", "extra", "knob"), [
    ("fsdp2", {}, "hsdp_shard_size"),
    ("deepspeed", {"zero": 3}, "mics_shard_size"),
])
@pytest.mark.parametrize("model", ["llama-3.2-1b", "params:1B"])
def test_shard_group_of_every_rank_is_full_sharding_byte_for_byte(engine, extra, knob, model):
    full = memplan.estimate(model, "h100-sxm-80gb", job="full", engine=engine, **TWO_NODES, **extra)
    same = memplan.estimate(model, "h100-sxm-80gb", job="full", engine=engine, engine_config={knob: 16}, **TWO_NODES,
                            **extra)
    assert [(r.component, r.tier, r.bytes) for r in same.rows] == [(r.component, r.tier, r.bytes) for r in full.rows]
    assert same.peak == full.peak


def test_fsdp2_hsdp_shards_fp32_states_over_the_shard_group():
    """fp32 params, grads, Adam m and v (MixedPrecisionPolicy bf16/fp32): 4 B each over S = 8, not dp = 16."""
    est = memplan.estimate("params:1B", "h100-sxm-80gb", job="full", engine="fsdp2", engine_config={"hsdp_shard_size": 8},
                           **TWO_NODES)
    got = rows(est)
    assert got["weights/params"] == 4 * N // 8
    assert got["gradients"] == 4 * N // 8
    assert got["optimizer/adam_m"] == got["optimizer/adam_v"] == 4 * N // 8


def test_deepspeed_mics_partitions_every_zero3_state_within_the_group():
    est = memplan.estimate("params:1B", "h100-sxm-80gb", job="full", engine="deepspeed", zero=3,
                           engine_config={"mics_shard_size": 8}, **TWO_NODES)
    got = rows(est)
    assert got["weights/params"] == 2 * N // 8  # bf16 parameters
    assert got["optimizer/master_fp32"] == 4 * N // 8
    assert got["optimizer/adam_m"] == 4 * N // 8


def test_deepspeed_hpz_adds_a_secondary_partition_and_keeps_states_over_all_ranks():
    """ZeRO++ Sec. 3.2: primary partition M/N, secondary M/α (α = GPUs per node); grads/states over N."""
    base = memplan.estimate("params:1B", "h100-sxm-80gb", job="full", engine="deepspeed", zero=3, **TWO_NODES)
    hpz = memplan.estimate("params:1B", "h100-sxm-80gb", job="full", engine="deepspeed", zero=3,
                           engine_config={"zero_hpz_partition_size": 8}, **TWO_NODES)
    got = rows(hpz)
    assert got["weights/params"] == 2 * N // 16
    assert got["optimizer/master_fp32"] == 4 * N // 16
    assert got["weights/zero_hpz_secondary"] == 2 * N // 8
    assert {k: v for k, v in got.items() if k != "weights/zero_hpz_secondary" and not k.startswith("runtime")} == \
        {k: v for k, v in rows(base).items() if not k.startswith("runtime")}
    assert hpz.peak > base.peak


@pytest.mark.parametrize(("fields", "words"), [
    ({"engine": Engine.DEEPSPEED, "zero": 2, "engine_config": {"mics_shard_size": 8}}, "use --zero 3"),
    ({"engine": Engine.DEEPSPEED, "zero": 1, "engine_config": {"zero_hpz_partition_size": 8}}, "use --zero 3"),
    ({"engine": Engine.FSDP2, "engine_config": {"hsdp_shard_size": 3}}, "must divide the data-parallel degree 16"),
    ({"engine": Engine.FSDP2, "engine_config": {"hsdp_shard_size": 1}}, "shard group of 2 or more"),
    ({"engine": Engine.DEEPSPEED, "zero": 3, "engine_config": {"hsdp_shard_size": 8}}, "is a knob of fsdp2"),
    ({"engine": Engine.FSDP2, "engine_config": {"mics_shard_size": 8}}, "is a knob of deepspeed"),
    ({"engine": Engine.DEEPSPEED, "zero": 3, "engine_config": {"mics_shard_size": 8, "zero_hpz_partition_size": 8}},
     "not both"),
    ({"engine": Engine.FSDP2, "engine_config": {"hsdp_shard_size": 8}, "job": "lora"}, "full-weight states"),
])
def test_engine_rules_refuse_what_the_engines_do_not_run(fields, words):
    cfg = JobConfig.model_validate({**TWO_NODES, **fields})
    reason = rules.violation(cfg)
    assert reason is not None and words in reason
    assert reason.count(". ") <= 1  # one sentence


def test_cli_exit_2_with_one_line(runner):
    result = run_cli(runner, "estimate", "llama-3.2-1b", "--engine", "deepspeed", "--zero", "2", "--gpus", "8",
                     "--nodes", "2", "--mics-shard-size", "8", code=2)
    assert "use --zero 3" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_cli_flags_reach_the_estimate(runner):
    result = run_cli(runner, "estimate", "params:1B", "--engine", "fsdp2", "--gpus", "8", "--nodes", "2",
                     "--hsdp-shard-size", "8", "--format", "json")
    import json

    comps = json.loads(result.stdout)["memory"]["gpu"]["components"]
    assert comps["weights/params"] == 4 * N // 8


# --- step time: worked by hand ---------------------------------------------------------------------------------
INTRA = shard_comm.Link(bw=100e9, lat=0.0)
INTER = shard_comm.Link(bw=25e9, lat=0.0)


def test_hybrid_step_time_by_hand():
    """W = G = 8e9 bytes, Nd = 16, S = 8: all-gather 7/8 · 8e9 / 100e9 = 0.07 s (twice) + reduce-scatter 0.07 s
    inside the node; all-reduce of the 1e9-byte shard over R = 2: 2 · 1/2 · 1e9 / 25e9 = 0.04 s."""
    micro, reduce = shard_comm.hybrid_seconds(weights=8e9, grads=8e9, dp=16, shard=8, gathers=2, layers=32,
                                              shard_link=INTRA, replica_link=INTER)
    assert micro == pytest.approx(0.21)
    assert reduce == pytest.approx(0.04)
    full = shard_comm.full_shard_micro_seconds(weights=8e9, grads=8e9, dp=16, gathers=2, layers=32, link=INTER)
    assert full == pytest.approx(3 * 15 / 16 * 8e9 / 25e9)  # 0.9 s: every collective crosses the nodes


def test_hybrid_with_one_group_is_full_sharding():
    micro, reduce = shard_comm.hybrid_seconds(weights=8e9, grads=4e9, dp=16, shard=16, gathers=2, layers=32,
                                              shard_link=shard_comm.Link(25e9, 5e-6), replica_link=INTER)
    full = shard_comm.full_shard_micro_seconds(weights=8e9, grads=4e9, dp=16, gathers=2, layers=32,
                                               link=shard_comm.Link(25e9, 5e-6))
    assert (micro, reduce) == (full, 0.0)


def test_hpz_step_time_by_hand():
    """Forward all-gather and reduce-scatter over Nd = 16 across nodes (15/16 · 8e9 / 25e9 = 0.3 s each), backward
    all-gather over H = 8 inside the node (0.07 s)."""
    seconds = shard_comm.hpz_micro_seconds(weights=8e9, grads=8e9, dp=16, hpz=8, layers=32, dp_link=INTER,
                                           hpz_link=INTRA)
    assert seconds == pytest.approx(0.3 + 0.3 + 0.07)


# --- plan ------------------------------------------------------------------------------------------------------
def _plan(**space):
    return memplan.plan("llama-3.2-1b", "a100-sxm-80gb", job="pretrain", engine="fsdp2", gpus_per_node=8, nodes=4,
                        seq_len=2048, perf={"inter_node_gbps": 3.0}, space={"global_batch": 512, **space})


def test_plan_picks_hsdp_where_inter_node_traffic_dominates():
    """32 A100s over 4 nodes, NVLink inside and a slow fabric across (3 GB/s per GPU, so the cross-node gathers are
    not hidden behind a 1B model's compute): sharding over a node's 8 ranks keeps the per-micro-batch gathers
    inside the node and sends only the gradient shard across."""
    best = _plan().best
    assert best is not None
    assert best.config.engine_config.hsdp_shard_size == 8
    full = _plan(shard=("full",)).best
    assert full is not None and full.config.engine_config.hsdp_shard_size is None
    assert best.tokens_per_s > full.tokens_per_s


def test_plan_shard_choice_needs_an_engine_that_runs_it():
    with pytest.raises(memplan.MemplanError, match="hybrid sharding"):
        memplan.plan("llama-3.2-1b", "a100-sxm-80gb", job="pretrain", engine="megatron", gpus_per_node=8, nodes=2,
                     space={"shard": ("node",)})


def test_plan_runs_deepspeed_hpz_and_mics_at_zero3_only():
    common = {"job": "pretrain", "engine": "deepspeed", "gpus_per_node": 8, "nodes": 2, "seq_len": 2048}
    for shard, knob in (("hpz", "zero_hpz_partition_size"), ("node", "mics_shard_size")):
        plan = memplan.plan("llama-3.2-1b", "a100-sxm-80gb", **common, space={"global_batch": 256, "shard": (shard,)})
        assert plan.best is not None, shard
        cfg = plan.best.config
        assert int(cfg.zero) == 3 and getattr(cfg.engine_config, knob) == 8
        assert rules.violation(cfg) is None
        if shard == "hpz":
            assert rows(plan.best.estimate)["weights/zero_hpz_secondary"] > 0


def test_recipes_carry_the_knobs_and_the_plan_dimension(tmp_path):
    import yaml

    from memplan.check import check_recipe
    from memplan.recipe_load import load_recipe

    data = {"model": "llama-3.2-1b", "hardware": {"gpu": "h100-sxm-80gb", "gpus_per_node": 8, "nodes": 2},
            "job": {"type": "full", "seq_len": 2048, "micro_batch": 1, "global_batch": 64},
            "fixed": {"engine": "fsdp2", "offload_activations": True, "engine_config": {"hsdp_shard_size": 8}},
            "min_headroom": "10%"}
    path = tmp_path / "hsdp.yaml"
    path.write_text(yaml.safe_dump(data))
    loaded = load_recipe(path)
    assert loaded.config.engine_config.hsdp_shard_size == 8 and loaded.config.offload_activations
    outcome = check_recipe(path)
    assert outcome.status == "fits"
    full = memplan.estimate("llama-3.2-1b", "h100-sxm-80gb", job="full", engine="fsdp2", **TWO_NODES)
    assert rows(outcome.estimate)["weights/params"] == 2 * rows(full)["weights/params"]  # 1.24e9·4 B over 8, not 16
    assert rows(outcome.estimate, Tier.CPU)["activations/cpu_offloaded"] > 0
    planned = {**data, "fixed": {"engine": "fsdp2"}, "search": {"shard": ["node"], "offload_activations": False}}
    path.write_text(yaml.safe_dump(planned))
    loaded = load_recipe(path)
    assert loaded.space.shard == ("node",) and loaded.space.offload_activations is False


def test_engine_step_time_uses_the_right_groups_and_links():
    """fsdp2 full sharding over 16 ranks on 2 nodes: two all-gathers of the 2P-byte bf16 weights and a
    reduce-scatter of the 4P-byte fp32 gradients (reduce_dtype=fp32) across the nodes, per micro-batch; HSDP with
    S = 8: the same inside the node plus an all-reduce of the 4P/8 shard over 2 replicas, per micro-batch; MiCS:
    that all-reduce (of bf16 gradients) once per step. Links given explicitly, no latency, no overlap."""
    from memplan.catalog.store import catalog_gpu
    from memplan.planner.steptime import sharded_comm_seconds

    gpu, p, micro = catalog_gpu("h100-sxm-80gb"), 10**9, 4
    intra, inter = 100e9, 10e9
    perf = {"intra_node_gbps": 100.0, "inter_node_gbps": 10.0, "intra_node_latency_us": 0.0,
            "inter_node_latency_us": 0.0}

    def seconds(**fields):
        cfg = JobConfig.model_validate({"job": "pretrain", **TWO_NODES, "perf": perf, **fields})
        return sharded_comm_seconds(gpu, cfg, params=p, grad=2 * p, layers=16, hidden=0.0, micro=micro)

    full = micro * (2 * 15 / 16 * 2 * p / inter + 15 / 16 * 4 * p / inter)
    assert seconds(engine="fsdp2") == pytest.approx(full)
    hsdp = micro * (2 * 7 / 8 * 2 * p / intra + 7 / 8 * 4 * p / intra + 2 * 1 / 2 * (4 * p / 8) / inter)
    assert seconds(engine="fsdp2", engine_config={"hsdp_shard_size": 8}) == pytest.approx(hsdp)
    once = 2 * 1 / 2 * (2 * p / 8) / inter
    mics = micro * (2 * 7 / 8 * 2 * p / intra + 7 / 8 * 2 * p / intra) + once
    assert seconds(engine="deepspeed", zero=3, engine_config={"mics_shard_size": 8}) == pytest.approx(mics)
    no_reshard = micro * (15 / 16 * 2 * p / inter + 15 / 16 * 4 * p / inter)
    assert seconds(engine="fsdp2", engine_config={"reshard_after_forward": False}) == pytest.approx(no_reshard)


def test_shard_group_and_a_fixed_knob_are_one_or_the_other():
    with pytest.raises(memplan.MemplanError, match="one or the other"):
        memplan.plan("llama-3.2-1b", "a100-sxm-80gb", job="pretrain", engine="fsdp2", gpus_per_node=8, nodes=2,
                     engine_config={"hsdp_shard_size": 8}, space={"shard": ("full", "node")})
