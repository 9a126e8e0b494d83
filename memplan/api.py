"""The typed Python API: ``estimate``, ``plan`` and ``sweep`` as functions returning typed results.

Arguments take the names of the CLI options and of ``JobConfig`` fields (``job="lora"``, ``zero=3``,
``seq_len=4096``); the options the CLI spells flat for nested settings are accepted flat too:
``context``/``kv_dtype``/``paged`` (``JobConfig.infer``), ``lora_rank``/``lora_targets`` (``JobConfig.lora``),
``galore_rank`` (``JobConfig.galore``); ``cpu_ram``/``nvme`` (sizes such as "512GiB") set the host;
``usd_per_hour`` overrides the GPU catalog's price. pandas and numpy are imported only by ``to_frame`` and
``sweep``, so ``import memplan`` and ``memplan.estimate`` stay light.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from memplan.catalog.schema import GpuSpec, HostSpec, ModelSpec
from memplan.config import GaloreConfig, InferConfig, JobConfig, LoraConfig
from memplan.errors import MemplanError
from memplan.memory.breakdown import Row, Tier
from memplan.report.cost import Cost, cost_of

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from memplan.estimator import Estimate as Detail
    from memplan.planner.plan import Candidate, PlanResult

NESTED: dict[str, type[InferConfig | LoraConfig | GaloreConfig]] = {
    "infer": InferConfig, "lora": LoraConfig, "galore": GaloreConfig}
"""Nested JobConfig sections whose fields may be given flat: infer fields by name (``context``), the
others with the section as prefix (``lora_rank``), as the CLI options spell them."""


def job_config(config: JobConfig | None = None, **options: Any) -> JobConfig:
    """A validated JobConfig from ``config`` and options named like JobConfig fields or flat CLI options."""
    from memplan.estimator import make_config

    sections: dict[str, dict[str, Any]] = {}
    flat: dict[str, Any] = {}
    for key, value in options.items():
        section = _section_of(key)
        if section is None:
            flat[key] = value
        elif value is not None:
            name = key if section == "infer" and key in InferConfig.model_fields else key[len(section) + 1:]
            sections.setdefault(section, {})[name] = value
    base = config or JobConfig()
    for section, values in sections.items():
        flat[section] = {**getattr(base, section).model_dump(), **values}
    return make_config(config, **flat)


def _section_of(key: str) -> str | None:
    if key in JobConfig.model_fields:
        return None
    if key in InferConfig.model_fields:
        return "infer"
    for section, model in NESTED.items():
        if key.startswith(section + "_") and key[len(section) + 1:] in model.model_fields:
            return section
    raise MemplanError(f"unknown option {key!r}: give a JobConfig field (job, zero, seq_len, ...) or a flat option "
                       "such as context, kv_dtype or lora_rank.")


def host_spec(host: HostSpec | None, cpu_ram: str | int | None, nvme: str | int | None) -> HostSpec:
    """The host: ``host`` as given, with ``cpu_ram``/``nvme`` (bytes or sizes such as "512GiB") applied."""
    from memplan.units import parse_size

    base = host or HostSpec()
    update = {}
    for name, value in (("cpu_ram_bytes", cpu_ram), ("nvme_bytes", nvme)):
        if value is not None:
            update[name] = value if isinstance(value, int) else parse_size(value, field=f"--{name[:-6].replace('_', '-')}")
    return base.model_copy(update=update) if update else base


def gpu_peak(detail: Detail) -> int:
    """The answer on the GPU tier: its phase peak once the memory model has phase peaks
    (``Estimate.peak(tier)``), the sum of its rows until then. The one place to switch."""
    peak = getattr(detail, "peak", None)
    return int(peak(Tier.GPU)) if callable(peak) else detail.total(Tier.GPU)


@dataclass(frozen=True)
class Estimate:
    """The memory of one configuration (``memplan.estimate``): rows, the GPU peak and the verdict.

    ``detail`` is the memory model's own result (per-tier totals, capacities, architecture); the
    properties below are the stable surface.
    """

    detail: Detail
    usd_per_hour: float | None = None
    """Price of one GPU per hour (catalog or override); None when unknown."""

    def __getattr__(self, name: str) -> Any:
        """Anything else the memory model's result has (so functions written for it accept this too)."""
        if name.startswith("__") or name == "detail":
            raise AttributeError(name)
        return getattr(self.detail, name)

    @property
    def rows(self) -> tuple[Row, ...]:
        return self.detail.rows

    @property
    def peak(self) -> int:
        """Bytes on the most loaded GPU at the step's peak (the answer)."""
        return gpu_peak(self.detail)

    @property
    def fits(self) -> bool:
        return self.detail.fits

    @property
    def config(self) -> JobConfig:
        return self.detail.config

    @property
    def model(self) -> ModelSpec:
        return self.detail.model

    @property
    def gpu(self) -> GpuSpec:
        return self.detail.gpu

    @property
    def arch(self) -> Any:
        return self.detail.arch

    @property
    def not_modelled(self) -> tuple[str, ...]:
        return self.detail.not_modelled

    @property
    def host(self) -> HostSpec:
        return self.detail.host

    @property
    def stage(self) -> int:
        return self.detail.stage

    @property
    def tiers(self) -> tuple[Tier, ...]:
        return self.detail.tiers

    @property
    def binding_tier(self) -> Tier:
        return self.detail.binding_tier

    @property
    def headroom_bytes(self) -> int:
        return self.detail.headroom_bytes

    def total(self, tier: Tier) -> int:
        return self.detail.total(tier)

    def capacity(self, tier: Tier) -> int:
        return self.detail.capacity(tier)

    def headroom(self, tier: Tier) -> int:
        return self.detail.headroom(tier)

    def to_frame(self) -> pd.DataFrame:
        """One row per component and tier: component, tier, bytes (int64), gib, phases, source."""
        from memplan.report.frame import rows_frame

        return rows_frame(self.rows)


