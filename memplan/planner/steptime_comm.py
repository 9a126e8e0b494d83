"""The communication side of the step-time model: the fabric's links, and the tensor-parallel, pipeline p2p,
context-parallel, expert all-to-all and sharded-state (ZeRO-3, fsdp2) traffic left exposed behind compute.

Part of ``planner.steptime`` (which re-exports every name). Seconds are floats.
"""

from __future__ import annotations

from dataclasses import dataclass

from memplan.arch.parallel import arch_stage_ranges
from memplan.arch.tensors import Architecture, Layer
from memplan.catalog.schema import GpuSpec
from memplan.config import CpComm, Engine, JobConfig, Offload, ZeroStage
from memplan.dtypes import Dtype
from memplan.errors import MemplanError
from memplan.planner import cost, perf_data
from memplan.planner.steptime_compute import (
    ACTIVATION_BYTES,
    BACKWARD_PASSES_FULL,
    FORWARD_PASSES,
    _tokens_micro,
    generation,
)

TP_COLLECTIVES_PER_LAYER = 4
"""Megatron: two all-reduces in the forward, two in the backward per layer (Shoeybi et al. 2019, Fig. 4);
with sequence parallelism a reduce-scatter + all-gather pair each, same volume (Korthikanti et al. 2022)."""
EP_ALL_TO_ALLS_PER_LAYER = 4
"""MoE: dispatch and combine in the forward and again in the backward (Lepikhin et al. 2020, GShard)."""


@dataclass(frozen=True)
class Links:
    """Bus bandwidth (bytes/s) and per-hop latency (s) inside a node and across nodes."""

    intra_bw: float
    intra_lat: float
    inter_bw: float
    inter_lat: float

    def pick(self, inside_node: bool) -> tuple[float, float]:
        return (self.intra_bw, self.intra_lat) if inside_node else (self.inter_bw, self.inter_lat)


def links(gpu: GpuSpec, cfg: JobConfig) -> Links:
    """The fabric of the job: the preset (``cfg.perf.cluster`` or the GPU's default) with overrides."""
    perf = cfg.perf
    name = perf.cluster or ("h800" if "h800" in gpu.name.lower() else perf_data.GENERATION_FABRIC[generation(gpu)])
    fabric = perf_data.FABRICS.get(name)
    if fabric is None:
        raise MemplanError(f"unknown cluster type {name!r}; choose one of {', '.join(perf_data.FABRICS)}.")
    intra = (fabric.intra_gbps or gpu.interconnect_gbps) * fabric.intra_efficiency
    inter = fabric.inter_gbps * fabric.inter_efficiency
    intra = perf.intra_node_gbps or intra
    inter = perf.inter_node_gbps or min(inter, intra)
    lat_in = fabric.intra_latency_us if perf.intra_node_latency_us is None else perf.intra_node_latency_us
    lat_out = fabric.inter_latency_us if perf.inter_node_latency_us is None else perf.inter_node_latency_us
    return Links(intra * 1e9, lat_in * 1e-6, inter * 1e9, lat_out * 1e-6)


CP_RING_BACKWARD_VOLUME = 2
"""The ring backward passes each KV block and its gradient dKV (TransformerEngine: ``p2p_comm_buffers`` of
[2, *kv.shape]; torch: ``next_kv`` and ``next_grad_kv``): twice the forward's bytes."""
CP_DIRECTIONS = 2
"""Forward and backward: Ulysses exchanges twice per attention in each: q, k, v before it and the output after
(forward); the output's gradient before and dq, dk, dv after (backward) (Jacobs et al. 2023, arXiv:2309.14509,
Sec. 3.1)."""


def cp_layer_seconds(arch: Architecture, gpu: GpuSpec, cfg: JobConfig, core_s: float) -> float:
    """Context-parallel traffic of one layer and micro-batch, forward + backward (``cp_layer_split``)."""
    return sum(cp_layer_split(arch, gpu, cfg, core_s))


