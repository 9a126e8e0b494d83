"""The GPU memory every engine budgets from: the CUDA runtime's total, not nvidia-smi's.

nvidia-smi's total (``GpuSpec.memory_mib``) includes memory the driver keeps for itself (page tables, ECC,
reserved regions). The CUDA runtime's total (``cudaMemGetInfo``'s total, ``cudaDeviceProp.totalGlobalMem``,
``torch.cuda.get_device_properties(0).total_memory``, the "GiB total capacity" of a PyTorch OOM message) leaves
that memory out, and it is the most any process can allocate. Budgeting from nvidia-smi's figure says FITS up to
about 0.5 GiB above what an engine can ever get, the dangerous direction.

Three cases, in order:
1. **cuda runtime (published):** the catalog entry carries ``cuda_memory_mib`` with the published line it comes
   from (``cuda_memory_quote``, ``cuda_memory_url``, ``cuda_memory_note``).
2. **nvidia-smi total less the largest published reservation:** a catalog GPU without a published figure. The
   reservation is nvidia-smi's total less the CUDA total, for every catalog GPU that has both; the rule takes the
   largest among GPUs of the same vendor and marketed memory size, else of the same vendor, else of all.
   Assumption: a GPU reserves no more than the worst published GPU of its class (reservations grow with driver
   version and ECC, and the published ones span several drivers).
3. **as given:** a GPU the user built: one not in the catalog keeps its cuda_memory_mib if set, else its
   memory_mib; a catalog GPU whose memory_mib was changed (a recipe's headroom-reduced GPU, a test's smaller
   card) keeps the new memory_mib, since the catalog's CUDA total belonged to the old one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from memplan.catalog.schema import GpuSpec
from memplan.units import MiB

PUBLISHED = "cuda runtime (published)"
RULE = "nvidia-smi total less the largest published reservation"
GIVEN = "memory as given"


@dataclass(frozen=True)
class Capacity:
    """The bytes an engine can allocate on one GPU, the kind of figure it is, and where it comes from."""

    bytes: int
    kind: str
    source: str


def reservation_mib(gpu: GpuSpec) -> int:
    """MiB the driver keeps below nvidia-smi's total on ``gpu``: memory_mib − cuda_memory_mib (published GPUs only).

    Source: the catalog's published CUDA totals (``cuda_memory_quote``/``cuda_memory_url``)."""
    if gpu.cuda_memory_mib is None:
        raise ValueError(f"{gpu.name} has no published CUDA total")
    return gpu.memory_mib - gpu.cuda_memory_mib


def peers(gpu: GpuSpec, published: Sequence[GpuSpec]) -> list[GpuSpec]:
    """The published GPUs whose reservation bounds ``gpu``'s: same vendor and marketed memory size, else the
    same vendor, else all of them."""
    same_vendor = [p for p in published if p.vendor == gpu.vendor]
    same_size = [p for p in same_vendor if p.marketed_memory_gb == gpu.marketed_memory_gb]
    return same_size or same_vendor or list(published)


def largest_reservation(gpu: GpuSpec, published: Sequence[GpuSpec]) -> tuple[int, GpuSpec]:
    """The largest published reservation among ``gpu``'s peers (``peers``), in MiB, and the GPU it was published for."""
    group = peers(gpu, published)
    if not group:
        raise ValueError("no catalog GPU has a published CUDA total")
    worst = max(group, key=lambda p: (reservation_mib(p), p.name))
    return reservation_mib(worst), worst


@lru_cache(maxsize=1)
def _catalog() -> dict[str, GpuSpec]:
    from memplan.catalog.store import all_gpus

    return {g.name: g for g in all_gpus()}


def published_gpus() -> list[GpuSpec]:
    """Catalog GPUs with a published CUDA-runtime total."""
    return [g for g in _catalog().values() if g.cuda_memory_mib is not None]


def gpu_capacity(gpu: GpuSpec) -> Capacity:
    """The capacity of ``gpu`` in bytes: the published CUDA total, else nvidia-smi's total less the largest published
    reservation of its class (catalog GPUs), else memory_mib as given (see the module docstring)."""
    return _capacity(gpu.name, gpu.vendor, gpu.marketed_memory_gb, gpu.memory_mib, gpu.cuda_memory_mib,
                     gpu.cuda_memory_url)


@lru_cache(maxsize=256)
def _capacity(name: str, vendor: str, marketed_gb: int, memory_mib: int, cuda_mib: int | None,
              url: str | None) -> Capacity:
    entry = _catalog().get(name)
    if entry is not None and entry.memory_mib != memory_mib:
        # a catalog GPU whose memory the caller changed (model_copy): its old CUDA total no longer applies
        return Capacity(memory_mib * MiB, GIVEN, f"{GIVEN}: {memory_mib} MiB")
    if cuda_mib is not None:
        if entry is None or entry.cuda_memory_mib != cuda_mib:
            return Capacity(cuda_mib * MiB, GIVEN, f"{GIVEN}: CUDA total {cuda_mib} MiB")
        where = f" ({url})" if url else ""
        return Capacity(cuda_mib * MiB, PUBLISHED, f"{PUBLISHED}: {cuda_mib} MiB{where}")
    if entry is None:
        return Capacity(memory_mib * MiB, GIVEN, f"{GIVEN}: {memory_mib} MiB")
    reserve, worst = largest_reservation(entry, published_gpus())
    return Capacity((memory_mib - reserve) * MiB, RULE,
                    f"{RULE}: {memory_mib} − {reserve} MiB (the reservation published for {worst.name})")
