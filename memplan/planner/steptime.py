"""The analytic step time of one training configuration, split the way the planner's ILP needs it.

- ``shape_seconds`` (depends on tp, pp, micro-batch, sequence): the pipelined compute of the slowest stage
  with its tensor-parallel, pipeline p2p and expert all-to-all traffic, at the GEMM efficiency of the shape;
- ``dp_comm_seconds`` (adds the ZeRO placement): data-parallel/ZeRO traffic not hidden behind compute;
- ``recompute_seconds`` (per layer and mode): the forward that recomputation repeats.

Their sum (plus offload time) is ``train_plan.step_seconds`` and ``step_time``. Seconds are floats.
Sources are in each function; the data (efficiency curves, fabrics, engine overlap) is ``perf_data``.
"""

from __future__ import annotations

from dataclasses import dataclass

from memplan.arch.parallel import arch_stage_ranges, stage_numel
from memplan.arch.tensors import Architecture, Layer
from memplan.catalog.schema import GpuSpec
from memplan.config import CpComm, Engine, Job, JobConfig, Offload, Recompute, ZeroStage
from memplan.dtypes import Dtype
from memplan.errors import MemplanError
from memplan.memory import megatron_recompute
from memplan.planner import cost, perf_data
from memplan.planner.classes import layer_classes

FORWARD_PASSES = 1
BACKWARD_PASSES_FULL = 2
"""A backward pass costs two forwards: activation gradients and weight gradients (Kaplan et al. 2020)."""
BACKWARD_PASSES_FROZEN = 1
"""LoRA/QLoRA: a frozen base needs the activation gradients only (no weight-gradient GEMMs)."""
TP_COLLECTIVES_PER_LAYER = 4
"""Megatron: two all-reduces in the forward, two in the backward per layer (Shoeybi et al. 2019, Fig. 4);
with sequence parallelism a reduce-scatter + all-gather pair each, same volume (Korthikanti et al. 2022)."""
EP_ALL_TO_ALLS_PER_LAYER = 4
"""MoE: dispatch and combine in the forward and again in the backward (Lepikhin et al. 2020, GShard)."""
ACTIVATION_BYTES = 2
"""Activations and gradients exchanged in 16-bit."""


@dataclass(frozen=True)
class Links:
    """Bus bandwidth (bytes/s) and per-hop latency (s) inside a node and across nodes."""

    intra_bw: float
    intra_lat: float
    inter_bw: float
    inter_lat: float

    def pick(self, inside_node: bool) -> tuple[float, float]:
        return (self.intra_bw, self.intra_lat) if inside_node else (self.inter_bw, self.inter_lat)


def generation(gpu: GpuSpec) -> str:
    """The GPU generation of a catalog GPU, by name prefix (``perf_data.GPU_GENERATION``)."""
    names = (gpu.name.lower(), *(a.lower() for a in gpu.aliases))
    for prefix, gen in perf_data.GPU_GENERATION:
        if any(n.startswith(prefix) for n in names):
            return gen
    return perf_data.DEFAULT_GENERATION


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


def peak_flops(gpu: GpuSpec, cfg: JobConfig) -> float:
    """Dense peak FLOP/s of the job's GEMMs: the fp8 peak for fp8 GEMMs (``perf.fp8`` or ``dtype: fp8``) on a
    GPU that has one, else the bf16/fp16 peak (GPU datasheets, ``catalog/gpus``)."""
    fp8 = cfg.perf.fp8 or cfg.dtype is Dtype.FP8
    if fp8 and gpu.fp8_dense_tflops:
        return gpu.fp8_dense_tflops * 1e12
    return gpu.bf16_dense_tflops * 1e12


def attention_peak_flops(gpu: GpuSpec) -> float:
    """Peak FLOP/s of the attention core: the 16-bit peak even in fp8 training (TransformerEngine runs
    dot-product attention in bf16 unless fp8 attention is asked for: ``fp8_dpa=False`` in
    transformer_engine/common/recipe; DeepSeek-V3 keeps attention in bf16, Sec. 3.3.1)."""
    return gpu.bf16_dense_tflops * 1e12


