"""The exit-code contract over generated bad inputs (issue 14 part 8): every command ends with exit 0 (an
answer), 1 (an answer that does not fit) or 2 (bad input, exactly one line on stderr), never exit 3 (an
internal error) and never a traceback.

Over 1,000 inputs are generated from a fixed seed, so every run sees the same ones: each option of each
command (found by introspecting the typer app, so a new option is fuzzed without editing this file) with
values from a pool of bad text; ``check --set`` with every recipe key and bad YAML values; config.json
fields; and the environment (output encoding, a closed or full stdout) in subprocesses. In-process runs use
typer's CliRunner; only the environment cases start a process.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import click
import pytest
import typer
from typer.testing import CliRunner

from memplan.cli.app import app

SEED = 14
RUNNER = CliRunner(env={"COLUMNS": "120", "NO_COLOR": "1", "HF_HUB_OFFLINE": "1"})
ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures" / "hf_configs"

BAD_VALUES = ["0", "-1", "nan", "inf", "-inf", "", " ", "abc", "1-", "5-3", "9" * 40, "1e400", "true", "none",
              ",", "0,1", "-1,2", "1,,2", "fp7", "٣", "3.5", "1e-9", "../..", "0-", "=", "a=b", "2", "1"]
"""Text given to any option: wrong types, empty, signs, non-finite, huge, ranges, near-valid words."""
SKIP_COMMANDS = {"measure", "calibrate"}
"""These build a real model with torch (slow and machine-dependent); their flags share the estimate
declarations, fuzzed through ``estimate``; ``calibrate`` without torch is tested in test_inputs.py."""
BASE_ARGS: dict[str, list[str]] = {
    "estimate": ["gpt2"],
    "plan": ["gpt2", "--top", "1", "--time-limit", "5", "--zero", "0", "--tp", "1", "--pp", "1", "--batch", "1",
             "--recompute", "none"],
    "sweep": ["--model", "gpt2", "--gpu", "l4", "--job", "infer", "--context", "1024", "--workers", "1"],
    "check": [str(ROOT / "recipes")],
    "explain": ["weights"],
    "models": [], "gpus": [],
}
"""A quick valid invocation of each command; one option at a time is replaced by a bad value."""
NO_HEAVY = {"sweep": {"all"}, "check": set()}


def commands() -> dict[str, Any]:
    """Every command of the (lazily loading) root group, by name."""
    group = typer.main.get_command(app)
    ctx = click.Context(group)
    return {name: group.get_command(ctx, name) for name in group.list_commands(ctx)}


def outcome(args: list[str]) -> tuple[int, str]:
    """(exit code, problem or '') of one in-process run, by the contract."""
    result = RUNNER.invoke(app, args)
    exc = result.exception
    if exc is not None and not isinstance(exc, SystemExit):
        return -1, f"uncaught {type(exc).__name__}: {exc}"
    code, err = result.exit_code, result.stderr
    if "Traceback" in result.stdout + err:
        return code, "traceback"
    if code not in (0, 1, 2):
        return code, f"exit {code}: {err.strip()[:200]}"
    lines = [line for line in err.splitlines() if line.strip()]
    if code == 2 and (len(lines) != 1 or not lines[0].startswith("memplan: ")):
        return code, f"exit 2 with {len(lines)} stderr lines: {err.strip()[:300]}"
    return code, ""


def option_cases(rng: random.Random, command: str, per_option: int) -> list[list[str]]:
    """``per_option`` bad values for each value-taking option of ``command`` (flags have no value to break)."""
    cmd = commands()[command]
    base = BASE_ARGS[command]
    out = []
    for param in cmd.params:
        if param.param_type_name != "option" or getattr(param, "is_flag", False):
            continue
        flag = param.opts[0]
        pool = [v for v in BAD_VALUES if v not in NO_HEAVY.get(command, set())]
        for value in rng.sample(pool, min(per_option, len(pool))):
            args = list(base)
            if flag in args:  # replace the base value of this option
                i = args.index(flag)
                del args[i:i + 2]
            out.append([command, *args, f"{flag}={value}"])
    return out


SET_VALUES = ["0", "-1", "[0]", "[-1]", "true", "[true]", "nope", "1e400", "''", "null", "{}", "[[]]", "9" * 40,
              "0GiB", "-5GiB", "[]", ".nan", "{a: 1}", "'8G'", "[1, 0]"]


def recipe_keys() -> list[str]:
    """Every dotted recipe key: the schema's blocks and the JobConfig / SearchSpace fields below them."""
    from memplan.config import JobConfig
    from memplan.planner.space import SearchSpace
    from memplan.recipe import Hardware, JobShape, Recipe, SweepBlock

    keys = [k for k in Recipe.model_fields if k not in ("hardware", "job", "fixed", "search", "sweep")]
    for block, model in (("hardware", Hardware), ("job", JobShape), ("fixed", JobConfig), ("search", SearchSpace),
                         ("sweep", SweepBlock)):
        keys += [f"{block}.{k}" for k in model.model_fields]
    return [*keys, "fixed.lora.rank", "fixed.infer.block_size", "fixed.nope", "job.nope", "nope"]


