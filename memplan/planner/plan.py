"""``plan``: solve the ILP, re-check each plan with exact bytes, rank alternatives, and explain
an infeasible request with the smallest verified changes that would make it fit."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from memplan.catalog.schema import GpuSpec, HostSpec, ModelSpec
from memplan.config import Job, JobConfig
from memplan.errors import MemplanError
from memplan.estimator import Estimate, estimate
from memplan.planner.ilp import IlpBuilder
from memplan.planner.space import Objective, SearchSpace, unread_dims

DEFAULT_TIME_LIMIT_S = 30.0


class NoValidDegree(MemplanError):
    """No tensor/pipeline degree of the search space fits this cluster size."""
MAX_REJECTED = 20
MAX_TIES = 4
"""Plans beyond ``--top`` still collected while their objective ties the best one's, so the documented ranking
(``rank_candidates``), not the solver's path, picks the best among ties and ``--top`` never changes it."""


def _ties(value: float, best: float | None) -> bool:
    """Whether an objective value equals the best one to 12 significant digits (``rank_candidates``' rounding)."""
    return best is not None and float(f"{value:.12g}") <= float(f"{best:.12g}")


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
    objective: Objective
    candidates: list[Candidate] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)
    binding: str | None = None
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
        import math

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


def gpu_counts(req: PlanRequest) -> list[tuple[int, int]]:
    """(gpus per node, nodes) to try: the request's own, or ascending counts for min-gpus / min-cost."""
    base = req.base
    if req.space.gpus:
        out = []
        for n in sorted(req.space.gpus):
            if n <= base.gpus_per_node:
                out.append((n, 1))
            elif n % base.gpus_per_node == 0:
                out.append((base.gpus_per_node, n // base.gpus_per_node))
        return out
    if req.objective not in (Objective.MIN_GPUS, Objective.MIN_COST):
        return [(base.gpus_per_node, base.nodes)]
    out = [(g, 1) for g in (1, 2, 4, 8, 16) if g <= base.gpus_per_node]
    if base.gpus_per_node not in [g for g, _ in out]:
        out.append((base.gpus_per_node, 1))
    out += [(base.gpus_per_node, n) for n in node_counts(base.nodes)]
    return out


EVERY_NODE_COUNT_UP_TO = 64
"""min-gpus / min-cost try every node count up to this, then doublings, so a huge --nodes stays quick."""


def node_counts(nodes: int) -> list[int]:
    """Node counts above one to try, ascending: 2..64 one by one, then 128, 256, ... and ``nodes`` itself."""
    out = list(range(2, min(nodes, EVERY_NODE_COUNT_UP_TO) + 1))
    n = EVERY_NODE_COUNT_UP_TO * 2
    while n < nodes:
        out.append(n)
        n *= 2
    if nodes > EVERY_NODE_COUNT_UP_TO:
        out.append(nodes)
    return out


def verified_solutions(req: PlanRequest, builder: IlpBuilder, result: PlanResult,
                       to_config: Callable[[Any], JobConfig]) -> Iterator[tuple[Any, JobConfig, Estimate]]:
    """Solve, re-check each solution with exact bytes, and cut it off for the next solve: yields up to
    ``req.top_k`` (solution, config, estimate) that fit; a solution the exact check rejects is cut and
    skipped (at most MAX_REJECTED). Sets ``result``'s solver status and the reason when none is found."""
    if req.debug_lp:
        builder.write_lp(req.debug_lp)
    found = rejected = 0
    best: float | None = None
    while (found < req.top_k + MAX_TIES) and rejected < MAX_REJECTED:
        limit = seconds_left(req)
        if limit <= 0:
            if not found:
                no_plan_reason("time_limit", req.time_limit_s, result)
            return
        sol = builder.solve(time_limit=limit, solver=req.solver)
        if found >= req.top_k and (sol.status not in ("optimal", "feasible") or not _ties(sol.objective, best)):
            return  # beyond top_k only plans tied with the best are collected, for a ranking independent of --top
        if sol.status not in ("optimal", "feasible"):
            no_plan_reason(sol.status, req.time_limit_s, result)
            return
        if sol.status == "feasible":
            result.solver_status = "feasible (time limit reached; best incumbent)"
        cfg = to_config(sol)
        builder.exclude(sol.choice, f"cut_{found}_{rejected}")
        try:
            est = estimate(req.model, req.gpu, cfg, host=req.host)
        except MemplanError:  # a combination the exact model rejects: cut, as one that does not fit
            rejected += 1
            continue
        if not est.fits:
            rejected += 1
            continue
        found += 1
        best = sol.objective if best is None else best
        yield sol, cfg, est


def explain_infeasible(req: PlanRequest, result: PlanResult) -> None:
    """The binding constraint and verified ways out (``suggest.diagnose``), within what is left of the time
    limit; when none is left, the binding line says so instead."""
    if seconds_left(req) <= 0:
        result.binding = (f"not diagnosed: the time limit ({req.time_limit_s:g} s) was spent before the re-solves "
                          "that find the binding constraint and the ways out; raise --time-limit")
        return
    from memplan.planner.suggest import diagnose

    diagnose(req, result)


def seconds_left(req: PlanRequest) -> float:
    """Seconds the next solve may take: what is left of the request's whole time limit."""
    if req.deadline is None:
        return req.time_limit_s
    import time

    return min(req.time_limit_s, req.deadline - time.monotonic())


def rank_candidates(candidates: list[Candidate], primary: Any = None) -> None:
    """Order verified plans, best first, by a documented key, so ties never depend on the solver's path:
    1. the objective (``primary``, default the ILP objective value; lower is better), to 12 significant
       digits, so equal costs computed along different paths compare equal;
    2. fewer GPUs;
    3. fewer exact GPU bytes on the most loaded GPU (the leaner plan);
    4. the configuration as canonical JSON (a total order)."""
    from memplan.memory.breakdown import Tier

    def key(c: Candidate) -> tuple[Any, ...]:
        value = primary(c) if primary is not None else c.objective_value
        return (float(f"{value:.12g}"), c.config.world_size, c.estimate.peak(Tier.GPU), c.config.model_dump_json())

    candidates.sort(key=key)


def no_plan_reason(status: str, time_limit_s: float, result: PlanResult) -> None:
    """After a solve that returned no plan: with no plan found so far, a time limit is an error the user
    can fix (a clear message, exit 2); any other status (infeasible, unbounded) is recorded as the
    solver's status of an infeasible result."""
    if result.candidates:
        if status == "time_limit":  # another part of the space was cut short: the best found may not be optimal
            result.solver_status = "feasible (time limit reached; best incumbent)"
        return
    if status == "time_limit":
        raise MemplanError(f"the solver reached its time limit ({time_limit_s:g} s) before finding any plan; "
                           "raise --time-limit.")
    result.solver_status = status


def plan(req: PlanRequest) -> PlanResult:
    """The best configurations for ``req`` (status "optimal"), or "infeasible" with suggestions."""
    from memplan.preflight import check_trainable_weights, gpu_default_dtype, host_assumptions

    if not req.space.per_layer_quant and req.objective is not Objective.MAX_QUALITY:  # train_quant.check explains those
        check_trainable_weights(req.base.job, (req.base.quant, *(req.space.quant or ())))
    if req.base.quant_map is not None:  # the plan's per-layer paths index it before any estimate validates it
        from memplan.memory.weights import check_quant_map

        check_quant_map(req.base, num_layers=req.model.num_hidden_layers or 0)
    unread = unread_dims(req.space, req.base.job)
    if unread:
        kind = "an inference" if req.base.job is Job.INFER else "a training"
        raise MemplanError(f"search {', '.join(unread)} {'does' if len(unread) == 1 else 'do'} not apply to "
                           f"{kind} plan.")

    base, assumed = gpu_default_dtype(req.base, req.gpu)  # fp16 for the bf16 default on a GPU without bf16
    if base is not req.base:
        req = replace(req, base=base)
    if req.deadline is None:
        import time

        req = replace(req, deadline=time.monotonic() + req.time_limit_s)
    result = _plan(req)
    result.assumptions = {**host_assumptions(req.host), **assumed}
    return result


def _plan(req: PlanRequest) -> PlanResult:
    """``plan`` once the request's defaults are fitted to the GPU."""
    if req.objective is Objective.MAX_QUALITY and not req.space.per_layer_quant:
        req = replace(req, space=req.space.model_copy(update={"per_layer_quant": True}))  # probes keep it
    if req.base.job is Job.QLORA and req.space.quant and None in req.space.quant and not req.space.per_layer_quant:
        raise MemplanError("quant=none: qlora trains adapters on quantized base weights (default nf4-dq); "
                           "for 16-bit base weights use job lora.")
    if req.base.job is Job.INFER:
        from memplan.planner.infer import plan_inference

        return plan_inference(req)
    result = PlanResult(status="infeasible", objective=req.objective)
    sizes = gpu_counts(req)
    from memplan.planner.train_plan import solve_training

    skipped: list[str] = []
    for gpn, nodes in sizes:
        try:
            ok = solve_training(req, gpn, nodes, result)
        except NoValidDegree as exc:  # min-gpus / min-cost: a count that cannot host --tp/--pp is skipped
            if len(sizes) == 1:
                raise
            skipped.append(str(exc))
            continue
        if ok and req.objective is not Objective.MIN_COST:
            break
    if len(skipped) == len(sizes):
        raise NoValidDegree(skipped[-1])
    if req.objective is Objective.MIN_COST and result.candidates:
        price = req.gpu.price_per_hour_usd or 0.0
        rank_candidates(result.candidates, primary=lambda c: price * c.config.world_size / c.tokens_per_s)
        result.candidates = result.candidates[: req.top_k]
    if result.candidates:
        if req.objective is not Objective.MIN_COST:  # min-cost is ranked by cost above
            rank_candidates(result.candidates)
        result.status = "optimal"
        return result
    if req.suggest:
        explain_infeasible(req, result)
    return result