def efficiency(gpu: GpuSpec, cfg: JobConfig, hidden: int) -> float:
    """The GEMM efficiency of the job's shape (``cost.gemm_efficiency``), or ``perf.mfu`` when given."""
    if cfg.perf.mfu is not None:
        return cfg.perf.mfu
    curve = perf_data.GEMM_CURVES[generation(gpu)]
    return cost.gemm_efficiency(curve=curve, width=max(1, hidden) / cfg.tp, tokens=_tokens_micro(cfg))


def attention_widths(arch: Architecture) -> tuple[int, int]:
    """(query-key width, value width) summed over heads: N·H each, MLA: N·(d_nope + d_rope) and N·d_v."""
    spec = arch.spec
    heads = spec.num_attention_heads or 0
    if spec.is_mla:
        return heads * ((spec.qk_nope_head_dim or 0) + (spec.qk_rope_head_dim or 0)), heads * (spec.v_head_dim or 0)
    return heads * spec.dim_per_head, heads * spec.dim_per_head


def layer_forward_flops(arch: Architecture, layer: Layer, seq_len: int, tokens: int) -> float:
    """Forward FLOPs of one layer over ``tokens`` tokens of sequences of ``seq_len``: GEMMs + attention core.

    Formula: (2·N_active + 2·S'·(d_qk + d_v)) · tokens, S' = min(S, window) on sliding layers.
    Source: Narayanan et al. 2021, Eq. 3 (24·B·s·h² + 4·B·s²·h per layer: 2 FLOPs per weight per token and
    the two s×s attention products); MoE layers count the top-k experts (Layer.active_params).
    Assumption: causal masking's halving of the attention products is not credited (the slower side).
    """
    return linear_forward_flops(layer, tokens) + attention_forward_flops(arch, layer, seq_len, tokens)


_ACTIVE: dict[int, tuple[Layer, int]] = {}


def _active_params(layer: Layer) -> int:
    """``layer.active_params``, memoized (a sum over its tensors the planner asks for thousands of times); the
    entry keeps the layer and is compared by identity, so a recycled ``id`` never answers for another."""
    return _memo(_ACTIVE, layer, "active_params")


_PARAMS: dict[int, tuple[Layer, int]] = {}


def _memo(cache: dict[int, tuple[Layer, int]], layer: Layer, attr: str) -> int:
    """``getattr(layer, attr)`` kept in ``cache`` by the layer's id; the entry keeps the layer and is compared by
    identity, so a recycled ``id`` never answers for another (cleared when it reaches 65,536 entries)."""
    hit = cache.get(id(layer))
    if hit is not None and hit[0] is layer:
        return hit[1]
    if len(cache) >= 65536:
        cache.clear()
    value: int = getattr(layer, attr)
    cache[id(layer)] = (layer, value)
    return value


def _params(layer: Layer) -> int:
    """``layer.params``, memoized like ``_active_params`` (each stage's weight re-read sums it per plan row)."""
    return _memo(_PARAMS, layer, "params")


def linear_forward_flops(layer: Layer, tokens: int) -> float:
    """Forward FLOPs of a layer's weight GEMMs: 2·N_active per token (Kaplan et al. 2020, Table 1)."""
    return 2.0 * _active_params(layer) * tokens


def attention_forward_flops(arch: Architecture, layer: Layer, seq_len: int, tokens: int) -> float:
    """Forward FLOPs of the attention core (QKᵀ and attention × V): 2·S'·(d_qk + d_v) per token."""
    d_qk, d_v = attention_widths(arch)
    span = min(seq_len, arch.spec.sliding_window) if layer.sliding and arch.spec.sliding_window else seq_len
    return 2.0 * span * (d_qk + d_v) * tokens


def head_forward_flops(arch: Architecture, tokens: int) -> float:
    """Forward FLOPs after the blocks: the output layer, 2·V·D per token (the tied embedding's matrix when
    tied), plus modules in ``extra`` that train with the model (DeepSeek-V3's multi-token prediction block:
    2 FLOPs per active parameter per token; DeepSeek-AI 2024, Sec. 2.2)."""
    spec = arch.spec
    flops = 2.0 * (spec.vocab_size or 0) * (spec.hidden_size or 0) * tokens
    topk = spec.num_experts_per_tok or 0
    active = sum(t.numel_each * min(topk, t.copies) if t.routed else t.numel for t in arch.extra)
    return flops + 2.0 * active * tokens


