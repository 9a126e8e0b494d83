"""``plan``: solve the ILP, re-check each plan with exact bytes, rank alternatives, and explain
an infeasible request with the smallest verified changes that would make it fit.

The types live in ``request``, the re-check loop in ``recheck``; they are re-exported here, the planner's
public entry point."""

from __future__ import annotations

import time
from dataclasses import replace

from memplan.config import Job, JobConfig
from memplan.errors import MemplanError
from memplan.memory.weights import check_quant_map
from memplan.planner.infer import plan_inference
from memplan.planner.recheck import MAX_REJECTED, MAX_TIES, no_plan_reason, verified_solutions
from memplan.planner.request import (
    DEFAULT_FINETUNE_BATCH_TOKENS,
    DEFAULT_GLOBAL_BATCH_TOKENS,
    DEFAULT_TIME_LIMIT_S,
    Candidate,
    NoValidDegree,
    PlanRequest,
    PlanResult,
    PlanStatus,
    global_batch_for,
    layer_map,
    rank_candidates,
    runs,
    seconds_left,
)
from memplan.planner.space import Objective, unread_dims
from memplan.planner.suggest import diagnose
from memplan.planner.train_plan import solve_training
from memplan.preflight import check_trainable_weights, gpu_default_dtype, host_assumptions

__all__ = ["DEFAULT_FINETUNE_BATCH_TOKENS", "DEFAULT_GLOBAL_BATCH_TOKENS", "DEFAULT_TIME_LIMIT_S", "MAX_REJECTED",
           "MAX_TIES", "Candidate", "NoValidDegree", "PlanRequest", "PlanResult", "PlanStatus", "explain_infeasible",
           "global_batch_for", "gpu_counts", "layer_map", "no_plan_reason", "node_counts", "plan", "rank_candidates",
           "runs", "seconds_left", "verified_solutions"]


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


def explain_infeasible(req: PlanRequest, result: PlanResult) -> None:
    """The binding constraint and verified ways out (``suggest.diagnose``), within what is left of the time
    limit; when none is left, the binding line says so instead."""
    if seconds_left(req) <= 0:
        result.binding = (f"not diagnosed: the time limit ({req.time_limit_s:g} s) was spent before the re-solves "
                          "that find the binding constraint and the ways out; raise --time-limit")
        return
    diagnose(req, result, plan)


def plan(req: PlanRequest) -> PlanResult:
    """The best configurations for ``req`` (status "optimal"), or "infeasible" with suggestions."""
    if not req.space.per_layer_quant and req.objective is not Objective.MAX_QUALITY:  # train_quant.check explains those
        check_trainable_weights(req.base.job, (req.base.quant, *(req.space.quant or ())))
    if req.base.quant_map is not None:  # the plan's per-layer paths index it before any estimate validates it
        check_quant_map(req.base, num_layers=req.model.num_hidden_layers or 0)
    unread = unread_dims(req.space, req.base.job)
    if unread:
        kind = "an inference" if req.base.job is Job.INFER else "a training"
        raise MemplanError(f"search {', '.join(unread)} {'does' if len(unread) == 1 else 'do'} not apply to "
                           f"{kind} plan.")

    refuse_decided(req.base, req.space.per_layer_offload,
                   req.space.per_layer_quant or req.objective is Objective.MAX_QUALITY)  # max-quality: per layer
    interleave = virtual_stages_note(req)
    base, assumed = gpu_default_dtype(req.base, req.gpu)  # fp16 for the bf16 default on a GPU without bf16
    if base is not req.base:
        req = replace(req, base=base)
    if req.deadline is None:
        req = replace(req, deadline=time.monotonic() + req.time_limit_s)
    result = _plan(req)
    result.assumptions = {**host_assumptions(req.host), **assumed, **interleave}
    return result


PLAN_SETS = {"recompute_layers": "the plan chooses each layer's recompute mode among the recompute choices",
             "recompute_map": "the plan chooses each layer's recompute mode among the recompute choices"}
"""Base JobConfig fields the plan overwrites with its own per-layer choice (``planner.setting``): given, each is
refused rather than dropped (``memplan.options.PLAN_DECIDES`` refuses the same on the command line)."""


def refuse_decided(base: JobConfig, per_layer_offload: bool, per_layer_quant: bool) -> None:
    """A MemplanError naming a ``PLAN_SETS`` field that ``base`` sets (a recipe's ``fixed`` block, the API),
    ``optimizer_gpu_layers`` where the plan places each layer's optimizer states itself (``per_layer_offload``) and
    ``quant_map`` where it picks each layer's format (``per_layer_quant``)."""
    for name, why in PLAN_SETS.items():
        if getattr(base, name) is not None:
            raise MemplanError(f"{name}: {why}; drop it (it applies to an estimate, not a plan).")
    if per_layer_quant and base.quant_map is not None:
        raise MemplanError("quant_map: the plan chooses each layer's weight format among the quant choices "
                           "(per-layer quantization); drop it, or turn that choice off to keep this map.")
    if per_layer_offload and base.optimizer_gpu_layers is not None:
        raise MemplanError("optimizer_gpu_layers: the plan chooses per layer where the optimizer states live; drop "
                           "it, or turn that choice off to keep this split (--no-per-layer-offload; a recipe's "
                           "search.per_layer_offload: false).")


def virtual_stages_note(req: PlanRequest) -> dict[str, str]:
    """``--virtual-stages`` (interleaved 1F1B) splits each pipeline stage into chunks, so it needs pp > 1: a search
    whose pp values are all 1 is refused; one that mixes pp = 1 with deeper pipelines interleaves only those,
    and the plan's ``assumptions`` say so (``virtual_stages``)."""
    v = req.base.perf.virtual_stages
    if v <= 1:
        return {}
    pps = req.space.pp or ((1,) if req.base.world_size == 1 else ())
    if pps and max(pps) == 1:
        raise MemplanError(f"--virtual-stages {v} interleaves pipeline stages and needs pp > 1, but this search has "
                           "pp = 1 only; add --pp values above 1 or drop --virtual-stages.")
    return {"virtual_stages": f"{v} chunks per stage, applied to plans with pp > 1 only (pp = 1 has no pipeline)"}


def _plan(req: PlanRequest) -> PlanResult:
    """``plan`` once the request's defaults are fitted to the GPU."""
    if req.objective is Objective.MAX_QUALITY and not req.space.per_layer_quant:
        req = replace(req, space=req.space.model_copy(update={"per_layer_quant": True}))  # probes keep it
    if req.base.job is Job.QLORA and req.space.quant and None in req.space.quant and not req.space.per_layer_quant:
        raise MemplanError("quant=none: qlora trains adapters on quantized base weights (default nf4-dq); "
                           "for 16-bit base weights use job lora.")
    if req.base.job is Job.INFER:
        return plan_inference(req, explain_infeasible)
    result = PlanResult(status=PlanStatus.INFEASIBLE, objective=req.objective)
    sizes = gpu_counts(req)
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
        result.status = PlanStatus.OPTIMAL
        return result
    if req.suggest:
        explain_infeasible(req, result)
    return result
