"""The step-time and scale flags of ``memplan plan`` (issue 13), through the command line: each one reaches
its field (``JobConfig.perf``, ``SearchSpace.ep``/``global_batch_tokens``, ``PlanRequest.train_tokens``) and
moves the answer the way the step-time model's own formula says it must."""

from __future__ import annotations

import json
from typing import Any

import pytest
from typer.testing import CliRunner

from memplan.cli.app import app

RUNNER = CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1", "HF_HUB_OFFLINE": "1"})
PINNED = ["--format", "json", "--top", "1", "--zero", "0", "--batch", "1", "--recompute", "none",
          "--offload-optimizer", "none", "--offload-params", "none", "--no-per-layer-offload"]
"""A pinned space, so a flag changes the time of the same layout rather than the layout chosen."""
DP2 = ["gpt2", *PINNED, "--engine", "megatron", "--gpus", "2", "--tp", "1", "--pp", "1"]
"""Data parallelism over two GPUs on Megatron, whose gradient all-reduce compute does not hide by default."""


def best(args: list[str]) -> dict[str, Any]:
    result = RUNNER.invoke(app, ["plan", *args])
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)["best"]


def rejected(args: list[str]) -> str:
    result = RUNNER.invoke(app, ["plan", *args])
    assert result.exit_code == 2, result.stdout
    return result.stderr


def test_mfu_sets_the_compute_efficiency():
    """Compute time is FLOPs / (peak × efficiency): half the efficiency, more time (the same layout)."""
    fast, slow = best(["gpt2", *PINNED, "--mfu", "0.6"]), best(["gpt2", *PINNED, "--mfu", "0.3"])
    assert fast["config"]["perf"]["mfu"] == 0.6
    assert slow["step_time_s"] > fast["step_time_s"]


@pytest.mark.parametrize("flag, value", [("--intra-node-gbps", "1"), ("--intra-node-latency-us", "5000"),
                                         ("--cluster", "pcie-ethernet")])
def test_a_slower_fabric_inside_the_node_lengthens_data_parallel_steps(flag, value):
    base, slow = best(DP2), best([*DP2, flag, value])
    assert slow["step_time_s"] > base["step_time_s"]


@pytest.mark.parametrize("flag, value", [("--inter-node-gbps", "1"), ("--inter-node-latency-us", "5000")])
def test_a_slower_fabric_across_nodes_lengthens_multi_node_steps(flag, value):
    args = ["gpt2", *PINNED, "--engine", "megatron", "--gpus", "1", "--nodes", "2", "--tp", "1", "--pp", "1"]
    base, slow = best(args), best([*args, flag, value])
    assert slow["step_time_s"] > base["step_time_s"]
    assert rejected(["gpt2", *PINNED, flag, value]).count("one") >= 1  # one node: no such traffic


def test_comm_overlap_hides_data_parallel_traffic():
    exposed, hidden = best([*DP2, "--comm-overlap", "0"]), best([*DP2, "--comm-overlap", "1"])
    assert hidden["step_time_s"] < exposed["step_time_s"]
    assert "one GPU" in rejected(["gpt2", *PINNED, "--comm-overlap", "0.5"])


def test_virtual_stages_shrink_the_pipeline_bubble():
    """Interleaved 1F1B: bubble (p − 1)/(v·m) (Narayanan et al. 2021, Sec. 2.2.2), so v = 2 is faster."""
    args = ["gpt2", *PINNED, "--engine", "megatron", "--gpus", "2", "--tp", "1", "--pp", "2"]
    plain, interleaved = best(args), best([*args, "--virtual-stages", "2"])
    assert interleaved["config"]["perf"]["virtual_stages"] == 2
    assert interleaved["step_time_s"] < plain["step_time_s"]


def test_global_batch_tokens_sets_the_sequences_per_step():
    """65,536 tokens of 2,048-token sequences on one GPU with micro-batch 1: 32 sequences per step."""
    got = best(["gpt2", *PINNED, "--seq-len", "2048", "--global-batch-tokens", "65536"])
    assert got["global_batch"] == 65536 // 2048
    assert "not both" in rejected(["gpt2", *PINNED, "--global-batch", "8", "--global-batch-tokens", "65536"])


def test_train_tokens_reports_the_training_budget():
    got = best(["gpt2", *PINNED, "--train-tokens", "1000000000"])
    seconds = 1e9 / got["tokens_per_s"]
    assert got["train_budget"]["seconds"] == pytest.approx(seconds, rel=1e-5)
    assert got["train_budget"]["gpu_hours"] == pytest.approx(seconds / 3600, rel=1e-3)
    assert "training plans" in rejected(["gpt2", "--format", "json", "--job", "infer", "--train-tokens", "1000"])


def test_ep_choices_reach_the_plan_of_a_moe_model():
    """Mixtral's 8 experts on 16 GPUs under Megatron: the plan takes an ep among those given."""
    args = ["mixtral-8x7b", "--format", "json", "--top", "1", "--job", "pretrain", "--engine", "megatron",
            "--gpus", "8", "--nodes", "2", "--seq-len", "2048"]
    assert best([*args, "--ep", "2"])["config"]["ep"] == 2
    assert best([*args, "--ep", "4,8"])["config"]["ep"] in (4, 8)
    assert "no experts" in rejected(["gpt2", *PINNED, "--ep", "2"])