def _passes(cfg: JobConfig) -> int:
    frozen = cfg.job in (Job.LORA, Job.QLORA)
    return FORWARD_PASSES + (BACKWARD_PASSES_FROZEN if frozen else BACKWARD_PASSES_FULL)


def _tokens_micro(cfg: JobConfig) -> int:
    """Tokens of one micro-batch on one rank: b·s, or b·s/cp with context parallelism."""
    return cfg.micro_batch * cfg.seq_len // cfg.cp


CAUSAL_TILE_SHARE = 0.5
"""Share of the s×s attention products a load-balanced context-parallel attention computes for a causal mask:
TransformerEngine ``AttnFuncWithCPAndKVP2P`` runs, per rank, one causal diagonal tile and cp − 1 half tiles
(``lower-triangle``: the first half of KV; ``upper-triangle``: the second half of Q), torch ``context_parallel``
the same (``_templated_ring_attention``: ``key.chunk(2)[0]`` / ``query.chunk(2)[1]``); Ulysses runs a causal flash
kernel over the whole sequence, which skips the masked blocks (Dao 2023, FlashAttention-2, Sec. 3.1.1)."""


def attention_share(cfg: JobConfig) -> float:
    """Share of the attention products counted by ``attention_forward_flops`` that the job computes: the causal
    half with context parallelism (``CAUSAL_TILE_SHARE``); 1 otherwise (memplan's calibration at cp = 1 does not
    credit causal masking, the slower side)."""
    return CAUSAL_TILE_SHARE if cfg.cp > 1 else 1.0


def stage_micro_seconds(arch: Architecture, gpu: GpuSpec, cfg: JobConfig, stage: int) -> float:
    """Seconds one pipeline stage spends on one micro-batch (forward + backward): GEMMs at the shape's
    efficiency (or the HBM roofline of re-reading the weights, if slower), QLoRA dequantization, and the
    tensor-parallel, expert all-to-all and pipeline p2p traffic on its critical path."""
    spec = arch.spec
    hidden = spec.hidden_size or 0
    tokens = _tokens_micro(cfg)
    layers = [arch.layers[i] for i in arch_stage_ranges(arch, cfg.pp)[stage]] if arch.layers else []
    gemm = sum(linear_forward_flops(layer, tokens) for layer in layers)
    core = attention_share(cfg) * sum(attention_forward_flops(arch, layer, cfg.seq_len, tokens) for layer in layers)
    if stage == cfg.pp - 1:
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


def stage_ep_seconds(arch: Architecture, gpu: GpuSpec, cfg: JobConfig, stage: int) -> float:
    """Per micro-batch expert all-to-all time of one stage not hidden behind compute: four all-to-alls per MoE
    layer (``EP_ALL_TO_ALLS_PER_LAYER``) of micro-batch tokens × top-k × hidden in 16-bit over ep ranks,
    inside a node when ep·tp ≤ GPUs per node, times (1 − overlap)."""
    if cfg.ep <= 1 or not arch.layers:
        return 0.0
    moe = [arch.layers[i] for i in arch_stage_ranges(arch, cfg.pp)[stage] if arch.layers[i].moe]
    if not moe:
        return 0.0
    topk = max(layer.experts_per_token for layer in moe)
    nbytes = _tokens_micro(cfg) * (arch.spec.hidden_size or 0) * ACTIVATION_BYTES * topk / cfg.tp
    bw, lat = links(gpu, cfg).pick(cfg.ep * cfg.tp <= cfg.gpus_per_node)
    a2a = cost.collective_seconds(kind="all_to_all", nbytes=nbytes, ranks=cfg.ep, bytes_per_s=bw, latency_s=lat)
    return (1.0 - overlap(cfg)) * EP_ALL_TO_ALLS_PER_LAYER * len(moe) * a2a


def ep_seconds(arch: Architecture, gpu: GpuSpec, cfg: JobConfig, global_batch: int) -> float:
    """Expert all-to-all time per step: the slowest stage's exposed all-to-all through the pipeline's
    (m + (p − 1)/v) slots (``cost.pipeline_seconds``), added to the compute's (an upper bound on pipelining
    both together)."""
    if cfg.ep <= 1:
        return 0.0
    slowest = max(stage_ep_seconds(arch, gpu, cfg, s) for s in _distinct_stages(arch, cfg.pp))
    return cost.pipeline_seconds(stage_micro_s=slowest, micro_batches=micro_batches(cfg, global_batch),
                                 pp=cfg.pp, virtual_stages=cfg.perf.virtual_stages)


