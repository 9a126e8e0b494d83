"""The vectorized sweep (memplan.vector) gives the scalar path's records byte for byte, fallback included."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import memplan.vector as vector
from memplan.config import Job, JobConfig, unread_by_all
from memplan.errors import MemplanError
from memplan.grid import SweepSpec, iter_results
from memplan.report.csv_out import records_to_csv
from memplan.vector import NotExact, group_results, iter_vector

MODELS = ("qwen2.5-0.5b", "gpt2", "llama-3.2-1b", "mixtral-8x7b", "deepseek-v2-lite", "zero-offload-1.4b")
"""Dense, MoE, MLA and a params-only model (nothing grows with batch: the scalar path's error records)."""
GPUS = ("t4", "l4", "h100-sxm-80gb", "mi300x", "rtx-4090")
JOBS = (Job.FULL, Job.LORA, Job.QLORA, Job.INFER, Job.PRETRAIN)
BASES = (
    JobConfig(),
    JobConfig(recompute="full"),
    JobConfig(allocator_reserve_pct=7.25),  # a share of 29/400: beyond the fit's forms, the scalar path
    JobConfig(attention="eager", flash_attention=False),  # attention scores grow with s²
    JobConfig(safety_margin_pct=10, zero=3),
    JobConfig(offload_optimizer="cpu", zero=2),
    JobConfig(engine="fsdp2"),  # sweep --engine: each engine's rows, and n/a cells for the jobs it does not run
    JobConfig(engine="deepspeed", zero=3),
    JobConfig(engine="megatron"),
    JobConfig(engine="pytorch", optimizer_impl="for-loop"),
    JobConfig(engine="vllm"),
    JobConfig(engine="sglang"),
    JobConfig(engine="llamacpp"),  # its compute buffers fail the fit's checks: the scalar path, exactly
)


def both(spec: SweepSpec) -> tuple[list, list]:
    scalar = [r for chunk in iter_results(spec, workers=1) for r in chunk]
    fast = [r for chunk in iter_vector(spec) for r in chunk]
    return scalar, fast


def assert_same(spec: SweepSpec) -> None:
    scalar, fast = both(spec)
    assert [r.cell for r in fast] == [r.cell for r in scalar]
    assert [r.value for r in fast] == [r.value for r in scalar]
    assert [r.error for r in fast] == [r.error for r in scalar]
    for a, b in zip(scalar, fast, strict=True):
        assert [list(r.items()) for r in b.records] == [list(r.items()) for r in a.records], a.cell
    records = [r for c in scalar for r in c.records]
    assert records_to_csv([r for c in fast for r in c.records]) == records_to_csv(records)


@st.composite
def grids(draw: st.DrawFn) -> SweepSpec:
    """Valid grids only (the product refuses a choice none of the grid's jobs reads, ``SweepSpec``): sequence
    lengths only with a training job, contexts only with inference, a base whose set fields some job reads."""
    jobs = tuple(draw(st.lists(st.sampled_from(JOBS), min_size=1, max_size=2, unique=True)))
    sizes = {}
    if any(j.trains for j in jobs):
        sizes["seq_lens"] = tuple(draw(st.lists(st.integers(16, 8192), min_size=1, max_size=4, unique=True)))
    if Job.INFER in jobs:
        sizes["contexts"] = tuple(draw(st.lists(st.integers(16, 32768), min_size=1, max_size=4, unique=True)))
    bases = [b for b in BASES if not unread_by_all(b, jobs)]
    return SweepSpec(
        models=tuple(draw(st.lists(st.sampled_from(MODELS), min_size=1, max_size=2, unique=True))),
        gpus=tuple(draw(st.lists(st.sampled_from(GPUS), min_size=1, max_size=3, unique=True))),
        jobs=jobs,
        batches=tuple(draw(st.lists(st.integers(1, 64), min_size=1, max_size=3, unique=True))),
        gpu_counts=tuple(draw(st.lists(st.sampled_from((1, 2, 8)), min_size=1, max_size=2, unique=True))),
        metric=draw(st.sampled_from(("fits", "max-batch", "max-context"))),
        base=draw(st.sampled_from(bases)),
        min_headroom=draw(st.sampled_from(("0B", "5%", "1GiB"))),
        **sizes,
    )


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=grids())
def test_vectorized_records_equal_the_scalar_model(spec: SweepSpec) -> None:
    assert_same(spec)


