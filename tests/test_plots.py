"""Plots (the ``plot`` extra): rendered with Agg, checked to be valid, non-empty PNG and SVG images."""

from __future__ import annotations

import struct
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from conftest import run_cli
from typer.testing import CliRunner

import memplan.cli.ci  # noqa: F401  (registers check, sweep and explain on the app)
from memplan.config import Job
from memplan.errors import MemplanError
from memplan.estimator import estimate
from memplan.grid import SweepSpec, run
from memplan.memory.breakdown import Tier
from memplan.report import plots

pytest.importorskip("matplotlib", reason="plots need the plot extra (matplotlib)")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SVG = "{http://www.w3.org/2000/svg}"


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the IHDR chunk, after checking the signature and the end chunk."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR" and data.endswith(b"IEND\xaeB`\x82")
    return struct.unpack(">II", data[16:24])


def assert_png(path: Path) -> None:
    from matplotlib.image import imread

    width, height = png_size(path)
    assert width > 300 and height > 200 and path.stat().st_size > 10_000
    pixels = imread(path)
    assert pixels.shape[:2] == (height, width)
    assert pixels[..., :3].std() > 0.05  # not a blank canvas


def svg_texts(path: Path) -> str:
    root = ET.parse(path).getroot()
    assert root.tag == f"{SVG}svg" and len(list(root.iter(f"{SVG}path"))) > 10
    return path.read_text()


@pytest.fixture(scope="module")
def offload():
    return estimate("llama-3.1-8b", "h100", job="full", zero=3, offload_optimizer="cpu", offload_params="cpu",
                    gpus_per_node=8)


def test_breakdown_png_and_svg(tmp_path: Path, offload) -> None:
    png = plots.maybe_plot(offload, tmp_path / "breakdown.png")
    assert png == tmp_path / "breakdown.png"
    assert_png(png)
    svg = plots.maybe_plot(offload, tmp_path / "breakdown.svg")
    text = svg_texts(svg)
    h100 = 85_017_755_648 // 2**20 / 1024  # the H100's CUDA total (deviceQuery bytes, whole MiB), in GiB
    assert f"capacity {h100:,.2f} GiB" in text and "CPU RAM (per node)" in text  # both tiers, against capacity
    assert "optimizer/adam_m" in text


def test_plan_draws_memory_against_context(tmp_path: Path) -> None:
    from memplan.catalog.resolve import load_model
    from memplan.catalog.schema import HostSpec
    from memplan.catalog.store import catalog_gpu
    from memplan.config import JobConfig
    from memplan.planner.plan import PlanRequest, plan
    from memplan.planner.space import Objective, SearchSpace

    req = PlanRequest(model=load_model("qwen2.5-0.5b"), gpu=catalog_gpu("t4"), host=HostSpec(),
                      base=JobConfig(job=Job.INFER), space=SearchSpace(batch=(1, 4, 16)), objective=Objective.MAX_BATCH)
    result = plan(req)
    assert result.best is not None
    svg = svg_texts(plots.maybe_plot(result, tmp_path / "plan.svg"))
    assert "GPU memory vs context" in svg and "chosen 4,096" in svg
    assert_png(plots.maybe_plot(result, tmp_path / "plan.png", axis="batch"))
    points = plots.curve_points(result.best.estimate, "context")
    totals = [p.total(Tier.GPU) for _, p in points]
    assert totals == sorted(totals) and totals[-1] > result.best.estimate.capacity(Tier.GPU)


def test_sweep_heatmap(tmp_path: Path) -> None:
    spec = SweepSpec(models=("gpt2", "llama-3.1-8b"), gpus=("t4", "h100"), jobs=(Job.FULL, Job.INFER))
    path = plots.maybe_plot(run(spec, workers=1), tmp_path / "matrix.png")
    assert_png(path)


def test_cli_plot_option(runner: CliRunner, tmp_path: Path) -> None:
    out = tmp_path / "fit.svg"
    run_cli(runner, "sweep", "-m", "gpt2", "-g", "t4,l4", "-j", "infer", "--workers", "1", "--plot", str(out))
    assert "infer · 1 GPU · context 4,096" in svg_texts(out)
    bad = run_cli(runner, "sweep", "-m", "gpt2", "-g", "t4", "--plot", str(tmp_path / "fit.jpg"), code=2)
    assert "--plot" in bad.stderr and ".png" in bad.stderr


def test_no_path_no_plot_and_clear_errors(tmp_path: Path, offload, monkeypatch: pytest.MonkeyPatch) -> None:
    assert plots.maybe_plot(offload, None) is None
    with pytest.raises(MemplanError, match="--plot-axis"):
        plots.maybe_plot(offload, tmp_path / "x.png", axis="tokens")
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MemplanError, match=r"memplan\[plot\]"):
        plots.maybe_plot(offload, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_plot_module_imports_no_matplotlib_until_drawing() -> None:
    import subprocess

    code = "import sys, memplan.report.plots, memplan.cli.ci, memplan.cli.sweep; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def has_plot_option(command: str) -> bool:
    from memplan.cli.app import load_command

    return "plot" in {p.name for p in load_command(command).params}


@pytest.mark.skipif(not has_plot_option("estimate"), reason="memplan.cli.app has no --plot on estimate/plan yet")
def test_estimate_and_plan_plot_options(runner: CliRunner, tmp_path: Path) -> None:
    run_cli(runner, "estimate", "llama-3.1-8b", "--gpu", "l4", "--job", "qlora", "--plot", str(tmp_path / "e.png"))
    assert_png(tmp_path / "e.png")
    run_cli(runner, "plan", "qwen2.5-0.5b", "--gpu", "t4", "--job", "infer", "--batch", "1,4", "--plot",
            str(tmp_path / "p.svg"), "--plot-axis", "batch")
    assert "GPU memory vs micro-batch" in svg_texts(tmp_path / "p.svg")
    skipped = run_cli(runner, "plan", "llama-3.1-70b", "--gpu", "t4", "--job", "lora", "--zero", "0",
                      "--offload-optimizer", "none", "--offload-params", "none", "--plot", str(tmp_path / "none.png"),
                      code=1)
    assert "--plot skipped" in skipped.stderr and not (tmp_path / "none.png").exists()
