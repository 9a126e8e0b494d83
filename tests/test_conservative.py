"""Conservative by construction: over random configurations, the value that ``estimate``, ``check`` and
``plan`` compare against a capacity is the exact phase peak of the component rows (the largest sum of the
rows alive together in one phase; no row counted in a phase it is not alive in), every byte is
an int, and the safety margin (``--safety-margin``, default 0) is a visible row of exactly
ceil(pct / 100 × capacity) bytes that only ever makes a verdict stricter.
"""

from __future__ import annotations

import json
import math
import tempfile
from fractions import Fraction
from pathlib import Path
from typing import Any

import yaml
from hypothesis import assume, given
from hypothesis import strategies as st
from test_fuzz_cli import RUNNER, fuzz_settings

from memplan.cli.app import app
from memplan.config import JobConfig
from memplan.errors import MemplanError
from memplan.estimator import estimate
from memplan.memory.breakdown import INFER_PHASES, TRAIN_PHASES, Tier
from memplan.memory.runtime import safety_margin_bytes
from memplan.report.json_out import estimate_dict

MODELS = ["llama-3.2-1b", "qwen2.5-0.5b", "gpt2", "phi-3-mini", "mixtral-8x7b", "deepseek-v2-lite", "params:3B"]
GPUS = ["h100-sxm-80gb", "a100-sxm-40gb", "rtx-4090", "t4", "l4", "mi300x"]
MARGINS = [0, 0, 0.5, 5, 12.5, 33.3, 99.9]

configs = st.fixed_dictionaries({
    "job": st.sampled_from(["pretrain", "full", "lora", "qlora", "galore", "infer"]),
    "zero": st.integers(0, 3),
    "gpus_per_node": st.sampled_from([1, 2, 8]),
    "nodes": st.sampled_from([1, 2, 16]),
    "micro_batch": st.integers(1, 64),
    "seq_len": st.sampled_from([128, 2048, 8192, 131072]),
    "recompute": st.sampled_from(["none", "selective", "full"]),
    "offload_optimizer": st.sampled_from(["none", "none", "cpu", "nvme"]),
    "optimizer": st.sampled_from(["adamw", "adamw-8bit", "adafactor", "sgd", "lion"]),
    "allocator_reserve_pct": st.sampled_from([None, 0.0, 7.5, 33.0]),
    "safety_margin_pct": st.sampled_from(MARGINS),
    "infer": st.fixed_dictionaries({"context": st.sampled_from([512, 32768, 1_000_000]),
                                    "kv_dtype": st.sampled_from([None, "fp8", "int4"])}),
})


def rows_sum(est: Any, tier: Tier) -> int:
    return sum(r.bytes for r in est.rows if r.tier is tier)


def phase_peak(est: Any, tier: Tier) -> int:
    """The largest phase total, recomputed from each row's phases (every row names them)."""
    phases = TRAIN_PHASES if est.config.job.trains else INFER_PHASES
    assert all(r.phases for r in est.rows)
    return max(sum(r.bytes for r in est.rows if r.tier is tier and p in r.phases) for p in phases)


def try_estimate(model: str, gpu: str, cfg: dict[str, Any]) -> Any:
    from memplan.config import NOT_READ, Job

    cfg = {k: v for k, v in cfg.items() if k not in NOT_READ[Job(cfg["job"])]}  # only what the job reads
    try:
        return estimate(model, gpu, JobConfig.model_validate(cfg))
    except (MemplanError, ValueError):
        return None  # an invalid combination (e.g. offload without ZeRO): refused, not estimated


@fuzz_settings(80)
@given(model=st.sampled_from(MODELS), gpu=st.sampled_from(GPUS), cfg=configs)
def test_compared_value_is_the_exact_phase_peak(model: str, gpu: str, cfg: dict[str, Any]) -> None:
    est = try_estimate(model, gpu, cfg)
    assume(est is not None)
    doc = estimate_dict(est)
    for tier in Tier:
        exact = phase_peak(est, tier)
        assert all(isinstance(r.bytes, int) and r.bytes >= 0 for r in est.rows)
        assert est.peak(tier) == exact <= rows_sum(est, tier) == est.total(tier)
        block = doc["memory"][tier.value]
        assert block["total_bytes"] == sum(block["components"].values()) == rows_sum(est, tier)
        assert block["peak_bytes"] == max(block["phases"].values()) == exact
        assert block["headroom_bytes"] == est.capacity(tier) - exact
    assert est.fits == all(phase_peak(est, t) <= est.capacity(t) for t in Tier)
    margin = [r.bytes for r in est.rows if r.component == "runtime/safety_margin"]
    pct = cfg["safety_margin_pct"]
    if pct:
        cap = est.capacity(Tier.GPU)
        assert margin == [math.ceil(Fraction(str(pct)) * cap / 100)]
        assert margin[0] >= pct / 100 * cap  # rounded up, never down
    else:
        assert margin == []  # default 0: no row, the gate is the exact sum of the modelled rows