ENGINE_GRIDS = {
    "pytorch": (Job.FULL, Job.LORA), "fsdp1": (Job.FULL, Job.QLORA), "fsdp2": (Job.FULL, Job.LORA),
    "deepspeed": (Job.FULL, Job.QLORA), "megatron": (Job.PRETRAIN, Job.INFER), "vllm": (Job.INFER, Job.FULL),
    "sglang": (Job.INFER,), "transformers": (Job.INFER,), "llamacpp": (Job.INFER,),
}
"""Each engine with a job it runs and, for some, one it does not (n/a cells on both paths)."""


@pytest.mark.parametrize("engine", sorted(ENGINE_GRIDS))
def test_vectorized_records_equal_the_scalar_model_on_every_engine(engine: str) -> None:
    jobs = ENGINE_GRIDS[engine]
    sizes = {"seq_lens": (512, 2048)} if any(j.trains for j in jobs) else {}
    if Job.INFER in jobs:
        sizes["contexts"] = (1024, 8192)
    base = JobConfig(engine=engine, **({"zero": 3} if engine == "deepspeed" else {}))
    for metric in ("max-batch", "fits"):
        assert_same(SweepSpec(models=("qwen2.5-0.5b",), gpus=("l4", "h100-sxm-80gb"), jobs=jobs, batches=(1, 3),
                              gpu_counts=(1, 2), metric=metric, base=base, **sizes))


def test_a_share_beyond_the_fit_falls_back_and_stays_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    # sizes are multiples of 128: flash's backward rounds queries up to 128 rows (memory.flash_workspace), a ceil
    # in s that the fit cannot take, so a LoRA job on the L4 at 1000 tokens would fall back to the scalar path
    spec = SweepSpec(models=("qwen2.5-0.5b",), gpus=("t4", "l4"), jobs=(Job.LORA, Job.INFER), seq_lens=(256, 1024, 4096),
                     contexts=(512, 3000), batches=(1, 7), base=JobConfig(allocator_reserve_pct=7.25))
    with pytest.raises(NotExact):
        group_results(spec, "qwen2.5-0.5b", Job.LORA, 1)
    fell_back = []
    real = vector.evaluate

    def counting(*args: object) -> object:
        fell_back.append(args)
        return real(*args)

    import memplan.grid as grid

    def shared(*args: object) -> object:  # the scalar path with estimates shared (vector_probe.shared_evaluate)
        if len(args) == 3:
            fell_back.append(args)
        return real(*args)

    monkeypatch.setattr(vector, "evaluate", counting)
    monkeypatch.setattr(grid, "evaluate", shared)
    assert_same(spec)
    assert fell_back  # the scalar path answered those cells
    fell_back.clear()
    assert_same(replace(spec, base=JobConfig()))  # a whole percentage: vectorized, no scalar cell
    assert not fell_back


def test_max_batch_matches_the_scalar_search_on_many_gpus() -> None:
    spec = SweepSpec(models=("llama-3.1-8b", "mixtral-8x7b"), gpus=GPUS, jobs=(Job.FULL, Job.QLORA, Job.INFER),
                     seq_lens=(1024, 4096), contexts=(2048, 32768), metric="max-batch")
    for model in spec.models:  # every group of this grid is vectorized
        for job in spec.jobs:
            group_results(spec, model, job, 1)
    assert_same(spec)
    first = next(iter_vector(spec, columnar=True))  # the streamed path: one columnar frame per (model, job)
    assert first.frame is not None and len(first.frame) == len(first) and not first[0].records


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=grids())
def test_columnar_csv_is_byte_identical_to_the_scalar_records(spec: SweepSpec) -> None:
    import tempfile
    from pathlib import Path

    from memplan.report.sweep_stream import csv_sink, stream

    expected = records_to_csv([r for chunk in iter_results(spec, workers=1) for c in chunk for r in c.records])
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "v.csv"
        stream(spec, sink=csv_sink(out), workers=1)
        assert out.read_text() == expected


