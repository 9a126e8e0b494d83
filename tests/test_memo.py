"""Size-free memos of the memory model (memory/memo.py) and the sweep pool that runs items in the caller too."""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import replace
from typing import ClassVar

import pytest

import memplan.grid as grid
from memplan.arch.build import build_architecture
from memplan.catalog.resolve import load_model
from memplan.config import JobConfig, Recompute
from memplan.estimator import estimate
from memplan.memory import memo
from memplan.memory.context import Context
from memplan.search import with_size


def _ctx(cfg: JobConfig) -> Context:
    from memplan.catalog.schema import HostSpec
    from memplan.catalog.store import catalog_gpu

    return Context(build_architecture(load_model("llama-3.1-8b")), cfg, catalog_gpu("h100-sxm-80gb"), HostSpec())


@pytest.mark.parametrize("read", [lambda c: c.cfg.micro_batch * 2, lambda c: c.cfg.seq_len + 1,
                                  lambda c: c.cfg.infer.context > 1, lambda c: c.cfg.micro_batch == 1,
                                  lambda c: c.gpu.memory_bytes, lambda c: c.host.cpu_ram_bytes,
                                  lambda c: bool(c.cfg.micro_batch)])
def test_a_size_free_function_cannot_read_a_size(read) -> None:
    """The memo is keyed on the configuration without its sizes: a memoized function that reads one (or the
    GPU, or the host) fails loudly instead of answering for another size."""
    with pytest.raises(memo.SizeRead):
        memo.size_free(read)(_ctx(JobConfig()))


def test_configurations_that_differ_only_in_size_share_one_entry() -> None:
    calls = []

    @memo.size_free
    def rows(ctx: Context) -> list[int]:
        calls.append(ctx.cfg.tp)
        return [ctx.cfg.tp]

    base = JobConfig(job="lora")
    for b, s in ((1, 512), (3, 4096), (7, 2048)):
        assert rows(_ctx(with_size(with_size(base, "micro_batch", b), "context", s))) == [1]
    assert rows(_ctx(base.model_copy(update={"tp": 2}))) == [2]  # another field: another entry
    assert calls == [1, 2]


def test_canonical_layers_hide_names_and_keep_every_other_field() -> None:
    arch = build_architecture(load_model("llama-3.1-8b"))
    canon = memo.canonical_layers(arch)
    assert {cls for cls, _ in canon} == {0}  # 32 alike blocks, one class
    with pytest.raises(memo.SizeRead):
        canon[5][1].tensors[0].name.split(".")
    other = replace(arch.layers[1], sliding=not arch.layers[1].sliding)
    mixed = replace(arch, layers=(arch.layers[0], other, *arch.layers[2:]))
    assert [cls for cls, _ in memo.canonical_layers(mixed)][:3] == [0, 1, 0]


CASES = [
    ("llama-3.1-8b", dict(job="lora")),
    ("llama-3.1-8b", dict(job="qlora", recompute=Recompute.SELECTIVE, recompute_layers=7)),
    ("llama-3.1-8b", dict(job="full", pp=2, gpus_per_node=2, recompute=Recompute.FULL, recompute_layers=5)),
    ("mixtral-8x7b", dict(job="lora", lora={"targets": ["all-linear"]})),
    ("gemma-2-9b", dict(job="full", zero=3, gpus_per_node=8)),
    ("llama-3.1-8b", dict(job="infer")),
]


@pytest.mark.parametrize(("model", "fields"), CASES)
def test_warm_memos_give_the_cold_answer(model: str, fields: dict) -> None:
    """Estimates at many sizes through warm memos equal the same estimates each computed with every memo
    emptied first (the memo changes no byte)."""
    cfg = JobConfig.model_validate(fields)
    points = [(b, s) for b in (1, 3, 8) for s in (256, 1536, 4096)]
    warm = [estimate(model, "h100-sxm-80gb", with_size(with_size(cfg, "micro_batch", b), "context", s)).rows
            for b, s in points]
    cold = []
    for b, s in points:
        memo._CACHE.clear()
        memo._PER_CONFIG[0] = (None, None, {})
        memo._LAST[0] = (None, None)
        cold.append(estimate(model, "h100-sxm-80gb", with_size(with_size(cfg, "micro_batch", b), "context", s)).rows)
    assert warm == cold


