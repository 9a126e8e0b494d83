"""The CPU meter's two additions for FSDP2 on gloo: storages counted through tensor wrapper subclasses (DTensor
parameters), and a backend's own staging buffers left out with their frees (``PeakMeter(exclude=...)``)."""

from __future__ import annotations

import pytest

from memplan.measure.peak import PeakMeter, storage_bytes

torch = pytest.importorskip("torch", reason="measure needs torch (pip install memplan[measure])")

pytestmark = pytest.mark.measure
STAGED = 1 << 20
KEPT = 1 << 16


def test_wrapper_subclass_counts_its_inner_storages_once() -> None:
    two_tensor = pytest.importorskip("torch.testing._internal.two_tensor", reason="torch's test TwoTensor subclass")
    a, b = torch.zeros(100), torch.zeros(50)
    wrapped = two_tensor.TwoTensor(a, a.clone())
    assert storage_bytes([wrapped]) == 2 * 100 * 4
    assert storage_bytes([wrapped, a, b, None]) == 2 * 100 * 4 + 50 * 4  # ``a`` once, though seen twice


def _staged_step(exclude: tuple[str, ...]) -> int:
    resident = torch.zeros(1024, dtype=torch.uint8)
    with PeakMeter("cpu", [resident], exclude=exclude) as meter, meter.phase("step"):
        with torch.profiler.record_function("gloo:all_gather"):
            staged = torch.empty(STAGED, dtype=torch.uint8)
        kept = torch.empty(KEPT, dtype=torch.uint8)
        del staged  # freed outside the excluded range, as gloo's worker thread does
        del kept
    return meter.phases["step"] - meter.baseline


def test_excluded_staging_buffer_is_left_out_with_its_free() -> None:
    assert _staged_step(()) == STAGED + KEPT
    assert _staged_step(("gloo:",)) == KEPT
