"""The ``pp_schedules`` dimension of a training plan: torch.distributed.pipelining's schedules (``arch.pp_schedules``),
searched as one base configuration each, like the engines (``space.engine_bases``) and context-parallel degrees
(``dims.cp_bases``). Only engine fsdp2 pipelines with torch.distributed.pipelining; every other engine keeps its own
schedule, so no plan combines a named schedule with another engine (issue 11's rule)."""

from __future__ import annotations

from memplan.arch.pp_schedules import SINGLE, V_SHAPE
from memplan.config import Engine, JobConfig
from memplan.engines import megatron_schedule_rules, pp_schedule_rules
from memplan.planner.space import SearchSpace


def stages_per_rank(name: str, virtual_stages: int) -> int:
    """The chunks per rank a schedule runs with (the values ``engines.pp_schedule_rules`` accepts): 1 for
    ``PipelineScheduleSingle`` ones, 2 for the V schedules, the base's ``virtual_stages`` (at least 2) otherwise
    (torchtitan's default for a multi-stage schedule is 2 stages per rank)."""
    if name in SINGLE:
        return 1
    if name in V_SHAPE:
        return 2
    return max(2, virtual_stages)


def schedule_bases(bases: list[JobConfig], space: SearchSpace, excluded: list[str]) -> list[JobConfig]:
    """One base per (base, schedule) for the fsdp2 bases of a training plan, with ``perf.virtual_stages`` as the
    schedule runs it; the other engines' bases unchanged, each refused schedule listed in ``excluded`` with its
    reason. None (no ``space.pp_schedules``): ``bases`` as given."""
    if not space.pp_schedules:
        return bases
    out = []
    for base in bases:
        if not base.job.trains or base.effective_engine is not Engine.FSDP2:
            excluded.extend(f"pp_schedule={name}: engine {base.effective_engine.value} runs its own pipeline "
                            "schedule (torch.distributed.pipelining's are engine fsdp2's)" for name in space.pp_schedules)
            out.append(base)
            continue
        for name in space.pp_schedules:
            v = stages_per_rank(name, base.perf.virtual_stages)
            out.append(base.model_copy(update={
                "engine_config": base.engine_config.model_copy(update={"pp_schedule": name}),
                "perf": base.perf.model_copy(update={"virtual_stages": v})}))
    return out


def takes(cfg: JobConfig) -> bool:
    """Whether ``cfg``'s named schedule (if any) takes its micro-batches per step (``engines.pp_schedule_rules``:
    DualPipeV's m ≥ 2p, the interleaved schedules' rounds): the shapes a plan may give it."""
    if megatron_schedule_rules.group_rule(cfg) is not None:  # Megatron's group size against m
        return False
    return cfg.engine_config.pp_schedule is None or pp_schedule_rules.rule(cfg, cfg.effective_engine) is None


def with_steps(cfg: JobConfig, global_batch: int) -> JobConfig:
    """``cfg`` with the micro-batches per step ``global_batch`` gives, for the rules that read them (a named
    schedule's); ``cfg`` itself without a named schedule. With Megatron's ``microbatch_group_size_per_vp_stage`` g
    (the micro-batch size, hence m, not chosen yet) m = g, which its checks against m accept: ``takes`` applies them
    to each shape."""
    if cfg.engine_config.microbatch_group_size_per_vp_stage is not None and cfg.engine_config.pp_schedule is None:
        return cfg.model_copy(update={"grad_accum": cfg.engine_config.microbatch_group_size_per_vp_stage})
    if cfg.engine_config.pp_schedule is None:
        return cfg
    return cfg.model_copy(update={"grad_accum": max(1, global_batch // (cfg.micro_batch * cfg.batch_dp))})