def _cold(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` with every memo of memory/memo.py emptied first."""
    memo._CACHE.clear()
    memo._PER_CONFIG[0] = (None, None, {})
    memo._LAST[0] = (None, None)
    return fn(*args, **kwargs)


NARROWED_CASES = [
    ("llama-3.1-8b", dict(job="lora")),
    ("qwen2.5-7b", dict(job="full", recompute=Recompute.SELECTIVE)),
    ("llama-3.1-8b", dict(job="infer")),
    ("mixtral-8x7b", dict(job="qlora", seq_len=1000)),
]


@pytest.mark.parametrize(("model", "fields"), NARROWED_CASES)
def test_gpus_that_differ_past_the_job_rows_share_them_and_keep_their_own_bytes(model: str, fields: dict,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """An NVIDIA and an AMD GPU (both with bf16) read alike in ``job_rows`` (``memo.gpu_narrowed``): the second
    estimate runs ``job_rows`` no more, and each estimate still equals its own cold estimate, the AMD one with its
    1 GiB HIP context against the NVIDIA 512 MiB (memory/runtime.py: ROCM_CONTEXT_BYTES, CUDA_CONTEXT_BYTES)."""
    from memplan.memory import components

    calls = []
    original = components.job_rows

    def counted(ctx, missing):
        calls.append(ctx.gpu)
        return original(ctx, missing)

    monkeypatch.setattr(components, "gpu_narrowed_job_rows", memo.gpu_narrowed(counted))
    cfg = JobConfig.model_validate(fields)
    with memo.narrowed_scope():
        nvidia, amd = estimate(model, "h100-sxm-80gb", cfg), estimate(model, "mi300x", cfg)
    assert len(calls) == 1
    assert nvidia.rows == _cold(estimate, model, "h100-sxm-80gb", cfg).rows
    assert amd.rows == _cold(estimate, model, "mi300x", cfg).rows
    context = {e.gpu.vendor: next(r.bytes for r in e.rows if r.component == "runtime/cuda_context") for e in (nvidia, amd)}
    assert context == {"nvidia": 512 * 2**20, "amd": 2**30}
    assert [r for r in nvidia.rows if not r.component.startswith("runtime/")] == \
        [r for r in amd.rows if not r.component.startswith("runtime/")]


def test_a_gpu_without_bf16_gets_its_own_job_rows() -> None:
    """The flash backward workspace reads ``supports_bf16`` (activations._attention_backward_rows): a GPU that answers
    it otherwise must not take another GPU's logged rows. Both runs of one configuration (dtype fp16 set, so that the
    dtype does not differ) equal their cold estimates."""
    cfg = JobConfig(job="full", dtype="fp16")
    with memo.narrowed_scope():
        warm = [estimate("llama-3.1-8b", gpu, cfg).rows for gpu in ("a100-sxm-80gb", "v100-sxm2-32gb")]
    assert warm == [_cold(estimate, "llama-3.1-8b", gpu, cfg).rows for gpu in ("a100-sxm-80gb", "v100-sxm2-32gb")]


@pytest.mark.parametrize("use", [lambda g: g.memory_bytes, lambda g: g.vendor, lambda g: g == g, lambda g: hash(g),
                                 lambda g: bool(g), lambda g: f"{g}", lambda g: getattr(g, "name", None)])
def test_a_gpu_narrowed_function_that_reads_more_runs_on_the_real_gpu(use, monkeypatch: pytest.MonkeyPatch) -> None:
    """Any use of the GPU beyond ``GPU_KEY_FIELDS`` raises ``GpuRead`` inside the memo (not an AttributeError, which
    ``getattr`` with a default would swallow); the function then runs on the real GPU, unmemoized, and answers as it
    does unmemoized."""
    monkeypatch.setattr(memo, "_READS_MORE", set())
    with pytest.raises(memo.GpuRead):
        use(memo._GpuView(_ctx(JobConfig()).gpu))

    def rows(ctx: Context, missing: list[str]) -> list:
        return [use(ctx.gpu)]

    wrapped = memo.gpu_narrowed(rows)
    ctx = _ctx(JobConfig())
    with memo.narrowed_scope():
        assert wrapped(ctx, []) == rows(ctx, []) == wrapped(ctx, [])
    assert rows in memo._READS_MORE


def test_a_gpu_narrowed_function_reads_the_real_gpu_as_logged() -> None:
    """A hit reads the logged GPU fields from the real GPU (a tracing GPU sees them), and what the function appended
    to ``missing`` is appended again."""
    runs = []

    def rows(ctx: Context, missing: list[str]) -> list:
        runs.append(1)
        missing.append("x")
        return [ctx.gpu.supports_bf16]

    wrapped, ctx = memo.gpu_narrowed(rows), _ctx(JobConfig())
    first, second = [], []
    with memo.narrowed_scope():
        assert wrapped(ctx, first) == wrapped(ctx, second) == [True]
    assert first == second == ["x"] and runs == [1]
    assert wrapped(ctx, []) == [True] and runs == [1, 1]  # outside a scope: no memo


class _SyncPool:
    """A ProcessPoolExecutor stand-in that runs each submitted item at once and records it."""

    submitted: ClassVar[list] = []

    def __init__(self, **kwargs: object) -> None:
        pass

    def submit(self, fn, item):
        _SyncPool.submitted.append(item)
        fut: Future = Future()
        fut.set_result(fn(item))
        return fut

    def shutdown(self, **kwargs: object) -> None:
        pass


def test_pool_keeps_order_runs_items_here_and_spawns_nothing_for_one_item(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(grid, "ProcessPoolExecutor", _SyncPool)
    items = [[9 - i, i] for i in range(9)]
    _SyncPool.submitted = []
    assert list(grid.pooled(sorted, iter(items), workers=2)) == [sorted(x) for x in items]
    assert 0 < len(_SyncPool.submitted) < len(items)  # some here, some in the pool
    _SyncPool.submitted = []
    assert list(grid.pooled(sorted, iter([[2, 1]]), workers=2)) == [[1, 2]]
    assert _SyncPool.submitted == []