def cp_layer_split(arch: Architecture, gpu: GpuSpec, cfg: JobConfig, core_s: float) -> tuple[float, float]:
    """Context-parallel traffic of one layer and micro-batch not hidden behind its attention: (forward, backward).

    ``core_s``: the layer's attention-core forward seconds on this rank (the backward takes twice as long).
    - ring: cp − 1 sends of the local KV block per direction, each overlapped with one of the cp attention steps:
      (cp − 1)·max(0, t_send − core/cp) forward, the same with twice the bytes and compute backward
      (Liu et al. 2023, Ring Attention, arXiv:2310.01889, Sec. 3; TransformerEngine ``AttnFuncWithCPAndKVP2P``);
    - allgather: one all-gather of K/V forward, an all-gather and a reduce-scatter of dK/dV backward, all exposed
      (TransformerEngine ``AttnFuncWithCPAndKVAllGather`` gathers before its attention steps and reduce-scatters
      after them; Llama 3, Dubey et al. 2024, Sec. 3.3.2: "the all-gather communication latency is exposed");
    - ulysses: per direction an all-to-all of the local q, k, v chunks and one of the output chunk
      (``context_parallel.chunk``; ``CP_DIRECTIONS``), on the critical path.
    Ranks: the cp group after tp (Megatron's order tp, cp, dp, pp): inside a node when tp·cp ≤ GPUs per node.
    """
    if cfg.cp <= 1:
        return 0.0, 0.0
    from memplan.memory.context_parallel import chunk

    c = chunk(arch.spec, cfg)
    bw, lat = links(gpu, cfg).pick(cfg.tp * cfg.cp <= cfg.gpus_per_node)
    if cfg.cp_comm is CpComm.RING:
        send = cost.collective_seconds(kind="p2p", nbytes=c.kv, ranks=2, bytes_per_s=bw, latency_s=lat)
        step = core_s / cfg.cp
        return (cfg.cp - 1) * max(0.0, send - step), (cfg.cp - 1) * max(0.0, CP_RING_BACKWARD_VOLUME * (send - step))
    if cfg.cp_comm is CpComm.ALLGATHER:
        gather = cost.collective_seconds(kind="all_gather", nbytes=cfg.cp * c.kv, ranks=cfg.cp, bytes_per_s=bw,
                                         latency_s=lat)
        scatter = cost.collective_seconds(kind="reduce_scatter", nbytes=cfg.cp * c.kv, ranks=cfg.cp, bytes_per_s=bw,
                                          latency_s=lat)
        return gather, gather + scatter
    a2a = sum(cost.collective_seconds(kind="all_to_all", nbytes=n, ranks=cfg.cp, bytes_per_s=bw, latency_s=lat)
              for n in (c.q + c.kv, c.out))
    return a2a, a2a


def stage_comm_seconds(arch: Architecture, gpu: GpuSpec, cfg: JobConfig, layers: list[Layer]) -> float:
    """Per micro-batch communication on a stage's critical path: tensor-parallel collectives (inside a node)
    and pipeline p2p sends (Narayanan et al. 2021, Sec. 4.1: the
    scatter/gather optimisation sends 1/tp of the activation; interleaving sends v times as often)."""
    link = links(gpu, cfg)
    hidden = arch.spec.hidden_size or 0
    nbytes = _tokens_micro(cfg) * hidden * ACTIVATION_BYTES
    bw, lat = link.pick(True)
    seconds = TP_COLLECTIVES_PER_LAYER * len(layers) * cost.collective_seconds(
        kind="all_reduce", nbytes=nbytes, ranks=cfg.tp, bytes_per_s=bw, latency_s=lat)
    if cfg.pp > 1:
        bw, lat = link.pick(cfg.tp * cfg.pp <= cfg.gpus_per_node)
        send = cost.collective_seconds(kind="p2p", nbytes=nbytes / cfg.tp, ranks=2, bytes_per_s=bw, latency_s=lat)
        seconds += 2 * cfg.perf.virtual_stages * send
    return seconds


def stage_ep_seconds(arch: Architecture, gpu: GpuSpec, cfg: JobConfig, stage: int, *,
                     exposed: float | None = None) -> float:
    """Per micro-batch expert all-to-all time of one stage not hidden behind compute: four all-to-alls per MoE
    layer (``EP_ALL_TO_ALLS_PER_LAYER``) of micro-batch tokens × top-k × hidden in 16-bit over ep ranks,
    inside a node when ep·tp ≤ GPUs per node, times ``exposed`` (default 1 − overlap)."""
    if cfg.ep <= 1 or not arch.layers:
        return 0.0
    moe = [arch.layers[i] for i in arch_stage_ranges(arch, cfg.pp)[stage] if arch.layers[i].moe]
    if not moe:
        return 0.0
    topk = max(layer.experts_per_token for layer in moe)
    nbytes = _tokens_micro(cfg) * (arch.spec.hidden_size or 0) * ACTIVATION_BYTES * topk / cfg.tp
    bw, lat = links(gpu, cfg).pick(cfg.ep * cfg.tp <= cfg.gpus_per_node)
    a2a = cost.collective_seconds(kind="all_to_all", nbytes=nbytes, ranks=cfg.ep, bytes_per_s=bw, latency_s=lat)
    share = 1.0 - overlap(cfg) if exposed is None else exposed
    return share * EP_ALL_TO_ALLS_PER_LAYER * len(moe) * a2a


