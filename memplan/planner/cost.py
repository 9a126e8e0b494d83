"""Analytic step-time model: compute, communication, pipeline bubble, offload traffic, decode.

Every function returns seconds as a float (time is not bytes; it is never compared to a
capacity). Bandwidths are in bytes/s, FLOP rates in FLOP/s.
"""

from __future__ import annotations

from typing import Any

DEFAULT_MFU = 0.45
"""Model FLOPs utilization assumed for prefill (serving): an assumption, typical of Megatron-LM at scale
(Narayanan et al. 2021 report 44-52% of peak on A100, Table 1). Training uses ``gemm_efficiency``."""

DEFAULT_CPU_ADAM_PARAMS_PER_S = 2.0e9
"""CPU-Adam parameter updates per second per node: an assumption of the order that ZeRO-Offload
reports for its vectorized CPU-Adam on a DGX-2 host (Ren et al. 2021, Sec. 5.1); override it."""

DEFAULT_INTER_NODE_BYTES_PER_S = 50e9
"""Per-GPU inter-node bandwidth: one 400 Gb/s InfiniBand NDR port per GPU (50 GB/s), an assumption."""


def training_flops(*, active_params: int, tokens: int, layers: int, seq_len: int, attn_width: int) -> float:
    """FLOPs of one training step over ``tokens`` tokens (forward + backward).

    Formula: 3 · (2·N + 2·L·S·d_attn) · tokens, d_attn = N_heads·H.
    Source: Kaplan et al. 2020, "Scaling Laws for Neural Language Models", Table 1
    (C_forward = 2N + 2·n_layer·n_ctx·d_attn; backward = 2 × forward).
    Assumptions: causal masking's halving of attention FLOPs is not credited (flash kernels skip
    masked blocks; counting them is the conservative, slower side).
    """
    return 3.0 * (2.0 * active_params + 2.0 * layers * seq_len * attn_width) * tokens


def layer_forward_flops(*, layer_params: int, tokens: int, seq_len: int, attn_width: int) -> float:
    """FLOPs of one layer's forward over ``tokens`` tokens: the work full recomputation repeats.

    Formula: (2·N_layer + 2·S·d_attn) · tokens. Source: Kaplan et al. 2020, Table 1; Korthikanti
    et al. 2022, Sec. 4 (full recomputation adds one forward pass).
    """
    return (2.0 * layer_params + 2.0 * seq_len * attn_width) * tokens


def compute_seconds(*, flops: float, gpus: int, peak_flops: float, mfu: float = DEFAULT_MFU) -> float:
    """Seconds for ``flops`` spread evenly over ``gpus`` GPUs at ``mfu`` of peak."""
    return flops / (gpus * peak_flops * mfu)


def gemm_efficiency(*, curve: Any, width: float, tokens: float) -> float:
    """Fraction of the dense peak a layer's kernels reach (``perf_data.GemmCurve``).

    Formula: e_max · w/(w + w½) · t/(t + t½), w = hidden/tp, t = tokens per micro-batch per GPU.
    Source: the saturating shape of Narayanan et al. 2021, Fig. 7 (throughput vs micro-batch size) and
    Sec. 3.3 (larger GEMMs per GPU use the GPU better); constants calibrated in ``perf_data``.
    """
    return curve.peak_fraction * width / (width + curve.width_half) * tokens / (tokens + curve.tokens_half)


ELEMENTWISE_PASSES = 4
"""HBM passes over each activation byte of a layer in one training step: written in the forward, read in the
backward, its gradient written and read (an assumption; the norms, GeLU/SwiGLU, dropout, residual adds and,
without flash attention, the softmax are memory-bound)."""


def elementwise_seconds(*, tokens: int, hidden: int, heads: int, seq_len: int, tp: int, sequence_parallel: bool,
                        flash: bool, hbm_bytes_per_s: float) -> float:
    """Seconds of one layer's memory-bound (non-GEMM) work for ``tokens`` tokens on one GPU.

    Formula: passes · s·b·h·(c + 5·a·s/(h·t)) / HBM bandwidth, c = 34/t with sequence parallelism, else
    10 + 24/t; the attention-score term only without flash attention (which never materializes s×s).
    Source: the activation bytes per layer of Korthikanti et al. 2022, Eq. 1-4 (Table 2), read and
    written ``ELEMENTWISE_PASSES`` times. Small hidden sizes spend a larger share here (Narayanan et al.
    2021, Table 1: 44% of peak at 1.7B vs 52% at 1T).
    """
    per_token = 34.0 / tp if sequence_parallel else 10.0 + 24.0 / tp
    if not flash:
        per_token += 5.0 * heads * seq_len / (hidden * tp)
    return ELEMENTWISE_PASSES * tokens * hidden * per_token / hbm_bytes_per_s


