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
from memplan.planner import act_offload, hybrid, train, train_offload, train_quant
from memplan.planner.budget import train_budget
from memplan.planner.dims import cp_bases, resolve
from memplan.planner.ilp_search import searcher
from memplan.planner.infer_layers import describe_formats, quality_extras
from memplan.planner.pp_schedule_dim import schedule_bases
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
from memplan.units import counted


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
    if hybrid.value_of(setting.base) == hybrid.FULL:  # the plan chose the sharding (else the base fixes it)
        comm_dims[hybrid.DIM] = (hybrid.value_of(cfg),)
    comm = next(iter(train.comm_factor(setting, comm_dims).entries.values())).seconds
    per_stage = [components.state_rows(c) for c in train._contexts(setting, cfg)]
    offload = train.offload_seconds(setting, cfg, per_stage)
    recompute = sum(recompute_seconds(setting, cfg, layer, Recompute(m))
                    for layer, m in zip(setting.arch.layers, modes, strict=False))
    acts = act_offload.step_seconds(setting.arch, setting.gpu, setting.host, cfg, setting.global_batch)
    return train.shape_seconds(setting, cfg) + comm + offload + recompute + acts


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
    found_any, errors, tried = False, [], 0
    excluded: list[str] = []
    bases = cp_bases(engine_bases(_with_world(req.base, gpn, nodes), req.space), req.space, excluded)
    bases = schedule_bases(bases, req.space, excluded)
    result.excluded = sorted(set(result.excluded + excluded))
    if not bases and excluded:
        raise NoValidDegree(f"no context-parallel degree is valid: {'; '.join(excluded)}.")
    for base in bases:
        for offload in act_offload.choices(base, req.space.offload_activations):
            if offload and not base.offload_activations and req.space.offload_activations is None \
                    and not _offload_may_help(result.candidates[start:]):
                continue
            tried += 1
            try:
                found_any |= _solve_engine(req, act_offload.variant(base, offload), result)
            except MemplanError as exc:  # an engine that runs nothing here; the others may
                errors.append(exc)
    if not found_any and errors and len(errors) == tried:
        raise errors[0]
    found = result.candidates[start:]
    rank_candidates(found)
    if req.space.pp_schedules:  # the pp = 1 plans of every schedule's base are one plan (setting.config_for)
        found = [c for i, c in enumerate(found) if all(c.config != d.config for d in found[:i])]
    result.candidates[start:] = found[: req.top_k]
    return bool(found)


def distinct_reasons(excluded: list[str], limit: int = 3) -> str:
    """The first ``limit`` distinct reasons among ``excluded`` ("dim=value: reason"), each said once: a reason every
    value shares (an NCCL knob on one GPU refuses every ZeRO/offload placement alike) is printed once, without the
    values; a reason of one value keeps its "dim=value" prefix."""
    heads: dict[str, list[str]] = {}
    for entry in excluded:
        head, sep, reason = entry.partition(": ")
        if not sep or "=" not in head:
            head, reason = "", entry
        heads.setdefault(reason, []).append(head)
    parts = [f"{h[0]}: {r}" if len(h) == 1 and h[0] else r for r, h in heads.items()]
    return "; ".join(parts[:limit])


def _offload_may_help(found: list) -> bool:
    """Whether a plan with activation offload is worth solving after those without (``found``): none fits, or the
    best recomputes layers, which offloaded activations could keep instead. A pruning of the search (offload costs
    PCIe time, so it cannot beat a plan that already keeps every activation without recompute)."""
    if not found:
        return True
    ranked = list(found)
    rank_candidates(ranked)
    best = ranked[0]
    return any(m is not Recompute.NONE for m in best.config.recompute_map or (best.config.recompute,))


