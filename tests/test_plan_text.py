"""``plan`` for people: the configuration line names the engine (table, CSV), and what ``plan`` itself prints (the best
plan line, the ranked alternatives, the suggestions) fits in 80 columns in a pipe."""

from __future__ import annotations

import csv
import io

from conftest import cli_json, run_cli

from memplan.report.table import PIPE_WIDTH

FITS = ("gpt2", "--gpu", "t4", "--job", "full", "--top", "3")
INFEASIBLE = ("llama-3.1-8b", "--gpu", "t4", "--job", "full", "--zero", "0", "--offload-optimizer", "none",
              "--offload-params", "none", "--top", "1")


def plan_lines(text: str) -> list[str]:
    """The lines ``plan`` writes itself: the best-plan line and the ranked alternatives, or the suggestions (the
    estimate table in between is ``estimate``'s)."""
    lines = text.splitlines()
    if "Ranked alternatives" not in text:
        return lines
    best = [lines[0]] + [line for line in lines[1:4] if line.startswith("  ")]  # the best-plan line, folded
    assert best[0].startswith("Best plan") and len(best) > 1
    return best + lines[lines.index("Ranked alternatives"):]


def test_the_configuration_names_the_engine_in_the_table_and_the_csv(runner):
    doc = cli_json(runner, "plan", *FITS, "--engine", "fsdp2")
    assert doc["best"]["engine"] == "fsdp2"
    text = run_cli(runner, "plan", *FITS, "--engine", "fsdp2").stdout
    assert "engine=fsdp2" in text.split("Ranked alternatives")[1]
    rows = list(csv.DictReader(io.StringIO(run_cli(runner, "plan", *FITS, "--format", "csv").stdout)))
    default = cli_json(runner, "plan", *FITS)["best"]["engine"]  # memplan's choice: the CSV's engine cell is empty
    assert rows and rows[0]["engine"] == "" and rows[0]["configuration"].split("; ")[0].endswith(f"engine={default}")


def test_plan_text_fits_80_columns_in_a_pipe(runner):
    for args, code in ((FITS, 0), (INFEASIBLE, 1)):
        text = run_cli(runner, "plan", *args, code=code).stdout
        long = [line for line in plan_lines(text) if len(line) > PIPE_WIDTH]
        assert not long, long
    assert "Smallest changes that fit" in text and "    --gpus " in text  # flags on their own indented line
