"""Recipes: every shipped recipe loads and is planned or estimated; the schema rejects bad input by name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from memplan.check import check_recipe
from memplan.config import Job, Offload, ZeroStage
from memplan.errors import MemplanError
from memplan.memory.breakdown import Tier
from memplan.recipe_load import apply_overrides, load_recipe, parse_set
from memplan.units import GB, GiB

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
FIXTURES = ROOT / "tests" / "fixtures" / "hf_configs"

BASE = {
    "model": "llama-3.1-8b",
    "hardware": {"gpu": "l4", "cpu_ram": "64GiB"},
    "job": {"type": "infer", "context": 8192, "concurrency": 1},
    "min_headroom": "10%",
}


def write(tmp_path: Path, data: dict, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def recipe_error(tmp_path: Path, data: dict) -> str:
    with pytest.raises(MemplanError) as exc:
        load_recipe(write(tmp_path, data))
    return str(exc.value)


def test_at_least_fifteen_recipes_cover_every_job() -> None:
    jobs = {load_recipe(p).config.job for p in RECIPES}
    assert len(RECIPES) >= 15
    assert jobs == set(Job)


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_loads_and_fits_with_its_headroom(path: Path) -> None:
    outcome = check_recipe(path)
    assert outcome.status == "fits", outcome.reason
    assert outcome.mode == ("plan" if outcome.loaded.recipe.planned else "estimate")
    gpu = outcome.tier(Tier.GPU)
    assert gpu is not None and gpu.headroom >= gpu.required > 0
    assert outcome.estimate.gpu.name == outcome.loaded.gpu.name  # checked on the real capacity
    assert outcome.estimate.capacity(Tier.GPU) == outcome.loaded.gpu.capacity_bytes  # the CUDA total


def test_named_scenarios_of_the_issue_are_shipped() -> None:
    by_name = {p.stem: load_recipe(p) for p in RECIPES}
    qlora = by_name["llama-3.1-8b-qlora-rtx4090"]
    assert (qlora.config.job, qlora.gpu.name) == (Job.QLORA, "rtx-4090")
    lora = by_name["llama-3.1-70b-lora-8xa100"]
    assert (lora.config.job, lora.gpu.name, lora.config.world_size) == (Job.LORA, "a100-sxm-80gb", 8)
    big = by_name["llama-3.1-405b-pretrain-128xh100-zero3"]
    assert (big.config.world_size, big.config.zero) == (128, ZeroStage.PARAMETERS)
    mixtral = by_name["mixtral-8x7b-serve-2xh100-fp8kv"]
    assert mixtral.config.infer.kv_dtype.value == "fp8" and mixtral.config.world_size == 2
    assert by_name["deepseek-v3-infer-8xh200"].model.name == "deepseek-v3"
    galore = by_name["llama-2-7b-galore-rtx4090"]
    assert galore.config.job is Job.GALORE and galore.gpu.marketed_memory_gb == 24
    infinity = by_name["zero-infinity-1t-nvme-dgx2"]
    assert infinity.config.offload_params is Offload.NVME and infinity.host.nvme_bytes == 28 * 10**12
    assert by_name["qwen2.5-72b-serve-32k"].config.infer.context == 32768


def test_sizes_need_an_explicit_unit(tmp_path: Path) -> None:
    ambiguous = recipe_error(tmp_path, {**BASE, "hardware": {"gpu": "l4", "cpu_ram": "80G"}})
    assert "hardware.cpu_ram" in ambiguous and "ambiguous" in ambiguous and "80GiB" in ambiguous
    bare = recipe_error(tmp_path, {**BASE, "hardware": {"gpu": "l4", "nvme": 512}})
    assert "hardware.nvme" in bare and "no unit" in bare
    loaded = load_recipe(write(tmp_path, {**BASE, "hardware": {"gpu": "l4", "cpu_ram": "1.5TiB", "nvme": "2TB"}}))
    assert loaded.host.cpu_ram_bytes == 1536 * GiB and loaded.host.nvme_bytes == 2000 * GB


def test_unknown_and_misplaced_fields_are_named(tmp_path: Path) -> None:
    assert "fixed.zero_stage" in recipe_error(tmp_path, {**BASE, "fixed": {"zero_stage": 2}})
    assert "hardwre" in recipe_error(tmp_path, {**BASE, "hardwre": {}})
    assert "search.tensor_parallel" in recipe_error(tmp_path, {**BASE, "search": {"tensor_parallel": [2]}})
    misplaced = recipe_error(tmp_path, {**BASE, "fixed": {"seq_len": 4096}})
    assert "fixed.seq_len" in misplaced and "job.seq_len" in misplaced
    wrong_job = recipe_error(tmp_path, {**BASE, "job": {"type": "lora", "context": 4096}})
    assert "job" in wrong_job and "context" in wrong_job
    assert "job.type" in recipe_error(tmp_path, {**BASE, "job": {"type": "finetune"}})
    assert "objective" in recipe_error(tmp_path, {**BASE, "objective": "throughput"})
    assert "min_headroom" in recipe_error(tmp_path, {**BASE, "min_headroom": "10"})
    assert "fixed.optimizer" in recipe_error(tmp_path, {**BASE, "fixed": {"optimizer": "adam"}})


def test_errors_name_the_file_and_suggest_catalog_names(tmp_path: Path) -> None:
    message = recipe_error(tmp_path, {**BASE, "hardware": {"gpu": "h100-sxm-80"}})
    assert message.startswith(str(tmp_path / "r.yaml")) and "hardware.gpu" in message and "h100-sxm-80gb" in message
    assert "model:" in recipe_error(tmp_path, {**BASE, "model": "llama-3.1-8"})


def test_global_batch_sets_gradient_accumulation(tmp_path: Path) -> None:
    data = {**BASE, "hardware": {"gpu": "h100", "gpus_per_node": 8},
            "job": {"type": "full", "seq_len": 2048, "micro_batch": 2, "global_batch": 64}, "fixed": {"zero": 3}}
    assert load_recipe(write(tmp_path, data)).config.grad_accum == 4  # 64 / (2 × 8)
    data["job"]["global_batch"] = 60
    assert "job.global_batch" in recipe_error(tmp_path, data)


def test_headroom_as_percentage_or_size_and_per_tier(tmp_path: Path) -> None:
    loaded = load_recipe(write(tmp_path, BASE))
    cap = loaded.gpu.memory_bytes
    assert loaded.recipe.required_bytes(Tier.GPU, cap) == -(-cap // 10)  # 10%, rounded up
    assert loaded.recipe.required_bytes(Tier.CPU, 10**12) == 0
    tiers = load_recipe(write(tmp_path, {**BASE, "min_headroom": {"gpu": "2GiB", "cpu": "5%"}})).recipe
    assert tiers.required_bytes(Tier.GPU, cap) == 2 * GiB
    assert tiers.required_bytes(Tier.CPU, 1000) == 50


def test_model_path_is_relative_to_the_recipe(tmp_path: Path) -> None:
    config = next(FIXTURES.glob("*.json"))
    (tmp_path / "models").mkdir()
    shutil.copy(config, tmp_path / "models" / "config.json")
    loaded = load_recipe(write(tmp_path, {**BASE, "model": "models/config.json"}))
    assert loaded.model.hidden_size == json.loads(config.read_text())["hidden_size"]


def test_what_if_overrides_reach_nested_fields(tmp_path: Path) -> None:
    overrides = parse_set(["job.context=32768", "fixed.infer.kv_dtype=fp8", "min_headroom=5%"])
    assert overrides == {"job.context": 32768, "fixed.infer.kv_dtype": "fp8", "min_headroom": "5%"}
    loaded = load_recipe(write(tmp_path, BASE), overrides=overrides)
    assert loaded.config.infer.context == 32768 and loaded.config.infer.kv_dtype.value == "fp8"
    assert BASE["job"]["context"] == 8192  # the caller's data is not mutated
    assert apply_overrides(BASE, {"job.context": 1})["job"] == {"type": "infer", "context": 1, "concurrency": 1}
    with pytest.raises(MemplanError, match="KEY=VALUE"):
        parse_set(["job.context"])


def test_search_block_maps_to_the_planner_space(tmp_path: Path) -> None:
    data = {**BASE, "job": {"type": "lora", "seq_len": 1024, "global_batch": 8},
            "search": {"micro_batch": [1, 2], "quant": ["none", "nf4"], "recompute": ["none", "full"]},
            "objective": "max-batch"}
    loaded = load_recipe(write(tmp_path, data))
    assert loaded.space.micro_batch == (1, 2) and loaded.space.quant == (None, "nf4")
    assert loaded.space.global_batch == 8 and loaded.objective.value == "max-batch"
