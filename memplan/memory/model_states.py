"""Model states of a training job: weights, gradients, fp32 master copy and optimizer states,
placed on GPU/CPU/NVMe and partitioned by ZeRO, under an explicit accounting convention.

Conventions (``JobConfig.accounting``):
- ``paper``: ZeRO's Fig. 1 accounting: 16-bit parameters and gradients plus K bytes/param of
  optimizer state (fp32 master copy + states). Nothing else.
- ``deepspeed``: what DeepSpeed allocates, following its estimator
  (``deepspeed.runtime.zero.stage_1_and_2.estimate_zero2_model_states_mem_needs`` and
  ``stage3.estimate_zero3_model_states_mem_needs``): adds the fp32 gradient partition the
  optimizer step reads (the "20 bytes/param" of ZeRO-Infinity Sec. 3), keeps 16-bit
  gradients whole in stage 0-1 and partitioned in stage 2 (2Ψ + 18Ψ/N, the estimator since DeepSpeed
  PR 5099; 4Ψ + 16Ψ/N before it), replaces stage 3's 16-bit gradient
  partition by live buffers of the largest layer, and on the CPU counts the per-process fp32
  copy made while loading the model and a 1.5x buffer factor. Each is a visible row.

Partial optimizer offload (``JobConfig.optimizer_gpu_layers``, DeepSpeed ZeRO-3 ``offload_optimizer.ratio``)
splits the trainable tensors into a set whose optimizer-side states stay on the GPU and a set offloaded to
the CPU (``optimizer_sets``); each set's buffers are built and partitioned as the single set is without it,
so a component can appear once per tier. ``layer_optimizer_bytes`` and ``offloaded_fraction`` serve the planner.
"""

from __future__ import annotations

from collections.abc import Iterable

from memplan.arch.parallel import sharded_numel
from memplan.arch.tensors import Tensor
from memplan.config import Accounting, Offload, ZeroStage
from memplan.dtypes import Dtype
from memplan.memory import optimizer as opt
from memplan.memory.breakdown import Row, Tier
from memplan.memory.context import Context
from memplan.memory.zero import OFFLOAD_TIER, StateBuffer, hpz_secondary_bytes, largest_layer_numel, place, shard_degree
from memplan.units import bits_to_bytes, ceil_div

DS_ESTIMATOR = "DeepSpeed ZeRO memory estimator (estimate_zero2/zero3_model_states_mem_needs)"
DS_ESTIMATOR_12 = ("DeepSpeed deepspeed/runtime/zero/stage_1_and_2.py estimate_zero2_model_states_mem_needs: "
                   "2Ψ + 18Ψ/N (16-bit gradients partitioned in ZeRO-2, DeepSpeed PR 5099)")
DS_CPU_BUFFER_FACTOR_PCT = 50
"""DeepSpeed's estimator multiplies CPU memory by ``additional_buffer_factor=1.5``: +50%."""
DS_PARAM_SWAP_BUFFERS = 5
DS_PARAM_SWAP_BUFFER_ELEMS = 100_000_000
"""ZeRO-Infinity parameter offload to NVMe: ``offload_param.buffer_count=5`` pinned buffers of
``buffer_size=1e8`` elements each (DeepSpeed config docs, defaults)."""
DS_OPT_SWAP_BUFFERS = 4
DS_SUB_GROUP_ELEMS = 1_000_000_000
"""ZeRO-Infinity optimizer offload to NVMe: ``offload_optimizer.buffer_count=4`` pinned fp32
buffers of one sub-group (``sub_group_size=1e9`` elements) each (DeepSpeed config docs, defaults)."""
FP32_BITS = Dtype.FP32.bits
PAPER = "ZeRO (Rajbhandari et al. 2020) Sec. 3.1, Fig. 1"


NOT_TRAINED = ("e_score_correction_bias",)
"""Tensors resident with the weights but updated without gradients: DeepSeek-V3's router bias is a
buffer in transformers (``register_buffer``), adjusted by a load-balancing rule, not by the optimizer."""


def trained(tensors: Iterable[Tensor]) -> list[Tensor]:
    """The tensors among ``tensors`` that receive gradients and optimizer states."""
    return [t for t in tensors if not t.name.endswith(NOT_TRAINED)]


def trainable_tensors(ctx: Context) -> list[Tensor]:
    """Tensors of the reported stage that receive gradients and optimizer states."""
    return trained(ctx.tensors)