def estimate(model: str | ModelSpec, gpu: str | GpuSpec = "h100-sxm-80gb", config: JobConfig | None = None, *,
             host: HostSpec | None = None, cpu_ram: str | int | None = None, nvme: str | int | None = None,
             usd_per_hour: float | None = None, **options: Any) -> Estimate:
    """Estimate ``model`` on ``gpu`` GPUs: ``memplan.estimate("llama-3.1-8b", "h100", job="lora")``.

    ``options`` are JobConfig fields or flat CLI options (see the module docstring); errors are
    ``MemplanError`` with one sentence naming the option.
    """
    from memplan.estimator import _check_types
    from memplan.estimator import estimate as run

    _check_types(model=(model, (str, ModelSpec)), gpu=(gpu, (str, GpuSpec)), config=(config, (JobConfig, type(None))),
                 host=(host, (HostSpec, type(None))))
    from memplan.plan_only import refuse_plan_only

    cfg = job_config(config, **options)
    refuse_plan_only(cfg, "estimate()")
    detail = run(model, gpu, cfg, host=host_spec(host, cpu_ram, nvme))
    return Estimate(detail, _price(detail.gpu, usd_per_hour))


def _price(gpu: GpuSpec, override: float | None) -> float | None:
    if override is not None:
        from memplan.report.cost import checked_usd_per_hour

        return checked_usd_per_hour(override)
    return gpu.price_per_hour_usd


class PlanStatus(StrEnum):
    """Whether a plan was found: OPTIMAL (``best`` is set) or INFEASIBLE (see ``suggestions``)."""

    OPTIMAL = "optimal"
    INFEASIBLE = "infeasible"


