"""Evaluate one fixed configuration: every component's bytes on every tier, and whether it fits."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from memplan.arch.build import build_architecture
from memplan.arch.tensors import Architecture
from memplan.catalog.schema import GpuSpec, HostSpec, ModelSpec
from memplan.catalog.store import catalog_gpu, format_validation_error
from memplan.config import JobConfig
from memplan.errors import MemplanError
from memplan.memory import components
from memplan.memory.breakdown import Row, Tier, tier_total
from memplan.memory.context import Context


@dataclass(frozen=True)
class Estimate:
    """The memory of one configuration: rows per component and tier, capacities, and the verdict."""

    model: ModelSpec
    arch: Architecture
    gpu: GpuSpec
    host: HostSpec
    config: JobConfig
    rows: tuple[Row, ...]
    not_modelled: tuple[str, ...] = field(default=())
    stage: int = 0
    """The pipeline stage whose GPU is reported (the most loaded one)."""

    def total(self, tier: Tier) -> int:
        return tier_total(self.rows, tier)

    def capacity(self, tier: Tier) -> int:
        if tier is Tier.GPU:
            return self.gpu.memory_bytes
        if tier is Tier.CPU:
            return self.host.cpu_ram_bytes
        return self.host.nvme_bytes

    def headroom(self, tier: Tier) -> int:
        return self.capacity(tier) - self.total(tier)

    @property
    def tiers(self) -> tuple[Tier, ...]:
        return tuple(Tier)

    @property
    def fits(self) -> bool:
        return all(self.headroom(t) >= 0 for t in Tier)

    @property
    def headroom_bytes(self) -> int:
        """The smallest headroom over the tiers that hold something (GPU always counts)."""
        used = [t for t in Tier if t is Tier.GPU or self.total(t) > 0]
        return min(self.headroom(t) for t in used)

    @property
    def binding_tier(self) -> Tier:
        used = [t for t in Tier if t is Tier.GPU or self.total(t) > 0]
        return min(used, key=lambda t: (self.headroom(t), list(Tier).index(t)))


def make_config(config: JobConfig | None = None, **overrides: Any) -> JobConfig:
    """A validated JobConfig from a base config and keyword overrides; errors name the field."""
    data = config.model_dump() if config is not None else {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return JobConfig.model_validate(data)
    except ValidationError as exc:
        raise MemplanError(f"invalid configuration: {format_validation_error(exc)}.") from None


def estimate(
    model: str | ModelSpec,
    gpu: str | GpuSpec,
    config: JobConfig | None = None,
    *,
    host: HostSpec | None = None,
    **overrides: Any,
) -> Estimate:
    """Estimate the memory of ``model`` running ``config`` on ``gpu`` GPUs.

    ``model`` is a ModelSpec or anything ``memplan.load_model`` accepts; ``gpu`` a GpuSpec or a
    catalog name; keyword ``overrides`` set JobConfig fields (``job="lora"``, ``zero=3``, ...).
    """
    from memplan.catalog.resolve import load_model

    _check_types(model=(model, (str, ModelSpec)), gpu=(gpu, (str, GpuSpec)), config=(config, (JobConfig, type(None))),
                 host=(host, (HostSpec, type(None))))
    spec = load_model(model) if isinstance(model, str) else model
    gpu_spec = catalog_gpu(gpu) if isinstance(gpu, str) else gpu
    cfg = make_config(config, **overrides)
    arch = build_architecture(spec)
    ctx = Context(arch=arch, cfg=cfg, gpu=gpu_spec, host=host or HostSpec())
    rows, missing, stage = components.all_rows(ctx)
    _check_printable(rows)
    return Estimate(spec, arch, gpu_spec, ctx.host, cfg, tuple(rows), tuple(missing), stage)


MAX_TOTAL_BITS = 1000
"""Byte totals must stay below 2^1000: exact ints either way, but GiB figures are printed as floats."""


def _check_printable(rows: list[Row]) -> None:
    """A MemplanError when a tier's total is astronomically large (absurd sizes such as a 10^300-token sequence)."""
    for tier in Tier:
        bits = tier_total(rows, tier).bit_length()
        if bits > MAX_TOTAL_BITS:
            raise MemplanError(f"this configuration would need about 2^{bits - 1} bytes of {tier.value} memory, beyond "
                               "what memplan reports; check the sizes given (sequence length, batch, context, parameters).")


def _check_types(**args: tuple[Any, tuple[type, ...]]) -> None:
    """A MemplanError naming the first argument whose type is not one of those allowed."""
    for name, (value, allowed) in args.items():
        if not isinstance(value, allowed):
            names = " or ".join("None" if t is type(None) else t.__name__ for t in allowed)
            raise MemplanError(f"estimate(): {name} must be a {names}, got {type(value).__name__}.")
