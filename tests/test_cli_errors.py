"""Bad input gets one clear sentence on stderr, a suggestion where one exists, and exit code 2."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("estimate", "llama-3.1-8", "--gpu", "h100"), "did you mean llama-3.1-8b"),
        (("estimate", "llama-3.1-8b", "--gpu", "h100-80"), "did you mean h100-80gb"),
        (("estimate", "llama-3.1-8b", "--zero", "4"), "zero"),
        (("estimate", "llama-3.1-8b", "--tp", "3", "--gpus", "3"), "--tp 3 must divide"),
        (("estimate", "llama-3.1-8b", "--quant", "nf5"), "did you mean nf4"),
        (("estimate", "llama-3.1-8b", "--batch", "0"), "micro_batch"),
        (("estimate", "llama-3.1-8b", "--seq-len", "-5"), "seq_len"),
        (("estimate", "llama-3.1-8b", "--cpu-ram", "512G"), "ambiguous"),
        (("estimate", "llama-3.1-8b", "--cpu-ram", "-1GiB"), "negative"),
        (("estimate", "llama-3.1-8b", "--job", "finetune"), "job"),
        (("estimate", "llama-3.1-8b", "--format", "xml"), "--format"),
        (("estimate", "params:-7B"), "params"),
        (("plan", "llama-3.1-8b", "--objective", "fastest"), "objective"),
        (("plan", "llama-3.1-8b", "--tp", "a,b"), "--tp"),
    ],
)
def test_bad_input_is_one_sentence_and_exit_2(runner, args, needle):
    result = run_cli(runner, *args, code=2)
    err = result.stderr.strip()
    assert needle.lower() in err.lower(), err
    assert "Traceback" not in err and "Traceback" not in result.stdout
    assert len(err.splitlines()) == 1, err


def test_validator_sentence_ends_with_one_full_stop(runner):
    """A field validator's own sentence (``engine_config.pp_schedule``) is not followed by a second full stop."""
    err = run_cli(runner, "estimate", "llama-3.1-8b", "--engine", "fsdp2", "--pp", "2", "--gpus", "2",
                  "--pp-schedule", "foo", code=2).stderr.strip()
    assert "DualPipeV" in err and not err.endswith(".."), err


def test_missing_and_malformed_config_json(runner, tmp_path):
    missing = run_cli(runner, "estimate", str(tmp_path / "nope" / "config.json"), code=2)
    assert "Traceback" not in missing.stderr
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    result = run_cli(runner, "estimate", str(bad), code=2)
    assert "json" in result.stderr.lower() and len(result.stderr.strip().splitlines()) == 1
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    result = run_cli(runner, "estimate", str(empty_dir), code=2)
    assert "config.json" in result.stderr


def test_infeasible_plan_is_an_answer_with_exit_1(runner):
    result = run_cli(runner, "plan", "llama-3.1-70b", "--gpu", "t4", "--job", "full", "--zero", "0",
                     "--offload-optimizer", "none", "--offload-params", "none", "--format", "json", code=1)
    out = json.loads(result.stdout)
    assert out["status"] == "infeasible" and out["best"] is None
    assert out["binding"].startswith("gpu memory")
    assert result.stderr == ""
