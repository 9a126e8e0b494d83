"""Resolve a SearchSpace into concrete candidate values per dimension, with reasons for exclusions."""

from __future__ import annotations

from memplan.arch.tensors import Architecture
from memplan.catalog.schema import HostSpec
from memplan.config import Job, JobConfig, Offload, Recompute
from memplan.planner.space import (
    Objective,
    SearchSpace,
    check_pp,
    check_tp,
    placements,
    powers_of_two,
)

MAX_MICRO_BATCH = 4
MAX_BATCH_SEARCH = 1024
MIN_CONTEXT = 512
MAX_CONTEXT_SEARCH = 2**20


def tp_candidates(arch: Architecture, base: JobConfig, space: SearchSpace, excluded: list[str]) -> tuple[int, ...]:
    wanted = space.tp or powers_of_two(base.gpus_per_node)
    out = []
    for tp in wanted:
        reason = check_tp(arch, tp, base.gpus_per_node) if arch.layers else (None if tp == 1 else "params-only model")
        if reason or base.world_size % tp:
            excluded.append(reason or f"tp={tp} does not divide the {base.world_size} GPUs")
        else:
            out.append(tp)
    return tuple(out)


def pp_candidates(arch: Architecture, base: JobConfig, space: SearchSpace, excluded: list[str]) -> tuple[int, ...]:
    if not arch.layers:
        return (1,)
    wanted = space.pp or tuple(p for p in powers_of_two(base.world_size) if p <= len(arch.layers))
    out = []
    for pp in wanted:
        reason = check_pp(arch, pp)
        if reason or base.world_size % pp:
            excluded.append(reason or f"pp={pp} does not divide the {base.world_size} GPUs")
        else:
            out.append(pp)
    return tuple(out)


def placement_candidates(base: JobConfig, space: SearchSpace, host: HostSpec) -> tuple:
    zeros = space.zero if space.zero is not None else ((base.zero.value,) if base.job is Job.INFER else (0, 1, 2, 3))
    default_off = (Offload.NONE, Offload.CPU) + ((Offload.NVME,) if host.nvme_bytes else ())
    if base.job is Job.INFER:
        default_off = (Offload.NONE,)
    opt_off = space.offload_optimizer or default_off
    param_off = space.offload_params or default_off
    return placements(base.job, zeros, opt_off, param_off)


def resolve(arch: Architecture, base: JobConfig, space: SearchSpace, objective: Objective, host: HostSpec,
            global_batch: int) -> tuple[dict[str, tuple], list[str]]:
    """Candidate values per dimension for a training job."""
    excluded: list[str] = []
    dims: dict[str, tuple] = {
        "tp": tp_candidates(arch, base, space, excluded),
        "pp": pp_candidates(arch, base, space, excluded),
        "placement": placement_candidates(base, space, host),
        "optimizer": space.optimizer or (base.optimizer,),
        "quant": space.quant or (base.quant,),
    }
    if objective is Objective.MAX_BATCH:
        dims["micro_batch"] = space.micro_batch or powers_of_two(MAX_BATCH_SEARCH)
    else:
        dims["micro_batch"] = space.micro_batch or tuple(
            m for m in powers_of_two(min(MAX_MICRO_BATCH, global_batch)) if global_batch % m == 0)
    if objective is Objective.MAX_CONTEXT:
        limit = MAX_CONTEXT_SEARCH
        dims["seq_len"] = space.seq_len or tuple(s for s in powers_of_two(limit) if s >= MIN_CONTEXT)
    else:
        dims["seq_len"] = space.seq_len or (base.seq_len,)
    default_modes: tuple[Recompute, ...] = (Recompute.NONE, Recompute.SELECTIVE, Recompute.OP, Recompute.FULL)
    if not space.per_layer_recompute:
        default_modes = (base.recompute,)
    dims["recompute"] = space.recompute or default_modes
    from memplan.planner.train_offload import split_values

    splits = split_values(dims, space.per_layer_offload and bool(arch.layers), base.job)
    if len(splits) > 1:
        dims["opt_split"] = splits
    return dims, excluded
