"""Model states of a training job: weights, gradients, fp32 master copy and optimizer states,
placed on GPU/CPU/NVMe and partitioned by ZeRO, under an explicit accounting convention.

Conventions (``JobConfig.accounting``):
- ``paper``: ZeRO's Fig. 1 accounting: 16-bit parameters and gradients plus K bytes/param of
  optimizer state (fp32 master copy + states). Nothing else.
- ``deepspeed``: what DeepSpeed allocates, following its estimator
  (``deepspeed.runtime.zero.stage_1_and_2.estimate_zero2_model_states_mem_needs`` and
  ``stage3.estimate_zero3_model_states_mem_needs``): adds the fp32 gradient partition the
  optimizer step reads (the "20 bytes/param" of ZeRO-Infinity Sec. 3), keeps 16-bit
  gradients unpartitioned in stage 1-2 (reduce buckets), replaces stage 3's 16-bit gradient
  partition by live buffers of the largest layer, and on the CPU counts the per-process fp32
  copy made while loading the model and a 1.5x buffer factor. Each is a visible row.
"""

from __future__ import annotations

from memplan.arch.parallel import sharded_numel
from memplan.config import Accounting, Offload, ZeroStage
from memplan.dtypes import Dtype
from memplan.memory import optimizer as opt
from memplan.memory.breakdown import Row, Tier
from memplan.memory.context import Context
from memplan.memory.zero import OFFLOAD_TIER, StateBuffer, place
from memplan.units import bits_to_bytes, ceil_div

DS_ESTIMATOR = "DeepSpeed ZeRO memory estimator (estimate_zero2/zero3_model_states_mem_needs)"
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


def trainable_tensors(ctx: Context) -> list:
    """Tensors of the reported stage that receive gradients and optimizer states."""
    return [t for t in ctx.tensors if not t.name.endswith(NOT_TRAINED)]


def trainable_numel(ctx: Context) -> int:
    """Trainable parameter elements on one GPU of the reported stage (after tp/ep division)."""
    return sum(sharded_numel(t, ctx.cfg.tp, ctx.cfg.ep) for t in trainable_tensors(ctx))


def largest_layer_numel(ctx: Context) -> int:
    """Elements of the largest module gathered at once by ZeRO-3, per tensor-parallel rank."""
    return ceil_div(ctx.arch.largest_layer_params, ctx.cfg.tp)


def state_buffers(ctx: Context, *, numel: int) -> list[StateBuffer]:
    """Gradients, master copy and optimizer states for ``numel`` trainable elements per GPU."""
    cfg = ctx.cfg
    ds = cfg.accounting is Accounting.DEEPSPEED
    opt_tier = OFFLOAD_TIER[cfg.offload_optimizer]
    master = cfg.uses_master_weights
    sdtype = opt.state_dtype(optimizer=cfg.optimizer, weight_dtype=cfg.dtype, master_weights=master)
    out: list[StateBuffer] = []
    grad_bytes = bits_to_bytes(numel, cfg.gradient_dtype.bits)
    if not ds:
        tier = Tier.GPU if cfg.offload_optimizer is Offload.NONE else opt_tier
        out.append(StateBuffer("gradients", grad_bytes, ZeroStage.GRADIENTS, tier, PAPER))
    elif cfg.zero < ZeroStage.PARAMETERS and cfg.offload_optimizer is Offload.NONE:
        out.append(StateBuffer("gradients", grad_bytes, None, Tier.GPU, DS_ESTIMATOR,
                               "16-bit gradients in reduce buckets, not partitioned by the estimator"))
    if master:
        out.append(StateBuffer("optimizer/master_fp32", bits_to_bytes(numel, FP32_BITS), ZeroStage.OPTIMIZER,
                               opt_tier, PAPER))
    if ds and master:
        out.append(StateBuffer("gradients/fp32_partition", bits_to_bytes(numel, FP32_BITS), ZeroStage.OPTIMIZER,
                               opt_tier, DS_ESTIMATOR + "; ZeRO-Infinity Sec. 3 (20 bytes/param)"))
    tensors = trainable_tensors(ctx)
    for name, nbytes in opt.state_rows(optimizer=cfg.optimizer, tensors=tensors, sdtype=sdtype):
        scaled = _scale_to_shard(nbytes, numel, tensors)
        out.append(StateBuffer(name, scaled, ZeroStage.OPTIMIZER, opt_tier,
                               f"{cfg.optimizer.value} states ({sdtype.value}); see memplan explain optimizer"))
    return out


def _scale_to_shard(nbytes: int, numel: int, tensors: list) -> int:
    """Scale state bytes computed on whole tensors to the tp/ep-sharded element count, rounding up."""
    full = sum(t.numel for t in tensors)
    if full == 0 or full == numel:
        return nbytes
    return ceil_div(nbytes * numel, full)


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
    return [
        Row("weights/zero3_live_params", Tier.GPU, bits_to_bytes(live, bits), DS_ESTIMATOR),
        Row("gradients/zero3_live_grads", Tier.GPU, bits_to_bytes(live, bits), DS_ESTIMATOR),
    ]


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
        part = ceil_div(numel, cfg.dp)
        per = DS_OPT_SWAP_BUFFERS * bits_to_bytes(min(DS_SUB_GROUP_ELEMS, part), FP32_BITS)
        rows.append(Row("optimizer/nvme_swap_buffers", Tier.CPU, per * g,
                        "DeepSpeed offload_optimizer buffer_count × sub_group_size (fp32)"))
    return rows


def place_all(ctx: Context, buffers: list[StateBuffer]) -> list[Row]:
    cfg = ctx.cfg
    return [place(b, zero=cfg.zero, dp=cfg.dp, gpus_per_node=cfg.gpus_per_node) for b in buffers]
