"""Activation offload to CPU (issue 13): what each engine moves (save_on_cpu, DeepSpeed cpu_checkpointing, Megatron
--cpu-offloading), the CPU tier, the phase peaks, the rules, the PCIe time and the plan dimension. Expected bytes are
arithmetic on the estimate without offload (Llama-3.2-1B's 16 identical layers) written in the test."""

from __future__ import annotations

import pytest
from conftest import run_cli

import memplan
from memplan.config import Engine, JobConfig
from memplan.engines import rules
from memplan.memory import activation_offload as ao
from memplan.memory.breakdown import TRAIN_PHASES, Phase, Tier, phase_totals

LAYERS = 16  # llama-3.2-1b
MODEL, GPU = "llama-3.2-1b", "h100-sxm-80gb"


def comps(est, tier: Tier = Tier.GPU) -> dict[str, int]:
    return {r.component: r.bytes for r in est.rows if r.tier is tier}


@pytest.mark.parametrize("engine", ["pytorch", "fsdp2"])
def test_save_on_cpu_moves_every_layer_and_keeps_two_in_transit(engine):
    kw = {"job": "full", "engine": engine, "gpus_per_node": 8, "seq_len": 4096}
    off = memplan.estimate(MODEL, GPU, **kw)
    on = memplan.estimate(MODEL, GPU, offload_activations=True, **kw)
    layers = comps(off)["activations/layers"]
    assert layers % LAYERS == 0
    assert comps(on)["activations/layers"] == 0
    assert comps(on)["activations/offload_buffer"] == 2 * layers // LAYERS
    assert comps(on, Tier.CPU)["activations/cpu_offloaded"] == 8 * layers  # 8 processes per node pin their own
    for name in set(comps(off)) - {"activations/layers", "runtime/allocator_reserve"}:
        assert comps(on)[name] == comps(off)[name], name
    drop = layers - 2 * layers // LAYERS
    before, after = (phase_totals(e.rows, Tier.GPU, TRAIN_PHASES) for e in (off, on))
    reserve = comps(off)["runtime/allocator_reserve"] - comps(on)["runtime/allocator_reserve"]
    assert before[Phase.BACKWARD_START] - after[Phase.BACKWARD_START] == drop + reserve
    assert after[Phase.BACKWARD] - before[Phase.BACKWARD] == 2 * layers // LAYERS - reserve  # in transit


def test_deepspeed_cpu_checkpointing_moves_the_checkpointed_inputs():
    kw = {"job": "full", "engine": "deepspeed", "zero": 2, "gpus_per_node": 8, "recompute": "full", "seq_len": 4096}
    off = memplan.estimate(MODEL, GPU, **kw)
    on = memplan.estimate(MODEL, GPU, offload_activations=True, **kw)
    inputs = comps(off)["activations/layers"]
    hidden, seq = 2048, 4096
    assert inputs == LAYERS * seq * hidden * 2  # each checkpointed block keeps its bf16 input (B·S·D·2)
    assert comps(on)["activations/layers"] == 0
    assert comps(on, Tier.CPU)["activations/cpu_offloaded"] == 8 * inputs
    assert comps(on)["activations/recompute_workspace"] == comps(off)["activations/recompute_workspace"]


def test_deepspeed_layers_not_checkpointed_stay_on_the_gpu():
    kw = {"job": "full", "engine": "deepspeed", "zero": 2, "gpus_per_node": 8, "recompute": "full",
          "recompute_layers": 8}
    off = memplan.estimate(MODEL, GPU, **kw)
    on = memplan.estimate(MODEL, GPU, offload_activations=True, **kw)
    moved = comps(on, Tier.CPU)["activations/cpu_offloaded"] // 8
    assert moved == 8 * 4096 * 2048 * 2 // 2  # 8 inputs of B·S·D·2 at the default seq 2048
    assert comps(on)["activations/layers"] == comps(off)["activations/layers"] - moved


@pytest.mark.parametrize(("n", "kept"), [(None, 1), (10, 6)])
def test_megatron_offloads_its_first_layers(n, kept):
    kw = {"job": "pretrain", "engine": "megatron", "gpus_per_node": 8}
    off = memplan.estimate(MODEL, GPU, **kw)
    extra = {} if n is None else {"engine_config": {"cpu_offloading_num_layers": n}}
    on = memplan.estimate(MODEL, GPU, offload_activations=True, **kw, **extra)
    per_layer = comps(off)["activations/layers"] // LAYERS
    assert comps(on)["activations/layers"] == kept * per_layer
    assert comps(on, Tier.CPU)["activations/cpu_offloaded"] == 8 * (LAYERS - kept) * per_layer
    assert comps(on)["activations/offload_buffer"] == 2 * per_layer


