"""The search space of the planner: which values each global choice may take, with defaults per job.

Every candidate value is checked against the model and the cluster; excluded values carry a
readable reason ("tp=3 does not divide the 32 attention heads"), shown by ``plan``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from pydantic import Field, field_validator, model_validator

from memplan.arch.tensors import Architecture
from memplan.config import CpComm, Engine, Job, JobConfig, Offload, OptimizerKind, Recompute, Strict, ZeroStage
from memplan.dtypes import Dtype
from memplan.engines.megatron_rules import selective_rule
from memplan.errors import MemplanError
from memplan.units import counted


class Objective(StrEnum):
    THROUGHPUT = "throughput"
    MIN_GPUS = "min-gpus"
    MAX_BATCH = "max-batch"
    MAX_CONCURRENCY = "max-concurrency"
    """Serving: the most concurrent sequences of the given context (max-batch by its serving name)."""
    MAX_CONTEXT = "max-context"
    MIN_MEMORY = "min-memory"
    MIN_COST = "min-cost"
    MAX_QUALITY = "max-quality"
    """Least weight quantization error (per-layer formats, LQ-LoRA-style) among plans that fit."""


Placement = tuple[ZeroStage, Offload, Offload]
"""(ZeRO stage, optimizer offload, parameter offload): one valid combination of the three."""


class SearchSpace(Strict):
    """Candidate values per global choice; None means "memplan's default for this job"."""

    tp: tuple[int, ...] | None = None
    pp: tuple[int, ...] | None = None
    ep: tuple[int, ...] | None = None
    """Expert-parallel degrees (MoE on Megatron/DeepSpeed); None: powers of two dividing the experts."""
    cp: tuple[int, ...] | None = None
    """Context-parallel degrees (``planner.dims.cp_bases``); None: the base's cp only."""
    cp_comm: tuple[CpComm, ...] | None = None
    """Context-parallel exchanges for the degrees above 1; None: the base's (ring by default)."""
    zero: tuple[int, ...] | None = None
    offload_optimizer: tuple[Offload, ...] | None = None
    offload_params: tuple[Offload, ...] | None = None
    micro_batch: tuple[int, ...] | None = None
    optimizer: tuple[OptimizerKind, ...] | None = None
    quant: tuple[str | None, ...] | None = None
    kv_dtype: tuple[Dtype, ...] | None = None
    recompute: tuple[Recompute, ...] | None = None
    per_layer_recompute: bool = True
    per_layer_offload: bool = True
    """Per-layer placement: inference weights on GPU or CPU (accelerate device_map); training optimizer
    states on GPU or CPU (DeepSpeed ZeRO-3 partial offload)."""
    per_layer_quant: bool = False
    """Choose each layer's weight format among the ``quant`` choices (LQ-LoRA-style): inference, or the
    frozen base of a LoRA/QLoRA job (with the ``max-quality`` objective)."""
    context: tuple[int, ...] | None = None
    seq_len: tuple[int, ...] | None = None
    batch: tuple[int, ...] | None = None
    gpus: tuple[int, ...] | None = None
    global_batch: int | None = Field(default=None, gt=0, le=2**31)
    """Sequences per optimizer step; at most 2^31 (the largest published runs use a few thousand), so the
    ILP's step-time coefficients stay within the solver's range."""
    engines: tuple[Engine, ...] | None = None
    """Engines to choose among (``plan --engine vllm,llamacpp``); None: the job's default engine. Passed through
    here; what each engine changes is the engines' code."""
    pp_schedules: tuple[str, ...] | None = None
    """torch.distributed.pipelining schedules to choose among on engine fsdp2 with pp > 1 (``planner.pp_schedule_dim``,
    ``engine_config.pp_schedule``); None: memplan's 1F1B, or Interleaved1F1B with ``perf.virtual_stages`` > 1."""
    shard: tuple[str, ...] | None = None
    """State sharding of a training plan (``planner.hybrid``): ``full`` (every data-parallel rank), ``node`` (fsdp2
    HSDP / deepspeed MiCS: shard within a node, replicate across nodes), ``hpz`` (deepspeed ZeRO++); None: each one
    the engine runs, on more than one node."""
    offload_activations: bool | None = None
    """Activation offload to CPU (``JobConfig.offload_activations``); None: tried off and on where the engine runs it."""
    global_batch_tokens: int | None = Field(default=None, gt=0, le=2**62)
    """Tokens per optimizer step (give it or ``global_batch``, not both); None: ``plan.DEFAULT_GLOBAL_BATCH_TOKENS``."""

    @model_validator(mode="after")
    def _one_batch_size(self) -> SearchSpace:
        """The global batch in sequences or in tokens, not both (one would be silently ignored)."""
        if self.global_batch is not None and self.global_batch_tokens is not None:
            raise ValueError("give the global batch in sequences (global_batch) or in tokens (global_batch_tokens), "
                             "not both")
        return self

    @field_validator("*")
    @classmethod
    def _distinct(cls, value: object) -> object:
        """Each candidate once, in the order given (``--quant int8,int8`` is one choice); never an empty list."""
        if isinstance(value, tuple) and not value:
            raise ValueError("give at least one value (omit the field for memplan's default)")
        return tuple(dict.fromkeys(value)) if isinstance(value, tuple) else value

    @field_validator("tp", "pp", "ep", "cp", "micro_batch", "context", "seq_len", "batch", "gpus")
    @classmethod
    def _positive(cls, value: tuple[int, ...] | None) -> tuple[int, ...] | None:
        """Degrees, batches and lengths are positive integers (as the command line requires)."""
        bad = [v for v in value or () if v < 1]
        if bad:
            raise ValueError(f"values must be positive integers, got {', '.join(map(str, bad))}")
        return value

    @field_validator("shard")
    @classmethod
    def _shards(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        bad = [v for v in value or () if v not in ("full", "node", "hpz")]
        if bad:
            raise ValueError(f"shard choices are full, node and hpz, got {', '.join(map(str, bad))}")
        return value

    @field_validator("zero")
    @classmethod
    def _stages(cls, value: tuple[int, ...] | None) -> tuple[int, ...] | None:
        bad = [v for v in value or () if v not in tuple(ZeroStage)]
        if bad:
            raise ValueError(f"ZeRO stages are 0, 1, 2 and 3, got {', '.join(map(str, bad))}")
        return value


TRAINING_DIMS = ("zero", "offload_optimizer", "micro_batch", "optimizer", "recompute", "seq_len", "global_batch",
                 "global_batch_tokens", "ep", "cp", "cp_comm", "shard", "offload_activations", "pp_schedules")
"""Search dimensions only a training plan reads."""
INFERENCE_DIMS = ("context", "batch", "kv_dtype")
"""Search dimensions only an inference plan reads (training searches ``micro_batch`` and ``seq_len``)."""


def unread_dims(space: SearchSpace, job: Job) -> list[str]:
    """The dimensions given in ``space`` that a plan for ``job`` does not search."""
    names = TRAINING_DIMS if job is Job.INFER else INFERENCE_DIMS
    return [n for n in names if getattr(space, n) is not None]


@dataclass(frozen=True)
class Resolved:
    """The concrete candidate lists after defaults and validity checks, and why values were excluded."""

    dims: dict[str, tuple]
    excluded: list[str] = field(default_factory=list)


def divisors(n: int) -> tuple[int, ...]:
    """The divisors of ``n`` in ascending order, found in O(√n) steps (each d ≤ √n gives d and n // d)."""
    from math import isqrt

    low = [d for d in range(1, isqrt(n) + 1) if n % d == 0]
    return tuple(low + [n // d for d in reversed(low) if d * d != n])


def powers_of_two(limit: int) -> tuple[int, ...]:
    out, v = [], 1
    while v <= limit:
        out.append(v)
        v *= 2
    return tuple(out)


def placements(job: Job, zeros: tuple[int, ...], opt_off: tuple[Offload, ...],
               param_off: tuple[Offload, ...]) -> tuple[Placement, ...]:
    """Valid (zero, optimizer offload, parameter offload) triples (ZeRO-Offload needs stage ≥ 1,
    NVMe optimizer offload and parameter offload need stage 3: ZeRO-Infinity)."""
    out = []
    for z in zeros:
        for oo in opt_off:
            for po in param_off:
                try:
                    JobConfig(job=job, zero=ZeroStage(z), offload_optimizer=oo, offload_params=po)
                except ValueError:
                    continue
                out.append((ZeroStage(z), oo, po))
    return tuple(out)


def check_tp(arch: Architecture, tp: int, gpus_per_node: int) -> str | None:
    spec = arch.spec
    heads, kv = spec.num_attention_heads or 1, spec.kv_heads
    if heads % tp:
        return f"tp={tp} does not divide the {heads} attention heads"
    if kv % tp and tp % kv:
        return f"tp={tp} and the {kv} key/value heads do not divide one another"
    if tp > gpus_per_node:
        return f"tp={tp} exceeds the {counted(gpus_per_node, 'GPU')} of a node (tensor parallelism stays inside a node)"
    return None


def check_pp(arch: Architecture, pp: int) -> str | None:
    layers = len(arch.layers)
    if layers % pp:
        return f"pp={pp} does not divide the {layers} layers"
    return None


def engine_bases(base: JobConfig, space: SearchSpace) -> list[JobConfig]:
    """One base configuration per engine to search: ``space.engines`` (training engines only for a training job),
    else the base's own engine (None: each combination's default engine, ``JobConfig.effective_engine``)."""
    if not space.engines:
        return [base]
    wanted = [e for e in space.engines if e.trains == base.job.trains]
    return [base.model_copy(update={"engine": e}) for e in wanted]


def runnable_dims(base: JobConfig, dims: dict[str, tuple], excluded: list[str]) -> dict[str, tuple]:
    """``dims`` without the tp, pp, (ZeRO, offload) and recompute values the base's engine never runs, each with its
    reason (``memplan.engines.rules``). Rules between dimensions (DeepSpeed's ZeRO-2/3 with pp > 1, optimizer offload
    with a non-CPU optimizer) are applied per combination where the states are tabulated (``planner.train``)."""
    from memplan.engines import rules

    def keep(dim: str, values: tuple, update) -> tuple:
        out = []
        for v in values:
            reason = rules.violation(base.model_copy(update=update(v)), partial=True)
            if reason is None:
                out.append(v)
            else:
                excluded.append(f"{dim}={_show(v)}: {reason}")
        return tuple(out)

    out = dict(dims)
    if "placement" in dims:
        out["placement"] = keep("placement", dims["placement"],
                                lambda p: {"zero": p[0], "offload_optimizer": p[1], "offload_params": p[2]})
    for dim in ("tp", "pp"):
        if dim in dims:
            out[dim] = keep(dim, dims[dim], lambda v, d=dim: {d: v, "zero": ZeroStage.NONE})
    if "recompute" in dims:
        out["recompute"] = keep("recompute", dims["recompute"], lambda m: {
            "recompute": m, "recompute_map": None, "recompute_layers": None, "zero": ZeroStage.NONE})
        if reason := selective_rule(base, out["recompute"]):  # Megatron's modules act in selective layers only
            raise MemplanError(reason)
    return out


def _show(value: object) -> str:
    if isinstance(value, tuple):
        z, oo, po = value
        return f"(zero {int(z)}, offload optimizer {oo.value}, params {po.value})"
    return str(value)
