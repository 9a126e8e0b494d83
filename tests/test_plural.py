"""Counts of GPUs, nodes and replicas read as English: "1 GPU", "2 GPUs" (a plan on one GPU printed "1 GPUs")."""

from __future__ import annotations

import pytest
from conftest import run_cli

from memplan.arch.build import build_architecture
from memplan.catalog.store import catalog_model
from memplan.planner.space import check_tp
from memplan.units import counted


def test_counted_is_singular_only_for_one() -> None:
    assert [counted(n, "GPU") for n in (0, 1, 2)] == ["0 GPUs", "1 GPU", "2 GPUs"]
    assert counted(2048, "GPU", grouped=True) == "2,048 GPUs"
    assert counted(1, "node", grouped=True) == "1 node"


@pytest.mark.parametrize(("args", "needle"), [
    (("estimate", "llama-3.1-8b", "--gpu", "rtx-4090", "--tp", "2"),
     "must divide the 1 GPU (1 per node × 1 node)."),
    (("estimate", "llama-3.1-8b", "--gpu", "rtx-4090", "--gpus", "2", "--tp", "2", "--pp", "2"),
     "must divide the 2 GPUs (2 per node × 1 node)."),
    (("estimate", "llama-3.2-1b", "--gpu", "rtx-4090", "--job", "infer", "--engine", "llamacpp",
      "--tensor-split", "1,1"), "2 proportions for 1 GPU;"),
    (("plan", "llama-3.2-1b", "--gpu", "h100", "--gpus", "1", "--job", "lora", "--pp", "2"),
     "pp=2 does not divide the 1 GPU."),
])
def test_one_gpu_and_one_node_are_singular_in_errors(runner, args: tuple[str, ...], needle: str) -> None:
    err = run_cli(runner, *args, code=2).stderr
    assert needle in " ".join(err.split()), err


def test_tp_beyond_a_one_gpu_node_is_singular() -> None:
    arch = build_architecture(catalog_model("llama-3.2-1b"))
    assert check_tp(arch, 2, 1) == "tp=2 exceeds the 1 GPU of a node (tensor parallelism stays inside a node)"
    assert "the 2 GPUs of a node" in (check_tp(arch, 4, 2) or "")


def test_a_one_replica_serving_plan_says_replica() -> None:
    from typer.testing import CliRunner

    from memplan.cli.app import app

    out = CliRunner().invoke(app, ["plan", "llama-3.2-1b", "--gpu", "h100", "--gpus", "1", "--job", "infer"]).stdout
    line = next(x for x in out.splitlines() if x.startswith("Serving:"))
    assert line.endswith("per replica × 1 replica."), line
