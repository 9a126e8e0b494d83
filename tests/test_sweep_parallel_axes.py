"""``sweep --pp``/``--cp`` with a ``--gpu-count`` axis: the base job is validated at the grid's GPU counts, not at
one GPU, so a degree that divides some counts sweeps; the counts it does not divide are n/a cells with the reason."""

from __future__ import annotations

import csv
import io

import pytest
from typer.testing import CliRunner

import memplan
from tests.conftest import run_cli

MODEL, GPU = "llama-3.2-1b", "a100-sxm-80gb"


def _rows(runner: CliRunner, *args: str) -> dict[int, dict[str, str]]:
    """The CSV rows by GPU count (GPUs per node × nodes)."""
    result = run_cli(runner, "sweep", "-m", MODEL, "-g", GPU, "-j", "full", "--gpu-count", "1,2,4", *args,
                     "--format", "csv", "-q")
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    return {int(r["gpus_per_node"]) * int(r["nodes"]): r for r in rows}


@pytest.mark.parametrize(("flag", "column"), [("--pp", "pp"), ("--cp", "cp")])
def test_a_degree_above_one_sweeps_the_counts_it_divides(runner: CliRunner, flag: str, column: str) -> None:
    rows = _rows(runner, flag, "2")
    assert set(rows) == {1, 2, 4}
    assert "must divide the 1 GPU (" in rows[1]["error"]
    for count in (2, 4):
        assert rows[count]["error"] == "", rows[count]["error"]
        assert rows[count][column] == "2" and int(rows[count]["max_batch"]) >= 1


def test_a_degree_that_divides_no_count_is_refused(runner: CliRunner) -> None:
    """Every cell would be invalid: one sentence, exit 2 (as ``estimate --pp 2`` on one GPU)."""
    result = run_cli(runner, "sweep", "-m", MODEL, "-g", GPU, "-j", "full", "--pp", "2", "-q", code=2)
    assert "must divide the 1 GPU (" in (result.stderr or result.stdout)


def test_sweep_options_without_a_job_flag(runner: CliRunner) -> None:
    """A fixed option (--zero) or an axis (--seq-len) without -j: the default job reads them."""
    for args in (("--zero", "2", "--gpu-count", "2"), ("-s", "4096")):
        result = run_cli(runner, "sweep", "-m", MODEL, "-g", GPU, *args, "--format", "csv", "-q")
        rows = list(csv.DictReader(io.StringIO(result.stdout)))
        assert rows and all(r["error"] == "" for r in rows)


def test_api_sweep_takes_pp_with_gpu_counts() -> None:
    df = memplan.sweep(MODEL, GPU, gpu_counts=(2, 4), pp=2)
    assert list(df["pp"].astype(int)) == [2, 2]
    assert (df["error"].astype(str).isin(["", "nan"])).all()
