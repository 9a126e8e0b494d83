"""Pydantic models of memplan's JSON output (schema_version 1), and the JSON Schema files made from them.

``memplan/schema/{estimate,plan,check,sweep}.schema.json`` are generated from these models
(``python -m memplan.report.schemas`` rewrites them); tests check that the files are current and that
real output validates against them. Bytes are exact ints; every object forbids unknown keys, so a
renamed or added field shows up as a schema change (bump SCHEMA_VERSION when renaming).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt, StringConstraints

from memplan.config import JobConfig
from memplan.memory.breakdown import TOP_LEVEL
from memplan.planner.space import Objective

SCHEMA_DIR = Path(__file__).resolve().parents[1] / "schema"
DRAFT = "https://json-schema.org/draft/2020-12/schema"

ComponentName = Annotated[str, StringConstraints(pattern=rf"^({'|'.join(TOP_LEVEL)})(/.+)?$")]
TierName = Literal["gpu", "cpu", "nvme"]
PhaseName = Literal["forward", "backward_start", "backward", "optimizer_step", "load", "prefill", "decode"]
Version = Literal[1]


class Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelOut(Out):
    name: str
    family: str
    params: NonNegativeInt
    active_params: NonNegativeInt
    published_params: int | None
    source: str


class HardwareOut(Out):
    gpu: str
    gpu_memory_bytes: NonNegativeInt = Field(description="nvidia-smi's total (catalog memory_mib), in bytes.")
    gpu_capacity_bytes: NonNegativeInt = Field(
        description="What every engine budgets from: the CUDA runtime's total (memplan.catalog.capacity), in bytes.")
    gpu_capacity_source: str = Field(
        description="Where gpu_capacity_bytes comes from: 'cuda runtime (published)', 'nvidia-smi total less the "
        "largest published reservation' or 'memory as given', with the figure.")
    gpus_per_node: int
    nodes: int
    cpu_ram_bytes: NonNegativeInt
    nvme_bytes: NonNegativeInt


class TierOut(Out):
    total_bytes: NonNegativeInt
    capacity_bytes: NonNegativeInt
    headroom_bytes: int
    """Capacity minus ``peak_bytes``."""
    components: dict[ComponentName, NonNegativeInt] = Field(json_schema_extra={"additionalProperties": False})
    peak_bytes: NonNegativeInt
    """The answer: the largest number of bytes alive at any phase of the step (``total_bytes`` adds every row)."""
    peak_phase: PhaseName
    """The phase whose total is ``peak_bytes``."""
    phases: dict[PhaseName, NonNegativeInt]
    """Bytes alive in each phase of the step (training: forward, backward_start, backward, optimizer_step;
    serving: load, prefill, decode)."""


class MemoryOut(Out):
    gpu: TierOut
    cpu: TierOut
    nvme: TierOut


class EstimateOut(Out):
    """``memplan estimate --format json``: one configuration, bytes per component and tier."""

    schema_version: Version
    model: ModelOut
    hardware: HardwareOut
    config: JobConfig
    memory: MemoryOut
    fits: bool
    headroom_bytes: int
    binding_tier: TierName
    not_modelled: list[str]
    warnings: list[str] = []
    """Inputs the answer still covers but the user should know, e.g. a context above the model's
    max_position_embeddings (one sentence each)."""
    assumptions: dict[str, int | str] = {}
    serving: dict[str, int] = {}
    """The serving engine's capacity figures (vLLM: KV pool bytes/blocks/tokens, max_concurrency, max_context)."""
    """What was assumed because it was not given: ``cpu_ram_bytes`` (1 TiB per node) and ``nvme_bytes`` (0)
    when the host was not described, ``dtype`` (fp16) when a GPU without bf16 got the bf16 default."""
    sources: dict[ComponentName, str] = Field(json_schema_extra={"additionalProperties": False})
    max_context: NonNegativeInt | None = None
    """With ``--max-context``: the longest context that fits (0: none)."""
    max_batch: NonNegativeInt | None = None
    """With ``--max-batch``: the largest batch that fits (0: none)."""
    engine: str | None = None
    """The engine whose layout the rows follow: ``config.engine``, or the default memplan chose
    (``JobConfig.effective_engine``)."""
    engine_reason: str | None = None
    """One sentence: the engine and, when memplan chose it, why."""


