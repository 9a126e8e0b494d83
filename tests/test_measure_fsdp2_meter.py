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


def test_running_totals_close_a_storage_whose_free_was_not_recorded() -> None:
    """Events (time, address, ±size, excluded): a storage freed on a thread the profiler does not record (gloo's worker
    dropping the last reference) has no free event; the next allocation at its address proves it gone."""
    from memplan.measure.peak import running_totals

    lost, other, reuse = 513_280, 1_000, 327_680
    events = [(1, 0xA, lost, False), (2, 0xB, other, False), (3, 0xA, reuse, False), (4, 0xA, -reuse, False),
              (5, 0xB, -other, False)]
    timeline, unrecorded = running_totals(events)
    assert unrecorded == 1
    assert [v for _, v in timeline] == [lost, lost + other, other + reuse, other, 0]
    # without the closing rule the lost storage would stay counted: the final sum would be `lost`, not 0


def test_running_totals_counts_the_free_of_a_job_buffer_at_a_staging_address() -> None:
    """An excluded staging buffer whose free was not recorded must not swallow the free of the job's next buffer at
    the same address."""
    from memplan.measure.peak import running_totals

    staged, kept = 4_096, 2_048
    events = [(1, 0xC, staged, True), (2, 0xC, kept, False), (3, 0xC, -kept, False)]
    timeline, unrecorded = running_totals(events)
    assert unrecorded == 0  # the staging buffer was never in the sum
    assert [v for _, v in timeline] == [kept, 0]
