"""The analytic step time of one training configuration, split the way the planner's ILP needs it.

- ``shape_seconds`` (depends on tp, pp, micro-batch, sequence): the pipelined compute of the slowest stage
  with its tensor-parallel, pipeline p2p and expert all-to-all traffic, at the GEMM efficiency of the shape;
- ``dp_comm_seconds`` (adds the ZeRO placement): data-parallel/ZeRO traffic not hidden behind compute;
- ``recompute_seconds`` (per layer and mode): the forward that recomputation repeats.

Their sum (plus offload time) is ``train_plan.step_seconds`` and ``step_time``. Seconds are floats.
Sources are in each function; the data (efficiency curves, fabrics, engine overlap) is ``perf_data``.

The parts live in smaller modules, and every name is importable from here: ``steptime_compute`` (FLOPs, peaks,
GEMM efficiency, dequantization), ``steptime_comm`` (links, tensor/pipeline/context/expert and sharded-state
traffic, overlap), ``steptime_recompute`` (what recomputation adds). This module composes them through the
pipeline schedule (micro-batches, the slowest stage) and adds the data-parallel traffic.
"""

from __future__ import annotations

from memplan.arch.parallel import arch_stage_ranges, rank_layer_indices, stage_numel
from memplan.arch.pp_schedules import V_SHAPE
from memplan.arch.tensors import Architecture
from memplan.catalog.schema import GpuSpec
from memplan.config import Engine, Job, JobConfig, ZeroStage
from memplan.memory.pp_schedule_flight import named
from memplan.planner import cost
from memplan.planner.classes import layer_classes
from memplan.planner.steptime_comm import (
    CP_DIRECTIONS,
    CP_RING_BACKWARD_VOLUME,
    EP_ALL_TO_ALLS_PER_LAYER,
    TP_COLLECTIVES_PER_LAYER,
    Links,
    cp_layer_seconds,
    cp_layer_split,
    engine_name,
    links,
    overlap,
    pipelined_fsdp2_rounds,
    sharded_comm_seconds,
    stage_comm_seconds,
    stage_ep_seconds,
)
from memplan.planner.steptime_compute import (
    ACTIVATION_BYTES,
    BACKWARD_PASSES_FROZEN,
    BACKWARD_PASSES_FULL,
    CAUSAL_TILE_SHARE,
    FORWARD_PASSES,
    _params,
    _passes,
    _tokens_micro,
    attention_forward_flops,
    attention_peak_flops,
    attention_share,
    attention_widths,
    dequant_seconds,
    efficiency,
    generation,
    head_forward_flops,
    layer_forward_flops,
    linear_forward_flops,
    peak_flops,
)
from memplan.planner.steptime_recompute import _cp_recompute_seconds as _cp_recompute_seconds
from memplan.planner.steptime_recompute import layer_recompute_modes, recompute_seconds

__all__ = [
    "ACTIVATION_BYTES",
    "BACKWARD_PASSES_FROZEN",
    "BACKWARD_PASSES_FULL",
    "CAUSAL_TILE_SHARE",
    "CP_DIRECTIONS",
    "CP_RING_BACKWARD_VOLUME",
    "EP_ALL_TO_ALLS_PER_LAYER",
    "FORWARD_PASSES",
    "TP_COLLECTIVES_PER_LAYER",
    "Links",
    "_passes",
    "_tokens_micro",
    "attention_forward_flops",
    "attention_peak_flops",
    "attention_share",
    "attention_widths",
    "cp_layer_seconds",
    "cp_layer_split",
    "dequant_seconds",
    "dp_comm_seconds",
    "efficiency",
    "engine_name",
    "ep_overlap_seconds",
    "ep_seconds",
    "generation",
    "global_batch_of",
    "head_forward_flops",
    "layer_forward_flops",
    "layer_recompute_modes",
    "linear_forward_flops",
    "links",
    "micro_batches",
    "overlap",
    "peak_flops",
    "pipelined_fsdp2_rounds",
    "recompute_seconds",
    "shape_seconds",
    "sharded_comm_seconds",
    "stage_comm_seconds",
    "stage_ep_seconds",
    "stage_micro_seconds",
    "trainable_stage_params",
]


