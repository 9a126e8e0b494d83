"""Resolve a SearchSpace into concrete candidate values per dimension, with reasons for exclusions."""

from __future__ import annotations

from memplan.arch.tensors import Architecture
from memplan.catalog.schema import HostSpec
from memplan.config import CpComm, Engine, Job, JobConfig, Offload, Recompute
from memplan.errors import MemplanError
from memplan.planner.space import (
    Objective,
    SearchSpace,
    check_tp,
    divisors,
    placements,
    powers_of_two,
)
from memplan.planner.split import split_values
from memplan.units import counted

SP_ENGINES = frozenset({Engine.MEGATRON, Engine.PYTORCH, Engine.FSDP2})
"""Engines that run sequence parallelism with tensor parallelism: Megatron-LM ``--sequence-parallel``
(Korthikanti et al. 2022, Sec. 4.2.2), PyTorch/FSDP2 with ``torch.distributed.tensor.parallel.SequenceParallel``.
DeepSpeed's training engine has no tensor-parallel sequence split (its Ulysses is context parallelism)."""

MAX_MICRO_BATCH = 4
MAX_BATCH_SEARCH = 1024
MIN_CONTEXT = 512
MAX_CONTEXT_SEARCH = 2**20


def with_sequence_parallel(cfg: JobConfig) -> JobConfig:
    """The plan's configuration with sequence parallelism on wherever tp > 1 and the engine runs it (the job's
    engine, or the default one, ``JobConfig.effective_engine``).
    It never costs time (the reduce-scatter + all-gather pair moves what the
    all-reduce moved) and divides the layer's replicated activations by tp (Korthikanti et al. 2022, Table 2),
    so a plan with tp > 1 always takes it."""
    engine = cfg.effective_engine
    if cfg.tp > 1 and not cfg.sequence_parallel and engine in SP_ENGINES:
        return cfg.model_copy(update={"sequence_parallel": True})
    return cfg


def _with_cp(base: JobConfig) -> str:
    return f" × cp={base.cp}" if base.cp > 1 else ""


def tp_candidates(arch: Architecture, base: JobConfig, space: SearchSpace, excluded: list[str]) -> tuple[int, ...]:
    wanted = space.tp or powers_of_two(base.gpus_per_node)
    out = []
    for tp in wanted:
        reason = check_tp(arch, tp, base.gpus_per_node) if arch.layers else (None if tp == 1 else "params-only model")
        if reason or base.world_size % (tp * base.cp):
            excluded.append(reason or f"tp={tp}{_with_cp(base)} does not divide the {counted(base.world_size, 'GPU')}")
        else:
            out.append(tp)
    return tuple(out)


def pp_candidates(arch: Architecture, base: JobConfig, space: SearchSpace, excluded: list[str]) -> tuple[int, ...]:
    """Pipeline degrees up to the layer count that divide the GPUs (by default every such divisor, so 280 GPUs
    can take Korthikanti's pp = 35); a degree that does not divide the layers gets balanced uneven stages
    (``arch.parallel.balanced_stage_sizes``)."""
    if not arch.layers:
        return (1,)
    wanted = space.pp or tuple(p for p in divisors(base.world_size) if p <= len(arch.layers))
    out = []
    for pp in wanted:
        reason = None if pp <= len(arch.layers) else f"pp={pp} exceeds the {len(arch.layers)} layers"
        if reason or base.world_size % (pp * base.cp):
            excluded.append(reason or f"pp={pp}{_with_cp(base)} does not divide the {counted(base.world_size, 'GPU')}")
        else:
            out.append(pp)
    return tuple(out)


EP_ENGINES = frozenset({Engine.MEGATRON, Engine.DEEPSPEED})
"""Engines with expert parallelism in training: Megatron-Core MoE (``--expert-model-parallel-size``) and
DeepSpeed-MoE (``ep_size``); Hugging Face modules under PyTorch/FSDP2 run every expert on every rank."""


def ep_candidates(arch: Architecture, base: JobConfig, space: SearchSpace) -> tuple[int, ...] | None:
    """Expert-parallel degrees for a mixture-of-experts model on an engine that runs them: powers of two that
    divide the routed experts, up to the GPUs (the ILP drops those that do not divide a plan's data-parallel
    degree, as ``components.validate`` does); None for a dense model or another engine (ep stays the base's)."""
    experts = arch.spec.num_experts or 0
    if not experts or base.engine not in EP_ENGINES:
        if space.ep is not None:  # a choice no plan could take: an error, not silently ignored
            why = (f"{arch.spec.name} has no experts (expert parallelism splits a mixture-of-experts model's experts)"
                   if not experts else f"engine {(base.engine or base.effective_engine).value} runs no expert "
                   "parallelism in memplan's plans; use --engine megatron or --engine deepspeed")
            raise MemplanError(f"--ep: {why}.")
        return None
    if space.ep:
        return space.ep
    if base.ep > 1:
        return (base.ep,)
    return tuple(e for e in powers_of_two(min(experts, base.world_size)) if not experts % e)


def cp_bases(bases: list[JobConfig], space: SearchSpace, excluded: list[str]) -> list[JobConfig]:
    """One base per context-parallel degree and exchange to search (``space.cp``, ``space.cp_comm``; None: each
    base's own). A degree that does not divide the GPUs is excluded with its reason; cp = 1 is searched once, with
    the default exchange (``cp_comm`` is read only with cp > 1). Each base is solved as its own ILP, like each
    engine (``train_plan.solve_training``); the engine rules and the shape rules
    (``memory.context_parallel.check_shape``) drop what cannot run."""
    if not space.cp and not space.cp_comm:
        return bases
    if space.cp_comm and not any(cp > 1 for base in bases for cp in space.cp or (base.cp,)):
        raise MemplanError("--cp-comm chooses how context-parallel ranks exchange keys and values; with --cp 1 there "
                           "are none: give --cp with a degree above 1, or drop --cp-comm.")
    out = []
    for base in bases:
        for cp in space.cp or (base.cp,):
            if base.world_size % cp:
                excluded.append(f"cp={cp} does not divide the {counted(base.world_size, 'GPU')}")
                continue
            for comm in (space.cp_comm or (base.cp_comm,)) if cp > 1 else (CpComm.RING,):
                out.append(base.model_copy(update={"cp": cp, "cp_comm": comm}))
    return out


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
    eps = ep_candidates(arch, base, space)
    if eps is not None:
        dims["ep"] = eps
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
    splits = split_values(dims, space.per_layer_offload and bool(arch.layers), base.job)
    if len(splits) > 1:
        dims["opt_split"] = splits
    return dims, excluded