def collective_seconds(*, kind: str, nbytes: float, ranks: int, bytes_per_s: float, latency_s: float) -> float:
    """Seconds of one NCCL collective over ``ranks`` ranks (alpha-beta model of a ring).

    ``nbytes``: the full buffer (all-reduce, all-gather output, reduce-scatter input, all-to-all send buffer,
    p2p message). Bus bandwidth ``bytes_per_s`` as nccl-tests reports it (busbw).
    Formula, n = ranks:
      all_reduce:      2(n−1)/n · bytes/bw + 2(n−1)·α
      all_gather, reduce_scatter: (n−1)/n · bytes/bw + (n−1)·α
      all_to_all:      (n−1)/n · bytes/bw + (n−1)·α
      p2p:             bytes/bw + α
    Source: Patarasuk & Yuan 2009 (ring all-reduce); NCCL's performance notes (nccl-tests
    doc/PERFORMANCE.md: busbw = algbw · 2(n−1)/n for all-reduce, (n−1)/n for all-gather/reduce-scatter).
    Assumption: rings, not trees (the conservative latency for large n).
    """
    if kind == "p2p":
        return nbytes / bytes_per_s + latency_s
    if ranks <= 1:
        return 0.0
    steps = 2 * (ranks - 1) if kind == "all_reduce" else ranks - 1
    factor = 2.0 if kind == "all_reduce" else 1.0
    return factor * (ranks - 1) / ranks * nbytes / bytes_per_s + steps * latency_s


def pipeline_seconds(*, stage_micro_s: float, micro_batches: int, pp: int, virtual_stages: int = 1,
                     schedule: str | None = None) -> float:
    """Seconds of one pipelined step: m micro-batches through p stages, the slowest stage taking
    ``stage_micro_s`` per micro-batch (forward + backward).

    Formula: (m + (p − 1)/v) · t_stage. The bubble is (p − 1)/(v·m) of the ideal time.
    Source: Narayanan et al. 2021, Sec. 2.2.1 (1F1B: bubble (p−1)/m) and Sec. 2.2.2 (interleaved schedule
    with v model chunks per device: (p−1)/(v·m)). Uneven stages: the slowest stage sets the pace.
    ``schedule``: a named torch.distributed.pipelining schedule, whose idle slots are ``bubble_slots``'.
    """
    idle = (pp - 1) / virtual_stages if schedule is None else bubble_slots(schedule, pp, virtual_stages, micro_batches)
    return (micro_batches + idle) * stage_micro_s


def bubble_slots(schedule: str, pp: int, virtual_stages: int, micro_batches: int) -> float:
    """Idle time of a pipeline rank per step, in units of one micro-batch's forward + backward on the whole rank
    (t), for torch.distributed.pipelining's schedules.

    With the backward twice the forward and split evenly into input (I) and weight (W) parts (the matmuls' 2N FLOPs
    each: F = I = W = t/3 per rank, t/(3v) per chunk):
    - 1F1B, GPipe: p − 1 (Narayanan et al. 2021, Sec. 2.2.1; Huang et al. 2019, GPipe Sec. 2.3, (K − 1)/(M + K − 1));
    - Interleaved1F1B, LoopedBFS: (p − 1)/v (Narayanan et al. 2021, Sec. 2.2.2; Lamy-Poirier 2022, Breadth-First
      Pipeline Parallelism, Sec. 3: the looped placement divides the bubble by the loops);
    - InterleavedZeroBubble (torch: "implementing the ZB1P schedule"): (p − 1)(F + B − 2W) per chunk = (p − 1)/(3v)
      (DeepSeek-V3 report, Table 2; Qi et al. 2023, Zero Bubble Pipeline Parallelism, ZB-H1: a third of 1F1B's);
    - ZBVZeroBubble: 0 when F = I = W (Qi et al. 2023, Sec. 6; torch's docstring: zero bubble "only if time forward
      == time backward input == time backward weights"), plus the 2p − 1 − m micro-batches torch plans and drops
      when m < 2p − 1 (``_calculate_single_rank_operations``: n_micro = max(2p − 1, m)), t each;
    - DualPipeV: DualPipe's (PP/2 − 1)(F&B + B − 3W) (DeepSeek-V3 report, Table 2; deepseek-ai/DualPipe README) with
      PP = 2p stages and per chunk F&B = F + B (the overlap hides communication, not compute): (p − 1)/3.
    """
    p, v, m = pp, max(1, virtual_stages), micro_batches
    if schedule in ("1F1B", "GPipe"):
        return float(p - 1)
    if schedule in ("Interleaved1F1B", "LoopedBFS"):
        return (p - 1) / v
    if schedule == "InterleavedZeroBubble":
        return (p - 1) / (3 * v)
    if schedule == "ZBVZeroBubble":
        return float(max(0, 2 * p - 1 - m))
    if schedule == "DualPipeV":
        return (p - 1) / 3
    raise ValueError(f"unknown pipeline schedule {schedule!r}")


def ring_allreduce_seconds(*, nbytes: int, ranks: int, bytes_per_s: float) -> float:
    """Seconds of a ring all-reduce of ``nbytes`` over ``ranks`` ranks.

    Formula: 2·(n − 1)/n · bytes / bandwidth. Source: Patarasuk & Yuan 2009; NCCL's
    performance notes (algorithm bandwidth vs bus bandwidth).
    """
    if ranks <= 1:
        return 0.0
    return 2.0 * (ranks - 1) / ranks * nbytes / bytes_per_s


