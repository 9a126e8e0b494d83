"""``plan``: solve the ILP, re-check each plan with exact bytes, rank alternatives, and explain
an infeasible request with the smallest verified changes that would make it fit."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from memplan.arch.build import build_architecture
from memplan.catalog.schema import GpuSpec, HostSpec, ModelSpec
from memplan.config import Job, JobConfig, Recompute
from memplan.errors import MemplanError
from memplan.estimate import Estimate, estimate
from memplan.planner import train, train_offload
from memplan.planner.dims import resolve
from memplan.planner.ilp import IlpBuilder
from memplan.planner.space import Objective, SearchSpace

DEFAULT_TIME_LIMIT_S = 30.0
MAX_REJECTED = 20


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


@dataclass
class PlanResult:
    status: str
    objective: Objective
    candidates: list[Candidate] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)
    binding: str | None = None
    suggestions: list[dict[str, Any]] = field(default_factory=list)
    solver_status: str = "optimal"

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


def global_batch_for(req: PlanRequest, world: int, dims_mb: tuple[int, ...] | None = None) -> int:
    if req.space.global_batch:
        return req.space.global_batch
    biggest = max(dims_mb) if dims_mb else (max(req.space.micro_batch) if req.space.micro_batch else 8)
    return biggest * world


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
    from memplan.memory import components

    comm_dims = {"tp": (cfg.tp,), "pp": (cfg.pp,), "placement": ((cfg.zero, cfg.offload_optimizer, cfg.offload_params),),
                 "micro_batch": (cfg.micro_batch,)}
    comm = next(iter(train.comm_factor(setting, comm_dims).entries.values())).seconds
    per_stage = [components.state_rows(c) for c in train._contexts(setting, cfg)]
    offload = train.offload_seconds(setting, cfg, per_stage)
    from memplan.planner.train_recompute import recompute_seconds

    recompute = sum(recompute_seconds(setting, cfg, layer.params, Recompute(m))
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
    arch = build_architecture(req.model)
    base = _with_world(req.base, gpn, nodes)
    probe = global_batch_for(req, base.world_size)
    dims, excluded = resolve(arch, base, req.space, req.objective, req.host, probe)
    result.excluded = sorted(set(result.excluded + excluded))
    if not dims["tp"] or not dims["pp"]:
        raise MemplanError("no tensor/pipeline degree is valid: " + "; ".join(excluded[:3]))
    gb = global_batch_for(req, base.world_size, dims["micro_batch"])
    setting = train.TrainSetting(arch=arch, gpu=req.gpu, host=req.host, base=base, global_batch=gb)
    formats = None
    if req.space.per_layer_quant:
        from memplan.planner import train_quant

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
    builder = IlpBuilder(problem)
    if cutoff is not None:
        builder.cutoff(cutoff)

    def to_config(sol: Any) -> JobConfig:
        cfg = train.config_for(base, sol.choice, global_batch=gb, modes=sol.modes or None,
                               optimizer_modes=sol.block_modes.get(train_offload.BLOCK_NAME))
        if formats is not None:
            from memplan.planner import train_quant

            qmap = train_quant.quant_map(sol.block_modes[train_quant.BLOCK_NAME], formats, base.dtype.value)
            cfg = cfg.model_copy(update={"quant_map": qmap})
        return cfg

    out = []
    for sol, cfg, est in verified_solutions(req, builder, result, to_config):
        seconds = step_seconds(setting, cfg, sol.modes)
        tokens = gb * cfg.seq_len
        text, extras = layer_map(sol.modes), {}
        if cfg.optimizer_gpu_layers is not None:
            from memplan.memory.context import Context
            from memplan.memory.model_states import offloaded_fraction

            ratio = offloaded_fraction(Context(arch, cfg, req.gpu, req.host))
            size, ds_ratio = train_offload.deepspeed_settings(arch, cfg)
            extras = {"optimizer_gpu_layers": cfg.optimizer_gpu_layers, "offload_ratio": round(ratio, 6),
                      "deepspeed_sub_group_size": size, "deepspeed_ratio": round(ds_ratio, 6)}
            text = "; ".join(t for t in (text, train_offload.describe(cfg, ratio, len(arch.layers))) if t)
        if formats is not None:
            from memplan.planner.infer_layers import describe_formats, quality_extras

            extras.update(quality_extras(arch, cfg))
            text = "; ".join(t for t in (text, describe_formats(cfg)) if t)
        out.append(Candidate(cfg, est, seconds, tokens / seconds, sol.objective, text, extras))
    return out


def verified_solutions(req: PlanRequest, builder: IlpBuilder, result: PlanResult,
                       to_config: Callable[[Any], JobConfig]) -> Iterator[tuple[Any, JobConfig, Estimate]]:
    """Solve, re-check each solution with exact bytes, and cut it off for the next solve: yields up to
    ``req.top_k`` (solution, config, estimate) that fit; a solution the exact check rejects is cut and
    skipped (at most MAX_REJECTED). Sets ``result``'s solver status and the reason when none is found."""
    if req.debug_lp:
        builder.write_lp(req.debug_lp)
    found = rejected = 0
    while found < req.top_k and rejected < MAX_REJECTED:
        sol = builder.solve(time_limit=req.time_limit_s, solver=req.solver)
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
        yield sol, cfg, est


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
        return (float(f"{value:.12g}"), c.config.world_size, c.estimate.total(Tier.GPU), c.config.model_dump_json())

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
    if req.objective is Objective.MAX_QUALITY and not req.space.per_layer_quant:
        req = replace(req, space=req.space.model_copy(update={"per_layer_quant": True}))  # probes keep it
    if req.base.job is Job.INFER:
        from memplan.planner.infer import plan_inference

        return plan_inference(req)
    result = PlanResult(status="infeasible", objective=req.objective)
    sizes = gpu_counts(req)
    for gpn, nodes in sizes:
        ok = solve_training(req, gpn, nodes, result)
        if ok and req.objective is not Objective.MIN_COST:
            break
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
        from memplan.planner.suggest import diagnose

        diagnose(req, result)
    return result
