"""Recipes: one scenario per YAML file (model, hardware, job shape, fixed choices, search space,
objective and required headroom), validated once at the boundary.

A recipe with a ``search`` block is planned (the planner picks the configuration, keeping the
headroom free); one without is estimated as written. Sizes are strings with an explicit unit
(``80GiB``, ``512GB``); a bare ``80G`` is rejected as ambiguous, a bare number as unit-less.
Every error names the file and the field (``recipes/x.yaml: hardware.cpu_ram: ...``).

Layout::

    name: llama-3.1-8b-qlora-rtx4090        # optional, default: the file name
    description: QLoRA on one 24 GB card
    model: llama-3.1-8b                      # catalog name, config.json path (relative to the recipe) or hf:org/name
    hardware: {gpu: rtx-4090, gpus_per_node: 1, nodes: 1, cpu_ram: 64GiB, nvme: 0}
    job: {type: qlora, seq_len: 2048, micro_batch: 2, global_batch: 16}   # infer: context, concurrency
    fixed: {optimizer: adamw-8bit, recompute: full, lora: {rank: 64, targets: [all-linear]}}
    search: {micro_batch: [1, 2, 4], recompute: [none, selective, full]}  # optional: plan instead of estimate
    objective: throughput                    # with search only
    min_headroom: 10%                        # or 2GiB; or per tier {gpu: 10%, cpu: 64GiB}
    sweep: {models: [...], gpus: [...], jobs: [full, lora], batches: [1, 8]}  # for `memplan sweep --recipe`
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from memplan.catalog.schema import GpuSpec, HostSpec, ModelSpec
from memplan.config import Job, JobConfig
from memplan.errors import MemplanError
from memplan.memory.breakdown import Tier
from memplan.planner.space import Objective, SearchSpace
from memplan.units import parse_fraction_or_size, parse_size

SHAPE_FIELDS = {"job": "job.type", "seq_len": "job.seq_len", "micro_batch": "job.micro_batch",
                "grad_accum": "job.global_batch", "gpus_per_node": "hardware.gpus_per_node",
                "nodes": "hardware.nodes", "cuda_context_bytes": "fixed.cuda_context"}
"""JobConfig fields a recipe sets elsewhere than under ``fixed`` (field -> where it goes)."""
PROBE_TOTAL = 2**40
"""Any positive total, to check that a percentage parses before capacities are known."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def size_bytes(value: Any) -> int:
    """A size written with its unit (``64GiB``, ``2TB``) in bytes; 0 may stand alone."""
    if isinstance(value, bool) or (isinstance(value, int | float) and value != 0):
        raise ValueError(f"{value!r} has no unit; write it as a string like '{value}GiB' or '{value}GB'")
    try:
        return parse_size(value if isinstance(value, str) else int(value), field="size")
    except MemplanError as exc:
        raise ValueError(str(exc).removeprefix("size: ")) from None


def check_headroom(value: Any) -> str:
    """``"10%"`` or a size such as ``"2GiB"``; returned as written, checked now."""
    text = str(value).strip() if isinstance(value, str) else value
    if not isinstance(text, str):
        size_bytes(text)
        return "0B"
    try:
        parse_fraction_or_size(text, total=PROBE_TOTAL, field="size")
    except MemplanError as exc:
        raise ValueError(str(exc).removeprefix("size: ")) from None
    return text


class Hardware(Strict):
    gpu: str
    gpus_per_node: int = Field(default=1, gt=0)
    nodes: int = Field(default=1, gt=0)
    cpu_ram: int | None = None
    """CPU RAM per node (default 1024GiB)."""
    nvme: int = 0
    """NVMe capacity per node usable for offload."""
    nvme_read_gbps: float | None = Field(default=None, gt=0)
    nvme_write_gbps: float | None = Field(default=None, gt=0)
    pcie_gbps_per_gpu: float | None = Field(default=None, gt=0)

    @field_validator("cpu_ram", "nvme", mode="before")
    @classmethod
    def _size(cls, value: Any) -> int | None:
        return None if value is None else size_bytes(value)

    def host(self) -> HostSpec:
        data = {k: v for k, v in {"cpu_ram_bytes": self.cpu_ram, "nvme_bytes": self.nvme,
                                   "nvme_read_gbps": self.nvme_read_gbps, "nvme_write_gbps": self.nvme_write_gbps,
                                   "pcie_gbps_per_gpu": self.pcie_gbps_per_gpu}.items() if v is not None}
        return HostSpec(**data)