def allgather_seconds(*, nbytes: int, ranks: int, bytes_per_s: float) -> float:
    """Seconds of a ring all-gather (or reduce-scatter) producing ``nbytes``: (n − 1)/n · bytes / bw."""
    if ranks <= 1:
        return 0.0
    return (ranks - 1) / ranks * nbytes / bytes_per_s


def zero_dp_comm_seconds(*, grad_bytes: int, dp: int, zero: int, bytes_per_s: float, micro_steps: int) -> float:
    """Data-parallel communication per step: gradient all-reduce, plus ZeRO-3's parameter all-gathers.

    Formula: stages 0-2: one all-reduce of the gradients (2Ψ volume); stage 3: reduce-scatter of
    gradients plus an all-gather of parameters in the forward and again in the backward of every
    micro-step (3Ψ per micro-step instead of 2Ψ per step).
    Source: ZeRO (Rajbhandari et al. 2020), Sec. 7.2 ("P_os+g+p ... 1.5x communication").
    """
    base = ring_allreduce_seconds(nbytes=grad_bytes, ranks=dp, bytes_per_s=bytes_per_s)
    if zero < 3:
        return base
    gather = allgather_seconds(nbytes=grad_bytes, ranks=dp, bytes_per_s=bytes_per_s)
    return base / 2.0 + 2.0 * gather * micro_steps


def tp_comm_seconds(*, tokens_per_gpu_group: int, hidden: int, layers: int, tp: int, bytes_per_s: float,
                    dtype_bytes: int = 2) -> float:
    """Tensor-parallel communication per step: four all-reduces of B·S·D per layer.

    Formula: 4 · L · allreduce(tokens · D · bytes). Source: Shoeybi et al. 2019 (Megatron-LM),
    Sec. 3 and Fig. 4 (two all-reduces in the forward, two in the backward per layer);
    sequence parallelism replaces each by a reduce-scatter + all-gather of the same volume
    (Korthikanti et al. 2022, Sec. 4.2.2).
    """
    if tp <= 1:
        return 0.0
    nbytes = tokens_per_gpu_group * hidden * dtype_bytes
    return 4.0 * layers * ring_allreduce_seconds(nbytes=nbytes, ranks=tp, bytes_per_s=bytes_per_s)


def pipeline_bubble_fraction(*, pp: int, micro_batches: int, virtual_stages: int = 1) -> float:
    """Idle fraction of a 1F1B pipeline: ((p − 1)/v)/(m + (p − 1)/v).

    Source: Narayanan et al. 2021 ("Efficient Large-Scale Language Model Training on GPU
    Clusters Using Megatron-LM"), Sec. 2.2.1 (bubble time fraction (p−1)/m of ideal time,
    i.e. (p−1)/(m+p−1) of the total) and Sec. 2.2.2 (interleaved: (p−1)/(v·m)).
    """
    idle = (pp - 1) / virtual_stages
    return idle / (micro_batches + idle)


def offload_seconds(*, bytes_to_host: int, bytes_to_device: int, pcie_bytes_per_s: float,
                    cpu_update_params: int, cpu_adam_params_per_s: float, backward_s: float) -> float:
    """Extra step time of ZeRO-Offload: transfers overlapped with backward, then the CPU update.

    Formula: max(0, (grad_down + param_up)/PCIe − backward) + P_cpu / rate_cpu_adam.
    Source: Ren et al. 2021, "ZeRO-Offload", Sec. 4.2-4.3 (gradients stream to the CPU during the
    backward pass; the CPU Adam step and the fp16 parameter copy back follow it).
    """
    transfer = (bytes_to_host + bytes_to_device) / pcie_bytes_per_s
    return max(0.0, transfer - backward_s) + cpu_update_params / cpu_adam_params_per_s


def nvme_seconds(*, bytes_read: int, bytes_written: int, read_bytes_per_s: float, write_bytes_per_s: float) -> float:
    """Seconds to stream ``bytes_read`` from and ``bytes_written`` to NVMe (ZeRO-Infinity Sec. 6.2)."""
    return bytes_read / read_bytes_per_s + bytes_written / write_bytes_per_s


def decode_seconds_per_token(*, bytes_read: int, hbm_bytes_per_s: float) -> float:
    """Seconds per decode step: every weight byte and cached K/V byte is read once per step.

    Formula: (weights + KV cache) bytes / HBM bandwidth.
    Source: Pope et al. 2022, "Efficiently Scaling Transformer Inference", Sec. 2.1 (decode is
    memory-bandwidth bound at small batch).
    """
    return bytes_read / hbm_bytes_per_s


def pcie_bytes_per_s(gpu: Any, host: Any) -> float:
    """Host-to-GPU bandwidth of one GPU: the host's figure when given, else the PCIe generation's x16 rate."""
    from memplan.catalog.schema import PCIE_GBPS_X16

    return (host.pcie_gbps_per_gpu or PCIE_GBPS_X16[gpu.pcie_gen]) * 1e9
