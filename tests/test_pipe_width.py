"""Output read through a pipe fits 80 columns (the product brief; closing note 3 left the estimate table inside
``plan`` at 90): every line that ``plan``, ``estimate``, ``check``, ``sweep`` (its matrices and ``--pivot``)
and ``explain`` print to a pipe or a file is at most 80 characters, and folding drops nothing: every
component and every byte count of the JSON answer is in the table, each name whole.

typer's CliRunner gives the command a stream that is not a terminal: the layout a pipe gets.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memplan.report.table import PIPE_WIDTH, fit_line, wrap_words
from tests.conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]
PLANS = {
    "training": ["llama-3.1-8b", "--gpu", "a100-sxm-80gb", "--job", "full", "--gpus", "8", "--batch", "1,2",
                 "--recompute", "none", "--zero", "3"],
    "serving": ["llama-3.1-70b", "--gpu", "a100-sxm-80gb", "--job", "infer", "--engine", "vllm", "--gpus", "4",
                "--batch", "8"],
    "offload to NVMe": ["llama-3.1-70b", "--gpu", "a100-sxm-80gb", "--job", "full", "--gpus", "8", "--zero", "3",
                        "--offload-optimizer", "nvme", "--offload-params", "nvme", "--nvme", "30TB", "--batch", "1",
                        "--recompute", "full"],
}
INFEASIBLE = ["llama-3.1-70b", "--gpu", "rtx-4090", "--job", "full"]
"""A 70B full fine-tune on one 24 GB card: no plan, with the smallest changes that fit."""
ESTIMATES = {
    "params only (not modelled rows)": ["params:7.5B", "--gpu", "v100-sxm2-32gb", "--job", "full", "--zero", "3",
                                        "--gpus", "8", "--nodes", "8"],
    "serving, KV pool": ["llama-3.1-8b", "--gpu", "a100-sxm-80gb", "--job", "infer", "--engine", "vllm"],
    "qlora with searches": ["llama-3.1-8b", "--gpu", "rtx-4090", "--job", "qlora", "--max-batch", "--max-context"],
}


def long_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if len(line) > PIPE_WIDTH]


def assert_narrow(text: str) -> None:
    assert not long_lines(text), "\n".join(long_lines(text))


def assert_whole(text: str, memory: dict) -> None:
    """Every component name (whole) and every byte count of ``memory`` (a JSON ``memory`` block) is in ``text``."""
    words = set(text.split())
    for tier in memory.values():
        for name, nbytes in tier["components"].items():
            assert name in words, f"{name} missing or broken in the table"
            assert f"{nbytes:,}" in words, f"{name}: {nbytes:,} missing"


@pytest.mark.parametrize("name", sorted(PLANS))
def test_a_piped_plan_fits_80_columns_and_keeps_every_row(name, runner):
    text = run_cli(runner, "plan", *PLANS[name], "--top", "3").stdout
    assert_narrow(text)
    doc = json.loads(run_cli(runner, "plan", *PLANS[name], "--top", "3", "--format", "json").stdout)
    assert_whole(text, doc["best"]["memory"])


def test_a_piped_infeasible_plan_with_suggestions_fits_80_columns(runner):
    text = run_cli(runner, "plan", *INFEASIBLE, code=1).stdout
    assert "Smallest changes that fit" in text
    assert_narrow(text)


@pytest.mark.parametrize("name", sorted(ESTIMATES))
def test_a_piped_estimate_fits_80_columns_and_keeps_every_row(name, runner):
    text = run_cli(runner, "estimate", *ESTIMATES[name]).stdout
    assert_narrow(text)
    assert_whole(text, json.loads(run_cli(runner, "estimate", *ESTIMATES[name], "--format", "json").stdout)["memory"])


def test_piped_check_of_every_shipped_recipe_fits_80_columns(runner):
    result = runner.invoke(__import__("memplan.cli.app", fromlist=["app"]).app,
                           ["check", str(ROOT / "recipes"), "--time-limit", "120"])
    assert result.exit_code in (0, 1), result.stderr
    assert_narrow(result.stdout)
    heads = [line for line in result.stdout.splitlines() if line[:5].strip() in ("PASS", "FAIL", "ERROR")]
    assert len(heads) == len(list((ROOT / "recipes").glob("*.yaml")))  # one head line per recipe, folded after it


@pytest.mark.parametrize("pivot", [False, True])
def test_piped_sweep_matrices_over_every_gpu_fit_80_columns(pivot, runner):
    args = ["sweep", "--model", "llama-3.1-8b,qwen2.5-72b", "--gpu", "all", "--job", "infer,full", "-q",
            "--workers", "1", *(["--pivot"] if pivot else [])]
    text = run_cli(runner, *args).stdout
    assert_narrow(text)
    doc = json.loads(run_cli(runner, *args[:-1 if pivot else None], "--format", "json").stdout)
    gpus = doc["matrices"][0]["gpu_names"]
    assert all(gpu in text.split() for gpu in gpus)  # every GPU column is in some panel


@pytest.mark.parametrize("topic", ["activations/layers", "zero", "optimizer", "inference", "kv_cache"])
def test_piped_explain_fits_80_columns(topic, runner):
    assert_narrow(run_cli(runner, "explain", topic).stdout)


def test_folding_keeps_every_character_but_spaces():
    line = ("      plan: tp=8 pp=1 dp=16 zero=3 offload(opt=none, params=none) micro-batch=1 grad-accum=32 "
            "seq=8192 optimizer=adamw engine=deepspeed; recompute full: layers 0-99, "
            "(``deepspeed.runtime.zero.stage_1_and_2.estimate_zero2_model_states_mem_needs``)")
    out = fit_line(line)
    assert not long_lines(out)
    assert "".join(out.split()) == "".join(line.split())


def test_a_long_name_breaks_after_its_separators_only():
    lines = wrap_words("activations/flash_backward_workspace", 20)
    assert "".join(lines) == "activations/flash_backward_workspace" and len(lines) > 1
    assert all(len(t) <= 20 for t in lines) and all(t[-1] in "/_" for t in lines[:-1])
    assert wrap_words("a, b, c", 3) == ["a,", "b,", "c"]


@pytest.mark.parametrize("command", ["models", "gpus"])
def test_piped_catalog_listings_split_into_panels_and_keep_every_value(command, runner):
    """Nine numeric columns cannot fold: the listing comes as panels, the name column repeated in each."""
    text = run_cli(runner, command).stdout
    assert_narrow(text)
    words = set(text.split())
    for row in json.loads(run_cli(runner, command, "--format", "json").stdout):
        for key, value in row.items():
            shown = f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)
            assert not shown or shown in words, f"{row['name']}: {key}={shown} missing"  # '': no price