def set_cases(rng: random.Random, n: int) -> list[list[str]]:
    """``check RECIPE --set key=value`` on a quick estimated recipe and a planned one."""
    recipes = [ROOT / "recipes" / "llama-3.1-8b-qlora-rtx4090.yaml", ROOT / "recipes" / "qwen2.5-72b-serve-32k.yaml"]
    recipes = [r for r in recipes if r.is_file()] or sorted((ROOT / "recipes").glob("*.yaml"))[:2]
    keys = recipe_keys()
    pairs = [(k, v) for k in keys for v in SET_VALUES]
    return [["check", str(rng.choice(recipes)), "--set", f"{k}={v}", "--time-limit", "5"]
            for k, v in rng.sample(pairs, min(n, len(pairs)))]


CONFIG_VALUES: list[Any] = [0, -1, True, "false", "true", None, [], {}, 1e300, float("nan"), "x", "<5000 digits>",
                            2**64, 1.5, [1, 2]]


def config_cases(rng: random.Random, tmp: Path, n: int) -> list[list[str]]:
    """``estimate path/config.json`` with one field of a fixture set to a bad value."""
    out = []
    fixtures = sorted(FIXTURES.glob("*.json"))
    for i in range(n):
        fixture = rng.choice(fixtures)
        data = json.loads(fixture.read_text())
        key = rng.choice(sorted(data))
        value = rng.choice(CONFIG_VALUES)
        data[key] = 0 if value == "<5000 digits>" else value
        path = tmp / f"c{i}" / "config.json"
        path.parent.mkdir()
        text = json.dumps(data)
        if value == "<5000 digits>":  # beyond Python's int-to-text digit limit: written by hand
            text = text.replace(f'"{key}": 0', f'"{key}": {"9" * 5000}')
        path.write_text(text)
        out.append(["estimate", str(path), "--format", "json"])
    return out


SECTIONS = {"estimate": 10, "plan": 4, "sweep": 6, "check": 0, "explain": 20, "models": 20, "gpus": 20}
"""Bad values drawn per option, per command (check's options are fuzzed through --set below)."""


def all_cases(tmp: Path) -> dict[str, list[list[str]]]:
    rng = random.Random(SEED)
    cases = {name: option_cases(rng, name, n) for name, n in SECTIONS.items() if n and name in commands()}
    cases["check --set"] = set_cases(rng, 260)
    cases["config.json"] = config_cases(rng, tmp, 60)
    return cases


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> dict[str, list[list[str]]]:
    return all_cases(tmp_path_factory.mktemp("fuzz-contract"))


def test_at_least_1000_generated_inputs(generated):
    assert sum(len(v) for v in generated.values()) >= 1000, {k: len(v) for k, v in generated.items()}
    assert not set(commands()) - set(BASE_ARGS) - SKIP_COMMANDS, "a new command: give it a quick BASE_ARGS entry"


@pytest.mark.parametrize("section", [*SECTIONS, "check --set", "config.json"])
def test_generated_bad_inputs_keep_the_exit_code_contract(section, generated, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # --out, --plot, --junit, --debug-lp values land here
    failures = []
    for args in generated.get(section, []):
        _code, problem = outcome(args)
        if problem:
            failures.append(f"{' '.join(args)[-160:]} -> {problem}")
    assert not failures, f"{len(failures)} broke the contract, e.g.:\n" + "\n".join(failures[:8])


# -- environment: subprocesses ------------------------------------------------------------------------

CLI = [sys.executable, "-c", "from memplan.cli.app import main; main()"]
ENV_CASES = {
    "ascii_encoding_estimate": ("PYTHONIOENCODING=ascii", ["estimate", "gpt2"], None),
    "ascii_encoding_models": ("PYTHONIOENCODING=ascii", ["models"], None),
    "full_disk": (None, ["estimate", "gpt2"], "/dev/full"),
    "closed_stdout": (None, ["estimate", "gpt2"], "closed"),
    "closed_pipe": (None, ["models"], "pipe"),
}


def run_env(env_item: str | None, args: list[str], stdout: str | None) -> tuple[int, str]:
    import os

    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "80"}
    if env_item:
        key, _, value = env_item.partition("=")
        env[key] = value
    if stdout == "pipe":
        proc = subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        proc.stdout.close()  # the reader went away before memplan wrote
        err = proc.stderr.read().decode()
        return proc.wait(timeout=120), err
    if stdout == "closed":
        cmd = " ".join(f"'{a}'" for a in [*CLI, *args]) + " >&-"
        done = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, env=env, timeout=120)
        return done.returncode, done.stderr
    with open(stdout or os.devnull, "w") as out:
        done = subprocess.run([*CLI, *args], stdout=out, stderr=subprocess.PIPE, text=True, env=env, timeout=120)
    return done.returncode, done.stderr


@pytest.mark.parametrize("case", sorted(ENV_CASES))
def test_environment_keeps_the_exit_code_contract(case):
    code, err = run_env(*ENV_CASES[case])
    lines = [line for line in err.splitlines() if line.strip()]
    assert code in (0, 1, 2), f"exit {code}: {err[-300:]}"
    assert code != 2 or len(lines) == 1, err
