"""Recipes (the schema): one scenario per YAML file (model, hardware, job shape, fixed choices, search space,
objective and required headroom), validated once at the boundary.

A recipe with a ``search`` block is planned (the planner picks the configuration, keeping the
headroom free); one without is estimated as written. Sizes are strings with an explicit unit
(``80GiB``, ``512GB``); a bare ``80G`` is rejected as ambiguous, a bare number as unit-less.
Every error names the file and the field (``recipes/x.yaml: hardware.cpu_ram: ...``).
Loading, catalog look-ups and the JobConfig a recipe describes: ``memplan.recipe_load``.

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

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from memplan.catalog.schema import HostSpec
from memplan.config import MAX_GPUS, Job
from memplan.config import Strict as ConfigStrict
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


class Strict(ConfigStrict):
    """Recipe blocks: unknown keys are errors, and a bool is never taken for a number (``ConfigStrict``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def size_bytes(value: Any) -> int:
    """A size written with its unit (``64GiB``, ``2TB``) in bytes; 0 may stand alone."""
    if not isinstance(value, str | int | float):
        raise ValueError(f"expected a size such as '64GiB' or '2TB', got {type(value).__name__} {value!r}")
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
    gpus_per_node: int = Field(default=1, gt=0, le=MAX_GPUS)
    nodes: int = Field(default=1, gt=0, le=MAX_GPUS)
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

    @field_validator("cpu_ram")
    @classmethod
    def _positive_ram(cls, value: int | None) -> int | None:
        """A node has some CPU RAM (the same rule as ``--cpu-ram``); NVMe may be 0 (none)."""
        if value is not None and value <= 0:
            raise ValueError("must be positive, e.g. '64GiB'")
        return value

    def host(self) -> HostSpec:
        data = {k: v for k, v in {"cpu_ram_bytes": self.cpu_ram, "nvme_bytes": self.nvme,
                                   "nvme_read_gbps": self.nvme_read_gbps, "nvme_write_gbps": self.nvme_write_gbps,
                                   "pcie_gbps_per_gpu": self.pcie_gbps_per_gpu}.items() if v is not None}
        return HostSpec.model_validate(data)


class JobShape(Strict):
    type: Job
    seq_len: int | None = Field(default=None, gt=0)
    micro_batch: int | None = Field(default=None, gt=0)
    global_batch: int | None = Field(default=None, gt=0, le=2**31)
    """Sequences per optimizer step (training); at most 2^31, as ``SearchSpace.global_batch``."""
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
    gpus_per_node: int | None = Field(default=None, gt=0)
    """How GPU counts split into nodes; default: the recipe's hardware.gpus_per_node when above 1, else 8."""
    tp: int | Literal["node"] | None = None
    """Tensor-parallel degree of every cell; ``node``: all the GPUs of a node (serving); default: the recipe's."""
    metric: Metric = "max-batch"

    @field_validator("tp")
    @classmethod
    def _tp(cls, value: int | str | None) -> int | str | None:
        if isinstance(value, int) and value <= 0:
            raise ValueError("must be a positive integer or 'node'")
        return value

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


MAX_ERRORS = 3
"""At most this many invalid fields are named in one message (the first ones), so it stays one short line."""


def error_lines(exc: ValidationError, *, prefix: str = "", model: type[BaseModel] | None = None) -> str:
    """Each invalid field as ``loc: message``, the raw message of a ValueError (no 'Value error,'); an unknown
    key names the keys allowed there when ``model`` (the validated class) is given. Repeats are dropped and
    at most MAX_ERRORS fields are named."""
    parts: list[str] = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-"))
        loc = f"{prefix}.{loc}" if prefix and loc else loc
        if err["type"] == "value_error" and "error" in err.get("ctx", {}):
            msg = str(err["ctx"]["error"])
        elif err["type"] == "extra_forbidden":
            msg = "unknown key" + known_keys(model, [str(p) for p in err["loc"]])
        else:
            msg = err["msg"].replace("Input should be", "must be")
        line = f"{loc}: {msg}" if loc else msg
        if line not in parts:
            parts.append(line)
    more = len(parts) - MAX_ERRORS
    return "; ".join(parts[:MAX_ERRORS]) + (f"; and {more} more" if more > 0 else "")


MAX_LISTED_KEYS = 12
"""Up to this many valid keys are listed after an unknown one; above it, only the closest are suggested."""


def known_keys(model: type[BaseModel] | None, path: list[str]) -> str:
    """``; valid keys here: a, b, c`` (or a did-you-mean) for an unknown key ``path[-1]`` inside the
    (sub)model of ``model`` at ``path[:-1]``; '' when the model is unknown."""
    from memplan.errors import did_you_mean

    for part in path[:-1]:
        if model is None:
            return ""
        field = model.model_fields.get(part)
        annotation = field.annotation if field is not None else None
        candidates = [a for a in (annotation, *getattr(annotation, "__args__", ())) if isinstance(a, type)]
        model = next((a for a in candidates if issubclass(a, BaseModel)), None)
    if model is None:
        return ""
    keys = list(model.model_fields)
    if len(keys) > MAX_LISTED_KEYS:
        return did_you_mean(path[-1], keys).replace(" Did you mean", "; did you mean").rstrip("?")
    return f"; valid keys here: {', '.join(keys)}"
