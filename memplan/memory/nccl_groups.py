"""Which NCCL communicators each training engine creates on one GPU, and the ``runtime/nccl_communicators`` row.

A group of one rank creates no connection; a group used by no operation of the step creates no communicator
(PyTorch ProcessGroupNCCL initializes lazily, per group, at its first collective or send/recv). The groups:

- ``pytorch`` (DDP): the data-parallel group (torch/nn/parallel/distributed.py: the default group's all-reduce).
- ``fsdp1``/``fsdp2``: the shard group (all-gather, reduce-scatter); with HSDP (``hsdp_shard_size``) also the
  replicate group's all-reduce (torch/distributed/fsdp/_fully_shard/_fsdp_collectives.py ``foreach_reduce``).
- ``deepspeed``: the data-parallel group (deepspeed/utils/groups.py ``_get_data_parallel_group``: without an mpu a
  clone of the world group, ``_clone_world_group``, so the default group is one more communicator of the same
  ranks: ``_default_group``); MiCS adds its
  shard and replicate groups (runtime/zero/mics.py), ZeRO++ hpZ its secondary-partition group (groups.py
  ``_get_zero_param_intra_parallel_group``); pipeline stages talk through a two-rank group per neighbour
  (runtime/pipe/p2p.py, ``_grid.p2p_groups``).
- ``megatron``: parallel_state.py's groups that a step uses: tensor (``_TENSOR_MODEL_PARALLEL_GROUP``), data ×
  context (``_DATA_PARALLEL_GROUP_WITH_CP``: gradients and the distributed optimizer), context, expert and
  expert-data, model-parallel (tensor × pipeline: clip_grads.py's norm all-reduce), the embedding group of the
  first and last stage (``_EMBEDDING_GROUP``: tied-embedding gradient all-reduce), pipeline neighbours
  (p2p_communication.py ``batch_isend_irecv`` on ``_PIPELINE_MODEL_PARALLEL_GROUP``; under the interleaved schedule
  the first and last ranks are neighbours too, chunk c + 1 starting on rank 0 where chunk c ended on rank p − 1).
Tensor, context and expert groups and pipeline neighbours exist in every engine that runs them.
The default (world) group gets a communicator of its own wherever it is not already the engine's data-parallel
group (``_default_group``): DeepSpeed's data-parallel group is a clone of it, Megatron's groups are all
``new_group``s, and fsdp2 on a 2-D or deeper mesh uses the mesh's subgroups; each of them still runs a collective
on the default group (the engine's own, or the trainer's barrier), so the world communicator is counted beside them.
Expert parallelism's all-to-all connects each GPU to every other rank of the expert group (issue #1685).
"""

from __future__ import annotations

from memplan.config import Engine
from memplan.errors import MemplanError
from memplan.memory import nccl
from memplan.memory.breakdown import Row, Tier
from memplan.memory.context import Context

COMPONENT = "runtime/nccl_communicators"


def settings(ctx: Context) -> nccl.NcclSettings:
    """The NCCL environment of the job: ``EngineConfig.nccl_*`` (NCCL's env names), else NCCL's defaults."""
    ec = ctx.cfg.engine_config
    return nccl.NcclSettings(
        buffsize=ec.nccl_buffsize if ec.nccl_buffsize is not None else nccl.DEFAULT_BUFFSIZE,
        max_nchannels=ec.nccl_max_nchannels if ec.nccl_max_nchannels is not None else nccl.DEFAULT_CHANNELS,
        nvls_enable=ec.nccl_nvls_enable,
        nvls_chunksize=ec.nccl_nvls_chunksize if ec.nccl_nvls_chunksize is not None else nccl.NVLS_CHUNKSIZE)


