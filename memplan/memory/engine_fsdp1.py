"""FSDP1 (``torch.distributed.fsdp.FullyShardedDataParallel``, the flat-parameter design): the model states and
buffers of a training job, per GPU, unit by unit.

Each wrapped unit (one per transformer block, the root holding everything outside the blocks, and, when the
adapters cannot share their block's unit, each adapter) flattens its parameters into one ``FlatParameter`` of one
dtype and keeps a 1/Nd shard of it (padded to a multiple of Nd). Sources, torch 2.1-2.13 (unchanged in these
respects; read in torch 2.13.0's tree):

- torch/distributed/fsdp/_flat_param.py: ``FlatParamHandle.flatten_tensors`` (one dtype per unit,
  ``_validate_tensors_to_flatten``), ``shard``/``_get_shard`` (padded 1/Nd chunk), ``pre_unshard`` (CPU offload
  copies the shard to the GPU; mixed precision casts it to ``_mp_shard``), ``unshard`` (the padded unsharded flat
  parameter in ``param_dtype``), ``prepare_gradient_for_backward`` and ``_use_sharded_grad_views`` (with
  ``use_orig_params`` and mixed ``requires_grad`` the flat parameter requires grad and its whole gradient
  exists);
- torch/distributed/fsdp/_wrap_utils.py: mixed ``requires_grad`` in one unit is refused with
  ``use_orig_params=False`` and warned about with True ("gradient memory usage will be higher than expected");
- torch/distributed/fsdp/_runtime_utils.py: ``_post_forward_reshard`` (the root is not resharded after forward),
  ``_unshard`` with the rate limiter, ``_post_backward_hook`` (under ``no_sync`` the unsharded gradient is kept;
  else it is reduce-scattered into a 1/Nd shard, or all-reduced for NO_SHARD), ``_reduce_grad``;
- torch/distributed/fsdp/_limiter_utils.py: ``_FreeEventQueue`` (``_max_num_inflight_all_gathers = 2``);
- torch/distributed/fsdp/api.py: ``ShardingStrategy``, ``CPUOffload(offload_params=True)`` (parameters and
  gradients on the CPU, so the optimizer steps on the CPU), ``MixedPrecision`` (``reduce_dtype`` defaults to
  ``param_dtype``).

Programs: Lightning Fabric's ``FSDPStrategy`` (litgpt; ``use_orig_params=True`` by default on torch >= 2.0,
``auto_wrap_policy={Block}``, ``no_backward_sync`` during accumulation), accelerate's FSDP plugin, and
AnswerDotAI fsdp_qlora train.py (``use_orig_params=False``, each LoRA ``nn.Linear`` its own unit through a
``lambda_auto_wrap_policy``, ``limit_all_gathers=True``, bitsandbytes ``Linear4bit(quant_storage=bf16)``: the packed
4-bit weights are FSDP-managed bf16 storage, while their ``QuantState`` (absmax, code) is not a parameter and stays
whole on every rank).

The parts live in smaller modules, and every name is importable from here: ``engine_fsdp1_units`` (the units,
their dtypes, sharded and gathered bytes), ``engine_fsdp1_pools`` (the allocator's per-stream pools); this module
counts what is unsharded at once and builds the weight, gradient and optimizer-state rows.
"""

from __future__ import annotations

from memplan.arch.tensors import Tensor
from memplan.config import Engine, Job, JobConfig, Offload
from memplan.memory import optimizer as opt
from memplan.memory.breakdown import Row, Tier
from memplan.memory.context import Context
from memplan.memory.engine_fsdp1_pools import SRC_GRAD_POOL, SRC_POOLS, _grad_pool_rows, init_high_water, pool_rows
from memplan.memory.engine_fsdp1_units import (
    BNB4,
    Unit,
    _adapters,
    _gather_dtype,
    _tensor_bytes,
    accumulating_unsharded,
    shard_bytes,
    sharded,
    storage_dtype,
    units,
)

__all__ = [
    "BNB4",
    "IN_FLIGHT_LIMITED",
    "SRC",
    "SRC_GRAD",
    "SRC_GRAD_POOL",
    "SRC_LIMIT",
    "SRC_OFFLOAD",
    "SRC_POOLS",
    "SRC_QS",
    "Unit",
    "_gather_dtype",
    "_grad_pool_rows",
    "_grad_rows",
    "_tensor_bytes",
    "accumulating_unsharded",
    "gathered_bytes",
    "in_flight_shard_bytes",
    "init_high_water",
    "is_fsdp1",
    "pool_rows",
    "rows",
    "shard_bytes",
    "sharded",
    "storage_dtype",
    "trainable_tensors",
    "units",
]