_NUMEL: dict[tuple, tuple[object, int]] = {}


def trainable_numel(ctx: Context) -> int:
    """Trainable parameter elements on one GPU of the reported stage (after tp/ep division); memoized per
    (architecture object, pp, stage, tp, ep), the only inputs, as the planner asks for it under many choices."""
    cfg = ctx.cfg
    key = (id(ctx.arch), cfg.pp, ctx.stage, cfg.tp, cfg.ep)
    hit = _NUMEL.get(key)
    if hit is not None and hit[0] is ctx.arch:
        return hit[1]
    numel = sum(sharded_numel(t, cfg.tp, cfg.ep) for t in trainable_tensors(ctx))
    if len(_NUMEL) >= _SETS_LIMIT:
        _NUMEL.clear()
    _NUMEL[key] = (ctx.arch, numel)
    return numel


def state_buffers(ctx: Context) -> list[StateBuffer]:
    """Gradients, master copy and optimizer states of the stage's trainable tensors, set by set.

    One set (today's ZeRO-Offload) unless ``optimizer_gpu_layers`` splits the tensors into a set kept
    on the GPU and a set offloaded to the CPU (``optimizer_sets``); each set's buffers carry its tier.
    """
    out: list[StateBuffer] = []
    split = ctx.cfg.optimizer_gpu_layers is not None
    for tier, tensors in optimizer_sets(ctx):
        note = _split_note(ctx, tier) if split else ""
        out += set_buffers(ctx, tensors=tensors, opt_tier=tier, note=note)
    return out


def set_buffers(ctx: Context, *, tensors: list[Tensor], opt_tier: Tier, note: str = "") -> list[StateBuffer]:
    """Gradients, master copy and optimizer states for ``tensors`` (trainable), their optimizer-side
    states on ``opt_tier``, before ZeRO partitioning.

    Formula (per GPU, n = the tensors' elements after tp/ep division): paper: gradients
    n·bits(grad)/8 on ``opt_tier`` (ZeRO-Offload moves them with the optimizer); deepspeed: 16-bit
    gradients only in stage 0-2 without offload (partitioned from stage 2); master fp32 4·n and (deepspeed) the fp32 gradient
    partition 4·n; optimizer states summed per tensor (``optimizer.state_rows``) and scaled to n.
    Source: ZeRO Fig. 1; ZeRO-Offload Sec. 4; DeepSpeed's estimator (module docstring).
    Assumptions: ``_scale_to_shard`` rounds once per call, i.e. once per set of tensors.
    """
    cfg = ctx.cfg
    ds = cfg.accounting is Accounting.DEEPSPEED
    master = cfg.uses_master_weights
    sdtype = opt.state_dtype(optimizer=cfg.optimizer, weight_dtype=cfg.dtype, master_weights=master)
    numel, states = _numel_and_states(ctx, tensors, sdtype)
    out: list[StateBuffer] = []
    grad_bytes = bits_to_bytes(numel, cfg.gradient_dtype.bits)
    if not ds:
        out.append(StateBuffer("gradients", grad_bytes, ZeroStage.GRADIENTS, opt_tier, PAPER, note))
    elif cfg.zero < ZeroStage.PARAMETERS and cfg.offload_optimizer is Offload.NONE:
        part = "partitioned (ZeRO-2)" if cfg.zero >= ZeroStage.GRADIENTS else "whole on every rank"
        out.append(StateBuffer("gradients", grad_bytes, ZeroStage.GRADIENTS, Tier.GPU, DS_ESTIMATOR_12,
                               f"16-bit gradients, {part}"))
    if master:
        out.append(StateBuffer("optimizer/master_fp32", bits_to_bytes(numel, FP32_BITS), ZeroStage.OPTIMIZER,
                               opt_tier, PAPER, note))
    if ds and master:
        out.append(StateBuffer("gradients/fp32_partition", bits_to_bytes(numel, FP32_BITS), ZeroStage.OPTIMIZER,
                               opt_tier, DS_ESTIMATOR + "; ZeRO-Infinity Sec. 3 (20 bytes/param)", note))
    for name, scaled in states:
        out.append(StateBuffer(name, scaled, ZeroStage.OPTIMIZER, opt_tier,
                               f"{cfg.optimizer.value} states ({sdtype.value}); see memplan explain optimizer", note))
    return out


_SETS: dict[tuple, tuple[object, int, list[tuple[str, int]]]] = {}
_SETS_LIMIT = 4096


