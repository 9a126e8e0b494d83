"""The published JSON Schemas (memplan/schema/*.schema.json): current with the code, and real output valid."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import run_cli
from typer.testing import CliRunner

import memplan.cli.ci  # noqa: F401  (registers check, sweep and explain on the app)
from memplan.report.schemas import MODELS, json_schema, schema_path

jsonschema = pytest.importorskip("jsonschema", reason="schema validation needs jsonschema (the test extra)")


def strip_prose(node: Any) -> Any:
    """The schema without titles and descriptions: the structural contract only."""
    if isinstance(node, dict):
        return {k: strip_prose(v) for k, v in node.items() if k not in ("title", "description")}
    if isinstance(node, list):
        return [strip_prose(v) for v in node]
    return node


def validator(name: str) -> Any:
    schema = json.loads(schema_path(name).read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def assert_valid(name: str, data: dict[str, Any]) -> None:
    errors = sorted(validator(name).iter_errors(data), key=str)
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors[:5])


@pytest.mark.parametrize("name", sorted(MODELS))
def test_published_schema_is_current(name: str) -> None:
    published = json.loads(schema_path(name).read_text())
    assert published["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert strip_prose(published) == strip_prose(json_schema(name)), (
        f"memplan/schema/{name}.schema.json is stale: run python -m memplan.report.schemas")


@pytest.mark.parametrize("args", [
    ("llama-3.1-8b", "--job", "lora"),
    ("mixtral-8x7b", "--job", "infer", "--gpus", "2", "--tp", "2", "--kv-dtype", "fp8", "--max-context"),
    ("zero-infinity-1t", "--zero", "3", "--offload-params", "nvme", "--offload-optimizer", "nvme", "--nvme", "30TB",
     "--gpus", "16", "--gpu", "v100-sxm2-32gb"),
    ("llama-3.1-70b", "--job", "qlora", "--max-batch"),
], ids=["lora", "infer", "nvme", "qlora"])
def test_estimate_output_validates(runner: CliRunner, args: tuple[str, ...]) -> None:
    data = json.loads(run_cli(runner, "estimate", *args, "--format", "json").stdout)
    assert_valid("estimate", data)


def test_plan_output_validates_feasible_and_infeasible(runner: CliRunner) -> None:
    feasible = json.loads(run_cli(runner, "plan", "qwen2.5-0.5b", "--gpu", "t4", "--job", "infer",
                                  "--batch", "1,8", "--format", "json").stdout)
    assert feasible["status"] == "optimal"
    assert_valid("plan", feasible)
    infeasible = json.loads(run_cli(runner, "plan", "llama-3.1-8b", "--gpu", "t4", "--job", "lora", "--zero", "0",
                                    "--offload-optimizer", "none", "--offload-params", "none", "--format", "json",
                                    code=1).stdout)
    assert infeasible["status"] == "infeasible" and infeasible["best"] is None and infeasible["suggestions"]
    assert_valid("plan", infeasible)


def test_check_output_validates(runner: CliRunner, tmp_path: Path) -> None:
    serve = {"model": "qwen2.5-0.5b", "hardware": {"gpu": "t4"}, "job": {"type": "infer", "context": 4096},
             "min_headroom": "10%"}
    planned = {**serve, "search": {"batch": [1, 4]}, "objective": "max-batch"}
    recipes = {"fits": serve, "planned": planned, "misfit": {**serve, "job": {"type": "infer", "context": 2**21}},
               "invalid": {**serve, "hardware": {"gpu": "t4", "cpu_ram": "8G"}}}
    paths = []
    for name, data in recipes.items():
        paths.append(tmp_path / f"{name}.yaml")
        paths[-1].write_text(yaml.safe_dump(data))
    data = json.loads(run_cli(runner, "check", *map(str, paths), "--format", "json", code=2).stdout)
    assert [r["status"] for r in data["recipes"]] == ["fits", "fits", "does_not_fit", "error"]
    assert data["recipes"][1]["plan"]["configuration"].startswith("tp=1")
    assert_valid("check", data)


def test_sweep_output_validates(runner: CliRunner) -> None:
    data = json.loads(run_cli(runner, "sweep", "-m", "gpt2,llama-3.2-1b", "-g", "t4", "-j", "infer,galore",
                              "--gpu-count", "1,2", "--workers", "1", "--format", "json").stdout)
    assert data["invalid_cells"] == 2  # GaLore's per-layer updates run on one GPU only
    assert_valid("sweep", data)


def test_the_schemas_reject_drift(runner: CliRunner) -> None:
    good = json.loads(run_cli(runner, "estimate", "gpt2", "--format", "json").stdout)
    renamed = copy.deepcopy(good)
    renamed["memory"]["gpu"]["total"] = renamed["memory"]["gpu"].pop("total_bytes")
    float_bytes = copy.deepcopy(good)
    float_bytes["memory"]["gpu"]["components"]["weights/params"] = 1.5
    bad_component = copy.deepcopy(good)
    bad_component["memory"]["gpu"]["components"]["weight/params"] = 1
    for broken in (renamed, float_bytes, bad_component, {**good, "schema_version": 2}):
        assert list(validator("estimate").iter_errors(broken))