SRC = "torch/distributed/fsdp/_flat_param.py, _runtime_utils.py (FSDP1 FlatParameter)"
SRC_LIMIT = "torch/distributed/fsdp/_limiter_utils.py _FreeEventQueue (2 all-gathers in flight)"
SRC_GRAD = "torch/distributed/fsdp/_runtime_utils.py _post_backward_hook, _reduce_grad (no_sync keeps it unsharded)"
SRC_QS = "bitsandbytes Params4bit.quant_state: not a parameter, so FSDP1 neither flattens nor shards it"
SRC_OFFLOAD = "torch/distributed/fsdp/api.py CPUOffload(offload_params=True); _flat_param.py _cpu_grad"
IN_FLIGHT_LIMITED = 2
"""Unsharded block units alive at once under ``limit_all_gathers``: the one computing and the one prefetched
(``BackwardPrefetch.BACKWARD_PRE``, the default; forward issues the next all-gather when the CPU reaches it),
bounded by ``_FreeEventQueue._max_num_inflight_all_gathers = 2``."""


def gathered_bytes(cfg: JobConfig, us: list[Unit]) -> int:
    """Bytes of unsharded (all-gathered) FlatParameters alive at once, per GPU.

    Formula: FULL_SHARD: root + k · (largest block unit, its adapter units included), k = 2 under
    ``limit_all_gathers`` (``IN_FLIGHT_LIMITED``), every block without it (the CPU may issue all of them); the
    root is never resharded after forward (``_post_forward_reshard``), so it stays gathered until the end of
    backward. SHARD_GRAD_OP: every unit stays gathered from its forward to its backward (all units).
    NO_SHARD or one rank: 0 (the parameters are whole already).
    """
    if not sharded(cfg):
        return 0
    root = sum(u.gathered_bytes for u in us if not u.is_block)
    per_block: dict[str, int] = {}
    for u in us:
        if u.is_block:
            key = u.name.removesuffix(" adapters")
            per_block[key] = per_block.get(key, 0) + u.gathered_bytes
    blocks = sorted(per_block.values(), reverse=True)
    if cfg.engine_config.sharding_strategy == "SHARD_GRAD_OP" or not cfg.engine_config.limit_all_gathers:
        return root + sum(blocks)
    return root + sum(blocks[:IN_FLIGHT_LIMITED])


def in_flight_shard_bytes(cfg: JobConfig, us: list[Unit]) -> int:
    """Per in-flight unit, the GPU copies of its shard that the all-gather reads: with CPU offload the shard copied
    to the GPU (``flat_param_to(device)``, storage dtype), with a mixed-precision ``param_dtype`` the low-precision
    ``_mp_shard`` (_flat_param.py ``_use_low_precision_shard``), both freed once the unit is gathered.
    Formula: Σ over the root and the two largest blocks of [offload] ceil(flat/Nd) + [mixed] ceil(gathered/Nd)."""
    offload = cfg.offload_params is not Offload.NONE
    if not sharded(cfg):
        return 0
    blocks = sorted((u for u in us if u.is_block), key=lambda u: u.gathered_bytes, reverse=True)[:IN_FLIGHT_LIMITED]
    total = 0
    for u in blocks + [u for u in us if not u.is_block]:
        total += shard_bytes(u.flat_bytes, cfg.dp) if offload else 0
        total += shard_bytes(u.gathered_bytes, cfg.dp) if u.gathered_bytes != u.flat_bytes else 0
    return total


def rows(ctx: Context) -> list[Row]:
    """Model-state rows of a training job on engine fsdp1 (pretrain, full, lora, qlora), GPU per rank and CPU
    per node; see the module docstring and the functions above for each formula."""
    cfg = ctx.cfg
    us = units(ctx)
    dp = cfg.dp if sharded(cfg) else 1
    offload = cfg.offload_params is not Offload.NONE
    host = Tier.CPU if offload else Tier.GPU
    ranks_on_host = min(cfg.dp, cfg.gpus_per_node) if offload else 1
    strategy = cfg.engine_config.sharding_strategy if cfg.dp > 1 else "one rank"
    flat = sum(shard_bytes(u.flat_bytes, dp) for u in us)
    out = [Row("weights/fsdp1_flat_params", host, flat * ranks_on_host, SRC,
               f"{len(us)} FlatParameters in {storage_dtype(ctx).value}, {strategy}" + (", CPUOffload" if offload
                                                                                         else ""))]
    replicated = sum(u.replicated_bytes for u in us)
    if replicated:
        out.append(Row("weights/quant_state", Tier.GPU, replicated, SRC_QS, "absmax/code of the 4-bit weights"))
    out.append(Row("weights/fsdp1_unsharded", Tier.GPU, gathered_bytes(cfg, us) + in_flight_shard_bytes(cfg, us),
                   SRC_LIMIT, _gather_note(cfg)))
    out += _grad_rows(ctx, us, dp=dp, host=host, ranks_on_host=ranks_on_host)
    out += _state_rows(ctx, dp=dp, host=host, ranks_on_host=ranks_on_host)
    if cfg.job in (Job.LORA, Job.QLORA):
        from memplan.memory import peft

        out += peft._dora_row(ctx)
    return [r for r in out if r.bytes or r.component == "weights/fsdp1_flat_params"]