def dequant_seconds(gpu: GpuSpec, cfg: JobConfig, params: int) -> float:
    """QLoRA/quantized-base training: each pass reads the packed weights and writes a 16-bit copy for the GEMM.

    Formula: passes · P · (bits/8 + 2) / HBM bandwidth. Source: bitsandbytes ``dequantize_4bit`` (a separate
    kernel before ``torch.matmul`` in ``MatMul4Bit``, bitsandbytes/autograd/_functions.py), run in the
    forward and again for the backward's activation gradient. Assumption: memory-bound.
    """
    if cfg.job is not Job.QLORA and not (cfg.quant and cfg.job is Job.LORA):
        return 0.0
    from memplan.memory.quant import get_format
    from memplan.memory.weights import effective_quant

    fmt = effective_quant(cfg)
    if fmt is None:
        return 0.0
    bits = float(get_format(fmt).nominal_bits)
    return _passes(cfg) * params * (bits / 8 + ACTIVATION_BYTES) / (gpu.hbm_bandwidth_gbps * 1e9)


def micro_batches(cfg: JobConfig, global_batch: int) -> int:
    """Micro-batches per pipeline per step: global batch / (micro-batch · dp), at least one (dp: the replicas that
    read different sequences, ``JobConfig.batch_dp``; the cp ranks of a replica share each micro-batch)."""
    return max(1, global_batch // (cfg.micro_batch * cfg.batch_dp))


def shape_seconds(arch: Architecture, gpu: GpuSpec, cfg: JobConfig, global_batch: int) -> float:
    """Pipelined compute of one step: the slowest stage's micro-batch time through (m + (p − 1)/v) slots
    (``cost.pipeline_seconds``)."""
    slowest = max(stage_micro_seconds(arch, gpu, cfg, s) for s in _distinct_stages(arch, cfg.pp))
    return cost.pipeline_seconds(stage_micro_s=slowest, micro_batches=micro_batches(cfg, global_batch),
                                 pp=cfg.pp, virtual_stages=cfg.perf.virtual_stages)


def _distinct_stages(arch: Architecture, pp: int) -> list[int]:
    """One stage per distinct signature (first, last, the classes of its layers): alike stages take alike time."""
    classes = layer_classes(arch) if arch.layers else []
    seen: dict[tuple, int] = {}
    for s, rng in enumerate(arch_stage_ranges(arch, pp) if arch.layers else [range(0)]):
        seen.setdefault((s == 0, s == pp - 1, tuple(classes[i] for i in rng)), s)
    return list(seen.values())


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


def trainable_stage_params(arch: Architecture, cfg: JobConfig) -> int:
    """Trainable parameters of the largest stage on one GPU (after tp and ep): all its parameters, or the LoRA
    adapters of a LoRA/QLoRA job (``memory.peft.lora_params``, spread over the stages)."""
    if cfg.job in (Job.LORA, Job.QLORA):
        from memplan.memory.peft import lora_params

        return -(-lora_params(arch, cfg.lora) // (cfg.pp * cfg.tp))
    if not arch.layers:
        return -(-arch.params // (cfg.tp * cfg.pp))
    return max(stage_numel(arch, cfg.pp, s, cfg.tp, cfg.ep) for s in _distinct_stages(arch, cfg.pp))


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
    stage = max(stage_micro_seconds(arch, gpu, cfg, s) for s in _distinct_stages(arch, cfg.pp))
    share = overlap(cfg)
    if cfg.zero < ZeroStage.PARAMETERS and cfg.effective_engine is not Engine.FSDP2:
        comm = cost.collective_seconds(kind="all_reduce", nbytes=grad, ranks=cfg.dp, bytes_per_s=bw, latency_s=0.0)
        comm += 2 * n_layers * (cfg.dp - 1) * lat  # one bucket per layer
        return max(0.0, comm - share * stage * BACKWARD_PASSES_FULL / (FORWARD_PASSES + BACKWARD_PASSES_FULL))
    return sharded_comm_seconds(gpu, cfg, params=params, grad=grad, layers=n_layers, hidden=share * stage,
                                micro=micro_batches(cfg, global_batch))


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


def recompute_seconds(arch: Architecture, gpu: GpuSpec, cfg: JobConfig, global_batch: int, layer: Layer,
                      mode: Recompute) -> float:
    """Step time a recomputed layer adds, over the whole global batch, spread over all GPUs.

    Full: the layer's forward again plus its two forward tensor-parallel collectives (Korthikanti et al.
    2022, Sec. 4: one extra forward); op-level: 2 FLOPs per weight element and token of the matmuls it does not
    keep (``activations_op.recomputed_mm_numel``; its elementwise ops are memory-bound and left out);
    selective: the attention core, 2·S·(d_qk + d_v) per token (Korthikanti
    et al. 2022, Sec. 5: QKᵀ, softmax and attention over V); on megatron, what its ``--recompute-modules`` rerun
    (``megatron_recompute.recompute_flops``). Assumption: the pipeline bubble does not
    stretch recomputation (the ILP adds it per layer, without the pipeline degree).
    """
    if mode is Recompute.NONE:
        return 0.0
    tokens = global_batch * cfg.seq_len
    if mode is Recompute.OP:
        from memplan.memory.activations_op import recomputed_mm_numel

        flops = 2.0 * tokens * recomputed_mm_numel(layer, 1)  # the matmuls op-level checkpointing does not keep
    elif mode is Recompute.FULL:
        flops = linear_forward_flops(layer, tokens) + attention_share(cfg) * attention_forward_flops(
            arch, layer, cfg.seq_len, tokens)
    else:
        d_qk, d_v = attention_widths(arch)
        flops = attention_share(cfg) * 2.0 * cfg.seq_len * (d_qk + d_v) * tokens
        if (mods := megatron_recompute.modules(cfg)) is not None:  # Megatron's --recompute-modules
            flops = megatron_recompute.recompute_flops(arch.spec, tokens=tokens, core_flops=flops, mods=mods, tp=1)
    seconds = flops / (cfg.world_size * peak_flops(gpu, cfg) * efficiency(gpu, cfg, arch.spec.hidden_size or 0))
    if mode is Recompute.FULL and cfg.tp > 1:
        bw, lat = links(gpu, cfg).pick(True)
        nbytes = _tokens_micro(cfg) * (arch.spec.hidden_size or 0) * ACTIVATION_BYTES
        per_micro = 2 * cost.collective_seconds(kind="all_reduce", nbytes=nbytes, ranks=cfg.tp, bytes_per_s=bw,
                                                latency_s=lat)
        seconds += per_micro * global_batch / cfg.micro_batch / (cfg.world_size // (cfg.tp * cfg.cp))
    if mode in (Recompute.FULL, Recompute.SELECTIVE) and cfg.cp > 1:
        seconds += _cp_recompute_seconds(arch, gpu, cfg, global_batch, layer)
    return seconds


def _cp_recompute_seconds(arch: Architecture, gpu: GpuSpec, cfg: JobConfig, global_batch: int, layer: Layer) -> float:
    """The forward exchange a recomputed attention repeats (Megatron recomputes ``core_attention``, with its
    context-parallel communication, under full and selective recompute), per step and spread over the pipeline's
    stages as the ILP sums it over all layers: global batch / (micro-batch · replicas · pp) per layer."""
    core = attention_share(cfg) * attention_forward_flops(arch, layer, cfg.seq_len, _tokens_micro(cfg))
    core_s = core / (cfg.tp * efficiency(gpu, cfg, arch.spec.hidden_size or 0) * attention_peak_flops(gpu))
    forward, _ = cp_layer_split(arch, gpu, cfg, core_s)
    return forward * global_batch / (cfg.micro_batch * cfg.batch_dp * cfg.pp)


def layer_recompute_modes(cfg: JobConfig, num_layers: int) -> list[Recompute]:
    """Each layer's recompute mode: ``recompute_map``, else ``recompute`` on the first ``recompute_layers``."""
    if cfg.recompute_map is not None:
        return list(cfg.recompute_map)
    n = num_layers if cfg.recompute_layers is None else min(cfg.recompute_layers, num_layers)
    return [cfg.recompute] * n + [Recompute.NONE] * (num_layers - n)


def global_batch_of(cfg: JobConfig) -> int:
    """Sequences per step: micro-batch × gradient accumulation × data-parallel replicas (``batch_dp``)."""
    return cfg.micro_batch * cfg.grad_accum * cfg.batch_dp