@st.composite
def cells_drawn(draw: st.DrawFn) -> tuple[SweepSpec, str, str, Job, int]:
    """One max-batch cell: a model with layer shapes, a GPU, a job, a size and a GPU count."""
    job = draw(st.sampled_from(JOBS))
    size = draw(st.integers(16, 8192))
    sizes = {"contexts": (size,)} if job is Job.INFER else {"seq_lens": (size,)}
    bases = [b for b in BASES if not unread_by_all(b, (job,))]
    model, gpu = draw(st.sampled_from(MODELS[:-1])), draw(st.sampled_from(GPUS))
    spec = SweepSpec(models=(model,), gpus=GPUS, jobs=(job,), gpu_counts=(draw(st.sampled_from((1, 2, 8))),),
                     metric="max-batch", base=draw(st.sampled_from(bases)),
                     min_headroom=draw(st.sampled_from(("0B", "5%", "1GiB"))), **sizes)
    return spec, model, gpu, job, size


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(drawn=cells_drawn())
def test_vectorized_max_batch_fits_and_one_more_does_not(drawn: tuple) -> None:
    """The vectorized search's C for one GPU of a whole-catalog group: C fits and C + 1 does not, each
    answered by the scalar model itself (``grid._Evaluator.slack``: the same slack ``memplan estimate`` gives)."""
    from memplan.grid import Cell, _Evaluator
    from memplan.search import MAX_BATCH

    spec, model, gpu, job, size = drawn
    try:
        solved = vector.solve_group(spec, model, job, spec.gpu_counts[0])
    except (NotExact, MemplanError):
        return  # the scalar path answers this group (test_vectorized_records_equal_the_scalar_model)
    c = next(s for s in solved if s.member.gpu == gpu).values[size]
    ev = _Evaluator(spec, Cell(model, gpu, job, spec.gpu_counts[0], size, None))
    if c == 0:
        assert ev.slack(1) < 0
        return
    assert ev.slack(c) >= 0
    if c < MAX_BATCH:
        assert ev.slack(c + 1) < 0


