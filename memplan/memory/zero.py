"""ZeRO partitioning and offload: where each model-state buffer lives and how it is sharded.

ZeRO (Rajbhandari et al. 2020, Sec. 5, Fig. 1): stage 1 partitions optimizer states (and the
fp32 master copy) over the Nd data-parallel ranks, stage 2 also gradients, stage 3 also
parameters. Sharding rounds up (``ceil_div``), the safe direction for a capacity gate.
ZeRO-Offload (Ren et al. 2021, Sec. 4) keeps 16-bit parameters on the GPU and moves
gradients, the fp32 master copy and optimizer states to CPU memory; ZeRO-Infinity
(Rajbhandari et al. 2021, Sec. 5) moves parameters and/or optimizer states to NVMe.
GPU rows are bytes per GPU; CPU and NVMe rows are bytes per node (the node's processes summed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from memplan.config import Offload, ZeroStage
from memplan.memory.breakdown import Row, Tier
from memplan.units import ceil_div

if TYPE_CHECKING:
    from memplan.arch.tensors import Architecture
    from memplan.config import JobConfig
    from memplan.memory.context import Context

OFFLOAD_TIER = {Offload.NONE: Tier.GPU, Offload.CPU: Tier.CPU, Offload.NVME: Tier.NVME}


@dataclass(frozen=True, slots=True)
class StateBuffer:
    """A model-state buffer of one rank before ZeRO partitioning (already divided by tp/pp/ep).

    ``shard_from``: the first ZeRO stage that partitions it over data parallelism (None: never).
    """

    component: str
    nbytes: int
    shard_from: ZeroStage | None
    tier: Tier
    source: str
    note: str = ""


def partitioned_bytes(*, nbytes: int, zero: ZeroStage, shard_from: ZeroStage | None, dp: int) -> int:
    """Bytes one data-parallel rank holds of a buffer of ``nbytes``.

    Formula: ceil(nbytes / Nd) when zero ≥ shard_from, else nbytes.
    Source: ZeRO (Rajbhandari et al. 2020), Sec. 5.1-5.3 and Fig. 1.
    """
    if shard_from is not None and zero >= shard_from:
        return ceil_div(nbytes, dp)
    return nbytes


def shard_degree(cfg: JobConfig) -> int:
    """The data-parallel ranks over which the model states are partitioned: ``cfg.dp`` (FSDP, ZeRO), or the
    shard group of hybrid sharding, whose states are replicated dp/S times.

    - fsdp2 ``engine_config.hsdp_shard_size`` S: HSDP, a 2-D DeviceMesh (replicate, shard) given to
      ``fully_shard(mesh=...)`` shards over the mesh's last dimension and replicates over the first
      (torch/distributed/fsdp/_fully_shard/_fully_shard.py, ``FSDPParamGroup`` with a 2-D ``HSDPMeshInfo``);
    - deepspeed ``engine_config.mics_shard_size`` S: MiCS partitions ZeRO-3's parameters, gradients and
      optimizer states within groups of S ranks (deepspeed/runtime/zero/mics.py ``MiCS_Init``:
      ``create_mics_comm_groups(shard_size, ...)``, ``param_shard_group``).
    ZeRO++ hpZ keeps every state partitioned over all ranks (its secondary copy is ``hpz_secondary_bytes``).
    Formula: S when set, else dp; S = dp is full sharding byte for byte. An FSDP1 HYBRID_SHARD profile maps here
    with S = the node's data-parallel ranks.
    """
    knobs = cfg.engine_config
    size = knobs.hsdp_shard_size or knobs.mics_shard_size
    return size if size else cfg.dp


def hpz_secondary_bytes(*, param_bytes: int, hpz: int) -> int:
    """GPU bytes of ZeRO++ hpZ's secondary parameter partition: the 16-bit parameters split over the hpZ group.

    Formula: ceil(param_bytes / hpz), param_bytes the stage's 16-bit parameters per tp rank; 0 when hpz = 1.
    Source: Wang et al. 2023, "ZeRO++" (arXiv:2306.10209), Sec. 3.2 (hpZ holds a secondary copy of the weights
    partitioned within a node: M/α per GPU beside the primary M/N); DeepSpeed
    deepspeed/runtime/zero/partition_parameters.py ``_partition_param_sec`` (``ds_secondary_tensor`` of
    numel/zero_hpz_partition_size elements, kept from the forward all-gather for the backward all-gather).
    """
    if hpz <= 1:
        return 0
    return ceil_div(param_bytes, hpz)


def place(buf: StateBuffer, *, zero: ZeroStage, dp: int, gpus_per_node: int) -> Row:
    """The row for one buffer: partitioned per rank; on CPU/NVMe summed over the node's ranks."""
    per_rank = partitioned_bytes(nbytes=buf.nbytes, zero=zero, shard_from=buf.shard_from, dp=dp)
    nbytes = per_rank if buf.tier is Tier.GPU else per_rank * gpus_per_node
    return Row(buf.component, buf.tier, nbytes, buf.source, buf.note)