class LayerPlanOut(Out):
    """Per-layer decisions a user copies into a framework's config."""

    optimizer_gpu_layers: NonNegativeInt | None = None
    """Training, ZeRO-3 partial offload: the leading layers whose optimizer states stay on the GPU."""
    offload_ratio: float | None = None
    """Offloaded share of the trainable parameters."""
    deepspeed_sub_group_size: NonNegativeInt | None = None
    """DeepSpeed ``zero_optimization.sub_group_size`` that makes each layer one sub-group (its partition per rank)."""
    deepspeed_ratio: float | None = None
    """DeepSpeed ``offload_optimizer.ratio`` that, with that sub-group size, offloads exactly the planned layers."""
    weights_relative_mse: float | None = None
    """Inference, per-layer formats: parameter-weighted mean relative MSE of round-to-nearest quantization."""
    weights_sqnr_db: float | None = None
    """The same as a signal-to-quantization-noise ratio, dB (higher is better)."""


class ServingOut(Out):
    """Serving latency and throughput of an inference plan (memplan.planner.serve_cost)."""

    ttft_s: float | None = None
    """Time to first token: prefill FLOPs of the prompt at the effective peak, seconds."""
    tpot_s: float | None = None
    """Time per output token: one decode step (roofline of bytes read and FLOPs), seconds."""
    tokens_per_s_replica: float | None = None
    """Decode tokens per second of one replica (micro_batch sequences)."""
    replicas: NonNegativeInt | None = None
    """Data-parallel replicas serving side by side (tokens_per_s is replicas × tokens_per_s_replica)."""
    concurrent_sequences: NonNegativeInt | None = None
    """min-gpus / min-cost plans: sequences served at once over all replicas."""


class TrainBudgetOut(Out):
    train_tokens: float
    seconds: float
    days: float
    gpu_hours: float


class StageOut(Out):
    stage: NonNegativeInt
    first_layer: NonNegativeInt | None
    last_layer: NonNegativeInt | None
    layers: NonNegativeInt
    gpu_bytes: NonNegativeInt


class CostOut(Out):
    usd_per_gpu_hour: float
    """The GPU's price per hour (the catalog's ``price_per_hour_usd``, or ``--usd-per-hour``)."""
    usd_per_hour: float
    """The whole job: the price of one GPU per hour × its GPUs."""
    usd_per_step: float
    usd_per_m_trained_tokens: float | None
    usd_per_m_served_tokens: float | None


class CandidateOut(EstimateOut):
    step_time_s: float
    tokens_per_s: float
    objective_value: float
    layer_map: str
    """Compact map of the per-layer decisions, '; '-separated: 'recompute full: layers 0-18, none: layers
    19-31', 'optimizer states: ...', 'weights int8: layers 0-67, nf4: layers 68-79', 'placement gpu: ...'."""
    layer_plan: LayerPlanOut
    """Facts of the per-layer decisions (empty when the plan makes none)."""
    # JSON contract (schema_version 1): a candidate's `serving` is the latency object, not the estimate's
    # capacity dict; pydantic allows the override, mypy's Liskov check does not.
    serving: ServingOut | None = None  # type: ignore[assignment]
    """Inference plans: latency and throughput (absent for training plans)."""
    global_batch: PositiveInt | None = None
    """Training plans: sequences per optimizer step, the same for every plan compared."""
    global_batch_tokens: PositiveInt | None = None
    train_budget: TrainBudgetOut | None = None
    """With a token budget: what training that many tokens takes at this plan's throughput."""
    cost: CostOut | None = None
    """The plan's price, when its GPU has one (absent otherwise)."""
    stages: list[StageOut] | None = None
    """With pp > 1: each pipeline stage's layers and GPU bytes (uneven stages, in-flight micro-batches)."""


