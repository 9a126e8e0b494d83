"""The planner's request and result types (``PlanRequest``, ``Candidate``, ``PlanResult`` with a ``PlanStatus``),
and the small rules every part of the planner shares: the global batch a plan is compared at, the documented
ranking of verified plans, the per-layer map text and the time left of a request's limit.

The planner's modules import one way: these types → the ILP (``ilp_model``, ``ilp_layers``, ``ilp``,
``ilp_search``) → the solve / exact re-check / cut loop (``recheck``) → the training and inference spaces
(``train*``, ``infer*``) → suggestions (``change``, ``suggest``) → ``plan`` (a test checks the graph has no cycle).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from memplan.catalog.schema import GpuSpec, HostSpec, ModelSpec
from memplan.config import Job, JobConfig
from memplan.errors import MemplanError
from memplan.estimator import Estimate
from memplan.memory.breakdown import Tier
from memplan.planner.space import Objective, SearchSpace

DEFAULT_TIME_LIMIT_S = 30.0


class PlanStatus(StrEnum):
    """Whether a plan was found: ``optimal`` (the best verified plans of the search space) or ``infeasible``
    (nothing fits; ``PlanResult.binding`` and ``suggestions`` say why and what would). A ``str``, so the JSON
    output and comparisons with the plain words are unchanged."""

    OPTIMAL = "optimal"
    INFEASIBLE = "infeasible"


class NoValidDegree(MemplanError):
    """No tensor/pipeline degree of the search space fits this cluster size."""


@dataclass
class Candidate:
    """A plan that fits, checked with exact bytes."""

    config: JobConfig
    estimate: Estimate
    step_time_s: float
    tokens_per_s: float
    objective_value: float
    layer_map: str
    extras: dict[str, Any] = field(default_factory=dict)
    """Plan facts beyond the estimate (e.g. ``weights_sqnr_db`` of per-layer formats, ``offload_ratio``)."""
    global_batch: int | None = None
    """Sequences per optimizer step the plan was compared at (training plans)."""
    train_budget: dict[str, float] | None = None
    """Seconds, days and GPU-hours to train ``PlanRequest.train_tokens`` tokens (``budget.train_budget``)."""


@dataclass
class PlanResult:
    status: str
    """A ``PlanStatus``."""
    objective: Objective
    candidates: list[Candidate] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)
    binding: str | None = None
    lean_fits: bool = False
    """True when no plan was found although the leanest configuration of the search space fits on the exact estimate
    (``suggest.binding``: the planner's linear model under-counted its candidates); ``binding`` then says so."""
    suggestions: list[dict[str, Any]] = field(default_factory=list)
    solver_status: str = "optimal"
    assumptions: dict[str, Any] = field(default_factory=dict)
    """What the plan assumed because it was not given (host RAM and NVMe, fp16 for the bf16 default on a
    GPU without bf16), as ``Estimate.assumptions``; also present when no plan fits."""

    @property
    def best(self) -> Candidate | None:
        return self.candidates[0] if self.candidates else None


@dataclass(frozen=True)
class PlanRequest:
    model: ModelSpec
    gpu: GpuSpec
    host: HostSpec
    base: JobConfig
    space: SearchSpace = field(default_factory=SearchSpace)
    objective: Objective = Objective.THROUGHPUT
    top_k: int = 3
    time_limit_s: float = DEFAULT_TIME_LIMIT_S
    solver: str | None = None
    debug_lp: str | None = None
    suggest: bool = True
    train_tokens: int | None = None
    """Tokens to train: each training plan reports the time and GPU-hours they take."""
    deadline: float | None = None
    """``time.monotonic()`` by which the whole plan (every solve, the suggestions' re-solves too) must end;
    ``plan`` sets it from ``time_limit_s`` when None, so the limit bounds the command, not each solve."""

    def __post_init__(self) -> None:
        if not (isinstance(self.time_limit_s, int | float) and math.isfinite(self.time_limit_s) and self.time_limit_s > 0):
            raise MemplanError(f"--time-limit must be a positive number of seconds, got {self.time_limit_s!r}.")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 1:
            raise MemplanError(f"--top must be a positive integer, got {self.top_k!r}.")
        if self.train_tokens is not None and (not isinstance(self.train_tokens, int) or isinstance(self.train_tokens, bool)
                                              or self.train_tokens < 1):
            raise MemplanError(f"--train-tokens must be a positive integer, got {self.train_tokens!r}.")
        if self.train_tokens is not None and not self.base.job.trains:
            raise MemplanError("--train-tokens applies to training plans; a serving plan has no training budget.")


def runs(modes: list[str]) -> str:
    """Runs of equal modes: 'full: layers 0-18, none: layers 19-31'."""
    out: list[tuple[str, int, int]] = []
    for i, m in enumerate(modes):
        if out and out[-1][0] == m and out[-1][2] == i - 1:
            out[-1] = (m, out[-1][1], i)
        else:
            out.append((m, i, i))
    return ", ".join(f"{m}: layer{'s' if a != b else ''} {a}{'-' + str(b) if a != b else ''}" for m, a, b in out)


def layer_map(modes: list[str]) -> str:
    """Compact per-layer recompute map: 'recompute full: layers 0-18, none: layers 19-31'."""
    return "recompute " + runs(modes) if modes else ""


DEFAULT_GLOBAL_BATCH_TOKENS = {Job.PRETRAIN: 2**22}
"""Tokens per optimizer step a plan assumes when none is given: pre-training 4,194,304 (Llama 2 trained with
4M-token batches, Touvron et al. 2023, Sec. 2.2; GPT-3 175B with 3.2M, Brown et al. 2020, Table 2.1)."""
DEFAULT_FINETUNE_BATCH_TOKENS = 2**17
"""Fine-tuning (full, LoRA, QLoRA, GaLore): 131,072 tokens, 64 sequences of 2,048 (Alpaca: 128 × 512;
QLoRA's Guanaco runs: 16 sequences × up to 4,096 with accumulation, Dettmers et al. 2023, App. B)."""


def global_batch_for(req: PlanRequest, world: int, dims_mb: tuple[int, ...] | None = None) -> int:
    """Sequences per optimizer step, the same for every plan compared: ``--global-batch``, else
    ``--global-batch-tokens`` / sequence length, else the job's default tokens (``DEFAULT_GLOBAL_BATCH_TOKENS``)
    / sequence length; the last two rounded up to a multiple of (largest micro-batch × d), d the largest
    divisor of the GPU count that keeps that unit within the batch (d = all GPUs on a small cluster, so every
    micro-batch and data-parallel degree divides it; on a large one only data-parallel degrees up to d can
    split the batch, as in the published runs: Llama 3 405B ran 2,048 sequences over dp 64-128)."""
    if req.space.global_batch:
        return req.space.global_batch
    biggest = max(dims_mb) if dims_mb else (max(req.space.micro_batch) if req.space.micro_batch else 8)
    tokens = req.space.global_batch_tokens or DEFAULT_GLOBAL_BATCH_TOKENS.get(req.base.job,
                                                                               DEFAULT_FINETUNE_BATCH_TOKENS)
    sequences = -(-tokens // req.base.seq_len)
    unit = max([biggest * d for d in range(1, world + 1) if not world % d and biggest * d <= sequences] or [biggest])
    return max(1, -(-sequences // unit)) * unit


def seconds_left(req: PlanRequest) -> float:
    """Seconds the next solve may take: what is left of the request's whole time limit."""
    if req.deadline is None:
        return req.time_limit_s
    return min(req.time_limit_s, req.deadline - time.monotonic())


def rank_candidates(candidates: list[Candidate], primary: Any = None) -> None:
    """Order verified plans, best first, by a documented key, so ties never depend on the solver's path:
    1. the objective (``primary``, default the ILP objective value; lower is better), to 12 significant
       digits, so equal costs computed along different paths compare equal;
    2. fewer GPUs;
    3. fewer exact GPU bytes on the most loaded GPU (the leaner plan);
    4. the configuration as canonical JSON (a total order)."""
    def key(c: Candidate) -> tuple[Any, ...]:
        value = primary(c) if primary is not None else c.objective_value
        return (float(f"{value:.12g}"), c.config.world_size, c.estimate.peak(Tier.GPU), c.config.model_dump_json())

    candidates.sort(key=key)


