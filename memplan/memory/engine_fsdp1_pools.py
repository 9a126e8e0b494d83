"""FSDP1's per-stream pools: reserved memory the caching allocator cannot share between FSDP1's streams and its
construction (the unshard stream's pending all-gather, the construction cache, the post-backward stream's
sharded gradients).

Part of ``memory.engine_fsdp1`` (which re-exports every name); the units are ``memory.engine_fsdp1_units``.
"""

from __future__ import annotations

from memplan.config import Offload
from memplan.memory import hf_legacy
from memplan.memory.breakdown import Row, Tier
from memplan.memory.context import Context
from memplan.memory.engine_fsdp1_units import Unit, accumulating_unsharded, shard_bytes, sharded, units

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
