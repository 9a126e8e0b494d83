"""A full-weight training job's model-state rows (weights, gradients, optimizer, engine buffers) on the engine
that runs it (``JobConfig.effective_engine``).

``accounting="paper"`` is ZeRO's convention whatever the engine (for reproducing papers). Under the default
``accounting="deepspeed"`` each engine holds what it allocates: DeepSpeed's estimator layout for ``deepspeed``
(``memory.model_states``), the layouts of ``memory.engine_states`` for ``pytorch``, ``fsdp2`` and ``megatron``,
and each engine's buffers (``memory.engine_buffers``).
"""

from __future__ import annotations

from memplan.config import Accounting, Engine
from memplan.dtypes import Dtype
from memplan.memory import engine_buffers, engine_states
from memplan.memory import model_states as ms
from memplan.memory.breakdown import Row, Tier, tier_total
from memplan.memory.context import Context
from memplan.memory.zero import StateBuffer
from memplan.units import bits_to_bytes, ceil_div


def with_dtype(ctx: Context, dtype: Dtype) -> Context:
    """``ctx`` with another ``dtype`` (the engine's storage dtype for the weights); the same context when equal."""
    if ctx.cfg.dtype is dtype:
        return ctx
    cfg = ctx.cfg.model_copy(update={"dtype": dtype})
    return Context(ctx.arch, cfg, ctx.gpu, ctx.host, stage_override=ctx.stage)


def engine_layout(ctx: Context) -> bool:
    """Whether the engine's own layout applies (not the paper's convention, not DeepSpeed's)."""
    cfg = ctx.cfg
    return cfg.accounting is Accounting.DEEPSPEED and cfg.effective_engine in (Engine.PYTORCH, Engine.FSDP2,
                                                                                Engine.MEGATRON)


def train_rows(ctx: Context) -> list[Row]:
    """Model-state rows of a pretrain/full job on the reported stage (no activations)."""
    if engine_layout(ctx):
        return _engine_rows(ctx)
    fp8 = engine_states.fp8_rows(ctx)
    ctx = with_dtype(ctx, engine_states.compute_dtype(ctx)) if ctx.cfg.job.trains else ctx
    numel = ms.trainable_numel(ctx)
    rows = ms.place_all(ctx, _weight_buffers(ctx, ms.OFFLOAD_TIER[ctx.cfg.offload_params]) + ms.state_buffers(ctx))
    rows += ms.deepspeed_gpu_buffers(ctx)
    if ctx.cfg.accounting is Accounting.DEEPSPEED:
        rows += engine_buffers.deepspeed_rows(ctx)
    rows += fp8
    rows += ms.nvme_swap_rows(ctx, numel=numel)
    rows += ms.deepspeed_cpu_rows(ctx, numel=numel, steady_cpu=tier_total(rows, Tier.CPU))
    return rows


def fsdp2_place(ctx: Context, buffers: list[StateBuffer], tensors: list, numel: int) -> list[Row]:
    """FSDP2's per-rank rows: the trainable tensors' bytes scaled to the padded dim-0 shard of rank 0 (the largest
    rank), buffers (``model_states.NOT_TRAINED``) whole on every rank; other rows as ``place_all``.

    Formula: per rank = ceil(bytes · P / n) with n the trainable elements and P = ``fsdp2_shard.padded_shard_numel``
    over the shard group (exact for one dtype per row: bits/8 · P); ``weights/params`` adds bits(param dtype)/8 ·
    the untrained buffers' elements, unsharded. Source: memory/fsdp2_shard.py (torch 2.13 _fsdp_param.py
    ``_init_sharded_param``, _fsdp_collectives.py ``foreach_reduce``, _fsdp_init.py ``_get_managed_states``).
    Assumptions: the optimizer states are counted for rank 0 (``fsdp2_shard.rank_shard_numel`` gives the others).
    """
    from memplan.memory import fsdp2_shard
    from memplan.memory.zero import shard_degree

    cfg = ctx.cfg
    n = shard_degree(cfg)
    rows = ms.place_all(ctx, buffers)
    if n <= 1 or numel == 0:
        return rows
    padded = fsdp2_shard.padded_shard_numel(tensors, n, tp=cfg.tp, ep=cfg.ep)
    trained = {id(t) for t in tensors}
    kept = sum(ms.sharded_numel(t, cfg.tp, cfg.ep) for t in ctx.tensors if id(t) not in trained)
    kept_bytes = bits_to_bytes(kept, ctx.cfg.dtype.bits)
    out = []
    for buf, row in zip(buffers, rows, strict=True):
        if buf.shard_from is engine_states.DP_SHARDED and buf.tier is Tier.GPU:
            whole = buf.nbytes - (kept_bytes if buf.component == "weights/params" else 0)
            nbytes = ceil_div(whole * padded, numel) + (kept_bytes if buf.component == "weights/params" else 0)
            row = Row(row.component, row.tier, nbytes, row.source, row.note)
        out.append(row)
    return out


def _weight_buffers(ctx: Context, tier: Tier, shard_from: object = ms.ZeroStage.PARAMETERS) -> list[StateBuffer]:
    from memplan.memory import weights

    return [StateBuffer(r.component, r.bytes, shard_from, tier, r.source, r.note)  # type: ignore[arg-type]
            for r in weights.rows(ctx)]


def _engine_rows(ctx: Context) -> list[Row]:
    """pytorch / fsdp2 / megatron: weights in the engine's storage dtype, its state buffers, its buffers."""
    cfg = ctx.cfg
    pctx = with_dtype(ctx, engine_states.param_dtype(ctx))
    shard = engine_states.DP_SHARDED if cfg.effective_engine is Engine.FSDP2 else None
    tensors = ms.trainable_tensors(ctx)
    numel, states = ms._numel_and_states(ctx, tensors, engine_states.state_dtype(ctx))
    buffers = _weight_buffers(pctx, Tier.GPU, shard) + engine_states.state_buffers(ctx, numel=numel, states=states)
    rows = ms.place_all(ctx, buffers) if shard is None else fsdp2_place(pctx, buffers, tensors, numel)
    rows += engine_states.autocast_rows(ctx) + engine_states.fp8_rows(ctx)
    gdtype = cfg.grad_dtype or engine_states.param_dtype(ctx)
    rows += engine_buffers.rows(ctx, grad_bytes=bits_to_bytes(numel, gdtype.bits))
    return rows