@dataclass(frozen=True)
class Suggestion:
    """A verified change that makes an infeasible request fit."""

    change: str
    flags: str
    """The ``plan`` options that make the change, written from ``extra["changes"]`` (``memplan.report.flags``)."""
    verified: bool
    gpu_total_bytes: int | None = None
    tokens_per_s: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PlanOption:
    """One configuration that fits, with its speed and cost."""

    config: JobConfig
    estimate: Estimate
    step_time_s: float
    tokens_per_s: float
    layer_map: str
    cost: Cost | None
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Plan:
    """The answer of ``memplan.plan``: the best option, the alternatives, or suggestions."""

    status: PlanStatus
    best: PlanOption | None
    alternatives: tuple[PlanOption, ...]
    suggestions: tuple[Suggestion, ...]
    binding: str | None
    excluded: tuple[str, ...]
    solver_status: str
    result: PlanResult
    """The planner's own result (what the CLI reports)."""

    @property
    def options(self) -> tuple[PlanOption, ...]:
        return ((self.best,) if self.best else ()) + self.alternatives

    def to_frame(self) -> pd.DataFrame:
        """One row per option (best first): configuration, GPU peak, speed and cost columns."""
        from memplan.report.frame import plan_frame

        return plan_frame(self.options)


def plan(model: str | ModelSpec, gpu: str | GpuSpec = "h100-sxm-80gb", config: JobConfig | None = None, *,
         objective: str = "throughput", top: int = 3, time_limit: float | None = None, solver: str | None = None,
         space: dict[str, Any] | None = None, host: HostSpec | None = None, cpu_ram: str | int | None = None,
         nvme: str | int | None = None, usd_per_hour: float | None = None, suggest: bool = True,
         **options: Any) -> Plan:
    """The fastest configurations that fit: ``memplan.plan("llama-3.1-70b", "h100", job="lora", gpus=(8,))``.

    ``space`` holds SearchSpace fields (candidate tuples such as ``{"zero": (2, 3)}``); ``gpus``,
    ``tp``, ``pp``, ``zero`` and ``micro_batch`` given as tuples among ``options`` go there too.
    """
    from pydantic import ValidationError

    from memplan.catalog.resolve import load_model
    from memplan.catalog.store import catalog_gpu, format_validation_error
    from memplan.planner.plan import DEFAULT_TIME_LIMIT_S, PlanRequest
    from memplan.planner.plan import plan as solve
    from memplan.planner.space import Objective, SearchSpace

    space = dict(space or {})
    for key in [k for k, v in options.items() if isinstance(v, (tuple, list)) and k in SearchSpace.model_fields]:
        space[key] = tuple(options.pop(key))
    try:
        search, obj = SearchSpace.model_validate(space), Objective(objective)
    except ValidationError as exc:
        raise MemplanError(f"invalid search space: {format_validation_error(exc)}.") from None
    except ValueError:
        raise MemplanError(f"objective must be one of {', '.join(o.value for o in Objective)}, got {objective!r}.") from None
    spec = load_model(model) if isinstance(model, str) else model
    gpu_spec = catalog_gpu(gpu) if isinstance(gpu, str) else gpu
    if usd_per_hour is not None:  # min-cost ranks by it too
        gpu_spec = gpu_spec.model_copy(update={"price_per_hour_usd": _price(gpu_spec, usd_per_hour)})
    req = PlanRequest(model=spec, gpu=gpu_spec, host=host_spec(host, cpu_ram, nvme), base=job_config(config, **options),
                      space=search, objective=obj, top_k=top, solver=solver, suggest=suggest,
                      time_limit_s=DEFAULT_TIME_LIMIT_S if time_limit is None else time_limit)
    return wrap_plan(solve(req), _price(gpu_spec, usd_per_hour))