def test_gpus_share_probes_only_when_every_read_attribute_agrees(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The H100 and the A100 read alike (vendor, bf16, no calibration profile) until the H100 gets a
    calibration profile: then it is probed on its own, and either way the records are the scalar model's."""
    from memplan.measure import calibrate as cal

    spec = SweepSpec(models=("llama-3.2-1b",), gpus=("a100-sxm-80gb", "h100-sxm-80gb", "mi300x"), jobs=(Job.LORA,),
                     metric="max-batch")
    solved = vector.solve_group(spec, "llama-3.2-1b", Job.LORA, 1)
    probers = [s.member.prober for s in solved]
    assert probers[0] is probers[1] and probers[2] is not probers[0]  # the MI300X's ROCm context differs
    assert {"vendor", "supports_bf16", "calibration"} <= probers[0].reads and "name" not in probers[0].reads
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    cal.save_profile("h100-sxm-80gb", {"cuda_context_bytes": 700 * 2**20, "allocator_reserve_pct": 5})
    solved = vector.solve_group(spec, "llama-3.2-1b", Job.LORA, 1)
    assert solved[0].member.prober is not solved[1].member.prober
    assert_same(spec)


def test_max_context_shares_estimates_and_equals_the_scalar_search(estimate_calls: list[tuple]) -> None:
    """max-context runs the scalar search on every GPU, on estimates its class shares: the same records and
    answers as the scalar path, with fewer estimates (GPUs of one memory size search alike: here 4 searches
    where the scalar path runs 8)."""
    gpus = ("a40", "l40", "l40s", "h100-pcie-80gb", "h100-sxm-80gb", "h800-sxm-80gb", "a100-sxm-80gb", "mi300x")
    spec = SweepSpec(models=("llama-3.2-1b",), gpus=gpus,
                     jobs=(Job.LORA, Job.INFER), batches=(1, 3), seq_lens=(1024, 4096), contexts=(2048,),
                     metric="max-context")
    calls = estimate_calls
    fast = [r for chunk in iter_vector(spec) for r in chunk]
    shared, calls[:] = len(calls), []
    scalar = [r for chunk in iter_results(spec, workers=1) for r in chunk]
    assert [r.value for r in fast] == [r.value for r in scalar] and all(r.value for r in fast)
    assert [[list(x.items()) for x in r.records] for r in fast] == [[list(x.items()) for x in r.records] for r in scalar]
    assert shared < len(calls) / 2


def test_runs_spilled_by_workers_and_written_in_slices_give_the_scalar_csv(monkeypatch: pytest.MonkeyPatch,
                                                                          tmp_path: Any) -> None:
    """Bounded memory (issue 15): each worker pickles its run's frame into the spill folder itself, and the CSV is
    formatted a few rows at a time; the bytes are still the scalar records' (a slice boundary inside a run)."""
    import memplan.report.sweep_stream as sweep_stream

    spec = SweepSpec(models=("qwen2.5-0.5b", "gpt2"), gpus=("t4", "l4"), jobs=(Job.LORA, Job.INFER),
                     seq_lens=(512, 1024), contexts=(512, 1024), batches=(1, 2, 3), metric="fits")
    expected = records_to_csv([r for chunk in iter_results(spec, workers=1) for c in chunk for r in c.records])
    monkeypatch.setattr(sweep_stream, "CSV_SLICE_ROWS", 5)  # 12 rows per run: slices of 5, 5 and 2
    monkeypatch.setattr(vector, "PROCESS_RUNS", 1)  # 4 runs: one spawned worker builds some of them
    out = tmp_path / "v.csv"
    done = sweep_stream.stream(spec, sink=sweep_stream.csv_sink(out), workers=2)
    assert done.rows == expected.count("\n") - 1
    assert out.read_text() == expected


def test_long_runs_spill_as_frames_and_short_ones_as_columns(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """A worker makes a run of at least ``FRAME_ROWS`` rows a frame itself and leaves a shorter one as columns that
    the parent joins with its neighbours; in any mix, and in order, the CSV is the scalar records' CSV."""
    import itertools
    import pickle

    import memplan.report.sweep_stream as sweep_stream
    import memplan.vector_frame as vector_frame

    spec = SweepSpec(models=("qwen2.5-0.5b", "gpt2"), gpus=("t4", "l4"), jobs=(Job.LORA, Job.INFER),
                     seq_lens=(512, 1024), contexts=(512,), batches=(1, 2, 3), metric="fits")
    expected = records_to_csv([r for chunk in iter_results(spec, workers=1) for c in chunk for r in c.records])
    monkeypatch.setattr(vector_frame, "FRAME_ROWS", 10)  # LoRA runs (12 rows) become frames, inference ones (6) not
    spill = sweep_stream.Spill(tmp_path)
    kinds = []
    for _, run in itertools.groupby(vector.cells(spec), key=lambda c: (c.model, c.job)):
        chunk = vector.run_chunk(spec, list(run), columnar=True, spill=str(tmp_path))
        with open(chunk.part[0], "rb") as fh:
            kinds.append(type(pickle.load(fh)).__name__)
        spill.add_part(chunk.part)
    assert kinds == ["DataFrame", "dict", "DataFrame", "dict"]
    out = tmp_path / "v.csv"
    sweep_stream.csv_sink(out)(spill, False)
    assert out.read_text() == expected


FORKED = """
import sys
import memplan.vector as vector
from memplan.config import Job
from memplan.grid import SweepSpec, start_method
from memplan.report.csv_out import records_to_csv

if __name__ == "__main__":
    vector.PROCESS_RUNS = 1  # 4 runs: the worker builds some of them
    spec = SweepSpec(models=("qwen2.5-0.5b", "gpt2"), gpus=("t4", "l4"), jobs=(Job.LORA, Job.INFER),
                     seq_lens=(512, 1024), contexts=(512, 1024), batches=(1, 2, 3), metric="max-batch")
    print(start_method())
    sys.stdout.write(records_to_csv([r for ch in vector.iter_vector(spec, workers=2) for c in ch for r in c.records]))
"""


def test_a_single_threaded_process_forks_its_workers_and_they_give_the_scalar_csv(tmp_path: Any) -> None:
    """With one OS thread (OpenBLAS held to one, as the CLI's main does) the workers are forked on Linux, not spawned,
    and the rows they build are the scalar path's, byte for byte."""
    import os
    import subprocess
    import sys

    if sys.platform != "linux":
        pytest.skip("fork is taken on Linux only")
    spec = SweepSpec(models=("qwen2.5-0.5b", "gpt2"), gpus=("t4", "l4"), jobs=(Job.LORA, Job.INFER),
                     seq_lens=(512, 1024), contexts=(512, 1024), batches=(1, 2, 3), metric="max-batch")
    expected = records_to_csv([r for chunk in iter_results(spec, workers=1) for c in chunk for r in c.records])
    script = tmp_path / "forked.py"
    script.write_text(FORKED)
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True, env=env).stdout
    method, csv = out.split("\n", 1)
    assert method == "fork"
    assert csv == expected


def test_a_second_thread_makes_workers_spawned() -> None:
    """Fork copies only the calling thread: while another thread is alive, workers are spawned."""
    import threading

    from memplan.grid import start_method

    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        assert start_method() == "spawn"
    finally:
        stop.set()
        thread.join()
