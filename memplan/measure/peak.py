"""Peak memory of a step, per phase, on CPU (torch.profiler memory events) or CUDA (allocator statistics).

CPU method. The step runs inside ``torch.profiler.profile(profile_memory=True)``; each phase is a
``record_function`` range. The profiler reports every allocation and free of PyTorch's CPU
allocator (``ProfiledCPUMemoryReporter``) with its size and time. The bytes alive when profiling
starts are not in those events, so they are counted first: the job's resident tensors (parameters,
buffers, master copies, optimizer states, input ids; by default every tensor the garbage collector
reaches), deduplicated by storage. The peak is that baseline plus the largest running sum of the
events; a phase's peak is the largest running sum inside its time range. This is the CPU
counterpart of ``torch.cuda.max_memory_allocated``.

Limits of the CPU method:
- it counts tensor storages only: not the Python heap, not oneDNN/MKL scratch buffers or thread
  stacks (they do not go through the c10 allocator), not the process's resident-set overhead;
- a storage allocated before profiling and freed during it is invisible (its size is unknown to the
  reporter), so nothing may be freed across the start: gradients are set to None first;
- the CPU allocator caches nothing, so there is no "reserved" figure, and CPU kernels save some
  tensors differently from CUDA ones (``activations_block.cpu_counting``);
- the profiler's own bookkeeping is not tensor memory and is not counted.

CUDA method. ``torch.cuda.reset_peak_memory_stats`` at the start of each phase, then
``max_memory_allocated`` / ``max_memory_reserved`` at its end (after a synchronize), and the driver's
view ``mem_get_info`` (total − free: the context, the allocator's reserved segments, other libraries).
The allocated peak is reported the same way as on CPU, baseline + (``max_memory_allocated`` − the
bytes allocated at the start), so tensors of an earlier job in the same process do not count; the
reserved and driver figures are the process's own and include them.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from typing import Any

PHASE_PREFIX = "memplan::"
BANNER = b"USDT:"


def storage_bytes(tensors: Any) -> int:
    """Bytes of the distinct storages behind ``tensors`` (None and empty ones skipped).

    A tensor subclass that wraps others (DTensor, the sharded parameters of FSDP2) owns no storage of its own:
    it counts through the tensors it wraps (``__tensor_flatten__``: a DTensor's local shard), each storage once.
    """
    seen: dict[tuple[str, int], int] = {}
    for tensor in _plain_tensors(tensors):
        storage = tensor.untyped_storage()
        if storage.nbytes():
            seen[(str(tensor.device), storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


def _plain_tensors(tensors: Any) -> Iterator[Any]:
    """``tensors`` without None, wrapper subclasses replaced by the plain tensors inside them."""
    for tensor in tensors:
        if not hasattr(tensor, "untyped_storage"):  # None, or a non-tensor a subclass flattens to
            continue
        flatten = getattr(type(tensor), "__tensor_flatten__", None)
        if flatten is None:
            yield tensor
            continue
        inner, _ = flatten(tensor)
        yield from _plain_tensors(getattr(tensor, name) for name in inner)


def live_tensor_bytes(device_type: str) -> int:
    """Bytes of every tensor storage on ``device_type`` that the garbage collector can reach."""
    import torch

    found = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            try:
                if isinstance(obj, torch.Tensor) and obj.device.type == device_type and not obj.is_meta:
                    found.append(obj)
            except (ReferenceError, RuntimeError, AttributeError):  # pragma: no cover - proxies, dead weakrefs
                continue
    try:
        return storage_bytes(found)
    finally:
        del found


class PhasePeaks:
    """The peak over a step's phases, for anything holding ``phases`` (phase -> bytes) and ``baseline``."""

    phases: dict[str, int]
    baseline: int

    @property
    def peak(self) -> int:
        return max(self.phases.values(), default=self.baseline)

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=lambda k: self.phases[k]) if self.phases else ""