def stage_micro_seconds(arch: Architecture, gpu: GpuSpec, cfg: JobConfig, stage: int) -> float:
    """Seconds one pipeline stage spends on one micro-batch (forward + backward): GEMMs at the shape's
    efficiency (or the HBM roofline of re-reading the weights, if slower), QLoRA dequantization, and the
    tensor-parallel, expert all-to-all and pipeline p2p traffic on its critical path."""
    spec = arch.spec
    hidden = spec.hidden_size or 0
    tokens = _tokens_micro(cfg)
    v_shape = named(cfg) in V_SHAPE  # a V schedule: rank s runs stages s and 2p − 1 − s, the head on rank 0
    layers = [arch.layers[i] for i in rank_layer_indices(arch, cfg.pp, stage, v_shape=v_shape)] if arch.layers else []
    gemm = sum(linear_forward_flops(layer, tokens) for layer in layers)
    core = attention_share(cfg) * sum(attention_forward_flops(arch, layer, cfg.seq_len, tokens) for layer in layers)
    if stage == (0 if v_shape else cfg.pp - 1):
        gemm += head_forward_flops(arch, tokens)
    if not layers:  # a model known only by its parameter count
        gemm = 2.0 * arch.active_params * tokens
    eff = efficiency(gpu, cfg, hidden)
    compute = _passes(cfg) * (gemm / peak_flops(gpu, cfg) + core / attention_peak_flops(gpu)) / (cfg.tp * eff)
    compute /= 1.0 - cfg.perf.comm_sm_fraction
    params = sum(_params(layer) for layer in layers) or arch.params
    reread = _passes(cfg) * ACTIVATION_BYTES * params / cfg.tp / (gpu.hbm_bandwidth_gbps * 1e9)
    seconds = max(compute, reread) + dequant_seconds(gpu, cfg, params // cfg.tp)
    seconds += len(layers) * cost.elementwise_seconds(
        tokens=tokens, hidden=hidden, heads=spec.num_attention_heads or 0, seq_len=cfg.seq_len, tp=cfg.tp,
        sequence_parallel=cfg.sequence_parallel, flash=cfg.attention_impl == "flash",
        hbm_bytes_per_s=gpu.hbm_bandwidth_gbps * 1e9)
    seconds += len(layers) * cp_layer_seconds(arch, gpu, cfg, core / max(1, len(layers)) / (cfg.tp * eff
                                                                                          * attention_peak_flops(gpu)))
    return seconds + stage_comm_seconds(arch, gpu, cfg, layers)


def ep_seconds(arch: Architecture, gpu: GpuSpec, cfg: JobConfig, global_batch: int) -> float:
    """Expert all-to-all time per step: the slowest stage's exposed all-to-all through the pipeline's
    (m + (p − 1)/v) slots (``cost.pipeline_seconds``), added to the compute's (an upper bound on pipelining
    both together)."""
    if cfg.ep <= 1:
        return 0.0
    m = micro_batches(cfg, global_batch)
    if cfg.engine_config.overlap_moe_expert_parallel_comm and cfg.effective_engine is Engine.MEGATRON:
        slowest = max(ep_overlap_seconds(arch, gpu, cfg, s, m) for s in _distinct_stages(arch, cfg))
    else:
        slowest = max(stage_ep_seconds(arch, gpu, cfg, s) for s in _distinct_stages(arch, cfg))
    return cost.pipeline_seconds(stage_micro_s=slowest, micro_batches=m,
                                 pp=cfg.pp, virtual_stages=cfg.perf.virtual_stages, schedule=named(cfg))


def ep_overlap_seconds(arch: Architecture, gpu: GpuSpec, cfg: JobConfig, stage: int, micro_batches: int) -> float:
    """Per micro-batch exposed expert all-to-all time of a stage under Megatron's ``overlap_moe_expert_parallel_comm``:
    the steady 1F1B steps run one micro-batch's forward with another's backward, each one's all-to-alls hidden
    behind the other's computation (megatron/core/pipeline_parallel/combined_1f1b.py; moe/README.md "Overlaps
    All-to-All with computation by merging FWD-BWD passes of adjacent microbatches"); the warm-up forwards and the
    cool-down backwards run alone, exposed as without the knob.

    Formula: f·A·(1 − o) + (1 − f)·min(A·(1 − o), max(0, A − C)), A = ``stage_ep_seconds`` unhidden, o = ``overlap``
    (what is hidden without the knob, ``perf.comm_overlap`` where given), C = ``stage_micro_seconds`` (forward +
    backward), f = W/(m·v) the unpaired share of the stage's chunk steps, W = its warm-up chunk forwards with the
    extra one (``arch.interleaved.warmup_chunk_forwards``). Assumption: a paired step hides up to the other
    micro-batch's whole compute time; the knob never exposes more than without it."""
    from memplan.arch.interleaved import warmup_chunk_forwards

    v = max(1, cfg.perf.virtual_stages)
    raw = stage_ep_seconds(arch, gpu, cfg, stage, exposed=1.0)
    group = cfg.engine_config.microbatch_group_size_per_vp_stage
    warm = warmup_chunk_forwards(cfg.pp, stage, v, micro_batches, group=group, extra=1) if cfg.pp > 1 else 1
    alone = min(1.0, warm / (micro_batches * v))
    plain = raw * (1.0 - overlap(cfg))
    return alone * plain + (1.0 - alone) * min(plain, max(0.0, raw - stage_micro_seconds(arch, gpu, cfg, stage)))


def micro_batches(cfg: JobConfig, global_batch: int) -> int:
    """Micro-batches per pipeline per step: global batch / (micro-batch · dp), at least one (dp: the replicas that
    read different sequences, ``JobConfig.batch_dp``; the cp ranks of a replica share each micro-batch)."""
    return max(1, global_batch // (cfg.micro_batch * cfg.batch_dp))


def shape_seconds(arch: Architecture, gpu: GpuSpec, cfg: JobConfig, global_batch: int) -> float:
    """Pipelined compute of one step: the slowest stage's micro-batch time through (m + (p − 1)/v) slots
    (``cost.pipeline_seconds``)."""
    slowest = max(stage_micro_seconds(arch, gpu, cfg, s) for s in _distinct_stages(arch, cfg))
    return cost.pipeline_seconds(stage_micro_s=slowest, micro_batches=micro_batches(cfg, global_batch),
                                 pp=cfg.pp, virtual_stages=cfg.perf.virtual_stages, schedule=named(cfg))


def _distinct_stages(arch: Architecture, cfg: JobConfig) -> list[int]:
    """One stage per distinct signature (first, last, the classes of its layers): alike stages take alike time.
    Every rank under a V schedule (its ranks hold two stages each)."""
    pp = cfg.pp
    if named(cfg) in V_SHAPE:
        return list(range(pp))
    classes = layer_classes(arch) if arch.layers else []
    seen: dict[tuple, int] = {}
    for s, rng in enumerate(arch_stage_ranges(arch, pp) if arch.layers else [range(0)]):
        seen.setdefault((s == 0, s == pp - 1, tuple(classes[i] for i in rng)), s)
    return list(seen.values())


def trainable_stage_params(arch: Architecture, cfg: JobConfig) -> int:
    """Trainable parameters of the largest stage on one GPU (after tp and ep): all its parameters, or the LoRA
    adapters of a LoRA/QLoRA job (``memory.peft.lora_params``, spread over the stages)."""
    if cfg.job in (Job.LORA, Job.QLORA):
        from memplan.memory.peft import lora_params

        return -(-lora_params(arch, cfg.lora) // (cfg.pp * cfg.tp))
    if not arch.layers:
        return -(-arch.params // (cfg.tp * cfg.pp))
    v_shape = named(cfg) in V_SHAPE
    return max(stage_numel(arch, cfg.pp, s, cfg.tp, cfg.ep, v_shape=v_shape) for s in _distinct_stages(arch, cfg))


def dp_comm_seconds(arch: Architecture, gpu: GpuSpec, cfg: JobConfig, global_batch: int) -> float:
    """Data-parallel/ZeRO communication per step not hidden behind compute.

    Stages 0: one gradient all-reduce; 1-2: reduce-scatter of gradients + all-gather of the updated
    16-bit parameters (the same volume); 3: per micro-batch, parameter all-gathers in the forward and the
    backward and a gradient reduce-scatter, one per layer (ZeRO, Rajbhandari et al. 2020, Sec. 7).
    Hidden: up to ``overlap`` × the compute it can run under (the last micro-batch's backward for stages
    0-2; each micro-batch's forward and backward for stage 3).
    Ranks: dp; inside a node when tp·dp ≤ GPUs per node (Megatron's rank order: tp, dp, then pp).
    fsdp2 shards like ZeRO-3 (one all-gather per micro-batch with ``reshard_after_forward=False``); hybrid
    sharding and hpZ: ``sharded_comm_seconds``.
    """
    if cfg.dp <= 1:
        return 0.0
    params = trainable_stage_params(arch, cfg)
    grad = params * cfg.gradient_dtype.bits // 8
    bw, lat = links(gpu, cfg).pick(cfg.tp * cfg.dp <= cfg.gpus_per_node)
    n_layers = max(1, len(arch.layers) // cfg.pp)
    stage = max(stage_micro_seconds(arch, gpu, cfg, s) for s in _distinct_stages(arch, cfg))
    share = overlap(cfg)
    if cfg.zero < ZeroStage.PARAMETERS and cfg.effective_engine is not Engine.FSDP2:
        comm = cost.collective_seconds(kind="all_reduce", nbytes=grad, ranks=cfg.dp, bytes_per_s=bw, latency_s=0.0)
        comm += 2 * n_layers * (cfg.dp - 1) * lat  # one bucket per layer
        return max(0.0, comm - share * stage * BACKWARD_PASSES_FULL / (FORWARD_PASSES + BACKWARD_PASSES_FULL))
    return sharded_comm_seconds(gpu, cfg, params=params, grad=grad, layers=n_layers, hidden=share * stage,
                                micro=micro_batches(cfg, global_batch))


def global_batch_of(cfg: JobConfig) -> int:
    """Sequences per step: micro-batch × gradient accumulation × data-parallel replicas (``batch_dp``)."""
    return cfg.micro_batch * cfg.grad_accum * cfg.batch_dp