def engine_name(cfg: JobConfig) -> str:
    """The engine whose overlap applies: the job's, else DeepSpeed for ZeRO/offload jobs, else PyTorch."""
    if cfg.engine is not None:
        return cfg.engine.value
    if cfg.zero > ZeroStage.NONE or cfg.offload_optimizer is not Offload.NONE:
        return Engine.DEEPSPEED.value
    return perf_data.DEFAULT_ENGINE_FOR_OVERLAP


def overlap(cfg: JobConfig) -> float:
    """Share of data-parallel communication hidden behind compute: ``perf.comm_overlap`` or the engine's."""
    if cfg.perf.comm_overlap is not None:
        return cfg.perf.comm_overlap
    table = perf_data.ENGINE_OVERLAP.get(engine_name(cfg), perf_data.ENGINE_OVERLAP["pytorch"])
    return table[int(cfg.zero)]


def sharded_comm_seconds(gpu: GpuSpec, cfg: JobConfig, *, params: int, grad: int, layers: int, hidden: float,
                         micro: int) -> float:
    """Exposed traffic per step of sharded states (ZeRO-3, fsdp2) over ``micro`` micro-batches, each hiding up to
    ``hidden`` seconds behind compute (``planner.shard_comm`` has the formulas and sources).

    Links: the whole data-parallel group inside a node when tp·dp ≤ GPUs per node; a shard (or hpZ) group of S ranks
    inside a node when tp·S ≤ GPUs per node; the replicas' all-reduce on the whole group's link. The MiCS all-reduce
    runs once per step, after the last backward, hiding up to its backward share (as the stage 0 all-reduce).
    """
    from memplan.memory.zero import shard_degree
    from memplan.planner import shard_comm

    link, gpn = links(gpu, cfg), cfg.gpus_per_node
    weights, dp, shard = params * ACTIVATION_BYTES, cfg.dp, shard_degree(cfg)
    hpz = cfg.engine_config.zero_hpz_partition_size
    whole = shard_comm.Link(*link.pick(cfg.tp * dp <= gpn))
    fsdp2 = cfg.effective_engine is Engine.FSDP2
    gathers = 1 if fsdp2 and not cfg.engine_config.reshard_after_forward else 2
    if fsdp2 and gathers == 1 and cfg.pp > 1:
        micro = pipelined_fsdp2_rounds()
    if fsdp2 and cfg.uses_master_weights:  # MixedPrecisionPolicy(reduce_dtype=fp32): gradients reduce in fp32
        grad = params * Dtype.FP32.bits // 8
    if hpz > 1:
        per = shard_comm.hpz_micro_seconds(weights=weights, grads=grad, dp=dp, hpz=hpz, layers=layers, dp_link=whole,
                                           hpz_link=shard_comm.Link(*link.pick(cfg.tp * hpz <= gpn)))
        return micro * max(0.0, per - hidden)
    if shard < dp:
        per, reduce = shard_comm.hybrid_seconds(weights=weights, grads=grad, dp=dp, shard=shard, gathers=gathers,
                                                layers=layers, shard_link=shard_comm.Link(*link.pick(cfg.tp * shard <= gpn)),
                                                replica_link=whole)
        if fsdp2:
            return micro * max(0.0, per + reduce - hidden)
        tail = max(0.0, reduce - hidden * BACKWARD_PASSES_FULL / (FORWARD_PASSES + BACKWARD_PASSES_FULL))
        return micro * max(0.0, per - hidden) + tail
    per = shard_comm.full_shard_micro_seconds(weights=weights, grads=grad, dp=dp, gathers=gathers, layers=layers,
                                              link=whole)
    return micro * max(0.0, per - hidden)


def pipelined_fsdp2_rounds() -> int:
    """Rounds of sharded-state traffic per step of FSDP2 under ``torch.distributed.pipelining`` with
    ``reshard_after_forward=False``: 1. The stage runs every backward but the last with
    ``set_requires_gradient_sync(False)`` and ``set_reshard_after_backward(False)`` (pipelining/stage.py
    ``backward_maybe_with_nosync``), so its units, gathered by the step's first forward, stay gathered across the
    micro-batches and their gradients are reduce-scattered once, after the last backward: one all-gather and one
    reduce-scatter per step, hidden behind one micro-batch's compute as ``sharded_comm_seconds`` counts it."""
    return 1
