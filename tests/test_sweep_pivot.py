"""``memplan sweep --pivot``, ``--usd-per-hour`` and ``--speed``: the fit matrix laid out for people and as CSV,
and the cost and speed columns of every row."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pandas as pd
from conftest import run_cli
from typer.testing import CliRunner

import memplan.cli.ci  # noqa: F401  (registers sweep on the app)
from memplan.catalog.store import catalog_gpu, gpu_names

GRID = ("-m", "qwen2.5-0.5b,llama-3.1-8b,mixtral-8x7b", "-j", "lora,infer", "--workers", "1", "-q")


def matrices(runner: CliRunner, *gpus: str) -> list[dict]:
    return json.loads(run_cli(runner, "sweep", *GRID, "-g", ",".join(gpus), "-f", "json").stdout)["matrices"]


def test_pivot_fits_80_columns_when_piped_and_shows_every_cell(runner: CliRunner) -> None:
    """The whole catalog's GPUs across: panels of at most 80 columns, each GPU once per matrix, each cell the
    JSON matrix's value ('-' for 0)."""
    gpus = gpu_names()
    text = run_cli(runner, "sweep", *GRID, "-g", "all", "--pivot").stdout
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80
    expected = {}
    for m in matrices(runner, *gpus):
        for i, model in enumerate(m["models"]):
            for j, gpu in enumerate(m["gpu_names"]):
                value = m["values"][i][j]
                expected[(m["title"], model, gpu)] = "n/a" if value is None else str(value) if value else "-"
    seen = {}
    title, header = "", []
    for line in lines:
        words = line.split()
        if "that fits" in line:
            title = line.split(" (GPUs")[0]
        elif words[:1] == ["model"]:
            header = words[1:]
        elif words and header and words[0] in ("qwen2.5-0.5b", "llama-3.1-8b", "mixtral-8x7b"):
            seen.update({(title, words[0], gpu): cell for gpu, cell in zip(header, words[1:], strict=True)})
    assert seen == expected


def test_pivot_csv_is_one_row_per_model_and_block(runner: CliRunner, tmp_path: Path) -> None:
    out = tmp_path / "rows.csv"
    text = run_cli(runner, "sweep", *GRID, "-g", "t4,h100-sxm-80gb", "--pivot", "-f", "csv", "--out", str(out)).stdout
    frame = pd.read_csv(io.StringIO(text))
    assert list(frame.columns) == ["job", "gpus", "size", "batch", "model", "t4", "h100-sxm-80gb"]
    assert len(frame) == 2 * 3  # two jobs × three models
    for m in matrices(runner, "t4", "h100-sxm-80gb"):
        rows = frame[frame["job"] == m["job"]].set_index("model")
        for i, model in enumerate(m["models"]):
            assert [rows.loc[model, g] for g in m["gpu_names"]] == m["values"][i]
    assert len(pd.read_csv(out)) == 2 * 3 * 2  # --out keeps one row per grid point


def test_pivot_of_a_fits_sweep_of_one_batch_says_fits(runner: CliRunner) -> None:
    text = run_cli(runner, "sweep", "-m", "qwen2.5-0.5b,mixtral-8x7b", "-g", "t4", "-j", "infer", "--metric", "fits",
                   "--pivot", "--workers", "1", "-q").stdout
    rows = {line.split()[0]: line.split()[1] for line in text.splitlines() if line.startswith(("qwen", "mixtral"))}
    assert rows == {"qwen2.5-0.5b": "FITS", "mixtral-8x7b": "-"}  # 0.5B serves on a 15 GiB T4; 47B does not


def test_usd_per_hour_and_speed_columns(runner: CliRunner) -> None:
    """The price is the flag's, else the catalog's, times the job's GPUs; the per-token prices are the hourly
    price over the tokens an hour at the row's speed (cost arithmetic written out here)."""
    args = ("sweep", "-m", "qwen2.5-0.5b", "-g", "l4,h100-sxm-80gb", "-j", "lora,infer", "--gpu-count", "1,2",
            "--workers", "1", "-q", "-f", "json")
    plain = json.loads(run_cli(runner, *args).stdout)["records"]
    for rec in plain:
        price = catalog_gpu(rec["gpu"]).price_per_hour_usd
        assert rec["usd_per_gpu_hour"] == price
        assert rec["usd_per_hour"] == (None if price is None else price * rec["gpus_per_node"] * rec["nodes"])
        assert "tokens_per_s" not in rec
    priced = json.loads(run_cli(runner, *args, "--usd-per-hour", "3", "--speed").stdout)["records"]
    for rec in priced:
        gpus = rec["gpus_per_node"] * rec["nodes"]
        assert rec["usd_per_gpu_hour"] == 3 and rec["usd_per_hour"] == 3 * gpus
        assert rec["tokens_per_s"] > 0 and rec["step_time_s"] > 0
        per_m = 3 * gpus / (rec["tokens_per_s"] * 3600) * 1e6
        trained, served = rec["usd_per_m_trained_tokens"], rec["usd_per_m_served_tokens"]
        assert (served if rec["job"] == "infer" else trained) == per_m
        assert (trained if rec["job"] == "infer" else served) is None
        assert abs(rec["usd_per_step"] - 3 * gpus * rec["step_time_s"] / 3600) < 1e-12


def test_flags_that_would_change_nothing_are_refused(runner: CliRunner) -> None:
    base = ("sweep", "-m", "gpt2", "-g", "l4", "--workers", "1", "-q")
    assert "JSON already holds" in run_cli(runner, *base, "--pivot", "-f", "json", code=2).stderr
    for flag in (("--speed",), ("--usd-per-hour", "2")):
        assert "give --out" in run_cli(runner, *base, *flag, code=2).stderr
        assert "give --out" in run_cli(runner, *base, *flag, "--pivot", "-f", "csv", code=2).stderr
    for bad in ("-1", "inf", "nan"):
        assert "--usd-per-hour" in run_cli(runner, *base, "-f", "csv", "--usd-per-hour", bad, code=2).stderr


def test_pivot_on_an_80_column_terminal_keeps_its_boxes_inside(runner: CliRunner) -> None:
    """rich's boxes take more room than the plain layout's gaps: the panels still fit the terminal."""
    from rich.console import Console

    import memplan.grid as grid
    from memplan.config import Job
    from memplan.report.pivot import render_pivot
    from memplan.report.sweep_out import matrices as mats
    from memplan.report.table import Out

    spec = grid.SweepSpec(models=("qwen2.5-0.5b", "llama-3.1-8b"), gpus=tuple(gpu_names()), jobs=(Job.INFER,))
    buffer = io.StringIO()
    out = Out(terminal=True)
    out._console = Console(file=buffer, width=80, force_terminal=True, color_system=None)
    render_pivot(mats(grid.run(spec, workers=1)), out)
    lines = buffer.getvalue().splitlines()
    assert max(len(line) for line in lines) <= 80
    assert sum(gpu in buffer.getvalue() for gpu in gpu_names()) == len(gpu_names())
