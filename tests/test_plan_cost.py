"""``plan --usd-per-hour``: the price per GPU-hour that the plan's cost (JSON, CSV, table) and min-cost read."""

from __future__ import annotations

import csv
import io

import pytest
from conftest import cli_json, run_cli
from typer.testing import CliRunner

import memplan.cli.ci  # noqa: F401  (registers the commands on the app)
from memplan.catalog.store import catalog_gpu

ARGS = ("plan", "llama-3.1-8b", "--gpu", "h100-sxm-80gb", "--job", "lora", "--top", "2")
SECONDS_PER_HOUR = 3600
TOKENS = 10**6


def _check_cost(cost: dict, price: float, gpus: int, step_time_s: float, tokens_per_s: float) -> None:
    hourly = price * gpus
    assert cost["usd_per_gpu_hour"] == price
    assert cost["usd_per_hour"] == pytest.approx(hourly)
    assert cost["usd_per_step"] == pytest.approx(hourly * step_time_s / SECONDS_PER_HOUR)
    assert cost["usd_per_m_trained_tokens"] == pytest.approx(hourly / SECONDS_PER_HOUR / tokens_per_s * TOKENS)
    assert cost["usd_per_m_served_tokens"] is None


def test_plan_json_costs_at_the_flag_price_else_the_catalog_price(runner: CliRunner) -> None:
    for flag, price in (((), catalog_gpu("h100-sxm-80gb").price_per_hour_usd), (("--usd-per-hour", "1.25"), 1.25)):
        data = cli_json(runner, *ARGS, *flag)
        for c in (data["best"], *data["alternatives"]):
            gpus = c["config"]["gpus_per_node"] * c["config"]["nodes"]
            _check_cost(c["cost"], price, gpus, c["step_time_s"], c["tokens_per_s"])


def test_plan_csv_and_table_show_the_flag_price(runner: CliRunner) -> None:
    rows = list(csv.DictReader(io.StringIO(run_cli(runner, *ARGS, "--usd-per-hour", "3", "--format", "csv").stdout)))
    assert rows and all(float(r["usd_per_gpu_hour"]) == 3.0 for r in rows)
    table = run_cli(runner, *ARGS, "--usd-per-hour", "3").stdout
    assert "Cost: $3.00 per hour (1 GPU at $3.00)" in table


@pytest.mark.parametrize("value", ["-1", "inf", "nan"])
def test_plan_rejects_a_bad_price(runner: CliRunner, value: str) -> None:
    result = run_cli(runner, *ARGS, "--usd-per-hour", value, code=2)
    assert "--usd-per-hour" in result.stderr