def wrap_plan(result: PlanResult, price: float | None) -> Plan:
    """The typed Plan of a planner result, with cost at ``price`` dollars per GPU-hour."""
    def option(c: Candidate) -> PlanOption:
        return PlanOption(c.config, Estimate(c.estimate, price), c.step_time_s, c.tokens_per_s, c.layer_map,
                          cost_of(price, c.config, c.step_time_s, c.tokens_per_s), dict(c.extras))

    from memplan.report.plan_out import suggestion_dict

    known = set(Suggestion.__dataclass_fields__) - {"extra"}
    suggestions = tuple(Suggestion(**{k: v for k, v in s.items() if k in known},
                                   extra={k: v for k, v in s.items() if k not in known})
                        for s in map(suggestion_dict, result.suggestions))
    options = [option(c) for c in result.candidates]
    return Plan(PlanStatus(result.status), options[0] if options else None, tuple(options[1:]), suggestions,
                result.binding, tuple(result.excluded), result.solver_status, result)


def sweep(models: str | Sequence[str], gpus: str | Sequence[str], jobs: str | Sequence[str] = ("full",), *,
          seq_lens: Sequence[int] = (2048,), contexts: Sequence[int] = (4096,), batches: Sequence[int] = (1,),
          gpu_counts: Sequence[int] = (1,), gpus_per_node: int = 8, tp: int | str | None = None,
          metric: str = "max-batch", min_headroom: str = "0B", config: JobConfig | None = None,
          host: HostSpec | None = None, cpu_ram: str | int | None = None, nvme: str | int | None = None,
          usd_per_hour: float | None = None, speed: bool = False, workers: int | None = 1,
          out: str | Path | None = None, **options: Any) -> pd.DataFrame:
    """A grid of models × GPUs × jobs × sizes as a DataFrame, one row per grid point.

    ``models``/``gpus``: catalog names or "all"; ``jobs``: job names. Columns are those of
    ``memplan sweep --format csv`` (``*_bytes`` int64, configuration columns categorical) plus
    ``usd_per_gpu_hour``/``usd_per_hour``; ``speed=True`` adds the step-time and per-token cost columns.
    ``out`` also writes the CSV (streamed, see ``memplan.report.sweep_stream``).
    """
    from memplan.grid import base_at_counts
    from memplan.report.sweep_stream import sweep_frame

    base = base_at_counts(lambda **world: job_config(config, **{**options, **world}), tuple(gpu_counts), gpus_per_node)
    spec = sweep_spec(models, gpus, jobs, seq_lens=seq_lens, contexts=contexts, batches=batches, gpu_counts=gpu_counts,
                      gpus_per_node=gpus_per_node, tp=tp, metric=metric, min_headroom=min_headroom, speed=speed,
                      config=base, host=host_spec(host, cpu_ram, nvme))
    return sweep_frame(spec, workers=workers, out=Path(out) if out is not None else None, usd_per_hour=usd_per_hour)


def sweep_spec(models: str | Sequence[str], gpus: str | Sequence[str], jobs: str | Sequence[str], *,
               config: JobConfig, host: HostSpec, **axes: Any) -> Any:
    """The validated SweepSpec of the API's arguments."""
    from memplan.catalog.store import gpu_names, model_names
    from memplan.config import Job
    from memplan.grid import SweepSpec, validate

    def names(value: str | Sequence[str], everything: list[str]) -> tuple[str, ...]:
        items = [value] if isinstance(value, str) else list(value)
        return tuple(everything) if items == ["all"] else tuple(items)

    if axes["metric"] not in ("max-batch", "max-context", "fits"):
        raise MemplanError(f"metric must be max-batch, max-context or fits, got {axes['metric']!r}.")
    try:
        job_values = tuple(Job(j) for j in names(jobs, []))
    except ValueError as exc:
        raise MemplanError(f"jobs: {exc}; give some of {', '.join(j.value for j in Job)}.") from None
    fields: dict[str, Any] = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in axes.items()}
    spec = SweepSpec(models=names(models, model_names()), gpus=names(gpus, gpu_names()), jobs=job_values,
                     **fields, base=config, host=host)
    if not spec.models or not spec.gpus or not spec.jobs:
        raise MemplanError("sweep(): give at least one model, GPU and job (or 'all').")
    validate(spec)
    return spec
