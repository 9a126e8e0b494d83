"""Runtime rows: the CUDA/ROCm context and the caching allocator's reserve."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from memplan.arch.tensors import Architecture
from memplan.catalog.schema import Family, HostSpec, ModelSpec
from memplan.catalog.store import catalog_gpu
from memplan.config import JobConfig
from memplan.memory import runtime
from memplan.memory.breakdown import Tier
from memplan.memory.context import Context
from memplan.units import GiB, MiB

ARCH = Architecture(
    spec=ModelSpec(name="tiny", source="test", family=Family.PARAMS_ONLY, published_params=1000),
    pre=(),
    layers=(),
    post=(),
)


def make_ctx(gpu: str = "h100", **cfg: object) -> Context:
    return Context(arch=ARCH, cfg=JobConfig(**cfg), gpu=catalog_gpu(gpu), host=HostSpec())


def by_name(ctx: Context, other: int) -> dict[str, int]:
    rows = runtime.rows(ctx, other_gpu_bytes=other)
    assert all(r.tier is Tier.GPU for r in rows)
    assert all(r.source for r in rows)
    return {r.component: r.bytes for r in rows}


def test_defaults_are_documented_constants() -> None:
    assert 512 * MiB == runtime.CUDA_CONTEXT_BYTES
    assert 1 * GiB == runtime.ROCM_CONTEXT_BYTES
    assert runtime.ALLOCATOR_RESERVE_PCT == 10.0
    # Docstrings give the formula and the source (`memplan explain` prints them).
    for fn in (runtime.allocator_reserve_bytes, runtime.cuda_context_bytes):
        assert "Formula:" in fn.__doc__ and "Source:" in fn.__doc__ and "Assumptions:" in fn.__doc__
    assert "CUDACachingAllocator" in runtime.allocator_reserve_bytes.__doc__


def test_default_rows_on_an_nvidia_gpu() -> None:
    rows = by_name(make_ctx("h100"), 80 * GiB)
    assert rows == {
        "runtime/cuda_context": 512 * MiB,
        "runtime/allocator_reserve": 8 * GiB,  # 10% of 80 GiB
    }


def test_default_context_on_an_amd_gpu() -> None:
    rows = by_name(make_ctx("mi300x"), 0)
    assert rows["runtime/cuda_context"] == 1 * GiB
    notes = {r.component: r.note for r in runtime.rows(make_ctx("mi300x"), other_gpu_bytes=0)}
    assert "ROCm" in notes["runtime/cuda_context"]


def test_overrides_from_the_job_config() -> None:
    ctx = make_ctx("h100", cuda_context_bytes=300 * MiB, allocator_reserve_pct=25.0)
    assert by_name(ctx, 4 * GiB) == {
        "runtime/cuda_context": 300 * MiB,
        "runtime/allocator_reserve": 1 * GiB,
    }


def test_zero_is_allowed_for_both() -> None:
    ctx = make_ctx("a100", cuda_context_bytes=0, allocator_reserve_pct=0.0)
    assert by_name(ctx, 10 * GiB) == {"runtime/cuda_context": 0, "runtime/allocator_reserve": 0}


def test_reserve_of_nothing_is_nothing() -> None:
    assert by_name(make_ctx(), 0)["runtime/allocator_reserve"] == 0


@pytest.mark.parametrize(
    ("allocated", "pct", "expected"),
    [
        (100, 10.0, 10),        # exact
        (101, 10.0, 11),        # 10.1 rounds up
        (1, 0.5, 1),            # any positive share of a positive count is at least one byte
        (1000, 12.5, 125),
        (3, 33.3, 1),           # 0.999 rounds up to 1
        (10**12, 10.1, 101_000_000_000),  # read as the decimal 10.1, not its binary float
        (7, 100.0, 7),
        (7, 0.0, 0),
    ],
)
def test_allocator_reserve_rounds_up(allocated: int, pct: float, expected: int) -> None:
    got = runtime.allocator_reserve_bytes(allocated_bytes=allocated, pct=pct)
    assert got == expected
    assert isinstance(got, int)


def test_allocator_reserve_is_monotonic_and_never_below_the_exact_share() -> None:
    previous = 0
    for allocated in range(0, 5000, 37):
        got = runtime.allocator_reserve_bytes(allocated_bytes=allocated, pct=7.0)
        assert got * 100 >= allocated * 7 > (got - 1) * 100
        assert got >= previous
        previous = got


@pytest.mark.parametrize(("allocated", "pct"), [(-1, 10.0), (10, -0.1), (10, 100.5)])
def test_allocator_reserve_rejects_out_of_range_input(allocated: int, pct: float) -> None:
    with pytest.raises(ValueError):
        runtime.allocator_reserve_bytes(allocated_bytes=allocated, pct=pct)


def test_context_override_and_vendor_default() -> None:
    assert runtime.cuda_context_bytes(vendor="nvidia") == 512 * MiB
    assert runtime.cuda_context_bytes(vendor="amd") == 1 * GiB
    assert runtime.cuda_context_bytes(vendor="amd", override=0) == 0
    with pytest.raises(ValueError):
        runtime.cuda_context_bytes(vendor="nvidia", override=-1)
    with pytest.raises(ValueError):
        runtime.cuda_context_bytes(vendor="intel")


def test_job_config_bounds_the_overrides() -> None:
    with pytest.raises(ValidationError):
        JobConfig(allocator_reserve_pct=101)
    with pytest.raises(ValidationError):
        JobConfig(cuda_context_bytes=-1)


def test_component_names_and_note_say_whether_a_default_was_used() -> None:
    default = {r.component: r.note for r in runtime.rows(make_ctx(), other_gpu_bytes=1000)}
    assert set(default) == {"runtime/cuda_context", "runtime/allocator_reserve"}
    assert "default" in default["runtime/cuda_context"]
    assert "10%" in default["runtime/allocator_reserve"]
    set_ = {r.component: r.note for r in runtime.rows(make_ctx(allocator_reserve_pct=5.0), other_gpu_bytes=1000)}
    assert "5%" in set_["runtime/allocator_reserve"]
    assert "default" not in set_["runtime/allocator_reserve"]