def _numel_and_states(ctx: Context, tensors: list[Tensor], sdtype: Dtype) -> tuple[int, list[tuple[str, int]]]:
    """(elements per GPU, optimizer state rows scaled to them) of a set of tensors, memoized: the planner
    evaluates the same tensors under many ZeRO stages and offload choices. Keyed by the tensors' identity
    within their architecture object, which is kept with the entry and compared by identity."""
    cfg = ctx.cfg
    key = (id(ctx.arch), tuple(map(id, tensors)), cfg.tp, cfg.ep, cfg.optimizer, sdtype)
    hit = _SETS.get(key)
    if hit is not None and hit[0] is ctx.arch:
        return hit[1], hit[2]
    numel = sum(sharded_numel(t, cfg.tp, cfg.ep) for t in tensors)
    states = [(name, _scale_to_shard(nbytes, numel, tensors))
              for name, nbytes in opt.state_rows(optimizer=cfg.optimizer, tensors=tensors, sdtype=sdtype)]
    if len(_SETS) >= _SETS_LIMIT:
        _SETS.clear()
    _SETS[key] = (ctx.arch, numel, states)
    return numel, states


def _scale_to_shard(nbytes: int, numel: int, tensors: list) -> int:
    """Scale state bytes computed on whole tensors to the tp/ep-sharded element count, rounding up."""
    full = sum(t.numel for t in tensors)
    if full == 0 or full == numel:
        return nbytes
    return ceil_div(nbytes * numel, full)


def optimizer_sets(ctx: Context) -> list[tuple[Tier, list[Tensor]]]:
    """The stage's trainable tensors grouped by the tier of their optimizer-side states, non-empty sets only.

    ``optimizer_gpu_layers`` None: one set on ``offload_optimizer``'s tier (all of them, as ZeRO-Offload).
    N: GPU = the tensors before the blocks (embeddings) and layers 0..N-1; CPU = layers N..L-1 and the
    tensors after the blocks (final norm, lm_head, ``extra`` modules such as MTP). So N ≥ L offloads only
    the post-block tensors and N = 0 keeps only the pre-block tensors on the GPU. Layer indices are global.
    Source: DeepSpeed ``runtime/zero/stage3.py`` (``offload_optimizer.ratio``): sub-groups in parameter order,
    ``i >= int((1 - ratio) · num_sub_groups)`` go to CPU Adam, the first ones stay with GPU Adam.
    """
    cfg = ctx.cfg
    tier = OFFLOAD_TIER[cfg.offload_optimizer]
    n = cfg.optimizer_gpu_layers
    if n is None:
        return [(tier, trainable_tensors(ctx))]
    kept = list(ctx.arch.pre) if ctx.stage == 0 else []
    offloaded: list[Tensor] = []
    for i, layer in ctx.layers:
        (kept if i < n else offloaded).extend(layer.tensors)
    if ctx.holds_output:
        offloaded += list(ctx.arch.post) + list(ctx.arch.extra)
    sets = [(Tier.GPU, trained(kept)), (tier, trained(offloaded))]
    return [(t, tensors) for t, tensors in sets if tensors]


def _split_note(ctx: Context, tier: Tier) -> str:
    """Which tensors a partial-offload row holds, in words."""
    n, layers = ctx.cfg.optimizer_gpu_layers, len(ctx.arch.layers)
    assert n is not None, "only called for a split (optimizer_gpu_layers set)"
    if tier is Tier.GPU:
        span = f" and layers 0-{min(n, layers) - 1}" if n else ""
        return f"partial offload: pre-block tensors{span} (GPU optimizer)"
    span = f"layers {n}-{layers - 1} and " if n < layers else ""
    return f"partial offload: {span}post-block tensors (CPU optimizer)"


