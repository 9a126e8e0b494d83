"""Hybrid sharding as a training-plan dimension ``shard``: ``full`` (states sharded over every data-parallel rank),
``node`` (shard within a node, replicate across nodes: fsdp2 HSDP, deepspeed MiCS) and ``hpz`` (deepspeed ZeRO++'s
secondary parameter partition within a node). Each value sets the engine's own knob (``EngineConfig``
``hsdp_shard_size``, ``mics_shard_size``, ``zero_hpz_partition_size``) to the node's data-parallel ranks; the
memory and the step time are ``memory.zero.shard_degree`` / ``hpz_secondary_bytes`` and ``planner.shard_comm``.
"""

from __future__ import annotations

from memplan.config import Engine, Job, JobConfig
from memplan.errors import MemplanError

DIM = "shard"
FULL, NODE, HPZ = "full", "node", "hpz"
ENGINE_VALUES: dict[Engine, tuple[str, ...]] = {Engine.FSDP2: (NODE, FULL), Engine.DEEPSPEED: (NODE, HPZ, FULL)}
"""The values each engine runs: fsdp2 ``fully_shard`` with a 1-D or a 2-D (replicate, shard) mesh; DeepSpeed ZeRO-3,
MiCS and ZeRO++ hpZ (deepspeed/runtime/zero/config.py). An FSDP1 profile would take (node, full): HYBRID_SHARD.
Hybrid values come first: across nodes they usually win, so the later parts (``split``) are cut off sooner."""
KNOB = {(Engine.FSDP2, NODE): "hsdp_shard_size", (Engine.DEEPSPEED, NODE): "mics_shard_size",
        (Engine.DEEPSPEED, HPZ): "zero_hpz_partition_size"}


def values(base: JobConfig, wanted: tuple[str, ...] | None) -> tuple[str, ...] | None:
    """The ``shard`` values a plan tries, or None when the dimension does not apply: the user's (``--shard-group``),
    else every value the engine runs when the job spans several nodes and the user fixed no hybrid knob."""
    engine = base.engine
    runs = ENGINE_VALUES.get(engine) if engine is not None else None
    knobs = base.engine_config
    fixed = knobs.hsdp_shard_size or knobs.mics_shard_size or knobs.zero_hpz_partition_size > 1
    if wanted is not None and fixed:
        raise MemplanError("--shard-group chooses among sharding layouts; the engine knob given (--hsdp-shard-size, "
                           "--mics-shard-size or --zero-hpz-partition-size) fixes one: give one or the other.")
    if wanted is not None:
        if runs is None:
            raise MemplanError(f"--shard-group: hybrid sharding is fsdp2's HSDP and deepspeed's MiCS/hpZ; engine "
                               f"{engine.value if engine else 'default'} has none: add --engine fsdp2 or deepspeed.")
        assert engine is not None, "an engine with hybrid sharding was named"
        bad = [v for v in wanted if v not in runs]
        if bad:
            raise MemplanError(f"--shard-group {bad[0]}: engine {engine.value} runs {', '.join(runs)}.")
        return wanted
    if runs is None or fixed or base.nodes == 1 or base.job not in (Job.PRETRAIN, Job.FULL):
        return None
    return runs


def apply(cfg: JobConfig, value: str) -> JobConfig:
    """``cfg`` with ``value``'s knob set to the node's data-parallel ranks, S = GPUs per node / tp; a ValueError
    (an invalid combination, dropped by the planner) when S < 2, S does not divide dp, or S = dp (``full`` then)."""
    if value == FULL:
        return cfg
    knob = KNOB.get((cfg.effective_engine, value))
    size = cfg.gpus_per_node // cfg.tp
    if knob is None or size < 2 or cfg.dp % size or size >= cfg.dp:
        raise ValueError(f"shard={value}: no shard group of a node's {size} data-parallel ranks within dp={cfg.dp}")
    return cfg.model_copy(update={"engine_config": cfg.engine_config.model_copy(update={knob: size})})


def value_of(cfg: JobConfig) -> str:
    """The ``shard`` value a configuration has (the inverse of ``apply``)."""
    knobs = cfg.engine_config
    if knobs.zero_hpz_partition_size > 1:
        return HPZ
    return NODE if knobs.hsdp_shard_size or knobs.mics_shard_size else FULL


def describe(cfg: JobConfig) -> str:
    """The plan's sharding in the engine's words (empty for full sharding)."""
    knobs = cfg.engine_config
    for name in ("hsdp_shard_size", "mics_shard_size"):
        if getattr(knobs, name):
            return f"{name}={getattr(knobs, name)} (shard within, replicate over {cfg.dp // getattr(knobs, name)})"
    if knobs.zero_hpz_partition_size > 1:
        return f"zero_hpz_partition_size={knobs.zero_hpz_partition_size}"
    return ""


def split(dims: dict[str, tuple]) -> list[dict[str, tuple]]:
    """``dims`` as disjoint parts, one per ``shard`` value (their union is the space): solved one after the other
    (``train_plan``), each part is an ILP the size of a plan without the dimension, and a later part is cut off where
    it cannot beat the plans found (``IlpBuilder.cutoff``); one joint model took HiGHS several times longer."""
    if DIM not in dims or len(dims[DIM]) < 2:
        return [dims]
    return [{**dims, DIM: (value,)} for value in dims[DIM]]
