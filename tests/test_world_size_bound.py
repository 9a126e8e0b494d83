"""The world size memplan plans for is bounded (config.MAX_GPUS), and layouts are enumerated in O(√n): a huge
--nodes or hardware.nodes is bad input (exit 2, one sentence), not a planner that never returns."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from memplan.cli.app import app
from memplan.config import MAX_GPUS
from memplan.planner.space import divisors

RUNNER = CliRunner(env={"COLUMNS": "120", "NO_COLOR": "1"})


@pytest.mark.parametrize("n", [1, 2, 12, 36, 97, 1024, 16384, 720720])
def test_divisors_match_the_definition(n: int) -> None:
    assert divisors(n) == tuple(d for d in range(1, n + 1) if n % d == 0)


@pytest.mark.parametrize("args", [
    ["plan", "llama-3.1-8b", "--gpu", "h100-sxm-80gb", "--nodes", "9" * 40],
    ["estimate", "llama-3.1-8b", "--gpu", "h100-sxm-80gb", "--gpus", "2048", "--nodes", "2048"],
    ["check", "recipes/llama-3.1-8b-qlora-rtx4090.yaml", "--set", f"hardware.nodes={MAX_GPUS * 2}"],
])
def test_more_gpus_than_memplan_plans_for_is_bad_input(args: list[str]) -> None:
    result = RUNNER.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output


def test_the_bound_itself_is_accepted() -> None:
    result = RUNNER.invoke(app, ["estimate", "llama-3.1-8b", "--gpu", "h100-sxm-80gb", "--gpus", "8",
                                 "--nodes", str(MAX_GPUS // 8), "--zero", "3"])
    assert result.exit_code in (0, 1), result.output