def tensors_optimizer_bytes(ctx: Context, tensors: list[Tensor]) -> tuple[int, int]:
    """(bytes per GPU when kept on the GPU, bytes per node when offloaded to the CPU) of the
    optimizer-side states of ``tensors`` under the ctx's config, partitioned by ZeRO.

    Formula: gpu = Σ over ``set_buffers`` of partitioned bytes; cpu = gpu · g (g = gpus_per_node: each
    of the node's processes holds its partition in CPU RAM, as ``zero.place``), without DeepSpeed's 1.5
    buffer factor (``deepspeed_cpu_rows`` applies it to the CPU total).
    Source: ``zero.place``; ``set_buffers``. Assumptions: the ctx's ZeRO stage (DeepSpeed splits only at 3).
    """
    cfg = ctx.cfg
    tensors = trained(tensors)
    if not tensors:
        return 0, 0
    gpu = sum(place(b, zero=cfg.zero, dp=shard_degree(cfg), gpus_per_node=cfg.gpus_per_node).bytes
              for b in set_buffers(ctx, tensors=tensors, opt_tier=Tier.GPU))
    cpu = sum(place(b, zero=cfg.zero, dp=shard_degree(cfg), gpus_per_node=cfg.gpus_per_node).bytes
              for b in set_buffers(ctx, tensors=tensors, opt_tier=Tier.CPU))
    return gpu, cpu


def layer_optimizer_bytes(ctx: Context, layer_index: int) -> tuple[int, int]:
    """(bytes per GPU, bytes per node on the CPU) that layer ``layer_index``'s (global index)
    optimizer-side states add when kept on the GPU / offloaded: the planner's per-layer choice.

    Formula: ``tensors_optimizer_bytes`` of the layer's tensors (paper: gradients, master copy, states;
    deepspeed: master copy, fp32 gradient partition, states). Summed over layers it matches the set totals
    of ``state_buffers`` up to rounding: each partition (ceil over dp) rounds up once per call, here per
    layer, there per set (at most one byte per buffer and layer more here); with tp/ep > 1, per-tensor
    optimizers (8-bit, Adafactor) are scaled to the shard per set (``_scale_to_shard``), which can differ
    either way by a few hundred bytes (GPT-2 at tp 2). Exact when dp divides every buffer and tp = ep = 1.
    Source: DeepSpeed ``stage3.py`` partial offload (see ``optimizer_sets``).
    """
    return tensors_optimizer_bytes(ctx, list(ctx.arch.layers[layer_index].tensors))


def offloaded_fraction(ctx: Context) -> float:
    """DeepSpeed's ``offload_optimizer.ratio`` equivalent of the config: offloaded / all trainable params.

    Formula: (P − P_pre − Σ_{i<N} P_i) / P over the whole model's trainable tensors (unsharded);
    1.0 when ``optimizer_gpu_layers`` is None and the optimizer is offloaded, 0.0 without offload.
    Source: DeepSpeed ``runtime/zero/offload_config.py`` (``ratio``, ZeRO-3 only) and ``stage3.py``.
    Assumptions: DeepSpeed splits whole sub-groups (``sub_group_size``, default 1e9 elements per rank's
    partition), so the real split is coarser than one layer unless sub_group_size is set to about one
    layer's partition; with ratio r and k sub-groups the first int((1 − r)·k) stay on the GPU. That
    truncation can fall one sub-group short of the parameter fraction (Llama-3.1-8B, N = 16, one-layer
    sub-groups: r = 0.50000026, int(0.49999974 · 34) = 16 of the intended 17): to keep exactly g leading
    sub-groups on the GPU use r = (k − g − ½)/k. DeepSpeed pairs the split only with DeepSpeedCPUAdam.
    """
    cfg, arch = ctx.cfg, ctx.arch
    total = sum(t.numel for t in trained(arch.all_tensors()))
    if cfg.offload_optimizer is Offload.NONE or total == 0:
        return 0.0
    n = cfg.optimizer_gpu_layers
    if n is None:
        return 1.0
    kept = sum(t.numel for t in trained(arch.pre))
    kept += sum(t.numel for layer in arch.layers[:n] for t in trained(layer.tensors))
    return (total - kept) / total


def weight_buffer(ctx: Context, *, weight_bytes: int, component: str = "weights") -> StateBuffer:
    """The model's weights as a state buffer: partitioned by ZeRO-3, placed by parameter offload."""
    tier = OFFLOAD_TIER[ctx.cfg.offload_params]
    return StateBuffer(component, weight_bytes, ZeroStage.PARAMETERS, tier,
                       "weights per GPU; ZeRO-3 partitions, ZeRO-Infinity offloads them")