class SuggestionOut(Out):
    change: str
    flags: str
    verified: bool
    gpu_total_bytes: NonNegativeInt
    tokens_per_s: float
    changes: dict[str, Any] = {}
    """The change as data: request fields (``config.*``, ``space.*``, ``hardware.*``) and their new values, the
    same change ``flags`` writes as command-line options."""


class PlanOut(Out):
    """``memplan plan --format json``: the best plan (an estimate, extended), alternatives, or why none fits."""

    schema_version: Version
    status: Literal["optimal", "infeasible"]
    objective: Objective
    solver_status: str
    best: CandidateOut | None
    alternatives: list[CandidateOut]
    binding: str | None
    suggestions: list[SuggestionOut]
    excluded: list[str]
    assumptions: dict[str, int | str] = {}
    """What the plan assumed because it was not given (as an estimate's ``assumptions``), present also
    when no plan fits."""


class TierCheckOut(Out):
    tier: TierName
    total_bytes: NonNegativeInt
    capacity_bytes: NonNegativeInt
    headroom_bytes: int
    headroom_pct: float
    required_headroom_bytes: NonNegativeInt
    ok: bool


class PlanSummaryOut(Out):
    status: Literal["optimal", "infeasible"]
    objective: Objective
    solver_status: str
    configuration: str | None
    step_time_s: float | None
    tokens_per_s: float | None


class RecipeCheckOut(Out):
    name: str
    path: str
    status: Literal["fits", "does_not_fit", "error"]
    ok: bool
    reason: str
    mode: Literal["estimate", "plan"] | None
    seconds: float
    tiers: list[TierCheckOut]
    plan: PlanSummaryOut | None
    estimate: EstimateOut | None
    """The checked configuration on the real capacities (a planned recipe: its best plan)."""


class CheckCounts(Out):
    total: NonNegativeInt
    fits: NonNegativeInt
    does_not_fit: NonNegativeInt
    error: NonNegativeInt


class CheckOut(Out):
    """``memplan check --format json``: one verdict per recipe and the exit code."""

    schema_version: Version
    ok: bool
    exit_code: Literal[0, 1, 2]
    counts: CheckCounts
    recipes: list[RecipeCheckOut]


class MatrixOut(Out):
    title: str
    job: str
    gpus: int
    size: int | None
    batch: int | None
    metric: Literal["max-batch", "max-context", "fits"]
    models: list[str]
    gpu_names: list[str]
    values: list[list[NonNegativeInt | None]]
    """values[i][j]: model i on GPU j; 0: nothing fits; null: invalid configuration."""


Scalar = str | int | float | bool | None


class SweepOut(Out):
    """``memplan sweep --format json``: the fit matrices and one flat record per grid point (the CSV's rows)."""

    schema_version: Version
    metric: Literal["max-batch", "max-context", "fits"]
    metric_column: str
    cells: NonNegativeInt
    invalid_cells: NonNegativeInt
    estimates: NonNegativeInt
    matrices: list[MatrixOut]
    records: list[dict[str, Scalar]]


MODELS: dict[str, type[BaseModel]] = {"estimate": EstimateOut, "plan": PlanOut, "check": CheckOut, "sweep": SweepOut}


def json_schema(name: str) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of one output, as published in memplan/schema/."""
    schema = MODELS[name].model_json_schema(mode="serialization")
    return {"$schema": DRAFT, **schema}


def schema_path(name: str) -> Path:
    return SCHEMA_DIR / f"{name}.schema.json"


def schema_text(name: str) -> str:
    return json.dumps(json_schema(name), indent=2, ensure_ascii=False) + "\n"


def write_schemas(directory: Path = SCHEMA_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for name in MODELS:
        path = directory / f"{name}.schema.json"
        path.write_text(schema_text(name), encoding="utf-8")
        out.append(path)
    return out


def validated(name: str, data: dict[str, Any]) -> dict[str, Any]:
    """``data`` checked by the output model and dumped back as JSON-ready data (field order kept)."""
    return MODELS[name].model_validate(data).model_dump(mode="json", exclude_unset=True)


if __name__ == "__main__":  # pragma: no cover - maintenance entry point
    for written in write_schemas():
        print(written)