def _local(ctx: Context, stride: int, ranks: int) -> int:
    """Ranks of a group with rank stride ``stride`` that share one node: min(ranks, max(1, gpus_per_node // stride)).
    Rank order as Megatron's default ``order="tp-cp-ep-dp-pp"`` (parallel_state.py RankGenerator) and torch's
    DeviceMesh (outer dimensions first, tensor innermost)."""
    return min(ranks, max(1, ctx.cfg.gpus_per_node // stride))


def _dp_groups(ctx: Context) -> list[tuple[str, int, int]]:
    """The data-parallel collective groups: (name, ranks, ranks on this node)."""
    cfg, ec, engine = ctx.cfg, ctx.cfg.engine_config, ctx.cfg.effective_engine
    dp, tp = cfg.dp, cfg.tp
    shard = None
    if engine in (Engine.FSDP1, Engine.FSDP2) and ec.hsdp_shard_size:
        shard = ec.hsdp_shard_size
    elif engine is Engine.DEEPSPEED and ec.mics_shard_size:
        shard = ec.mics_shard_size
    if shard is not None and 1 < shard < dp:
        out = [("shard", shard, _local(ctx, tp, shard)), ("replicate", dp // shard, _local(ctx, tp * shard, dp // shard))]
    else:
        out = [("data-parallel", dp, _local(ctx, tp, dp))]
    if engine is Engine.DEEPSPEED and ec.zero_hpz_partition_size > 1:
        out.append(("hpZ secondary", ec.zero_hpz_partition_size, _local(ctx, tp, ec.zero_hpz_partition_size)))
    return out


def _default_group(ctx: Context) -> list[tuple[str, int, int]]:
    """The default (world) group as (name, ranks, ranks on this node), where it is a communicator beyond the
    engine's own groups; empty where it is one of them or no collective runs on it.

    - ``pytorch`` (DDP, ``process_group=None``) and fsdp1/fsdp2 whose only data-parallel group spans the world: that
      group is the default group (torch/distributed/device_mesh.py ``_init_one_process_group``: a mesh dimension of
      world size returns ``_get_default_group()``), counted once as the data-parallel group.
    - ``deepspeed``: always. Its data-parallel group is ``dist.new_group(ranks=range(world_size))``
      (deepspeed/utils/groups.py ``_clone_world_group``), a second communicator of the same ranks; ZeRO-3 barriers on
      the default group while it builds the optimizer (runtime/zero/stage3.py ``_setup_for_real_optimizer``,
      ``_create_fp16_partitions_with_defragmentation``: ``dist.barrier()``); at ZeRO 0-2 the engine does so in
      ``save_checkpoint`` (runtime/engine.py) and the pipeline engine in ``eval_batch`` (runtime/pipe/engine.py),
      and the HF Trainer/accelerate ``wait_for_everyone`` (``torch.distributed.barrier()``) runs around the step:
      counted always (a job that never checkpoints nor barriers does not create it, so this can over-count there).
    - ``megatron``: always. parallel_state.py makes every group with ``new_group`` (the data-parallel one too, even
      at dp = world), and megatron/training/training.py all-reduces the start time on the default group
      (``start_time_tensor``) and barriers in ``print_datetime`` and checkpointing.
    - fsdp1/fsdp2 on a 2-D or deeper mesh (HSDP, tp/pp/cp > 1): the shard and replicate groups are subgroups
      (``new_group``/``split_group``); the default group's communicator exists once a collective runs on it: torchtitan
      binds ``device_id`` in ``init_process_group`` (eager NCCL init, the subgroups ``ncclCommSplit`` from it, whose
      buffers are not shared without NCCL_COMM_SPLIT_SHARE_RESOURCES), and HF Trainer/accelerate barrier on it.
    Assumption: a barrier connects the full ring/tree/NVLS set like any collective (``memory.nccl``'s convention).
    """
    cfg, engine = ctx.cfg, ctx.cfg.effective_engine
    world = cfg.world_size
    if world <= 1:
        return []
    data_groups = _dp_groups(ctx)
    if engine in (Engine.PYTORCH, Engine.FSDP1, Engine.FSDP2) and any(ranks == world for _, ranks, _ in data_groups):
        return []
    return [("world (default group)", world, _local(ctx, 1, world))]


def communicators(ctx: Context) -> tuple[list[tuple[str, int, int]], list[tuple[str, int, bool]]]:
    """(collective groups as (name, ranks, ranks on this node), point-to-point peer sets as (name, peers, whether
    the communicator spans nodes)) of the reported stage's GPU, groups of one rank left out."""
    cfg, engine = ctx.cfg, ctx.cfg.effective_engine
    tp, dp, pp = cfg.tp, cfg.dp, cfg.pp
    groups = [*_dp_groups(ctx), *_default_group(ctx), ("tensor", tp, _local(ctx, 1, tp)),
              ("context", cfg.cp, _local(ctx, tp, cfg.cp))]
    if cfg.ep > 1:
        groups.append(("expert-data", dp // cfg.ep, _local(ctx, tp * cfg.ep, dp // cfg.ep)))
    pp_local = _local(ctx, tp * dp, pp)
    if engine is Engine.MEGATRON:
        groups.append(("model-parallel", tp * pp, _local(ctx, 1, tp) * pp_local))
        if pp > 1 and ctx.stage in (0, pp - 1):
            groups.append(("embedding", 2, 2 if pp_local == pp else 1))
    p2p = [("expert all-to-all", cfg.ep - 1, _local(ctx, tp, cfg.ep) < cfg.ep)]
    if pp > 1:  # interleaved (v > 1): chunk c's last stage (rank p − 1) feeds chunk c + 1's first (rank 0), so the
        # end ranks have two neighbours too (Megatron p2p_communication.py, torch ScheduleInterleaved1F1B's looped stages)
        # a V-shaped schedule (ZBVZeroBubble, DualPipeV) turns at both ends: rank 0 talks to rank 1 only, rank p − 1
        # runs stages p − 1 and p itself (torch pipelining's "V-schedule special case": no send between them)
        ends = ctx.stage in (0, pp - 1) and (cfg.perf.virtual_stages <= 1 or ctx.v_shape)
        p2p.append(("pipeline neighbours", 1 if pp == 2 or ends else 2, pp_local < pp))
    return [g for g in groups if g[1] > 1], [p for p in p2p if p[1] > 0]


def nccl_bytes(ctx: Context) -> tuple[int, str]:
    """Bytes of every NCCL communicator on the reported GPU, and a note naming them.

    Formula: Σ over collective groups (ring/tree ``nccl.collective_bytes`` + ``nccl.nvls_bytes`` with the group's
    ranks on this node, ``_local``) + Σ over peer sets ``nccl.p2p_bytes``.
    Source: ``memory.nccl`` (NCCL's source constants); the engines' groups as in this module's docstring.
    """
    s = settings(ctx)
    groups, p2p = communicators(ctx)
    total, parts = 0, []
    for name, ranks, local in groups:
        b = nccl.collective_bytes(ranks, local < ranks, s) + nccl.nvls_bytes(local, ctx.gpu.name, s)
        total += b
        parts.append(f"{name} ({ranks} ranks) {b}")
    for name, peers, spans_nodes in p2p:
        b = nccl.p2p_bytes(peers, spans_nodes, s)
        total += b
        parts.append(f"{name} ({peers} peers) {b}")
    return total, "; ".join(parts)


def check(ctx: Context) -> None:
    """NVLS knobs on a GPU without NVLink SHARP move no byte: an error naming why (engines.rules checks the rest)."""
    ec = ctx.cfg.engine_config
    nvls_set = ec.nccl_nvls_enable != 2 or ec.nccl_nvls_chunksize is not None
    if ec.nccl_nvls_enable == 0 and ec.nccl_nvls_chunksize is not None:
        raise MemplanError("NCCL_NVLS_CHUNKSIZE sizes NVLink SHARP buffers, which NCCL_NVLS_ENABLE=0 turns off: drop "
                           "--nccl-nvls-chunksize or --nccl-nvls-enable 0.")
    if nvls_set and ctx.gpu.name not in nccl.NVLS_GPUS and ctx.cfg.world_size > 1:
        raise MemplanError(f"NCCL_NVLS_ENABLE/NCCL_NVLS_CHUNKSIZE act on GPUs joined by an NVSwitch with multicast "
                           f"({', '.join(sorted(nccl.NVLS_GPUS))}); {ctx.gpu.name} has no NVLink SHARP: drop "
                           "--nccl-nvls-enable/--nccl-nvls-chunksize.")


def rows(ctx: Context) -> list[Row]:
    """The ``runtime/nccl_communicators`` row of a multi-GPU training job; none for one GPU or a serving engine
    (vLLM and SGLang carry their own measured non-torch rows). CPU measurements run gloo: ``measure.compare``
    lists the row among the runtime rows it leaves out (``RUNTIME_ROWS``)."""
    cfg = ctx.cfg
    check(ctx)
    if not cfg.job.trains or cfg.world_size <= 1 or cfg.effective_engine not in TRAINING_ENGINES:
        return []
    total, note = nccl_bytes(ctx)
    if not total:
        return []
    s = settings(ctx)
    knobs = (f"NCCL_BUFFSIZE {s.buffsize}, NCCL_MAX_NCHANNELS {s.max_nchannels}, NCCL_NVLS_ENABLE {s.nvls_enable}, "
             f"NCCL_NVLS_CHUNKSIZE {s.nvls_chunksize}")
    return [Row(COMPONENT, Tier.GPU, total, nccl.SOURCE, f"{note} ({knobs}; engine_config.nccl_*)")]


TRAINING_ENGINES = (Engine.PYTORCH, Engine.FSDP1, Engine.FSDP2, Engine.DEEPSPEED, Engine.MEGATRON)