class PeakMeter(PhasePeaks):
    """Peaks of named phases; use ``with meter: ... with meter.phase("forward"): ...``."""

    def __init__(self, device: str, resident: Any = (), exclude: tuple[str, ...] = ()) -> None:
        self.device = device
        self.exclude = exclude
        self.resident = list(resident)
        self.cuda = device.startswith("cuda")
        self.phases: dict[str, int] = {}
        self.reserved: dict[str, int] = {}
        self.baseline = 0
        self.driver_used: int | None = None
        self.unrecorded_frees = 0
        """Allocations whose free the CPU profiler did not record (``running_totals``); 0 on CUDA."""
        self._prof: Any = None
        self._start = 0

    def __enter__(self) -> PeakMeter:
        import torch

        gc.collect()
        self.baseline = storage_bytes(self.resident) if self.resident else live_tensor_bytes(self.device.split(":")[0])
        self.resident = []
        if self.cuda:
            torch.cuda.synchronize()
            self._start = torch.cuda.memory_allocated()
            return self
        from torch.profiler import ProfilerActivity, profile

        self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        with _without_profiler_banner():
            self._prof.__enter__()
        return self

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            yield
            torch.cuda.synchronize()
            self.phases[name] = self.baseline + torch.cuda.max_memory_allocated() - self._start
            self.reserved[name] = torch.cuda.max_memory_reserved()
            return
        with torch.profiler.record_function(PHASE_PREFIX + name):
            yield

    def __exit__(self, *exc: Any) -> None:
        if self.cuda:
            import torch

            free, total = torch.cuda.mem_get_info()
            self.driver_used = total - free
            return
        with _without_profiler_banner():
            self._prof.__exit__(*exc)
        if exc[0] is None:
            self.phases, self.unrecorded_frees = _cpu_phase_peaks(self._prof, self.baseline, self.exclude)
        self._prof = None

    @property
    def peak_reserved(self) -> int | None:
        return max(self.reserved.values()) if self.reserved else None


@contextlib.contextmanager
def _without_profiler_banner() -> Iterator[None]:
    """Kineto writes a ``USDT: ... profiler_start/stop`` line to file descriptor 2 on every start and stop;
    keep everything else it writes there."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            kept = [line for line in sink.read().splitlines(keepends=True) if not line.startswith(BANNER)]
            if kept:
                os.write(2, b"".join(kept))


def _walk(nodes: Any, allocations: list[tuple[Any, bool]], ranges: dict[str, tuple[int, int]],
          exclude: tuple[str, ...], inside: bool = False) -> None:
    from torch._C._profiler import _EventType

    for node in nodes:
        if node.tag == _EventType.Allocation:
            allocations.append((node, inside))
        elif node.name.startswith(PHASE_PREFIX):
            ranges[node.name.removeprefix(PHASE_PREFIX)] = (node.start_time_ns, node.end_time_ns)
        _walk(node.children, allocations, ranges, exclude, inside or (bool(exclude) and node.name.startswith(exclude)))


def _cpu_phase_peaks(prof: Any, baseline: int, exclude: tuple[str, ...] = ()) -> tuple[dict[str, int], int]:
    """baseline + the largest running sum of CPU allocation events inside each phase's time range, and the number of
    frees the profiler did not record (``running_totals``).

    ``exclude``: record_function name prefixes whose allocations are not the job's (a backend's own staging
    buffers); each such allocation is left out together with its free, matched by address, wherever the free
    happens.
    """
    allocations: list[tuple[Any, bool]] = []
    ranges: dict[str, tuple[int, int]] = {}
    _walk(prof.profiler.kineto_results.experimental_event_tree(), allocations, ranges, exclude)
    events = [(node.start_time_ns, node.extra_fields.ptr, node.extra_fields.alloc_size, excluded)
              for node, excluded in allocations if node.extra_fields.device.type == "cpu"]
    timeline, unrecorded = running_totals(events)
    peaks = {}
    for name, (start, end) in ranges.items():
        before = [value for time, value in timeline if time < start]
        inside = [value for time, value in timeline if start <= time <= end]
        peaks[name] = baseline + max([before[-1] if before else 0, *inside])
    return peaks, unrecorded


def running_totals(events: list[tuple[int, int, int, bool]]) -> tuple[list[tuple[int, int]], int]:
    """The running sum of allocation events (time, address, +size or −size, excluded), in time order, and how many
    frees were missing.

    An excluded allocation is skipped together with its free, matched by address. A free the profiler never saw
    (the last reference dropped on a thread it does not record, such as a collective backend's worker thread,
    ``memplan.measure.gloo_comm``) would otherwise count its storage to the end: a new allocation at an address
    still held proves the earlier one was freed, so that one leaves the sum then (at the latest moment possible:
    the peak stays an upper bound) and is counted in the second value. An excluded buffer freed unseen (gloo's
    staging copies are held by its work alone) only stops matching frees at its address.
    """
    timeline: list[tuple[int, int]] = []
    running = unrecorded = 0
    live: dict[int, int] = {}
    skipped: set[int] = set()
    for time, ptr, size, excluded in sorted(events, key=lambda e: e[0]):
        if size > 0:
            if ptr in live:
                unrecorded += 1
                running -= live.pop(ptr)
            skipped.discard(ptr)  # an excluded buffer freed unseen: not in the sum, not counted
            if excluded:
                skipped.add(ptr)
                continue
            live[ptr] = size
        elif ptr in skipped:
            skipped.discard(ptr)
            continue
        else:
            live.pop(ptr, None)
        running += size
        timeline.append((time, running))
    return timeline, unrecorded
