"""Data of the step-time model, with sources: GEMM efficiency per GPU generation, fabrics per cluster type,
and which engine overlaps which communication with compute. Every value is a default that a ``PerfConfig``
(``JobConfig.perf``) overrides; the functions that use them are in ``planner.cost``.

Calibration (``tools/published_runs.py`` prints the table): the published runs in
``tests/test_published_runs.py`` reach 44-52% of the A100's peak with Megatron-LM (Narayanan et al. 2021,
Table 1, counting the recomputed forward), 38-43% BF16 MFU on H100 (Llama 3, Dubey et al. 2024, Table 4)
and 56% MFU + recompute for Megatron's selective recompute with SP (Korthikanti et al. 2022, Table 5).
The curves below are the smallest set of numbers that put every one of those runs within ±15%: Narayanan
Table 1 −10% (1.7B) to +9% (18.4B), Korthikanti Table 4 0% to +12%, Llama 3 405B +4% / +8%, DeepSeek-V3
−13% (with its fp8 GEMMs and 20 of 132 SMs given to communication). Only ``peak_fraction`` was fitted per
generation; ``width_half`` and ``tokens_half`` are shared, fitted on the A100 runs (hidden/tp 768-3200).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GemmCurve:
    """Fraction of the dense peak a transformer layer's kernels reach, as a function of the GEMM shape.

    efficiency(w, t) = peak_fraction · w / (w + width_half) · t / (t + tokens_half), w = hidden / tp (the
    GEMMs' inner width per GPU), t = tokens of one micro-batch on one GPU (micro-batch × sequence / cp).
    The two saturating factors are an assumption in the spirit of Narayanan et al. 2021, Fig. 7 (throughput
    per GPU grows with the micro-batch and with the hidden size per tensor-parallel rank) and Sec. 3.3.
    """

    peak_fraction: float
    width_half: int
    tokens_half: int
    source: str


GEMM_CURVES: dict[str, GemmCurve] = {
    "volta": GemmCurve(0.55, 250, 128, "ZeRO-Offload (Ren et al. 2021, Sec. 6.2): 40 TFLOP/s of 125 on one V100 "
                       "for a 10B model, i.e. ~32% including the offload; Megatron-LM 2019 reports 39% on V100"),
    "ampere": GemmCurve(0.77, 250, 128, "Narayanan et al. 2021 Table 1 (44-52% of 312 TFLOP/s incl. bubble and "
                        "communication; the 1T run: 163 TFLOP/s at hidden/tp = 3200)"),
    "hopper": GemmCurve(0.66, 250, 128, "Llama 3 (Dubey et al. 2024) Table 4: 38-43% BF16 MFU on 8k-16k H100 "
                        "(400-430 TFLOP/s per GPU at tp8, 8k tokens per micro-batch)"),
    "blackwell": GemmCurve(0.66, 250, 128, "assumed equal to Hopper (no published large run at the time of writing)"),
    "ada": GemmCurve(0.50, 250, 128, "assumed: PCIe workstation parts with lower sustained clocks than SXM parts"),
    "cdna": GemmCurve(0.45, 250, 128, "assumed: ROCm GEMM efficiency on MI250X/MI300X as reported by "
                      "Frontier runs (Dash et al. 2023, ~32-38% of peak)"),
}

GPU_GENERATION: tuple[tuple[str, str], ...] = (
    ("v100", "volta"), ("t4", "volta"),
    ("a100", "ampere"), ("a10", "ampere"), ("a40", "ampere"), ("rtx-a6000", "ampere"), ("rtx-3090", "ampere"),
    ("h100", "hopper"), ("h200", "hopper"), ("h800", "hopper"), ("gh200", "hopper"),
    ("b200", "blackwell"), ("gb200", "blackwell"), ("rtx-5090", "blackwell"),
    ("l4", "ada"), ("l40", "ada"), ("rtx-4", "ada"),
    ("mi", "cdna"),
)
"""GPU catalog name prefix → generation (first match wins; unknown GPUs: ``DEFAULT_GENERATION``)."""

DEFAULT_GENERATION = "ampere"


@dataclass(frozen=True)
class Fabric:
    """Bandwidth and latency of one cluster type's links, per GPU, as NCCL's bus bandwidth sees them.

    ``intra_gbps`` None: the GPU's own ``interconnect_gbps`` (NVLink per direction) × ``intra_efficiency``.
    """

    inter_gbps: float
    """Inter-node bandwidth per GPU, one direction, GB/s (10^9 bytes/s)."""
    intra_latency_us: float
    inter_latency_us: float
    source: str
    intra_gbps: float | None = None
    intra_efficiency: float = 0.8
    """NCCL bus bandwidth over the NVLink figure: nccl-tests all_reduce_perf reaches ~230 of 300 GB/s on
    DGX A100 and ~360-370 of 450 GB/s on DGX H100 (NVIDIA DGX user guides, nccl-tests README)."""
    inter_efficiency: float = 0.9
    """NCCL bus bandwidth over the InfiniBand line rate (nccl-tests across nodes, ~92% of NDR line rate)."""


FABRICS: dict[str, Fabric] = {
    "dgx-v100": Fabric(12.5, 2.0, 8.0, "DGX-2: 8 × 100 Gb/s EDR InfiniBand for 16 GPUs (DGX-2 datasheet) "
                       "-> ~12.5 GB/s per GPU at one NIC per GPU pair; NVSwitch inside"),
    "dgx-a100": Fabric(25.0, 2.0, 6.0, "DGX A100 / Selene: 8 × 200 Gb/s HDR InfiniBand compute NICs, one per GPU "
                       "(DGX A100 datasheet; Narayanan et al. 2021, Sec. 5)"),
    "dgx-h100": Fabric(50.0, 2.0, 6.0, "DGX H100: 8 × 400 Gb/s NDR InfiniBand, one per GPU (DGX H100 datasheet; "
                       "Llama 3, Dubey et al. 2024, Sec. 3.3.1: 400 Gbps RoCE or InfiniBand per GPU)"),
    "h800": Fabric(50.0, 2.0, 6.0, "DeepSeek-V3 (DeepSeek-AI 2024, Sec. 3.2.2): H800 nodes, NVLink 160 GB/s "
                   "and InfiniBand 50 GB/s per GPU", intra_gbps=160.0, intra_efficiency=1.0),
    "dgx-b200": Fabric(50.0, 2.0, 6.0, "DGX B200: 8 × 400 Gb/s ConnectX-7 compute NICs (DGX B200 datasheet)"),
    "pcie-ethernet": Fabric(3.125, 5.0, 20.0, "assumed: PCIe servers on 25 Gb/s Ethernet per node, shared by "
                            "the node's GPUs (a workstation/cloud default)"),
}
"""Latencies: per hop, the order of magnitude NCCL's own tuning model assumes (src/graph/tuning.cc: about
1-2 µs per NVLink hop and 5-8 µs per network hop); they matter only for many ranks or small messages."""

GENERATION_FABRIC = {"volta": "dgx-v100", "ampere": "dgx-a100", "hopper": "dgx-h100", "blackwell": "dgx-b200",
                     "ada": "pcie-ethernet", "cdna": "dgx-h100"}
"""Default cluster type per GPU generation (an H800 GPU gets ``h800``)."""

ENGINE_OVERLAP: dict[str, dict[int, float]] = {
    "pytorch": {0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0},
    "fsdp1": {0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0},
    "fsdp2": {0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0},
    "deepspeed": {0: 1.0, 1: 0.0, 2: 0.0, 3: 1.0},
    "megatron": {0: 0.0, 1: 0.0, 2: 0.0, 3: 0.0},
}
"""Share of the data-parallel/ZeRO communication an engine hides behind compute, by ZeRO stage, at its
defaults. pytorch: DDP's bucketed all-reduce runs during backward (torch/nn/parallel/distributed.py,
``Reducer``); fsdp1 (BackwardPrefetch.BACKWARD_PRE, torch/distributed/fsdp/_runtime_utils.py) and fsdp2:
prefetched all-gathers and reduce-scatters on their own streams
(torch/distributed/fsdp/_fully_shard); deepspeed: ``overlap_comm`` defaults to False for stages 1-2 and
True for stage 3 (deepspeed/runtime/zero/config.py); megatron: ``--overlap-grad-reduce`` and
``--overlap-param-gather`` are off by default (megatron/training/arguments.py). Overridable with
``PerfConfig.comm_overlap``."""

DEFAULT_ENGINE_FOR_OVERLAP = "pytorch"
