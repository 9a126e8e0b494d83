"""FSDP2's all-gather and reduce-scatter on gloo, returning only once gloo's worker thread has let go of FSDP's
buffers, so that FSDP's own frees are the ones the CPU profiler records (``memplan.measure.fsdp2``).

Why. ``ProcessGroupGloo`` runs each collective on a worker thread; the work object holds the input and output
tensors, and the thread keeps it (``runLoop``: ``workInProgress_``, reset after ``execute`` returns and the thread
re-takes its lock). ``dist.all_gather_single(async_op=False)`` returns once the work's future is complete, which can
be before the worker drops its references when the machine is busy. FSDP then frees its buffer on schedule
(``FSDPParamGroup.wait_for_unshard``: ``self._all_gather_result = None``), but the last reference is the worker's,
the storage is freed on that thread, and the profiler records no free for it: the measured running sum keeps the
buffer to the end of the step. Measured on mixtral in mixed precision (torch 2.13, two gloo ranks, 2 busy cores):
in about 1 step in 6 the storage of the all-gather that the root's ``pre_backward`` prefetches for the last block
has a use count of 5 instead of 2 when that block's ``wait_for_unshard`` starts, is gone by the end of that block's
``pre_backward`` (weak reference expired), yet its free never appears, and its address is handed out again later in
the step; the step then reads 7,916,868 B instead of 7,403,588 (one block's bf16 all-gather output, 513,280 B,
still counted from its free to the end of the step).

NCCL has no such lag: ``WorkNCCL::wait`` → ``synchronizeStream`` → ``stashed_for_allocator_safety_->unstash()``
drops the work's tensors at the wait (torch/csrc/distributed/c10d/ProcessGroupNCCL.cpp), so FSDP's free is the
free. These comms restore that: after the collective they yield the CPU until the storages' use counts are back
to what they were before it (``torch._C._storage_Use_Count``), at most ``RELEASE_TIMEOUT_S``. They subclass
torch's defaults (``DefaultAllGather``, ``DefaultReduceScatter``), so FSDP allocates and runs exactly as before.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch
from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultAllGather, DefaultReduceScatter

RELEASE_TIMEOUT_S = 10.0
"""Longest wait for gloo's worker thread; past it the step goes on (a free the profiler then misses shows as
``PeakMeter.unrecorded_frees``)."""


def _use_counts(tensors: tuple[Any, ...]) -> list[int]:
    """References to each tensor's storage (every tensor and view on it, the work's included)."""
    return [torch._C._storage_Use_Count(t.untyped_storage()._cdata) for t in tensors]


def wait_released(tensors: tuple[Any, ...], before: list[int]) -> bool:
    """Yield the CPU until no storage of ``tensors`` has more references than ``before``; False on timeout."""
    deadline = time.monotonic() + RELEASE_TIMEOUT_S
    while any(now > then for now, then in zip(_use_counts(tensors), before, strict=True)):
        if time.monotonic() > deadline:
            return False
        os.sched_yield()
    return True


class ReleasedAllGather(DefaultAllGather):
    """``DefaultAllGather`` that returns once gloo's worker holds neither the output nor the input."""

    def __call__(self, output_tensor: Any, input_tensor: Any, group: Any, async_op: bool = False) -> Any:
        tensors = (output_tensor, input_tensor)
        before = _use_counts(tensors)
        work = super().__call__(output_tensor, input_tensor, group, async_op)
        if work is None:  # synchronous: FSDP frees the buffers on its own schedule from here on
            wait_released(tensors, before)
        return work


class ReleasedReduceScatter(DefaultReduceScatter):
    """``DefaultReduceScatter`` that returns once gloo's worker holds neither the output nor the input."""

    def __call__(self, output_tensor: Any, input_tensor: Any, group: Any, op: Any, async_op: bool = False) -> Any:
        tensors = (output_tensor, input_tensor)
        before = _use_counts(tensors)
        work = super().__call__(output_tensor, input_tensor, group, op, async_op)
        if work is None:
            wait_released(tensors, before)
        return work


def install(model: Any) -> None:
    """Every ``fully_shard`` unit of ``model`` uses the released comms (``FSDPModule.set_custom_all_gather``,
    ``set_custom_reduce_scatter``)."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_custom_all_gather(ReleasedAllGather())
            module.set_custom_reduce_scatter(ReleasedReduceScatter())