def _solve_engine(req: PlanRequest, base: JobConfig, result: PlanResult) -> bool:
    """``solve_training`` for one engine (``base.engine``; None: each combination's default engine)."""
    arch = build_architecture(req.model)
    probe = global_batch_for(req, base.world_size)
    dims, excluded = resolve(arch, base, req.space, req.objective, req.host, probe)
    dims = runnable_dims(base, dims, excluded)
    shards = hybrid.values(base, req.space.shard)
    if shards is not None:
        dims[hybrid.DIM] = shards
    dims = act_offload.restrict(base, dims)
    result.excluded = sorted(set(result.excluded + excluded))
    if not dims["tp"] or not dims["pp"] or not dims["placement"]:
        raise NoValidDegree(f"no tensor/pipeline degree or ZeRO/offload placement is valid on {counted(base.world_size, 'GPU')}: "
                            + distinct_reasons(excluded))
    if not dims["recompute"]:
        raise MemplanError("no recompute mode asked for runs on this engine: "
                           + "; ".join(e.split(": ", 1)[1] for e in excluded if e.startswith("recompute=")))
    gb = global_batch_for(req, base.world_size, dims["micro_batch"])
    setting = train.TrainSetting(arch=arch, gpu=req.gpu, host=req.host, base=base, global_batch=gb)
    formats = None
    if req.space.per_layer_quant:
        formats = dims["quant"]
        train_quant.check(base.job, formats, req.objective.value)
        dims = train_quant.restrict(dims, formats)
    start = len(result.candidates)
    kind = _objective_kind(req.objective)
    parts = [one for part in train_offload.partition(dims, base.job) for one in hybrid.split(part)]
    invalid: list[MemplanError] = []  # parts without a valid combination; all of them: the user's error
    for i, part in enumerate(parts):
        part_req = req if i == 0 or not req.debug_lp else replace(req, debug_lp=_part_path(req.debug_lp, i))
        mine = result.candidates[start:]
        # a later part only matters where it beats the k-th plan found so far (throughput: seconds)
        cutoff = max(c.objective_value for c in mine) if kind == "min_seconds" and len(mine) >= req.top_k else None
        result.candidates.extend(_solve_part(part_req, setting, part, result, cutoff, formats,
                                             invalid=invalid if len(parts) > 1 else None))
    if invalid and len(invalid) == len(parts):
        raise invalid[0]
    found = result.candidates[start:]
    rank_candidates(found)
    if req.space.pp_schedules:  # the pp = 1 plans of every schedule's base are one plan (setting.config_for)
        found = [c for i, c in enumerate(found) if all(c.config != d.config for d in found[:i])]
    result.candidates[start:] = found[: req.top_k]
    if found and not result.solver_status.startswith("feasible"):
        result.solver_status = "optimal"  # a part without plans does not make the whole infeasible
    return bool(found)


def _part_path(path: str, index: int) -> str:
    """Where ``--debug-lp`` writes the model of a further part: plan.lp -> plan.part1.lp."""
    stem, dot, ext = path.rpartition(".")
    return f"{stem}.part{index}.{ext}" if dot and "/" not in ext else f"{path}.part{index}"


def _solve_part(req: PlanRequest, setting: train.TrainSetting, dims: dict[str, tuple], result: PlanResult,
                cutoff: float | None = None, formats: tuple | None = None,
                invalid: list[MemplanError] | None = None) -> list[Candidate]:
    """Solve one part of the space; a part that holds no valid combination has no plans and, given ``invalid``,
    adds its reason there (the caller raises when every part is invalid: the user's error), else raises."""
    arch, base, gb = setting.arch, setting.base, setting.global_batch
    try:
        problem, _ = train.build_problem(setting, dims, _objective_kind(req.objective), _value_fn(req.objective),
                                         formats=formats)
    except MemplanError as exc:
        if invalid is None:
            raise
        invalid.append(exc)
        return []
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
        offloaded = "activations offloaded to CPU" if cfg.offload_activations else ""
        text = "; ".join(t for t in (text, hybrid.describe(cfg), offloaded) if t)  # config JSON holds the knobs
        if formats is not None:
            extras.update(quality_extras(arch, cfg))
            text = "; ".join(t for t in (text, describe_formats(cfg)) if t)
        budget = None
        if req.train_tokens:
            budget = train_budget(tokens_per_s=tokens / seconds, gpus=cfg.world_size, train_tokens=req.train_tokens)
        out.append(Candidate(cfg, est, seconds, tokens / seconds, sol.objective, text, extras, global_batch=gb,
                             train_budget=budget))
    return out
