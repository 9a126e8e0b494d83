"""The typed Python API (memplan.api): lazy imports, Estimate, Plan, sweep DataFrames, cost, streamed CSV."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import run_cli
from typer.testing import CliRunner

import memplan
import memplan.cli.ci
import memplan.grid as grid
from memplan.config import Job
from memplan.errors import MemplanError
from memplan.memory.breakdown import INFER_PHASES, TRAIN_PHASES, Tier, phase_totals
from memplan.report.csv_out import records_to_csv
from memplan.report.sweep_stream import PARTIAL_COLUMN

ROOT = Path(__file__).resolve().parents[1]
COST = ("usd_per_gpu_hour", "usd_per_hour", "step_time_s", "tokens_per_s", "usd_per_step",
        "usd_per_m_trained_tokens", "usd_per_m_served_tokens")
GRID = grid.SweepSpec(models=("qwen2.5-0.5b", "mixtral-8x7b", "llama-3.2-1b"), gpus=("t4", "h100-sxm-80gb"),
                      jobs=(Job.FULL, Job.QLORA, Job.INFER, Job.GALORE), batches=(1, 3), gpu_counts=(1, 2),
                      metric="fits", speed=True)
"""Jobs whose components differ (LoRA adapters, KV cache, a MoE model) and invalid cells (GaLore on 2 GPUs)."""

LAZY = """
import json, sys
import memplan
est = memplan.estimate("llama-3.1-8b", "h100-sxm-80gb", job="lora")
before = sorted(m for m in ("pandas", "numpy") if m in sys.modules)
est.to_frame()
after = sorted(m for m in ("pandas", "numpy") if m in sys.modules)
print(json.dumps({"before": before, "after": after, "fn": callable(memplan.estimate)}))
"""


def catalog_price(gpu: str) -> float:
    data = yaml.safe_load((ROOT / "memplan" / "catalog" / "gpus" / f"{gpu}.yaml").read_text())
    return float(data["price_per_hour_usd"])


def test_import_memplan_and_estimate_import_neither_pandas_nor_numpy() -> None:
    proc = subprocess.run([sys.executable, "-c", LAZY], capture_output=True, text=True, timeout=120, check=True,
                          cwd=ROOT)
    out = json.loads(proc.stdout)
    assert out == {"before": [], "after": ["numpy", "pandas"], "fn": True}


def test_the_api_names_are_functions_even_after_the_modules_are_imported() -> None:
    import memplan.estimator
    import memplan.grid
    from memplan import estimate, plan, sweep

    assert all(callable(f) and type(f).__name__ == "function" for f in (estimate, plan, sweep))
    assert isinstance(estimate("gpt2", "t4"), memplan.Estimate)


def test_estimate_peak_rows_fits_and_frame() -> None:
    est = memplan.estimate("llama-3.1-8b", "h100-sxm-80gb", job="lora", seq_len=4096, lora_rank=8)
    assert est.config.lora.rank == 8 and est.config.seq_len == 4096
    gpu_rows = [r for r in est.rows if r.tier is Tier.GPU]
    assert est.peak == max(phase_totals(est.rows, Tier.GPU, TRAIN_PHASES).values())  # the step's largest moment
    assert est.peak <= sum(r.bytes for r in gpu_rows)
    assert est.fits == all(est.total(t) <= est.capacity(t) for t in Tier)
    frame = est.to_frame()
    assert str(frame["bytes"].dtype) == "int64" and len(frame) == len(est.rows)
    assert int(frame.loc[frame["tier"] == "gpu", "bytes"].sum()) == sum(r.bytes for r in gpu_rows)
    infer = memplan.estimate("qwen2.5-0.5b", "t4", job="infer", context=8192, kv_dtype="fp8")
    assert infer.config.infer.context == 8192 and infer.config.infer.kv_dtype == "fp8"
    assert infer.peak == max(phase_totals(infer.rows, Tier.GPU, INFER_PHASES).values())


@pytest.mark.parametrize("kwargs", [{"bogus": 1}, {"lora_bogus": 2}, {"seq_len": 0}, {"usd_per_hour": -1.0}])
def test_bad_options_are_one_sentence_errors(kwargs: dict) -> None:
    with pytest.raises(MemplanError):
        memplan.estimate("gpt2", "t4", **kwargs)


@pytest.mark.parametrize("serve", [{"prompt_tokens": 128}, {"hbm_efficiency": 0.5}, {"compute_efficiency": 0.3}])
def test_settings_only_a_serving_plan_reads_are_refused_by_estimate_and_sweep(serve: dict) -> None:
    """The prompt length and the efficiency shares time a serving plan; estimate and sweep compute memory, so
    they refuse them in one sentence (as the CLI offers them on plan only), and plan reads them."""
    (name,) = serve
    with pytest.raises(MemplanError, match=rf"serve\.{name} only times a serving plan"):
        memplan.estimate("gpt2", "l4", job="infer", serve=serve)
    with pytest.raises(MemplanError, match=rf"serve\.{name}"):
        memplan.sweep("gpt2", "l4", "infer", serve=serve)
    base = memplan.plan("gpt2", "l4", job="infer", top=1, batch=(8,), context=(1024,))
    told = memplan.plan("gpt2", "l4", job="infer", top=1, batch=(8,), context=(1024,), serve=serve)
    assert base.best is not None and told.best is not None
    assert base.to_frame().drop(columns="config", errors="ignore").to_dict() != \
        told.to_frame().drop(columns="config", errors="ignore").to_dict()


def test_plan_status_is_an_enum_and_cost_follows_the_catalog_price() -> None:
    p = memplan.plan("llama-3.2-1b", "l4", job="lora", top=2)
    assert p.status is memplan.PlanStatus.OPTIMAL and p.best is not None and len(p.options) <= 2
    price = catalog_price("l4")
    best = p.best
    gpus = best.config.gpus_per_node * best.config.nodes
    assert best.cost.usd_per_hour == pytest.approx(price * gpus)
    assert best.cost.usd_per_step == pytest.approx(price * gpus * best.step_time_s / 3600)
    assert best.cost.usd_per_m_trained_tokens == pytest.approx(price * gpus / (best.tokens_per_s * 3600) * 1e6)
    assert best.cost.usd_per_m_served_tokens is None
    frame = p.to_frame()
    assert list(frame["rank"]) == list(range(len(p.options))) and "usd_per_m_trained_tokens" in frame
    cheap = memplan.plan("llama-3.2-1b", "l4", job="lora", top=1, usd_per_hour=0.5)
    assert cheap.best.cost.usd_per_hour == pytest.approx(0.5 * gpus)


def test_an_infeasible_plan_has_a_status_and_typed_suggestions() -> None:
    p = memplan.plan("llama-3.1-70b", "t4", job="full", gpus=(1,), time_limit=20)
    assert p.status is memplan.PlanStatus.INFEASIBLE and p.best is None and not p.alternatives
    assert all(isinstance(s, memplan.Suggestion) and s.change for s in p.suggestions)


def test_sweep_frame_types_rows_and_pivot() -> None:
    frame = memplan.sweep(models=["qwen2.5-0.5b", "llama-3.2-1b"], gpus=["t4", "l4"], jobs=["lora", "infer"],
                          batches=[1, 2])
    assert len(frame) == 2 * 2 * 2 * 2  # models × GPUs × jobs × batches, one size each
    for col in frame.columns:
        if (col.endswith("_bytes") and ":" in col) or col in ("gpu_total_bytes", "headroom_bytes", "params"):
            assert str(frame[col].dtype) == "int64", col
    for col in ("model", "gpu", "job", "dtype", "optimizer"):
        assert isinstance(frame[col].dtype, pd.CategoricalDtype), col
    result = grid.run(grid.SweepSpec(models=("qwen2.5-0.5b", "llama-3.2-1b"), gpus=("t4", "l4"),
                                     jobs=(Job.LORA, Job.INFER)), workers=1)
    from memplan.report.pivot import fit_matrix

    pivot = fit_matrix(frame, job="lora")
    for cell in (c for c in result.cells if c.cell.job is Job.LORA):
        assert pivot.loc[cell.cell.model, cell.cell.gpu] == cell.value


def test_sweep_cost_columns_follow_the_price() -> None:
    plain = memplan.sweep(models=["qwen2.5-0.5b"], gpus=["l4"], jobs=["full"], gpu_counts=[2])
    assert list(plain["usd_per_hour"]) == [pytest.approx(2 * catalog_price("l4"))] and "usd_per_step" not in plain
    frame = memplan.sweep(models=["qwen2.5-0.5b"], gpus=["l4"], jobs=["full", "infer"], usd_per_hour=2.0, speed=True)
    assert list(frame["usd_per_gpu_hour"]) == [2.0, 2.0]
    train, serve = frame.iloc[0], frame.iloc[1]
    assert train["usd_per_step"] == pytest.approx(2.0 * train["step_time_s"] / 3600)
    assert train["usd_per_m_trained_tokens"] == pytest.approx(2.0 / (train["tokens_per_s"] * 3600) * 1e6)
    assert pd.isna(train["usd_per_m_served_tokens"]) and pd.isna(serve["usd_per_m_trained_tokens"])
    assert serve["usd_per_m_served_tokens"] == pytest.approx(2.0 / (serve["tokens_per_s"] * 3600) * 1e6)


def parse(text: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(text)))


def test_streamed_csv_is_byte_identical_to_the_stdlib_writer(runner: CliRunner, tmp_path: Path) -> None:
    from dataclasses import replace

    plain = records_to_csv(grid.run(replace(GRID, speed=False), workers=1).records)
    out = tmp_path / "sweep.csv"
    args = ["sweep", "--model", ",".join(GRID.models), "--gpu", ",".join(GRID.gpus), "--job", "full,qlora,infer,galore",
            "--batch", "1,3", "--gpu-count", "1,2", "--metric", "fits", "--workers", "1", "--quiet"]
    stdout = run_cli(runner, *args, "--format", "csv", "--out", str(out)).stdout
    assert stdout == plain and out.read_text() == plain
    records = grid.run(GRID, workers=1).records
    expected = records_to_csv(records)
    frame = memplan.sweep(models=GRID.models, gpus=GRID.gpus, jobs=["full", "qlora", "infer", "galore"],
                          batches=[1, 3], gpu_counts=[1, 2], metric="fits", speed=True, out=tmp_path / "api.csv")
    assert (tmp_path / "api.csv").read_text() == expected and len(frame) == len(records)
    # today's columns: the new CSV without the cost columns is what the writer gave before them
    old = records_to_csv([{k: v for k, v in r.items() if k not in COST} for r in records])
    rows = parse(expected)
    keep = [i for i, name in enumerate(rows[0]) if name not in COST]
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([[row[i] for i in keep] for row in rows])
    assert buf.getvalue() == old


def test_ctrl_c_keeps_the_finished_rows_flagged_partial(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real, calls = grid.evaluate, []

    def interrupted(spec: grid.SweepSpec, cell: grid.Cell) -> grid.CellResult:
        calls.append(cell)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(spec, cell)

    monkeypatch.setattr(grid, "evaluate", interrupted)
    spec = grid.SweepSpec(models=("qwen2.5-0.5b", "llama-3.2-1b"), gpus=("t4", "l4"), jobs=(Job.LORA, Job.INFER),
                          seq_lens=(512, 1024), contexts=(512, 1024))  # 16 cells: chunks of 2 with one worker
    from memplan.report.sweep_stream import csv_sink, frame_of, stream

    out = tmp_path / "partial.csv"
    frames = []
    done = stream(spec, sink=lambda s, p: (csv_sink(out)(s, p), frames.append(frame_of(s, p))), workers=1,
                  vectorized=False)
    assert done.partial and done.rows == 4 and len(done.result.cells) == 4
    rows = parse(out.read_text())
    assert rows[0][-1] == PARTIAL_COLUMN and len(rows) == 5 and all(r[-1] == "True" for r in rows[1:])
    assert frames[0].attrs["partial"] is True and len(frames[0]) == 4


def test_the_output_path_is_checked_before_any_work(runner: CliRunner, monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    def never(*_: object) -> None:
        raise AssertionError("evaluated a cell before checking --out")

    import memplan.vector

    monkeypatch.setattr(grid, "evaluate", never)
    monkeypatch.setattr(memplan.vector, "group_results", never)
    result = run_cli(runner, "sweep", "--model", "gpt2", "--gpu", "t4", "--out", str(tmp_path / "no" / "x.csv"),
                     "--workers", "1", "--quiet", code=2)
    assert "does not exist" in result.stderr
    with pytest.raises(MemplanError, match="folder"):
        memplan.sweep(models="gpt2", gpus="t4", out=tmp_path)


def test_parquet_round_trip(tmp_path: Path) -> None:
    pytest.importorskip("pyarrow", reason="Parquet output needs pyarrow, an optional package not installed here")
    frame = memplan.sweep(models="gpt2", gpus="t4", jobs=["full", "infer"], out=tmp_path / "s.parquet")
    back = pd.read_parquet(tmp_path / "s.parquet")
    assert list(back["gpu_total_bytes"]) == list(frame["gpu_total_bytes"])


def test_parquet_without_pyarrow_is_a_clear_error(tmp_path: Path) -> None:
    import importlib.util

    if importlib.util.find_spec("pyarrow") is not None:
        pytest.skip("pyarrow is installed: the round-trip test covers Parquet")
    with pytest.raises(MemplanError, match="pyarrow"):
        memplan.sweep(models="gpt2", gpus="t4", out=tmp_path / "s.parquet")


def test_pivot_csv_is_the_fit_matrix() -> None:
    from memplan.report.pivot import KEYS, pivot_csv
    from memplan.report.sweep_out import matrices

    spec = grid.SweepSpec(models=("qwen2.5-0.5b", "llama-3.2-1b"), gpus=("t4", "l4"), jobs=(Job.LORA, Job.GALORE),
                          gpu_counts=(2,))
    result = grid.run(spec, workers=1)
    rows = parse(pivot_csv(matrices(result)))
    assert rows[0] == [*KEYS, "t4", "l4"] and len(rows) == 1 + 2 * 2  # models × (job blocks)
    for r in result.cells:
        row = next(x for x in rows[1:] if x[0] == r.cell.job.value and x[4] == r.cell.model)
        cell = row[rows[0].index(r.cell.gpu)]
        assert cell == ("" if r.value is None else str(r.value))  # empty: invalid (GaLore on 2 GPUs)
