"""Evaluate one fixed configuration: every component's bytes on every tier, and whether it fits."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from pydantic import ValidationError

from memplan.arch.build import build_architecture
from memplan.arch.tensors import Architecture
from memplan.catalog.schema import GpuSpec, HostSpec, ModelSpec
from memplan.catalog.store import catalog_gpu, format_validation_error
from memplan.config import Engine, JobConfig
from memplan.errors import MemplanError
from memplan.memory import components
from memplan.memory.breakdown import Phase, Row, Tier, peak, phase_totals, tier_total
from memplan.memory.context import Context
from memplan.preflight import gpu_default_dtype, host_assumptions, preflight


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
    warnings: tuple[str, ...] = field(default=())
    """Sentences about inputs the answer still covers but the user should know (``memplan.preflight``)."""
    assumptions: dict[str, Any] = field(default_factory=dict)
    serving: dict[str, int] = field(default_factory=dict)
    """The serving engine's capacity figures (vLLM: ``kv_pool_bytes``, ``kv_pool_blocks``, ``kv_pool_tokens``,
    ``max_concurrency`` at the context, ``max_context`` of one sequence); empty for other jobs and engines."""
    """What the answer assumed because it was not given: host sizes by HostSpec field (``cpu_ram_bytes``:
    1 TiB per node, ``nvme_bytes``: 0) and ``dtype`` when fp16 replaced the bf16 default on a GPU without
    bf16, so the answer can say what it rests on."""

    @property
    def engine(self) -> Engine:
        """The engine whose layout these rows follow: ``config.engine`` or the default (``JobConfig.effective_engine``)."""
        return self.config.effective_engine

    @property
    def engine_reason(self) -> str:
        """One sentence: the engine and, when memplan chose it, why (``memplan.engines.profiles.default_reason``)."""
        from memplan.engines.profiles import default_reason

        return default_reason(self.config)

    def total(self, tier: Tier) -> int:
        """Every row of ``tier`` added up (components never alive together included); the answer is ``peak``."""
        return tier_total(self.rows, tier)

    @property
    def step_phases(self) -> tuple[Phase, ...]:
        """The phases of the job's step (training: forward ... optimizer_step; serving: load, prefill, decode)."""
        return components.job_phases(self.config)

    def phases(self, tier: Tier) -> dict[Phase, int]:
        """Bytes alive on ``tier`` in each phase of the step."""
        return phase_totals(self.rows, tier, self.step_phases)

    def peak(self, tier: Tier) -> int:
        """The answer: the largest number of bytes alive on ``tier`` at any phase of the step."""
        return self._peaks[tier][0]

    def peak_phase(self, tier: Tier) -> Phase:
        """The phase whose total is ``peak(tier)`` (the first one on ties)."""
        return self._peaks[tier][1]

    @cached_property
    def _peaks(self) -> dict[Tier, tuple[int, Phase]]:
        """(peak, binding phase) per tier, computed once (the rows and the step never change)."""
        return {tier: peak(self.rows, tier, self.step_phases) for tier in Tier}

    def capacity(self, tier: Tier) -> int:
        if tier is Tier.GPU:
            return self.gpu.capacity_bytes
        if tier is Tier.CPU:
            return self.host.cpu_ram_bytes
        return self.host.nvme_bytes

    def headroom(self, tier: Tier) -> int:
        """Capacity minus the phase peak."""
        return self.capacity(tier) - self.peak(tier)

    @property
    def tiers(self) -> tuple[Tier, ...]:
        return tuple(Tier)

    @property
    def fits(self) -> bool:
        return all(self.headroom(t) >= 0 for t in Tier)

    @property
    def headroom_bytes(self) -> int:
        """The smallest headroom over the tiers that hold something (GPU always counts)."""
        used = [t for t in Tier if t is Tier.GPU or self.peak(t) > 0]
        return min(self.headroom(t) for t in used)

    @property
    def binding_tier(self) -> Tier:
        used = [t for t in Tier if t is Tier.GPU or self.peak(t) > 0]
        return min(used, key=lambda t: (self.headroom(t), list(Tier).index(t)))


def make_config(config: JobConfig | None = None, **overrides: Any) -> JobConfig:
    """A validated JobConfig from a base config and keyword overrides; errors name the field."""
    data = config.model_dump(exclude_unset=True) if config is not None else {}  # defaults stay defaults
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
    return estimate_validated(spec, gpu_spec, make_config(config, **overrides), host=host)


def estimate_validated(spec: ModelSpec, gpu_spec: GpuSpec, config: JobConfig, *, host: HostSpec | None = None) -> Estimate:
    """``estimate(spec, gpu_spec, config, host=host)`` for a ``config`` that already is what ``make_config(config)``
    returns (a validated JobConfig, or one made from it by ``search.with_size`` with positive sizes: no validator
    reads a size), so it is not dumped and validated again; sweeps estimate one configuration at many sizes."""
    cfg, assumed = gpu_default_dtype(config, gpu_spec)
    from memplan.engines import rules

    rules.check(cfg)
    arch = build_architecture(spec)
    warnings = preflight(spec, arch, gpu_spec, cfg)
    ctx = Context(arch=arch, cfg=cfg, gpu=gpu_spec, host=host or HostSpec())
    from memplan.engines import serving

    serving.check_knobs(cfg)
    rows, missing, stage = serving.all_rows(ctx) if serving.has_own_rows(cfg) else components.all_rows(ctx)
    _check_printable(rows)
    return Estimate(spec, arch, gpu_spec, ctx.host, cfg, tuple(rows), tuple(missing), stage,
                    tuple(warnings), {**host_assumptions(ctx.host), **assumed}, serving.summary(ctx))


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