@fuzz_settings(40)
@given(model=st.sampled_from(MODELS), gpu=st.sampled_from(GPUS), cfg=configs)
def test_a_safety_margin_only_makes_the_verdict_stricter(model: str, gpu: str, cfg: dict[str, Any]) -> None:
    with_margin = try_estimate(model, gpu, {**cfg, "safety_margin_pct": 20})
    without = try_estimate(model, gpu, {**cfg, "safety_margin_pct": 0})
    assume(with_margin is not None and without is not None)
    gpu_with, gpu_without = with_margin.peak(Tier.GPU), without.peak(Tier.GPU)
    assert gpu_with - gpu_without == safety_margin_bytes(capacity_bytes=without.capacity(Tier.GPU), pct=20)
    assert not with_margin.fits or without.fits


def test_safety_margin_default_and_bounds() -> None:
    assert JobConfig().safety_margin_pct == 0
    assert safety_margin_bytes(capacity_bytes=10**11, pct=0) == 0
    assert safety_margin_bytes(capacity_bytes=3, pct=33.3) == 1  # 0.999 bytes, rounded up
    assert safety_margin_bytes(capacity_bytes=85_520_809_984, pct=5) == 4_276_040_500  # 5% of an H100 exactly
    result = RUNNER.invoke(app, ["estimate", "gpt2", "--safety-margin", "100"])
    assert result.exit_code == 2 and "safety_margin_pct" in result.stderr, result.stderr


def test_safety_margin_is_a_visible_row_in_every_output() -> None:
    args = ["estimate", "llama-3.1-8b", "--job", "lora", "--safety-margin", "5"]
    doc = json.loads(RUNNER.invoke(app, [*args, "--format", "json"]).stdout)
    # 5% of the H100's capacity, the CUDA runtime's total (deviceQuery's 85,017,755,648 bytes in whole MiB), rounded up
    cuda_total = 85_017_755_648 // 2**20 * 2**20
    assert doc["memory"]["gpu"]["components"]["runtime/safety_margin"] == -(-cuda_total * 5 // 100)
    assert "runtime/safety_margin" in doc["sources"]
    assert "runtime/safety_margin" in RUNNER.invoke(app, args).stdout
    assert "gpu:runtime/safety_margin_bytes" in RUNNER.invoke(app, [*args, "--format", "csv"]).stdout


# -- check: the value it gates on ------------------------------------------------------------------

recipes = st.fixed_dictionaries({
    "model": st.sampled_from(MODELS[:-1]),
    "gpu": st.sampled_from(GPUS),
    "job": st.sampled_from(["full", "lora", "qlora", "infer"]),
    "gpus": st.sampled_from([1, 8]),
    "zero": st.integers(0, 3),
    "seq": st.sampled_from([1024, 8192]),
    "headroom": st.sampled_from(["0B", "10%", "2GiB", "99%"]),
    "margin": st.sampled_from(MARGINS),
})


def recipe_yaml(r: dict[str, Any]) -> dict[str, Any]:
    infer = r["job"] == "infer"
    job = {"type": r["job"], "context": r["seq"]} if infer else {"type": r["job"], "seq_len": r["seq"], "micro_batch": 1}
    return {"model": r["model"], "hardware": {"gpu": r["gpu"], "gpus_per_node": r["gpus"]}, "job": job,
            "fixed": {"zero": 0 if infer else r["zero"], "safety_margin_pct": r["margin"]}, "min_headroom": r["headroom"]}


@fuzz_settings(30)
@given(r=recipes)
def test_check_gates_on_the_exact_phase_peak(r: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "r.yaml"
        path.write_text(yaml.safe_dump(recipe_yaml(r)))
        result = RUNNER.invoke(app, ["check", str(path), "--format", "json"])
    assert result.exit_code in (0, 1, 2), result.stderr
    doc = json.loads(result.stdout)
    rec = doc["recipes"][0]
    assume(rec["status"] != "error")
    est = rec["estimate"]
    for t in rec["tiers"]:
        block = est["memory"][t["tier"]]
        assert t["total_bytes"] == block["peak_bytes"] == max(block["phases"].values())
        assert block["peak_bytes"] <= sum(block["components"].values())
        assert t["ok"] == (t["capacity_bytes"] - t["total_bytes"] >= t["required_headroom_bytes"])
    if r["margin"]:
        assert "runtime/safety_margin" in est["memory"]["gpu"]["components"]
    assert rec["ok"] == all(t["ok"] for t in rec["tiers"])


# -- plan: every offered plan fits by the exact phase peak, margin included ----------------------------------

@fuzz_settings(8)
@given(margin=st.sampled_from([0, 10, 40]), gpu=st.sampled_from(["t4", "l4", "a100-sxm-40gb"]),
       job=st.sampled_from(["full", "lora", "infer"]))
def test_plans_fit_by_the_exact_phase_peak(margin: float, gpu: str, job: str) -> None:
    result = RUNNER.invoke(app, ["plan", "qwen2.5-0.5b", "--gpu", gpu, "--gpus", "2", "--job", job, "--top", "2",
                                 "--safety-margin", str(margin), "--format", "json"])
    assert result.exit_code in (0, 1), result.stderr
    doc = json.loads(result.stdout)
    for cand in [doc["best"], *doc["alternatives"]] if doc["best"] else []:
        gpu_block = cand["memory"]["gpu"]
        assert gpu_block["total_bytes"] == sum(gpu_block["components"].values())
        assert gpu_block["peak_bytes"] == max(gpu_block["phases"].values()) <= gpu_block["capacity_bytes"]
        assert ("runtime/safety_margin" in gpu_block["components"]) == bool(margin)