@pytest.mark.parametrize(("fields", "words"), [
    ({"engine": Engine.DEEPSPEED, "zero": 2, "offload_activations": True}, "needs --recompute full"),
    ({"engine": Engine.MEGATRON, "job": "pretrain", "offload_activations": True, "recompute": "full"},
     "CPU offloading does not work when activation recomputation is enabled"),
    ({"engine": Engine.MEGATRON, "job": "pretrain", "offload_activations": True, "pp": 2},
     "no support for Pipeline parallelism with CPU offloading"),
    ({"engine": Engine.MEGATRON, "job": "pretrain", "engine_config": {"cpu_offloading_num_layers": 4}},
     "add --offload-activations"),
    ({"engine": Engine.FSDP2, "engine_config": {"cpu_offloading_num_layers": 4}, "offload_activations": True},
     "is a knob of megatron"),
])
def test_engine_rules(fields, words):
    cfg = JobConfig.model_validate({"gpus_per_node": 8, **fields})
    reason = rules.violation(cfg)
    assert reason is not None and words in reason


def test_megatron_cannot_offload_every_layer():
    with pytest.raises(memplan.MemplanError, match="at most 15"):
        memplan.estimate(MODEL, GPU, job="pretrain", engine="megatron", gpus_per_node=8, offload_activations=True,
                         engine_config={"cpu_offloading_num_layers": 16})


def test_cli_flag_and_exit_2(runner):
    result = run_cli(runner, "estimate", MODEL, "--engine", "deepspeed", "--zero", "2", "--gpus", "8",
                     "--offload-activations", code=2)
    assert "needs --recompute full" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    result = run_cli(runner, "estimate", MODEL, "--engine", "pytorch", "--offload-activations")
    assert "activations/cpu_offloaded" in result.stdout


def test_not_read_by_inference():
    with pytest.raises(memplan.MemplanError, match="offload_activations"):
        memplan.estimate(MODEL, GPU, job="infer", offload_activations=True)


def test_transfer_seconds_by_hand():
    """1 GB down and up over 25 GB/s: 0.08 s; an engine that overlaps hides up to the compute beside it."""
    assert ao.transfer_seconds(moved_bytes=10**9, pcie_bytes_per_s=25e9, hidden_s=0.05, overlap=1.0) == \
        pytest.approx(0.03)
    assert ao.transfer_seconds(moved_bytes=10**9, pcie_bytes_per_s=25e9, hidden_s=0.05, overlap=0.0) == \
        pytest.approx(0.08)
    assert ao.transfer_seconds(moved_bytes=10**9, pcie_bytes_per_s=25e9, hidden_s=1.0, overlap=1.0) == 0.0


# --- plan ------------------------------------------------------------------------------------------------------
PLAN = {"job": "full", "engine": "pytorch", "optimizer": "adamw-bf16", "seq_len": 6144}


def test_plan_offloads_activations_when_that_is_what_makes_it_fit():
    """Llama-3.2-1B, pure bf16 AdamW, 6k tokens on a 24 GB card with recompute ruled out: the saved activations do
    not fit on the GPU; moved to CPU RAM they do."""
    without = memplan.plan(MODEL, "rtx-4090", **PLAN, space={"recompute": ("none",), "offload_activations": False})
    assert without.best is None
    plan = memplan.plan(MODEL, "rtx-4090", **PLAN, space={"recompute": ("none",)})
    assert plan.best is not None and plan.best.config.offload_activations
    assert plan.best.estimate.fits
    assert comps(plan.best.estimate, Tier.CPU)["activations/cpu_offloaded"] > 0


def test_plan_does_not_offload_where_everything_fits():
    plan = memplan.plan(MODEL, "h100-sxm-80gb", job="full", engine="pytorch", seq_len=1024)
    assert plan.best is not None and not plan.best.config.offload_activations


def test_infeasible_plan_suggests_activation_offload():
    plan = memplan.plan(MODEL, "rtx-4090", job="full", optimizer="adamw-bf16", seq_len=6144,
                        space={"recompute": ("none",)})
    assert plan.best is None  # the default engine is not searched with offload; the suggestion re-solves with it
    flags = [s.flags for s in plan.suggestions]
    assert "--offload-activations" in flags