class JobShape(Strict):
    type: Job
    seq_len: int | None = Field(default=None, gt=0)
    micro_batch: int | None = Field(default=None, gt=0)
    global_batch: int | None = Field(default=None, gt=0)
    """Sequences per optimizer step (training)."""
    context: int | None = Field(default=None, gt=0)
    """Tokens per sequence held in the KV cache (inference)."""
    concurrency: int | None = Field(default=None, gt=0)
    """Sequences served at once (inference)."""

    @model_validator(mode="after")
    def _fits_job(self) -> JobShape:
        if self.type is Job.INFER:
            wrong = [f for f in ("seq_len", "micro_batch", "global_batch") if getattr(self, f) is not None]
            hint = "inference recipes use job.context and job.concurrency"
        else:
            wrong = [f for f in ("context", "concurrency") if getattr(self, f) is not None]
            hint = "training recipes use job.seq_len, job.micro_batch and job.global_batch"
        if wrong:
            raise ValueError(f"{', '.join(wrong)} does not apply to a {self.type.value} job; {hint}")
        return self


Metric = Literal["max-batch", "max-context", "fits"]


class SweepBlock(Strict):
    """A grid for ``memplan sweep --recipe``; empty axes take the recipe's own value."""

    models: tuple[str, ...] | None = Field(default=None, min_length=1)
    gpus: tuple[str, ...] | None = Field(default=None, min_length=1)
    jobs: tuple[Job, ...] | None = Field(default=None, min_length=1)
    seq_lens: tuple[int, ...] | None = Field(default=None, min_length=1)
    contexts: tuple[int, ...] | None = Field(default=None, min_length=1)
    batches: tuple[int, ...] | None = Field(default=None, min_length=1)
    gpu_counts: tuple[int, ...] | None = Field(default=None, min_length=1)
    metric: Metric = "max-batch"

    @field_validator("seq_lens", "contexts", "batches", "gpu_counts")
    @classmethod
    def _positive(cls, values: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if values is not None and any(v <= 0 for v in values):
            raise ValueError("values must be positive integers")
        return values


class Recipe(Strict):
    """One scenario: what runs where, what may change, and how much memory must stay free."""

    name: str | None = None
    description: str = ""
    model: str
    hardware: Hardware
    job: JobShape
    fixed: dict[str, Any] = Field(default_factory=dict)
    search: SearchSpace | None = None
    objective: Objective | None = None
    min_headroom: str | dict[Tier, str] = "0B"
    sweep: SweepBlock | None = None

    @field_validator("min_headroom", mode="before")
    @classmethod
    def _headroom(cls, value: Any) -> str | dict[str, str]:
        if isinstance(value, dict):
            return {k: check_headroom(v) for k, v in value.items()}
        return check_headroom(value)

    @field_validator("search", mode="before")
    @classmethod
    def _none_quant(cls, value: Any) -> Any:
        """``quant: [none, nf4]``: the word none stands for 16-bit weights, as on the command line."""
        if isinstance(value, dict) and isinstance(value.get("quant"), list):
            value = {**value, "quant": [None if str(q).lower() == "none" else q for q in value["quant"]]}
        return value

    @model_validator(mode="after")
    def _objective_needs_search(self) -> Recipe:
        if self.objective is not None and self.search is None:
            raise ValueError("objective applies only to a recipe with a search block (a plan)")
        return self

    @property
    def planned(self) -> bool:
        return self.search is not None

    def headroom_for(self, tier: Tier) -> str | None:
        """The headroom written for ``tier``: a plain value applies to the GPU."""
        if isinstance(self.min_headroom, dict):
            return self.min_headroom.get(tier)
        return self.min_headroom if tier is Tier.GPU else None

    def required_bytes(self, tier: Tier, capacity: int) -> int:
        """Bytes that must stay free on ``tier`` (a percentage is of its capacity, rounded up)."""
        text = self.headroom_for(tier)
        if text is None:
            return 0
        return parse_fraction_or_size(text, total=capacity, field=f"min_headroom.{tier.value}")


@dataclass(frozen=True)
class LoadedRecipe:
    """A validated recipe with everything resolved: the model, GPU, host and configuration."""

    recipe: Recipe
    path: Path
    name: str
    model: ModelSpec
    gpu: GpuSpec
    host: HostSpec
    config: JobConfig

    @property
    def space(self) -> SearchSpace | None:
        space = self.recipe.search
        if space is not None and self.recipe.job.global_batch and space.global_batch is None:
            space = space.model_copy(update={"global_batch": self.recipe.job.global_batch})
        return space

    @property
    def objective(self) -> Objective:
        return self.recipe.objective or Objective.THROUGHPUT


def error_lines(exc: ValidationError, *, prefix: str = "") -> str:
    """Each invalid field as ``loc: message``, the raw message of a ValueError (no 'Value error,')."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        loc = f"{prefix}.{loc}" if prefix and loc else loc
        msg = str(err["ctx"]["error"]) if err["type"] == "value_error" and "error" in err.get("ctx", {}) else err["msg"]
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def job_config(recipe: Recipe) -> JobConfig:
    """The JobConfig a recipe describes: ``fixed`` fields plus the job shape and hardware."""
    fixed = dict(recipe.fixed)
    misplaced = [f"fixed.{k}: set it as {SHAPE_FIELDS[k]}" for k in fixed if k in SHAPE_FIELDS]
    infer = fixed.get("infer")
    if isinstance(infer, dict) and "context" in infer:
        misplaced.append("fixed.infer.context: set it as job.context")
    if misplaced:
        raise MemplanError("; ".join(misplaced))
    if "cuda_context" in fixed:
        try:
            fixed["cuda_context_bytes"] = size_bytes(fixed.pop("cuda_context"))
        except ValueError as exc:
            raise MemplanError(f"fixed.cuda_context: {exc}") from None
    shape, hw = recipe.job, recipe.hardware
    data: dict[str, Any] = {**fixed, "job": shape.type, "gpus_per_node": hw.gpus_per_node, "nodes": hw.nodes}
    if shape.type is Job.INFER:
        data["micro_batch"] = shape.concurrency or 1
        data["infer"] = {**(infer if isinstance(infer, dict) else {}), **({"context": shape.context} if shape.context else {})}
    else:
        data.update({k: v for k, v in (("seq_len", shape.seq_len), ("micro_batch", shape.micro_batch)) if v})
    try:
        cfg = JobConfig.model_validate(data)
    except ValidationError as exc:
        raise MemplanError(error_lines(exc, prefix="fixed")) from None
    if shape.global_batch and not recipe.planned:
        cfg = cfg.model_copy(update={"grad_accum": grad_accum(shape.global_batch, cfg)})
    return cfg


def grad_accum(global_batch: int, cfg: JobConfig) -> int:
    """Gradient-accumulation steps for ``global_batch`` sequences: global / (micro-batch × dp), exact."""
    per_step = cfg.micro_batch * cfg.dp
    if global_batch % per_step:
        raise MemplanError(f"job.global_batch: {global_batch} is not a multiple of micro-batch {cfg.micro_batch} × "
                           f"data-parallel degree {cfg.dp} = {per_step}.")
    return global_batch // per_step


def model_reference(text: str, base: Path) -> str:
    """``text`` with a relative config.json path resolved against the recipe's directory."""
    lowered = text.strip().lower()
    if lowered.startswith(("hf:", "params:")):
        return text
    path_like = text.endswith(".json") or "/" in text or "\\" in text or text.startswith(".")
    if path_like and not Path(text).expanduser().is_absolute():
        return str(base / text)
    return text


def parse_recipe(data: Any, *, name: str) -> Recipe:
    """Validate raw recipe data; MemplanError names the fields."""
    if not isinstance(data, dict):
        raise MemplanError("a recipe must be a mapping of fields (model, hardware, job, ...).")
    try:
        return Recipe.model_validate({"name": name, **data})
    except ValidationError as exc:
        raise MemplanError(error_lines(exc)) from None


def read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MemplanError("no such recipe file.") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise MemplanError(f"cannot read the recipe: {' '.join(str(exc).split())}") from None


def resolve(recipe: Recipe, path: Path) -> LoadedRecipe:
    """Look up the model and GPU and build the configuration of a validated recipe."""
    from memplan.catalog.resolve import load_model
    from memplan.catalog.store import catalog_gpu

    try:
        model = load_model(model_reference(recipe.model, path.parent))
    except MemplanError as exc:
        raise MemplanError(f"model: {exc}") from None
    try:
        gpu = catalog_gpu(recipe.hardware.gpu)
    except MemplanError as exc:
        raise MemplanError(f"hardware.gpu: {exc}") from None
    return LoadedRecipe(recipe, path, recipe.name or path.stem, model, gpu, recipe.hardware.host(), job_config(recipe))


def load_recipe(path: str | Path, *, overrides: dict[str, Any] | None = None) -> LoadedRecipe:
    """Read, validate and resolve one recipe file; every error names the file and the field."""
    p = Path(path)
    try:
        data = read_yaml(p)
        if overrides:
            data = apply_overrides(data, overrides)
        return resolve(parse_recipe(data, name=p.stem), p)
    except MemplanError as exc:
        raise MemplanError(f"{p}: {exc}") from None


def apply_overrides(data: Any, overrides: dict[str, Any]) -> Any:
    """``data`` with dotted keys set (``job.context`` -> data["job"]["context"]), for what-if checks."""
    if not isinstance(data, dict):
        return data
    out = {**data}
    for key, value in overrides.items():
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            node[part] = {**child} if isinstance(child, dict) else {}
            node = node[part]
        node[parts[-1]] = value
    return out


def parse_set(items: list[str]) -> dict[str, Any]:
    """``["job.context=32768", "fixed.zero=3"]`` -> {dotted key: YAML value}."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise MemplanError(f"--set: expected KEY=VALUE such as job.context=32768, got {item!r}.")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise MemplanError(f"--set: cannot read the value of {item!r}.") from None
    return out
