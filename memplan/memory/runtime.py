"""Runtime overheads on the GPU: the CUDA (or ROCm/HIP) context and the caching allocator's reserve.

Neither is a tensor of the model, yet both count against the CUDA runtime's total
(``GpuSpec.capacity_bytes``, ``memplan.catalog.capacity``): the context is memory the driver holds for the process, the reserve is
memory PyTorch's caching allocator has taken from the driver but not handed to a tensor.
Both are visible rows with a default and an override in ``JobConfig``; neither is a hidden factor.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from fractions import Fraction

from memplan.catalog.schema import GpuSpec
from memplan.config import JobConfig
from memplan.memory.breakdown import Row, Tier
from memplan.memory.context import Context
from memplan.units import GiB, MiB, ceil_div

CUDA_CONTEXT_BYTES = 512 * MiB
"""Default CUDA context of a PyTorch training process on an NVIDIA GPU: 512 MiB.

Measured figures, with lazy module loading (CUDA >= 11.7; PyTorch sets ``CUDA_MODULE_LOADING=LAZY``
since 1.13, pytorch/pytorch PR #86509):
- 287,047,680 B (274 MiB) after one small tensor, vs 666,632,192 B (636 MiB) with eager loading
  (pytorch/pytorch PR #86509, the PR's own measurement);
- "around 400MB if CUDA >= 11.7 is used and lazy module loading enabled" (ptrblck,
  pytorch/pytorch issue #109888);
- 426 MiB on an RTX 6000 Ada, PyTorch 2.10 + CUDA 13.0 (unslothai/unsloth-zoo PR #1053);
- 612 MiB on a B200 (unslothai/unsloth PR #8669).
512 MiB covers the Ampere/Hopper/Ada figures at start-up plus the kernels a training step loads
lazily afterwards (cuBLAS, attention, optimizer kernels); that margin is an assumption, not a
measurement. Blackwell (B200) measures above it: pass ``cuda_context_bytes`` there.
"""

ROCM_CONTEXT_BYTES = 1 * GiB
"""Default HIP context of a PyTorch process on an AMD GPU: 1 GiB.

No published measurement isolates the HIP context of a PyTorch process; vLLM's maintainers note
that PyTorch's initialization overhead is larger on ROCm than on CUDA (vllm-project/vllm PR #43236).
Twice the NVIDIA default, as a conservative placeholder: measure with ``torch.cuda.mem_get_info``
before and after the first CUDA call and pass ``cuda_context_bytes``.
"""

CONTEXT_BYTES_BY_VENDOR = {"nvidia": CUDA_CONTEXT_BYTES, "amd": ROCM_CONTEXT_BYTES}

ALLOCATOR_RESERVE_PCT = 10.0
"""Default reserve of PyTorch's caching allocator: 10% of the bytes allocated to tensors.

Rounding (c10/cuda/CUDACachingAllocator.cpp): requests round up to 512 B (``kMinBlockSize``);
requests up to 1 MiB (``kSmallSize``) share 2 MiB segments (``kSmallBuffer``), 1-10 MiB requests
share 20 MiB segments (``kLargeBuffer``), larger ones get a segment rounded up to 2 MiB
(``kRoundLarge``). For an LLM's tensors (tens to hundreds of MiB) rounding alone wastes under 2 MiB
per segment, well under 1%. The rest is fragmentation: cached blocks split by later, smaller
requests. GMLake (Guo et al., ASPLOS 2024, arXiv:2401.08156, Sec. 6) measures fragmentation,
(reserved - allocated) / reserved, on eight LLMs on A100-80GB under recomputation, offload, LoRA and
ZeRO, and removes 15% of reserved memory on average (up to 33%); STWeaver (arXiv:2507.16274) reports
up to 43% waste under virtual pipelines with recomputation. 10% of allocated (about 9% of reserved)
is the assumed middle for plain training; raise ``allocator_reserve_pct`` for those techniques.
"""

CONTEXT_SOURCE = "PyTorch process context: pytorch/pytorch PR #86509 and issue #109888 (lazy module loading)"
RESERVE_SOURCE = "PyTorch CUDACachingAllocator rounding (512 B, 2/20 MiB segments); GMLake (ASPLOS 2024) Sec. 6"


def cuda_context_bytes(*, vendor: str, override: int | None = None) -> int:
    """Bytes the CUDA (or ROCm/HIP) context of one PyTorch process holds on its GPU.

    Formula: ``override`` when given, else the vendor's default (``CUDA_CONTEXT_BYTES`` for
    nvidia, ``ROCM_CONTEXT_BYTES`` for amd).
    Source: the measurements listed under ``CUDA_CONTEXT_BYTES`` and ``ROCM_CONTEXT_BYTES``.
    Assumptions: one process per GPU; the context does not grow with the model (kernel images
    do not depend on tensor sizes); NCCL/RCCL communicator buffers are their own row,
    ``runtime/nccl_communicators`` (``memory.nccl``).
    """
    if override is not None:
        if override < 0:
            raise ValueError(f"cuda_context_bytes must not be negative, got {override}")
        return override
    try:
        return CONTEXT_BYTES_BY_VENDOR[vendor]
    except KeyError:
        raise ValueError(f"no default context size for vendor {vendor!r}") from None


@functools.lru_cache(maxsize=64)
def percent_share(pct: float) -> Fraction:
    """``pct`` percent as an exact fraction, ``pct`` read as the decimal it is written as (10.1 is 101/1000 of the
    whole); cached: every estimate reads the same few percentages and parsing the decimal is the costly part."""
    return Fraction(str(pct)) / 100


def allocator_reserve_bytes(*, allocated_bytes: int, pct: float) -> int:
    """Bytes the caching allocator reserves beyond those allocated to tensors, rounded up.

    Formula: ceil(pct / 100 × A), with A the bytes of every other GPU row (weights, gradients,
    optimizer states, activations, KV cache); ``pct`` is read as the decimal it is written as
    (10.1 is 101/10), so the result is exact integer arithmetic.
    Source: PyTorch c10/cuda/CUDACachingAllocator.cpp (rounding rules); GMLake (Guo et al.,
    ASPLOS 2024) Sec. 6 (fragmentation of LLM training); see ``ALLOCATOR_RESERVE_PCT``.
    Assumptions: the reserve scales with the allocated bytes at the peak; the CUDA context is not
    allocator memory and is not part of A.
    """
    if allocated_bytes < 0:
        raise ValueError(f"allocated_bytes must not be negative, got {allocated_bytes}")
    if not 0 <= pct <= 100:
        raise ValueError(f"pct must be between 0 and 100, got {pct}")
    share = percent_share(pct)
    return ceil_div(allocated_bytes * share.numerator, share.denominator)


@dataclass(frozen=True)
class RuntimeSettings:
    """The context size and reserve percentage in force, and where each comes from."""

    context_bytes: int
    reserve_pct: float
    context_source: str
    reserve_source: str
    context_note: str
    reserve_note: str


def settings(gpu: GpuSpec, cfg: JobConfig) -> RuntimeSettings:
    """Resolve the runtime overheads: explicit flags first, then a ``memplan calibrate`` profile of this
    GPU model (``memplan.catalog.profiles``), then the documented defaults."""
    profile = gpu.calibration
    stack = "ROCm/HIP" if gpu.vendor == "amd" else "CUDA"
    calibrated = (f"memplan calibrate profile {profile['path']} ({profile.get('device_name')}, driver "
                  f"{profile.get('driver')}, {profile.get('measured_at')})") if profile else None
    if cfg.cuda_context_bytes is not None:
        context, context_source, context_note = cfg.cuda_context_bytes, CONTEXT_SOURCE, "set"
    elif profile:
        context, context_source, context_note = int(profile["cuda_context_bytes"]), str(calibrated), "calibrated"
    else:
        context = cuda_context_bytes(vendor=gpu.vendor)
        context_source, context_note = CONTEXT_SOURCE, f"default {stack} context"
    if cfg.allocator_reserve_pct is not None:
        pct, reserve_source, reserve_note = cfg.allocator_reserve_pct, RESERVE_SOURCE, "set"
    elif profile:
        pct, reserve_source, reserve_note = float(profile["allocator_reserve_pct"]), str(calibrated), "calibrated"
    else:
        pct, reserve_source, reserve_note = ALLOCATOR_RESERVE_PCT, RESERVE_SOURCE, "default"
    return RuntimeSettings(context, pct, context_source, reserve_source, context_note, reserve_note)


SAFETY_MARGIN_SOURCE = "user-chosen safety margin (--safety-margin, JobConfig.safety_margin_pct), not a measured overhead"


def safety_margin_bytes(*, capacity_bytes: int, pct: float) -> int:
    """Bytes of a GPU's memory kept free on purpose, rounded up.

    Formula: ceil(pct / 100 × capacity), ``pct`` read as the decimal it is written as (exact integer
    arithmetic, as ``allocator_reserve_bytes``).
    Source: none, a policy: memory a user keeps in reserve for what no model row covers (other
    processes, fragmentation spikes, library workspaces). Default 0%.
    Assumptions: a share of the GPU's capacity (``GpuSpec.capacity_bytes``, the CUDA runtime's total), independent of the job,
    so a planner may subtract it from the capacity like the CUDA context.
    """
    if capacity_bytes < 0:
        raise ValueError(f"capacity_bytes must not be negative, got {capacity_bytes}")
    if not 0 <= pct < 100:
        raise ValueError(f"pct must be at least 0 and below 100, got {pct}")
    share = percent_share(pct)
    return ceil_div(capacity_bytes * share.numerator, share.denominator)


def rows(ctx: Context, *, other_gpu_bytes: int, reserve_floor: int = 0) -> list[Row]:
    """The runtime rows of the reported GPU: its context, its allocator reserve and, when one is set, the
    safety margin (``safety_margin_bytes``), in bytes.

    ``other_gpu_bytes`` is the A of ``allocator_reserve_bytes``: the bytes allocated to tensors at the step's
    peak, the largest phase total of every other GPU row (``components.allocated_peak``).
    Values come from ``settings``: flags (``cuda_context_bytes``, ``allocator_reserve_pct``; 0 allowed),
    then a calibrated profile, then ``CUDA_CONTEXT_BYTES``/``ROCM_CONTEXT_BYTES`` and ``ALLOCATOR_RESERVE_PCT``.
    ``reserve_floor``: reserved bytes a known mechanism holds beyond ``other_gpu_bytes``
    (``allocator_segments.reserved_floor``); the reserve is the larger of it and the percentage (the percentage is
    the allowance for such mechanisms, so the two are not added); ignored when the reserve is off (pct 0).
    """
    st = settings(ctx.gpu, ctx.cfg)
    reserve = allocator_reserve_bytes(allocated_bytes=other_gpu_bytes, pct=st.reserve_pct)
    note = f"{st.reserve_note} {st.reserve_pct:g}% of {other_gpu_bytes} bytes allocated at the peak (allocator_reserve_pct)"
    if st.reserve_pct > 0 and reserve_floor > reserve:
        reserve, note = reserve_floor, (f"segments the start of backward cannot use (memory.allocator_segments), above "
                                        f"the {st.reserve_pct:g}% of {other_gpu_bytes} bytes allocated at the peak")
    out = [
        Row("runtime/cuda_context", Tier.GPU, st.context_bytes, st.context_source, f"{st.context_note} (cuda_context_bytes)"),
        Row("runtime/allocator_reserve", Tier.GPU, reserve, st.reserve_source, note),
    ]
    pct = ctx.cfg.safety_margin_pct
    if pct:
        cap = ctx.gpu.capacity_bytes
        out.append(Row("runtime/safety_margin", Tier.GPU, safety_margin_bytes(capacity_bytes=cap, pct=pct),
                       SAFETY_MARGIN_SOURCE, f"{pct:g}% of the GPU's {cap} bytes kept free (safety_margin_pct)"))
    return out
