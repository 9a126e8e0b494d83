"""FSDP1's units: which FlatParameters a training job's stage has, in which dtype, their bytes sharded and
all-gathered (``memory.engine_fsdp1`` has the sources and the rows built from these).

Part of ``memory.engine_fsdp1`` (which re-exports every name).
"""

from __future__ import annotations

from dataclasses import dataclass

from memplan.arch.tensors import Tensor
from memplan.config import Job, JobConfig
from memplan.dtypes import Dtype
from memplan.memory.context import Context
from memplan.units import bits_to_bytes, ceil_div

BNB4 = ("nf4", "nf4-dq", "fp4", "fp4-dq")


@dataclass(frozen=True)
class Unit:
    """One FSDP1 unit: its FlatParameter's bytes (storage dtype), its all-gathered bytes (``param_dtype``),
    whether it requires grad, and the bytes outside FSDP that every rank keeps whole (bnb quant states)."""

    name: str
    flat_bytes: int
    gathered_bytes: int
    requires_grad: bool
    replicated_bytes: int = 0
    is_block: bool = True


def sharded(cfg: JobConfig) -> bool:
    """Whether the strategy shards (FULL_SHARD, SHARD_GRAD_OP) over more than one rank."""
    return cfg.dp > 1 and cfg.engine_config.sharding_strategy != "NO_SHARD"


def shard_bytes(nbytes: int, dp: int) -> int:
    """Bytes of one rank's shard of a flat buffer: ceil(n / Nd) (``_get_shard`` pads the flat parameter to a
    multiple of Nd elements; padding of under Nd elements is at most a few bytes and rounds up here)."""
    return ceil_div(nbytes, dp)


def storage_dtype(ctx: Context) -> Dtype:
    """The FlatParameters' dtype: fp32 under a mixed-precision policy with fp32 masters (``MixedPrecision``
    over an fp32 model), else the weights' dtype (bf16-true, fsdp_qlora's ``precision=bf16``)."""
    from memplan.memory.engine_states import compute_dtype, mixed

    frozen_base = ctx.cfg.job in (Job.LORA, Job.QLORA)  # the base stays in the weights' dtype (or quantized)
    return Dtype.FP32 if mixed(ctx) and not frozen_base else compute_dtype(ctx)


def _tensor_bytes(ctx: Context, t: Tensor, layer: int | None, dtype: Dtype) -> tuple[int, int]:
    """(FSDP-managed bytes, bytes kept whole on every rank) of one base tensor in its stored format."""
    from memplan.memory import quant
    from memplan.memory.weights import layer_format

    fmt = layer_format(ctx.cfg, layer) if ctx.cfg.job is not Job.FULL and ctx.cfg.job is not Job.PRETRAIN else None
    st = quant.storage(fmt, t, layer_index=layer, num_layers=len(ctx.arch.layers), dtype=dtype)
    if st.quantized and fmt in BNB4:
        packed = t.copies * bits_to_bytes(t.numel_each, quant.INT4_BITS)
        return packed, st.bytes - packed
    return st.bytes, 0


def units(ctx: Context) -> list[Unit]:
    """The stage's FSDP1 units: one per transformer block, the root, and (``use_orig_params=False`` with
    adapters) the adapters as their own units, grouped per block for the in-flight count."""
    cfg = ctx.cfg
    lora = cfg.job in (Job.LORA, Job.QLORA)
    full = not lora
    sdtype = storage_dtype(ctx)
    gdtype = sdtype if not full else _gather_dtype(ctx)
    separate = lora and not cfg.engine_config.use_orig_params
    out: list[Unit] = []

    def add(name: str, tensors: list[Tensor], layer: int | None, *, is_block: bool) -> None:
        managed = replicated = 0
        for t in tensors:
            m, r = _tensor_bytes(ctx, t, layer, sdtype)
            managed, replicated = managed + m, replicated + r
        adapters = _adapters(ctx, tensors) if lora else []
        abytes = sum(bits_to_bytes(a.numel, cfg.lora.dtype.bits) for a in adapters)
        gathered = managed * gdtype.bits // sdtype.bits  # MixedPrecision: gathered in param_dtype
        if separate and adapters:
            out.append(Unit(f"{name} adapters", abytes, abytes, True, is_block=is_block))
            out.append(Unit(name, managed, gathered, False, replicated, is_block))
        else:
            out.append(Unit(name, managed + abytes, gathered + abytes, full or bool(adapters), replicated, is_block))

    for i, layer in ctx.layers:
        add(f"block {i}", list(layer.tensors), i, is_block=True)
    inside = {id(t) for _, layer in ctx.layers for t in layer.tensors}
    root = [t for t in ctx.tensors if id(t) not in inside]
    add("root", root, None, is_block=False)
    return out


def _gather_dtype(ctx: Context) -> Dtype:
    from memplan.memory.engine_states import compute_dtype

    return compute_dtype(ctx)


def _adapters(ctx: Context, tensors: list[Tensor]) -> list[Tensor]:
    from memplan.memory import peft

    return peft.adapter_tensors(tensors, ctx.cfg.lora, family=ctx.arch.spec.family)


def accumulating_unsharded(cfg: JobConfig) -> bool:
    """Whether gradients stay unsharded across micro-batches: ``no_sync`` with grad_accum > 1, sharded."""
    return sharded(cfg) and cfg.engine_config.no_sync and cfg.grad_accum > 1