def _gather_note(cfg: JobConfig) -> str:
    if not sharded(cfg):
        return "nothing gathered (NO_SHARD or one rank)"
    if cfg.engine_config.sharding_strategy == "SHARD_GRAD_OP":
        return "SHARD_GRAD_OP: every unit stays gathered from forward to backward"
    if not cfg.engine_config.limit_all_gathers:
        return "limit_all_gathers=False: every unit may be gathered at once"
    return "root (kept from forward to backward) + 2 largest blocks (limit_all_gathers, BACKWARD_PRE)"


def _grad_rows(ctx: Context, us: list[Unit], *, dp: int, host: Tier, ranks_on_host: int) -> list[Row]:
    """Gradients: persistent sharded flat gradients (1/Nd of every unit that requires grad, in the storage dtype;
    CPU with offload), or under ``no_sync`` accumulation every such unit's unsharded gradient on the GPU (the
    sharded ones exist only after the synchronizing micro-batch, when the unsharded ones are gone); in backward
    the unit being reduced: its unsharded gradient in ``param_dtype`` and its shard (sharded strategies only)."""
    cfg = ctx.cfg
    grads = [u for u in us if u.requires_grad]
    if not grads:
        return []
    if accumulating_unsharded(cfg):
        total = sum(u.gathered_bytes for u in grads)
        return [Row("gradients/fsdp1_no_sync", Tier.GPU, total, SRC_GRAD,
                    f"no_sync over grad_accum={cfg.grad_accum}: unsharded gradients of {len(grads)} units kept")]
    total = sum(shard_bytes(u.flat_bytes, dp) for u in grads)
    note = f"sharded gradients of {len(grads)} units" + (" (whole FlatParameters: mixed requires_grad, "
                                                           "use_orig_params=True)" if _mixed(ctx) else "")
    out = [Row("gradients/fsdp1_sharded", host, total * ranks_on_host, SRC_GRAD, note)]
    if sharded(cfg):
        big = max(grads, key=lambda u: u.gathered_bytes)
        out.append(Row("gradients/fsdp1_reduce_scatter", Tier.GPU, big.gathered_bytes + shard_bytes(big.flat_bytes, dp),
                       SRC_GRAD, f"largest unit's unsharded gradient and its shard ({big.name})"))
    return out


def _mixed(ctx: Context) -> bool:
    return ctx.cfg.job in (Job.LORA, Job.QLORA) and ctx.cfg.engine_config.use_orig_params


def trainable_tensors(ctx: Context) -> list[Tensor]:
    """What the optimizer updates: every parameter (full, pretrain) or the adapters (lora, qlora)."""
    if ctx.cfg.job in (Job.LORA, Job.QLORA):
        return _adapters(ctx, list(ctx.tensors))
    return list(ctx.tensors)


def _state_rows(ctx: Context, *, dp: int, host: Tier, ranks_on_host: int) -> list[Row]:
    """Optimizer states over the rank's shard of the trainable elements, in the sharded parameters' dtype
    (``torch.zeros_like(p)`` on the FlatParameter, or the original parameters' sharded views with
    ``use_orig_params``): fp32 masters give fp32 states. With CPUOffload the optimizer steps on the CPU."""
    cfg = ctx.cfg
    tensors = trainable_tensors(ctx)
    sdtype = cfg.lora.dtype if cfg.job in (Job.LORA, Job.QLORA) else storage_dtype(ctx)
    states = opt.state_rows(optimizer=cfg.optimizer, tensors=tensors, sdtype=sdtype)
    src = f"{cfg.optimizer.value} states on the FlatParameter shards (torch/optim)"
    return [Row(name, host, shard_bytes(nbytes, dp) * ranks_on_host, src, f"{sdtype.value}, 1/{dp}")
            for name, nbytes in states]


def is_fsdp1(ctx: Context) -> bool:
    return ctx.cfg.effective_engine is Engine.FSDP1
