"""Planning a training job for one cluster size: the space resolved into dimensions, solved as its
disjoint parts (``train_offload.partition``), each solution re-checked by ``estimate`` and described
(per-layer maps, DeepSpeed settings, quantization quality), and the analytic step time of a plan."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from memplan.arch.build import build_architecture
from memplan.config import JobConfig, Recompute
from memplan.errors import MemplanError
from memplan.memory import components
from memplan.memory.context import Context
from memplan.memory.model_states import offloaded_fraction
from memplan.planner import train, train_offload, train_quant
from memplan.planner.budget import train_budget
from memplan.planner.dims import resolve
from memplan.planner.ilp_search import searcher
from memplan.planner.infer_layers import describe_formats, quality_extras
from memplan.planner.recheck import verified_solutions
from memplan.planner.request import (
    Candidate,
    NoValidDegree,
    PlanRequest,
    PlanResult,
    global_batch_for,
    layer_map,
    rank_candidates,
)
from memplan.planner.space import Objective, engine_bases, runnable_dims
from memplan.planner.train_recompute import recompute_seconds


def _objective_kind(objective: Objective) -> str:
    if objective in (Objective.MAX_BATCH, Objective.MAX_CONTEXT):
        return "max_value"
    if objective is Objective.MIN_MEMORY:
        return "min_gpu_bytes"
    if objective is Objective.MAX_QUALITY:
        return "min_error"
    return "min_seconds"


def _value_fn(objective: Objective):
    if objective is Objective.MAX_BATCH:
        return lambda choice: float(choice["micro_batch"])
    if objective is Objective.MAX_CONTEXT:
        return lambda choice: float(choice["seq_len"])
    return None


def step_seconds(setting: train.TrainSetting, cfg: JobConfig, modes: list[str]) -> float:
    """Analytic step time of one plan: shape (compute, bubble, tp), data-parallel traffic, offload, recompute."""

    comm_dims = {"tp": (cfg.tp,), "pp": (cfg.pp,), "placement": ((cfg.zero, cfg.offload_optimizer, cfg.offload_params),),
                 "micro_batch": (cfg.micro_batch,), "seq_len": (cfg.seq_len,), "ep": (cfg.ep,)}
    comm = next(iter(train.comm_factor(setting, comm_dims).entries.values())).seconds
    per_stage = [components.state_rows(c) for c in train._contexts(setting, cfg)]
    offload = train.offload_seconds(setting, cfg, per_stage)
    recompute = sum(recompute_seconds(setting, cfg, layer, Recompute(m))
                    for layer, m in zip(setting.arch.layers, modes, strict=False))
    return train.shape_seconds(setting, cfg) + comm + offload + recompute


def _with_world(base: JobConfig, gpn: int, nodes: int) -> JobConfig:
    return base.model_copy(update={"gpus_per_node": gpn, "nodes": nodes})


def solve_training(req: PlanRequest, gpn: int, nodes: int, result: PlanResult) -> bool:
    """Solve for one cluster size; append the ``top_k`` best verified candidates to ``result``. True when
    one fits.

    With per-layer optimizer placement the space is solved as two disjoint ILPs whose union is the whole
    space (``train_offload.partition``): plans that offload all or none of the optimizer states, and plans
    that split them by layer (ZeRO-3, pp = 1). Each is optimal over its part, so the better of the two is
    optimal over the whole; together they solve in a fraction of the time one joint model takes.
    """
    start = len(result.candidates)
    found_any, errors = False, []
    bases = engine_bases(_with_world(req.base, gpn, nodes), req.space)
    for base in bases:
        try:
            found_any |= _solve_engine(req, base, result)
        except MemplanError as exc:  # an engine that runs nothing here; the others may
            errors.append(exc)
    if not found_any and errors and len(errors) == len(bases):
        raise errors[0]
    found = result.candidates[start:]
    rank_candidates(found)
    result.candidates[start:] = found[: req.top_k]
    return bool(found)


def _solve_engine(req: PlanRequest, base: JobConfig, result: PlanResult) -> bool:
    """``solve_training`` for one engine (``base.engine``; None: each combination's default engine)."""
    arch = build_architecture(req.model)
    probe = global_batch_for(req, base.world_size)
    dims, excluded = resolve(arch, base, req.space, req.objective, req.host, probe)
    dims = runnable_dims(base, dims, excluded)
    result.excluded = sorted(set(result.excluded + excluded))
    if not dims["tp"] or not dims["pp"] or not dims["placement"]:
        raise NoValidDegree(f"no tensor/pipeline degree or ZeRO/offload placement is valid on {base.world_size} GPUs: "
                            + "; ".join(dict.fromkeys(excluded[:3])))
    gb = global_batch_for(req, base.world_size, dims["micro_batch"])
    setting = train.TrainSetting(arch=arch, gpu=req.gpu, host=req.host, base=base, global_batch=gb)
    formats = None
    if req.space.per_layer_quant:
        formats = dims["quant"]
        train_quant.check(base.job, formats, req.objective.value)
        dims = train_quant.restrict(dims, formats)
    start = len(result.candidates)
    kind = _objective_kind(req.objective)
    for i, part in enumerate(train_offload.partition(dims, base.job)):
        part_req = req if i == 0 or not req.debug_lp else replace(req, debug_lp=_part_path(req.debug_lp, i))
        mine = result.candidates[start:]
        # a later part only matters where it beats the k-th plan found so far (throughput: seconds)
        cutoff = max(c.objective_value for c in mine) if kind == "min_seconds" and len(mine) >= req.top_k else None
        result.candidates.extend(_solve_part(part_req, setting, part, result, cutoff, formats, later=i > 0))
    found = result.candidates[start:]
    rank_candidates(found)
    result.candidates[start:] = found[: req.top_k]
    if found and not result.solver_status.startswith("feasible"):
        result.solver_status = "optimal"  # a part without plans does not make the whole infeasible
    return bool(found)


def _part_path(path: str, index: int) -> str:
    """Where ``--debug-lp`` writes the model of a further part: plan.lp -> plan.part1.lp."""
    stem, dot, ext = path.rpartition(".")
    return f"{stem}.part{index}.{ext}" if dot and "/" not in ext else f"{path}.part{index}"


def _solve_part(req: PlanRequest, setting: train.TrainSetting, dims: dict[str, tuple], result: PlanResult,
                cutoff: float | None = None, formats: tuple | None = None, later: bool = False) -> list[Candidate]:
    """Solve one part of the space; a ``later`` part that holds no valid combination has no plans (the
    first part's invalidity is the user's error and propagates)."""
    arch, base, gb = setting.arch, setting.base, setting.global_batch
    try:
        problem, _ = train.build_problem(setting, dims, _objective_kind(req.objective), _value_fn(req.objective),
                                         formats=formats)
    except MemplanError:
        if later:
            return []
        raise
    builder = searcher(problem)
    if cutoff is not None:
        builder.cutoff(cutoff)

    def to_config(sol: Any) -> JobConfig:
        cfg = train.config_for(base, sol.choice, global_batch=gb, modes=sol.modes or None,
                               optimizer_modes=sol.block_modes.get(train_offload.BLOCK_NAME))
        if formats is not None:
            qmap = train_quant.quant_map(sol.block_modes[train_quant.BLOCK_NAME], formats, base.dtype.value)
            cfg = cfg.model_copy(update={"quant_map": qmap})
        return cfg

    out = []
    for sol, cfg, est in verified_solutions(req, builder, result, to_config):
        seconds = step_seconds(setting, cfg, sol.modes)
        tokens = gb * cfg.seq_len
        text, extras = layer_map(sol.modes), {}
        if cfg.optimizer_gpu_layers is not None:
            ratio = offloaded_fraction(Context(arch, cfg, req.gpu, req.host))
            size, ds_ratio = train_offload.deepspeed_settings(arch, cfg)
            extras = {"optimizer_gpu_layers": cfg.optimizer_gpu_layers, "offload_ratio": round(ratio, 6),
                      "deepspeed_sub_group_size": size, "deepspeed_ratio": round(ds_ratio, 6)}
            text = "; ".join(t for t in (text, train_offload.describe(cfg, ratio, len(arch.layers))) if t)
        if formats is not None:
            extras.update(quality_extras(arch, cfg))
            text = "; ".join(t for t in (text, describe_formats(cfg)) if t)
        budget = None
        if req.train_tokens:
            budget = train_budget(tokens_per_s=tokens / seconds, gpus=cfg.world_size, train_tokens=req.train_tokens)
        out.append(Candidate(cfg, est, seconds, tokens / seconds, sol.objective, text, extras, global_batch=gb,
                             train_budget=budget))
    return out
