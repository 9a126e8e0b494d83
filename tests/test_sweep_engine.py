"""``sweep --engine`` (issue 11: the engine on every command): every cell runs on the named engine; a cell whose
job that engine does not run is n/a with the engine's rule (how a sweep reports an invalid configuration), and a
grid none of whose jobs it runs is bad input (exit 2, one sentence)."""

from __future__ import annotations

import json

import pytest

import memplan
from memplan.errors import MemplanError
from tests.conftest import run_cli

GRID = ("sweep", "--model", "llama-3.2-1b", "--gpu", "l4", "--workers", "1", "-q")


def records(runner, *args: str) -> list[dict]:
    return json.loads(run_cli(runner, *GRID, *args, "--format", "json").stdout)["records"]


def test_every_cell_runs_on_the_named_engine(runner):
    rows = records(runner, "--job", "full,lora", "--engine", "fsdp2", "--gpu-count", "2")
    assert rows and {r["engine"] for r in rows} == {"fsdp2"}


def test_fsdp2_shards_the_states_that_ddp_replicates(runner):
    """fully_shard keeps 1/N of the Adam states per rank (rounded up, padded per parameter); DDP (pytorch) all of
    them: on 4 GPUs the fsdp2 cell holds at most a quarter and a little more."""
    args = ("--job", "full", "--gpu-count", "4", "--batch", "1", "--metric", "fits")
    ddp = records(runner, *args, "--engine", "pytorch")[0]
    fsdp = records(runner, *args, "--engine", "fsdp2")[0]
    whole, shard = ddp["gpu:optimizer/adam_m_bytes"], fsdp["gpu:optimizer/adam_m_bytes"]
    assert whole // 4 <= shard < whole // 3


def test_cells_the_engine_does_not_run_are_na_with_its_rule(runner):
    result = run_cli(runner, *GRID, "--job", "full,infer", "--engine", "vllm", "--format", "json")
    rows = json.loads(result.stdout)["records"]
    full = [r for r in rows if r["job"] == "full"]
    infer = [r for r in rows if r["job"] == "infer"]
    assert full and all("training engine" in r["error"] for r in full)
    assert infer and all(not r["error"] and r["engine"] == "vllm" for r in infer)
    assert "training engine" in result.stderr


def test_an_engine_that_runs_no_cell_is_one_sentence(runner):
    result = run_cli(runner, *GRID, "--job", "full,lora", "--engine", "sglang", code=2)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "engine sglang runs no cell" in lines[0] and "training engine" in lines[0], result.stderr


def test_the_python_sweep_refuses_the_same_grid():
    with pytest.raises(MemplanError, match="engine sglang runs no cell"):
        memplan.sweep("llama-3.2-1b", "l4", ["full", "lora"], engine="sglang")


def test_sweep_takes_the_bitsandbytes_options(runner):
    """bitsandbytes up to 0.43.1 keeps each 4-bit matmul's input past backward: a row the default lacks."""
    args = ("--job", "qlora", "--batch", "1", "--metric", "fits")
    old = records(runner, *args, "--bnb-version", "0.42.0")[0]
    new = records(runner, *args)[0]
    assert old.get("gpu:activations/bnb_retained_inputs_bytes", 0) > 0
    assert not new.get("gpu:activations/bnb_retained_inputs_bytes")


def test_bitsandbytes_settings_apply_to_the_quantized_cells_only(runner):
    """Full-weight cells have no bitsandbytes layers: they drop --bnb-version as they drop --quant (a grid of
    full-weight jobs alone refuses both)."""
    rows = records(runner, "--job", "full,qlora", "--bnb-version", "0.42.0", "--batch", "1", "--metric", "fits")
    assert {r["job"] for r in rows} == {"full", "qlora"} and not any(r["error"] for r in rows)
    for flag, value in (("--bnb-version", "0.42.0"), ("--bnb-integration", "lightning"), ("--quant", "nf4")):
        result = run_cli(runner, *GRID, "--job", "full", flag, value, code=2)
        assert "does not apply to the sweep's jobs (full)" in result.stderr, result.stderr
