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
"""

from __future__ import annotations

from dataclasses import dataclass

from memplan.arch.tensors import Tensor
from memplan.config import Engine, Job, JobConfig, Offload
from memplan.dtypes import Dtype
from memplan.memory import hf_legacy
from memplan.memory import optimizer as opt
from memplan.memory.breakdown import Row, Tier
from memplan.memory.context import Context
from memplan.units import bits_to_bytes, ceil_div

SRC = "torch/distributed/fsdp/_flat_param.py, _runtime_utils.py (FSDP1 FlatParameter)"
SRC_LIMIT = "torch/distributed/fsdp/_limiter_utils.py _FreeEventQueue (2 all-gathers in flight)"
SRC_GRAD = "torch/distributed/fsdp/_runtime_utils.py _post_backward_hook, _reduce_grad (no_sync keeps it unsharded)"
SRC_QS = "bitsandbytes Params4bit.quant_state: not a parameter, so FSDP1 neither flattens nor shards it"
SRC_OFFLOAD = "torch/distributed/fsdp/api.py CPUOffload(offload_params=True); _flat_param.py _cpu_grad"
BNB4 = ("nf4", "nf4-dq", "fp4", "fp4-dq")
IN_FLIGHT_LIMITED = 2
"""Unsharded block units alive at once under ``limit_all_gathers``: the one computing and the one prefetched
(``BackwardPrefetch.BACKWARD_PRE``, the default; forward issues the next all-gather when the CPU reaches it),
bounded by ``_FreeEventQueue._max_num_inflight_all_gathers = 2``."""


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


SRC_POOLS = ("c10/cuda/CUDACachingAllocator.cpp get_free_block (a cached block is reused only by its own stream); "
             "FSDP1 all-gathers into buffers of its _unshard_stream (_runtime_utils.py _unshard); construction: "
             "_init_utils.py _move_module_to_device, _flat_param.py flatten_tensors (torch.cat) and _get_shard (clone)")


def init_high_water(ctx: Context, us: list[Unit]) -> int:
    """Bytes the default stream holds at the end of FSDP1's construction, one unit at a time (post-order, so the
    largest unit, the root, last): the GPU-resident shards and replicated states, plus the largest unit moved to
    the GPU (U), its ``torch.cat`` into a FlatParameter (U) and the shard cloned from it (U/Nd).

    Formula: Σ GPU shards + replicated + buffers + 2·U_max + ceil(U_max/Nd) (NO_SHARD: no clone); buffers: the
    model's non-persistent buffers FSDP moves with the modules (``memory.hf_legacy``, older transformers).
    Source: torch/distributed/fsdp/_init_utils.py ``_move_module_to_device`` (with ``device_id``),
    _flat_param.py ``flatten_tensors`` and ``_get_shard``; fsdp_qlora benchmarks_03_2024.md reports 3.72 GiB
    reserved after wrapping a 7B QLoRA (``reserved_after_model_wrap``).
    Assumptions: the model is on the CPU or the meta device before wrapping (fsdp_qlora low_memory, Lightning's
    empty_init, accelerate's cpu_ram_efficient_loading); a model already on the GPU holds more.
    """
    cfg = ctx.cfg
    dp = cfg.dp if sharded(cfg) else 1
    on_gpu = 0 if cfg.offload_params is not Offload.NONE else sum(shard_bytes(u.flat_bytes, dp) for u in us)
    largest = max((u.flat_bytes for u in us), default=0)
    clone = shard_bytes(largest, dp) if sharded(cfg) else 0
    buffers = hf_legacy.rope_cache_bytes(ctx.arch.spec, cfg) + hf_legacy.mask_buffer_bytes(ctx.arch.spec, cfg)
    return on_gpu + sum(u.replicated_bytes for u in us) + buffers + 2 * largest + clone


def pool_rows(ctx: Context, *, allocated_peak: int, gathered: int) -> list[Row]:
    """Reserved memory the caching allocator cannot share between FSDP1's streams and its construction.

    Formula: P + max(0, W − (A − g)), with A the allocated peak, g the gathered bytes at it (the unshard stream's
    blocks), W ``init_high_water`` (the default stream's cache after construction, reused by the step's
    default-stream tensors only), P one block unit whose free event is still pending when the next block is
    gathered (FULL_SHARD under ``limit_all_gathers``: 0 otherwise, every unit is counted in g already).
    Source: ``SRC_POOLS``. Counted only with the allocator reserve (``allocator_reserve_pct`` > 0): it is
    reserved memory, never allocated to a tensor.
    """
    from memplan.memory.runtime import settings

    cfg = ctx.cfg
    if settings(ctx.gpu, cfg).reserve_pct <= 0:
        return []
    us = units(ctx)
    pending = 0
    if sharded(cfg) and cfg.engine_config.sharding_strategy == "FULL_SHARD" and cfg.engine_config.limit_all_gathers:
        pending = max((u.gathered_bytes for u in us if u.is_block and not u.name.endswith("adapters")), default=0)
    init = init_high_water(ctx, us)
    nbytes = pending + max(0, init - (allocated_peak - gathered))
    return [Row("runtime/fsdp1_stream_pools", Tier.GPU, nbytes, SRC_POOLS,
                f"pending all-gather buffer {pending} + construction cache above the step's default stream "
                f"({init} at wrap)"), *_grad_pool_rows(ctx, us)]


SRC_GRAD_POOL = ("torch/distributed/fsdp/_runtime_utils.py _post_backward_hook (under _post_backward_stream), "
                 "_reduce_grad (new_sharded_grad), _accumulate_sharded_grad; c10/cuda/CUDACachingAllocator.cpp "
                 "get_free_block (per-stream pools)")


def _grad_pool_rows(ctx: Context, us: list[Unit]) -> list[Row]:
    """The post-backward stream's cached sharded gradients, free while forward and the start of backward run.

    Formula: ``allocator_segments.stream_pool_bytes`` over ceil(flat/Nd) of every unit that requires grad; a row of
    forward and backward_start only (in backward and the step the same bytes are the gradients, allocated).
    Source: ``SRC_GRAD_POOL``: each shard is allocated on ``_post_backward_stream`` and kept as the gradient until
    ``zero_grad(set_to_none=True)`` frees it into that stream's pool. Sharded strategies without CPU offload
    (``_offload_grad`` drops the GPU shard at once) and without ``no_sync`` accumulation (its gradients are the
    compute stream's).
    """
    from memplan.memory.allocator_segments import stream_pool_bytes

    cfg = ctx.cfg
    if not sharded(cfg) or cfg.offload_params is not Offload.NONE or accumulating_unsharded(cfg):
        return []
    shards = [shard_bytes(u.flat_bytes, cfg.dp) for u in us if u.requires_grad]
    return [Row("runtime/fsdp1_grad_stream_pool", Tier.GPU, stream_pool_bytes(shards), SRC_GRAD_POOL,
                f"{len(shards)} sharded gradients' blocks cached on the post-backward stream")] if shards else []