def paper_model_states_per_gpu(*, params: int, k: int, zero: ZeroStage, dp: int) -> int:
    """Model-state bytes per GPU in mixed-precision training, as ZeRO's Figure 1 counts them.

    Formula: stage 0: (2 + 2 + K)·P; stage 1: 4·P + K·P/Nd; stage 2: 2·P + (2 + K)·P/Nd;
    stage 3: (4 + K)·P/Nd (each sharded term rounded up separately).
    Source: Rajbhandari et al. 2020, "ZeRO", Fig. 1 and Sec. 5 (K = 12 for mixed-precision Adam).
    Assumptions: 16-bit parameters and gradients; used as an independent check of ``place``.
    """
    p16 = partitioned_bytes(nbytes=2 * params, zero=zero, shard_from=ZeroStage.PARAMETERS, dp=dp)
    g16 = partitioned_bytes(nbytes=2 * params, zero=zero, shard_from=ZeroStage.GRADIENTS, dp=dp)
    opt = partitioned_bytes(nbytes=k * params, zero=zero, shard_from=ZeroStage.OPTIMIZER, dp=dp)
    return p16 + g16 + opt


def largest_layer_numel(ctx: Context) -> int:
    """Elements of the largest module DeepSpeed ZeRO-3 gathers at once, per tensor-parallel rank.

    DeepSpeed fetches parameters module by module (a module's own parameters, ``recurse=False``): the largest
    one is ``ModelSpec.largest_layer_params`` when given, else the largest module of the model
    (``largest_module_numel``). A parameter-count-only model without it is bounded by what DeepSpeed keeps
    gathered at most, ``stage3_max_live_parameters`` (default 1e9), capped at the model.
    Source: deepspeed/runtime/zero/stage3.py ``model_to_params`` (``largest_layer_params`` of the estimator) and
    partitioned_param_coordinator.py (module-granular fetch bounded by max_live_parameters).
    """
    arch = ctx.arch
    if arch.spec.largest_layer_params:
        n = arch.spec.largest_layer_params
    elif not arch.layers:
        n = min(arch.params, ctx.cfg.engine_config.stage3_max_live_parameters)
    else:
        n = largest_module_numel(arch)
    return ceil_div(n, ctx.cfg.tp)


_MODULES: dict[int, tuple[object, int]] = {}
_MODULES_LIMIT = 4096


def largest_module_numel(arch: Architecture) -> int:
    """Elements of the model's largest module counting only its own parameters (an ``nn.Linear``'s weight and
    bias, an embedding), as DeepSpeed's ``model_to_params`` does; memoized per arch. A layer's routed experts count
    as one module: transformers 5 fuses them into one experts module (e.g. ``MixtralExperts``: ``gate_up_proj`` and
    ``down_proj`` of every expert), the larger, safe reading where older versions had one module per expert."""
    hit = _MODULES.get(id(arch))
    if hit is not None and hit[0] is arch:
        return hit[1]
    sizes: dict[tuple[str, int, str], int] = {}
    groups = [("pre", 0, arch.pre), ("post", 0, arch.post), ("extra", 0, arch.extra)]
    groups += [("layer", i, layer.tensors) for i, layer in enumerate(arch.layers)]
    for where, index, tensors in groups:
        for t in tensors:
            key = (where, index, "routed experts" if t.routed else t.module)
            sizes[key] = sizes.get(key, 0) + t.numel
    n = max(sizes.values(), default=arch.params)
    if len(_MODULES) >= _MODULES_LIMIT:
        _MODULES.clear()
    _MODULES[id(arch)] = (arch, n)
    return n