def deepspeed_gpu_buffers(ctx: Context) -> list[Row]:
    """ZeRO-3's live buffers: the largest layer's 16-bit parameters and gradients, gathered.

    Formula: 2·LL + 2·LL bytes (the estimator's ``largest_layer_memory = 4 * largest_layer_params``).
    Source: DeepSpeed ``estimate_zero3_model_states_mem_needs``.
    """
    if ctx.cfg.accounting is not Accounting.DEEPSPEED or ctx.cfg.zero < ZeroStage.PARAMETERS:
        return []
    live = largest_layer_numel(ctx)
    bits = ctx.cfg.dtype.bits
    rows = [
        Row("weights/zero3_live_params", Tier.GPU, bits_to_bytes(live, bits), DS_ESTIMATOR),
        Row("gradients/zero3_live_grads", Tier.GPU, bits_to_bytes(live, bits), DS_ESTIMATOR),
    ]
    hpz = ctx.cfg.engine_config.zero_hpz_partition_size
    if hpz > 1:
        param_bytes = bits_to_bytes(trainable_numel(ctx), bits)
        rows.append(Row("weights/zero_hpz_secondary", Tier.GPU, hpz_secondary_bytes(param_bytes=param_bytes, hpz=hpz),
                        "DeepSpeed ZeRO++ hpZ (zero_hpz_partition_size; partition_parameters.py ds_secondary_tensor); "
                        "arXiv:2306.10209 Sec. 3.2", f"16-bit parameters partitioned over {hpz} ranks (a node)"))
    return rows


def deepspeed_cpu_rows(ctx: Context, *, numel: int, steady_cpu: int) -> list[Row]:
    """CPU memory DeepSpeed needs beyond the steady state: model load and the buffer factor.

    Formula: load = 4·P·g (each of the node's g processes builds an fp32 copy) or, with ZeRO-3
    ``zero_init``, 4·LL·g (one layer at a time); excess = max(0, load − steady);
    buffer = 50% · (steady + excess).
    Source: DeepSpeed ``estimate_zero2/zero3_model_states_mem_needs`` (``additional_buffer_factor=1.5``).
    """
    cfg = ctx.cfg
    if cfg.accounting is not Accounting.DEEPSPEED or not cfg.job.trains:
        return []
    g = cfg.gpus_per_node
    if cfg.zero >= ZeroStage.PARAMETERS and cfg.zero_init:
        load = bits_to_bytes(largest_layer_numel(ctx), FP32_BITS) * g
    else:
        load = bits_to_bytes(numel, FP32_BITS) * g
    excess = max(0, load - steady_cpu)
    rows = [Row("runtime/model_load_fp32", Tier.CPU, excess, DS_ESTIMATOR,
                "CPU peak while loading the model, beyond the steady state")]
    buffer = ceil_div((steady_cpu + excess) * DS_CPU_BUFFER_FACTOR_PCT, 100)
    rows.append(Row("runtime/cpu_buffer", Tier.CPU, buffer, DS_ESTIMATOR + " additional_buffer_factor=1.5"))
    return rows


def nvme_swap_rows(ctx: Context, *, numel: int) -> list[Row]:
    """Pinned CPU buffers that ZeRO-Infinity stages NVMe traffic through, per node.

    Formula: params: 5 × 1e8 elements × bits(dtype)/8 per process; optimizer: 4 ×
    min(sub_group_size, partition) × 4 bytes per process.
    Source: DeepSpeed config docs (offload_param / offload_optimizer buffer_count, buffer_size,
    sub_group_size defaults); Rajbhandari et al. 2021, ZeRO-Infinity Sec. 6.
    """
    cfg = ctx.cfg
    g = cfg.gpus_per_node
    rows = []
    if cfg.offload_params is Offload.NVME:
        per = DS_PARAM_SWAP_BUFFERS * bits_to_bytes(DS_PARAM_SWAP_BUFFER_ELEMS, cfg.dtype.bits)
        rows.append(Row("weights/nvme_swap_buffers", Tier.CPU, per * g, "DeepSpeed offload_param buffer_count × buffer_size"))
    if cfg.offload_optimizer is Offload.NVME:
        part = ceil_div(numel, shard_degree(cfg))
        per = DS_OPT_SWAP_BUFFERS * bits_to_bytes(min(DS_SUB_GROUP_ELEMS, part), FP32_BITS)
        rows.append(Row("optimizer/nvme_swap_buffers", Tier.CPU, per * g,
                        "DeepSpeed offload_optimizer buffer_count × sub_group_size (fp32)"))
    return rows


def place_all(ctx: Context, buffers: list[StateBuffer]) -> list[Row]:
    cfg = ctx.cfg
    return [place(b, zero=cfg.zero, dp=shard_degree(cfg), gpus_per_node=cfg.gpus_per_node) for b in buffers]
