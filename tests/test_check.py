"""``memplan check``: the CI gate's exit codes, lines, JSON and JUnit XML."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml
from conftest import run_cli
from typer.testing import CliRunner

import memplan.cli.ci  # noqa: F401  (registers check, sweep and explain on the app)
from memplan.check import check_recipe, exit_code

ROOT = Path(__file__).resolve().parents[1]
FITS_LINE = re.compile(r"fits: \d+\.\d\d GiB of \d+\.\d\d GiB \(\d+\.\d% headroom\)")

SERVE = {  # estimated as written: fast, and the context is the knob CI changes
    "description": "Llama-3.1-8B serving on one L4",
    "model": "llama-3.1-8b",
    "hardware": {"gpu": "l4", "cpu_ram": "64GiB"},
    "job": {"type": "infer", "context": 8192, "concurrency": 1},
    "fixed": {"infer": {"paged": True}},
    "min_headroom": "10%",
}
PLANNED = {  # planned: the planner picks the micro-batch, keeping the headroom free
    "model": "qwen2.5-0.5b",
    "hardware": {"gpu": "t4", "cpu_ram": "32GiB"},
    "job": {"type": "full", "seq_len": 1024, "global_batch": 16},
    "search": {"micro_batch": [1, 2, 4, 8, 16], "zero": [0], "offload_optimizer": ["none"],
               "offload_params": ["none"], "recompute": ["none", "full"]},
    "objective": "max-batch",
    "min_headroom": "15%",
}


def write(tmp_path: Path, data: dict, name: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def with_job(data: dict, **job: object) -> dict:
    return {**data, "job": {**data["job"], **job}}


def test_a_recipe_that_fits_exits_0_with_one_line(runner: CliRunner, tmp_path: Path) -> None:
    result = run_cli(runner, "check", str(write(tmp_path, SERVE, "serve")), code=0)
    lines = result.stdout.splitlines()
    assert lines[0].startswith("PASS  serve  ") and FITS_LINE.search(lines[0]), result.stdout
    assert lines[-1] == "1 recipe: 1 fit, 0 do not fit"


def test_four_times_the_context_exits_1_with_the_reason(runner: CliRunner, tmp_path: Path) -> None:
    longer = with_job(SERVE, context=4 * SERVE["job"]["context"])
    result = run_cli(runner, "check", str(write(tmp_path, longer, "serve")), code=1)
    line = result.stdout.splitlines()[0]
    assert line.startswith("FAIL  serve  does not fit: ")
    over = re.search(r"does not fit: ([\d,.]+) GiB of ([\d,.]+) GiB per GPU \(over by ([\d,.]+) GiB\)", line)
    assert over, line
    need, cap, by = (float(g.replace(",", "")) for g in over.groups())
    assert need > cap and by == pytest.approx(need - cap, abs=0.011)
    # The same what-if without editing the file:
    same = run_cli(runner, "check", str(write(tmp_path, SERVE, "serve")), "--set", "job.context=32768", code=1)
    assert same.stdout.splitlines()[0] == line


def test_too_little_headroom_fails_even_when_it_fits(runner: CliRunner, tmp_path: Path) -> None:
    greedy = {**SERVE, "min_headroom": "60%"}
    result = run_cli(runner, "check", str(write(tmp_path, greedy, "greedy")), code=1)
    assert "headroom too small" in result.stdout and "required 60%" in result.stdout


def test_a_malformed_recipe_exits_2_naming_the_field(runner: CliRunner, tmp_path: Path) -> None:
    bad = {**SERVE, "hardware": {"gpu": "l4", "cpu_ram": "64G"}}
    result = run_cli(runner, "check", str(write(tmp_path, bad, "bad")), code=2)
    assert "hardware.cpu_ram" in result.stderr and "ambiguous" in result.stderr
    unknown = {**SERVE, "fixed": {"kv_cache_dtype": "fp8"}}
    result = run_cli(runner, "check", str(write(tmp_path, unknown, "unknown")), code=2)
    assert "fixed.kv_cache_dtype" in result.stderr and "ERROR unknown" in result.stdout
    result = run_cli(runner, "check", str(tmp_path / "missing.yaml"), code=2)
    assert "no such recipe file" in result.stderr
    (tmp_path / "broken.yaml").write_text("model: [unclosed\n")
    assert "cannot read the recipe" in run_cli(runner, "check", str(tmp_path / "broken.yaml"), code=2).stderr


def test_invalid_input_outranks_a_misfit(tmp_path: Path) -> None:
    fits = check_recipe(write(tmp_path, SERVE, "fits"))
    misfit = check_recipe(write(tmp_path, with_job(SERVE, context=32768), "misfit"))
    invalid = check_recipe(write(tmp_path, {**SERVE, "job": {"type": "infer", "seq_len": 4}}, "invalid"))
    assert [o.status for o in (fits, misfit, invalid)] == ["fits", "does_not_fit", "error"]
    assert exit_code([fits]) == 0 and exit_code([fits, misfit]) == 1 and exit_code([misfit, invalid, fits]) == 2


def test_a_planned_recipe_keeps_its_headroom(tmp_path: Path) -> None:
    outcome = check_recipe(write(tmp_path, PLANNED, "planned"))
    assert outcome.status == "fits" and outcome.mode == "plan", outcome.reason
    gpu = outcome.tiers[0]
    assert gpu.headroom >= gpu.required == -(-gpu.capacity * 15 // 100)
    # Without the headroom the planner may use memory the recipe keeps free: never less batch.
    bare = check_recipe(write(tmp_path, {**PLANNED, "min_headroom": "0B"}, "bare"))
    assert bare.plan.best.config.micro_batch >= outcome.plan.best.config.micro_batch
    assert bare.tiers[0].headroom < gpu.required  # the headroom requirement did change the plan
    hopeless = check_recipe(write(tmp_path, with_job(PLANNED, seq_len=262144), "hopeless"))
    assert hopeless.status == "does_not_fit" and hopeless.reason.startswith("no plan in the search space fits")


def test_junit_xml_has_one_testcase_per_recipe(runner: CliRunner, tmp_path: Path) -> None:
    paths = [write(tmp_path, SERVE, "a-fits"), write(tmp_path, with_job(SERVE, context=32768), "b-misfit"),
             write(tmp_path, {**SERVE, "hardware": {"gpu": "l4", "nvme": 5}}, "c-invalid")]
    report = tmp_path / "reports" / "memplan.xml"
    run_cli(runner, "check", *map(str, paths), "--junit", str(report), code=2)
    root = ET.fromstring(report.read_bytes())  # well-formed XML
    suite = root.find("testsuite")
    assert root.tag == "testsuites" and suite is not None
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == ["a-fits", "b-misfit", "c-invalid"]
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("3", "1", "1")
    assert cases[0].find("failure") is None and cases[0].find("error") is None
    assert "does not fit" in cases[1].find("failure").get("message")
    assert "hardware.nvme" in cases[2].find("error").get("message")
    assert all(float(c.get("time")) >= 0 and c.get("file") for c in cases)
    assert "weights/params" in cases[0].find("system-out").text


def test_format_json_prints_only_json(runner: CliRunner, tmp_path: Path) -> None:
    paths = [write(tmp_path, SERVE, "fits"), write(tmp_path, with_job(SERVE, context=32768), "misfit")]
    result = run_cli(runner, "check", *map(str, paths), "--format", "json", code=1)
    data = json.loads(result.stdout)
    assert (data["ok"], data["exit_code"], data["counts"]["does_not_fit"]) == (False, 1, 1)
    fits, misfit = data["recipes"]
    assert fits["status"] == "fits" and misfit["status"] == "does_not_fit"
    gpu = fits["tiers"][0]
    assert gpu["headroom_bytes"] == gpu["capacity_bytes"] - gpu["total_bytes"]
    assert gpu["total_bytes"] == fits["estimate"]["memory"]["gpu"]["total_bytes"]


def test_json_stdout_stays_clean_in_a_fresh_process(tmp_path: Path) -> None:
    """The solver's native banner (printed once per process, on fd 1) must not reach stdout."""
    code = "import memplan.cli.ci; from memplan.cli.app import app; app()"
    path = write(tmp_path, PLANNED, "planned")
    proc = subprocess.run([sys.executable, "-c", code, "check", str(path), "--format", "json"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["recipes"][0]["mode"] == "plan"


def test_the_shipped_workflow_gates_on_check() -> None:
    workflow = yaml.safe_load((ROOT / "examples" / "github-actions" / "memplan-check.yml").read_text())
    steps = [s.get("run", "") for job in workflow["jobs"].values() for s in job["steps"]]
    assert any("memplan check recipes/*.yaml" in run and "--junit" in run for run in steps)
    hooks = yaml.safe_load((ROOT / ".pre-commit-hooks.yaml").read_text())
    assert hooks[0]["entry"] == "memplan check" and hooks[0]["id"] == "memplan-check"


LIGHTNING = {"fixed.bnb_integration": "lightning"}
"""Lightning Fabric quantizes the output layer too (``bnb_integration``): its 16-bit dequantization is alive next to
the logits at the start of backward, a phase the planner's linear model once left it out of."""


def test_a_recipe_the_exact_estimate_fits_is_planned(tmp_path: Path) -> None:
    """The QLoRA recipe under Lightning: micro-batch 1 with every layer recomputed keeps the recipe's 10% free on
    the exact estimate, so the check must find a plan (it said "needs 13.57 GiB against 23.64 GiB (over by 0.00
    GiB)", having cut every micro-batch whose under-counted plan the re-check rejected)."""
    from memplan.config import JobConfig
    from memplan.estimator import estimate
    from memplan.memory.breakdown import Tier
    from memplan.recipe_load import load_recipe

    path = ROOT / "recipes" / "llama-3.1-8b-qlora-rtx4090.yaml"
    loaded = load_recipe(path, overrides=LIGHTNING)
    lean = JobConfig.model_validate({**loaded.config.model_dump(), "micro_batch": 1, "grad_accum": 16,
                                     "recompute": "full"})
    est = estimate(loaded.model, loaded.gpu, lean, host=loaded.host)
    assert est.headroom(Tier.GPU) >= loaded.recipe.required_bytes(Tier.GPU, est.capacity(Tier.GPU))
    outcome = check_recipe(path, overrides=LIGHTNING)
    assert outcome.status == "fits", outcome.reason


def test_a_missed_plan_is_not_reported_as_over_capacity() -> None:
    """When the search finds nothing although its leanest configuration fits the exact estimate, the reason says
    the planner missed it, with that configuration's real numbers, never "over by 0.00 GiB"."""
    from dataclasses import replace
    from types import SimpleNamespace

    from memplan.check import plan_request
    from memplan.config import JobConfig
    from memplan.estimator import estimate
    from memplan.memory.breakdown import Tier
    from memplan.planner.request import PlanResult
    from memplan.planner.suggest import binding
    from memplan.recipe_load import load_recipe

    loaded = load_recipe(ROOT / "recipes" / "llama-3.1-8b-qlora-rtx4090.yaml")
    lean = JobConfig.model_validate({**loaded.config.model_dump(), "micro_batch": 1, "grad_accum": 16,
                                     "recompute": "full"})
    req = plan_request(loaded, loaded.gpu, loaded.host, time_limit_s=30.0)
    result = PlanResult(status="infeasible", objective=req.objective)
    binding(replace(req, suggest=False), result, lambda _req: SimpleNamespace(best=SimpleNamespace(config=lean)))
    est = estimate(loaded.model, loaded.gpu, lean, host=loaded.host)
    text = result.binding or ""
    assert result.lean_fits and "over by" not in text and "fits" in text, text
    gpu = Tier.GPU
    assert f"{est.peak(gpu) / 2**30:,.2f} GiB per GPU of {est.capacity(gpu) / 2**30:,.2f} GiB" in text, text
    assert "micro-batch=1 recompute full" in text, text
