"""``memplan sweep``: the grid, the exact fit search, the fit matrix, processes, CSV and progress."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pandas as pd
import pytest
from conftest import run_cli
from typer.testing import CliRunner

import memplan.cli.ci  # noqa: F401  (registers check, sweep and explain on the app)
import memplan.grid as sw
from memplan.config import Job, JobConfig
from memplan.estimator import estimate
from memplan.memory.breakdown import Tier
from memplan.memory.inference import largest_fitting
from memplan.report.sweep_out import matrices
from memplan.search import with_size

ROOT = Path(__file__).resolve().parents[1]
SMALL = sw.SweepSpec(models=("qwen2.5-0.5b", "llama-3.2-1b"), gpus=("t4", "l4"), jobs=(Job.LORA, Job.INFER),
                     seq_lens=(1024,), contexts=(4096,))


def bisection_oracle(model: str, gpu: str, cfg: JobConfig, axis: str, hi: int, required: int = 0) -> int:
    """The largest value that fits, by the plain bisection ``memplan estimate --max-batch`` uses."""
    def ok(v: int) -> bool:
        est = estimate(model, gpu, with_size(cfg, axis, v))  # type: ignore[arg-type]
        return est.fits and est.headroom(Tier.GPU) >= required
    return largest_fitting(ok, lo=1, hi=hi)


def test_secant_search_finds_the_same_answer_as_bisection() -> None:
    rng = random.Random(7)
    for _ in range(3000):
        hi = rng.choice([1, 2, 3, 17, 1000, 2**16, 2**24])
        threshold = rng.randint(0, min(hi + 3, 10**7))
        big = rng.choice([1, 10**3, 10**12])
        curve = rng.random()

        def slack(v: int, t: int = threshold, b: int = big, c: float = curve) -> int:
            return (t - v) * b + int(c * v * v) if v <= t else -1 - int(c * v)

        assert sw.largest_ok(slack, hi=hi) == min(threshold, hi)


def test_secant_search_needs_few_evaluations_on_affine_memory() -> None:
    calls: list[int] = []

    def slack(v: int) -> int:
        calls.append(v)
        return 80 * 2**30 - 17 * 2**30 - v * 123_456_789

    assert sw.largest_ok(slack, hi=2**16) == (63 * 2**30) // 123_456_789
    assert len(calls) <= 5  # bisection over [1, 2^16] needs about 2·16


def test_grid_cells_and_metric_axes() -> None:
    cells = sw.cells(SMALL)
    assert len(cells) == 2 * 2 * 2 and all(c.batch is None for c in cells)
    assert {c.size for c in cells if c.job is Job.INFER} == {4096}
    context = sw.cells(sw.SweepSpec(models=("gpt2",), gpus=("t4",), jobs=(Job.FULL,), batches=(1, 4),
                                    metric="max-context"))
    assert [(c.size, c.batch) for c in context] == [(None, 1), (None, 4)]
    with pytest.raises(Exception, match="whole number"):
        sw.SweepSpec(models=("gpt2",), gpus=("t4",), jobs=(Job.FULL,), gpu_counts=(12,)).layout(12)


def test_max_batch_cells_match_bisection() -> None:
    result = sw.run(SMALL, workers=1)
    assert not any(c.error for c in result.cells)
    for r in result.cells[:4]:
        c = r.cell
        cfg = with_size(JobConfig(job=c.job), "context", c.size)
        assert r.value == bisection_oracle(c.model, c.gpu, cfg, "micro_batch", sw.MAX_BATCH), c
    assert result.estimates < 6 * len(result.cells)


def test_max_context_and_headroom() -> None:
    spec = sw.SweepSpec(models=("qwen2.5-0.5b",), gpus=("t4",), jobs=(Job.INFER,), batches=(4,),
                        metric="max-context", min_headroom="20%")
    (cell,) = sw.run(spec, workers=1).cells
    cap = estimate("qwen2.5-0.5b", "t4").capacity(Tier.GPU)
    cfg = JobConfig(job=Job.INFER, micro_batch=4)
    assert cell.value == bisection_oracle("qwen2.5-0.5b", "t4", cfg, "context", sw.MAX_CONTEXT_TOKENS, -(-cap // 5))
    assert cell.value > 0 and cell.records[0]["ok"] in (True, False)


def test_fits_metric_takes_the_largest_swept_batch() -> None:
    spec = sw.SweepSpec(models=("llama-3.2-1b",), gpus=("t4",), jobs=(Job.FULL,), batches=(1, 2, 64, 4096),
                        metric="fits")
    (cell,) = sw.run(spec, workers=1).cells
    fits = [r["micro_batch"] for r in cell.records if r["ok"]]
    assert [r["micro_batch"] for r in cell.records] == [1, 2, 64, 4096]
    assert cell.value == max(fits, default=0) and cell.value < 4096


def test_invalid_cells_are_reported_not_fatal() -> None:
    spec = sw.SweepSpec(models=("llama-3.2-1b",), gpus=("t4",), jobs=(Job.GALORE, Job.LORA), gpu_counts=(2,))
    galore, lora = sw.run(spec, workers=1).cells
    assert galore.value is None and "per-layer" in galore.error and galore.records[0]["error"]
    assert lora.value is not None and not lora.error
    (m1, m2) = matrices(sw.run(spec, workers=1))
    assert m1.cell_text("llama-3.2-1b", "t4") == "n/a" and m2.cell_text("llama-3.2-1b", "t4") != "n/a"


def test_no_largest_batch_for_what_is_not_modelled() -> None:
    spec = sw.SweepSpec(models=("zero-offload-13b",), gpus=("h100",), jobs=(Job.FULL, Job.INFER))
    for result in sw.run(spec, workers=1).cells:  # a params-only model: no activations, no KV cache
        assert result.value is None and "does not model" in result.error
        assert result.records[0]["gpu_total_bytes"] > 0  # the estimate itself is still reported
    fits = sw.run(sw.SweepSpec(models=("zero-offload-13b",), gpus=("h100",), jobs=(Job.FULL,), metric="fits"),
                  workers=1).cells[0]
    assert fits.value == 0 and not fits.error  # 13B with fp32 Adam states does not fit one H100


def test_processes_give_the_same_results(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sw, "PROCESS_THRESHOLD", 1)
    done: list[int] = []
    parallel = sw.run(SMALL, workers=2, progress=done.append)
    serial = sw.run(SMALL, workers=1)
    assert [c.value for c in parallel.cells] == [c.value for c in serial.cells]
    assert [c.cell for c in parallel.cells] == [c.cell for c in serial.cells]
    assert sum(done) == len(serial.cells)


def test_cli_prints_the_fit_matrix_and_writes_exact_csv(runner: CliRunner, tmp_path: Path) -> None:
    out = tmp_path / "sweep.csv"
    result = run_cli(runner, "sweep", "-m", "qwen2.5-0.5b,llama-3.1-8b", "-g", "t4,h100", "-j", "full,infer",
                     "--workers", "1", "--out", str(out))
    assert "full · 1 GPU · seq 2,048: largest micro-batch that fits" in result.stdout
    assert "✗" in result.stdout  # llama-3.1-8b full fine-tuning fits on neither card
    assert "wrote 8 rows" in result.stderr and "━" not in result.stderr  # no progress bar off a terminal
    df = pd.read_csv(out)
    assert len(df) == 8 and set(df["job"]) == {"full", "infer"}
    byte_cols = [c for c in df.columns if c.endswith("_bytes") and c.startswith(("gpu:", "cpu:", "nvme:"))]
    assert byte_cols and all(str(df[c].dtype) == "int64" for c in byte_cols)  # exact ints, no float NaN
    assert {"gpu_total_gib", "max_batch", "ok"} <= set(df.columns)
    row = df[(df.model == "qwen2.5-0.5b") & (df.gpu == "t4") & (df.job == "infer")].iloc[0]
    est = estimate("qwen2.5-0.5b", "t4", job="infer")
    assert int(row["gpu_total_bytes"]) == est.total(Tier.GPU)
    assert int(row["gpu:kv_cache_bytes"]) == dict((r.component, r.bytes) for r in est.rows)["kv_cache"]


def test_cli_json_and_recipe_grid(runner: CliRunner) -> None:
    recipe = ROOT / "recipes" / "qwen2.5-72b-serve-32k.yaml"
    data = json.loads(run_cli(runner, "sweep", "--recipe", str(recipe), "-g", "h100,h200", "-c", "32768",
                              "--format", "json").stdout)
    assert data["metric"] == "max-batch" and data["cells"] == 2 * 2  # 2 GPUs × gpu_counts [4, 8]
    four, eight = data["matrices"]
    assert (four["gpus"], eight["gpus"]) == (4, 8)
    assert 0 < four["values"][0][0] < eight["values"][0][0]  # tp over 8 GPUs leaves more room for KV
    assert four["values"][0][0] <= four["values"][0][1]  # h200 holds at least as much as h100


def test_cli_rejects_bad_grids(runner: CliRunner) -> None:
    assert "unknown model" in run_cli(runner, "sweep", "-m", "llama-9", "-g", "t4", code=2).stderr
    assert "--metric" in run_cli(runner, "sweep", "-m", "gpt2", "-g", "t4", "--metric", "most", code=2).stderr
    assert "--gpu" in run_cli(runner, "sweep", "-m", "gpt2", code=2).stderr
    assert "unknown job 'lorra'" in run_cli(runner, "sweep", "-m", "gpt2", "-g", "t4", "-j", "lorra", code=2).stderr
    assert "ambiguous" in run_cli(runner, "sweep", "-m", "gpt2", "-g", "t4", "--min-headroom", "2G", code=2).stderr


def test_progress_bar_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    from memplan.cli import sweep as ci

    buffer = io.StringIO()
    monkeypatch.setattr("rich.console.Console.is_terminal", property(lambda self: True))
    monkeypatch.setattr("sys.stderr", buffer)
    spec = sw.SweepSpec(models=("gpt2",), gpus=("t4", "l4"), jobs=(Job.INFER,))
    result = ci.run_with_progress(spec, 2, quiet=False, workers=1, run=sw.run)
    assert len(result.cells) == 2 and "sweep" in buffer.getvalue()
    buffer.truncate(0)
    ci.run_with_progress(spec, 2, quiet=True, workers=1, run=sw.run)
    assert buffer.getvalue() == ""


def test_progress_bar_starts_no_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bar is redrawn from the progress callback, not by rich's refresh thread: a process with one OS thread can
    fork its sweep workers (``grid.start_method``)."""
    import threading

    from memplan.cli import sweep as ci

    monkeypatch.setattr("rich.console.Console.is_terminal", property(lambda self: True))
    monkeypatch.setattr("sys.stderr", io.StringIO())
    before = threading.active_count()
    seen = []

    def run(spec: sw.SweepSpec, **kwargs: object) -> sw.SweepResult:
        seen.append(threading.active_count())
        return sw.run(spec, **kwargs)

    spec = sw.SweepSpec(models=("gpt2",), gpus=("t4", "l4"), jobs=(Job.INFER,))
    ci.run_with_progress(spec, 2, quiet=False, workers=1, run=run)
    assert seen == [before]
