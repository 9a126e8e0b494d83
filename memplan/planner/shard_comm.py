"""Data-parallel traffic of sharded states (ZeRO-3, FSDP2) and of hybrid sharding, as pure functions of the bytes,
the group sizes and the links (``steptime.dp_comm_seconds`` picks the links and applies the overlap).

- Full sharding over Nd ranks (ZeRO-3, Rajbhandari et al. 2020, Sec. 7; FSDP2 ``fully_shard``): per micro-batch,
  parameter all-gathers in the forward (and again in the backward when the unit reshards after its forward) and a
  gradient reduce-scatter, all over Nd.
- Hybrid sharding with shard groups of S ranks and R = Nd/S replicas (fsdp2 HSDP, FSDP1 HYBRID_SHARD, DeepSpeed
  MiCS): the all-gathers and the reduce-scatter run inside the shard group, then the gradient shard (1/S of the
  gradients) is all-reduced across the R replicas: every micro-batch for FSDP2 (``set_requires_all_reduce``
  defaults to True, torch/distributed/fsdp/_fully_shard/_fully_shard.py; _fsdp_collectives.py ``foreach_reduce``:
  reduce-scatter then all-reduce on the replicate group), once per step for MiCS
  (deepspeed/runtime/zero/mics.py ``allreduce_mics_shard_grads`` returns early unless
  ``is_gradient_accumulation_boundary``; Zhang et al. 2022, MiCS, Sec. 3.3 two-hop synchronisation).
- ZeRO++ hpZ with groups of H ranks (Wang et al. 2023, arXiv:2306.10209, Sec. 3.2): the forward all-gather runs over
  Nd from the primary partition, the backward all-gather over H from the secondary partition, the gradient
  reduce-scatter over Nd.
"""

from __future__ import annotations

from dataclasses import dataclass

from memplan.planner import cost


@dataclass(frozen=True)
class Link:
    """A group's bus bandwidth (bytes/s) and per-hop latency (s)."""

    bw: float
    lat: float


def _coll(kind: str, nbytes: float, ranks: int, link: Link) -> float:
    return cost.collective_seconds(kind=kind, nbytes=nbytes, ranks=ranks, bytes_per_s=link.bw, latency_s=0.0)


def full_shard_micro_seconds(*, weights: float, grads: float, dp: int, gathers: int, layers: int, link: Link) -> float:
    """Seconds of one micro-batch's sharded-state traffic over all Nd ranks (before overlap).

    Formula: gathers · AG(W, Nd) + RS(G, Nd) + (gathers + 1) · layers · (Nd − 1) · α, one collective per layer and
    kind (``cost.collective_seconds`` for AG/RS; W the stage's 16-bit parameters, G its gradients).
    """
    seconds = gathers * _coll("all_gather", weights, dp, link) + _coll("reduce_scatter", grads, dp, link)
    return seconds + (gathers + 1) * layers * (dp - 1) * link.lat


def hybrid_seconds(*, weights: float, grads: float, dp: int, shard: int, gathers: int, layers: int,
                   shard_link: Link, replica_link: Link) -> tuple[float, float]:
    """(per micro-batch, all-reduce of the gradient shard) seconds of hybrid sharding, before overlap.

    Formula: per micro-batch gathers · AG(W, S) + RS(G, S) + (gathers + 1) · layers · (S − 1) · α_S inside the shard
    group; the replicas' all-reduce AR(G/S, R) + 2 · layers · (R − 1) · α_R, R = Nd/S (one bucket per layer), which
    the caller counts per micro-batch (FSDP2) or per step (MiCS). S = Nd gives ``full_shard_micro_seconds`` and 0.
    """
    replicas = dp // shard
    micro = full_shard_micro_seconds(weights=weights, grads=grads, dp=shard, gathers=gathers, layers=layers,
                                     link=shard_link)
    reduce = _coll("all_reduce", grads / shard, replicas, replica_link)
    reduce += 2 * layers * (replicas - 1) * replica_link.lat if replicas > 1 else 0.0
    return micro, reduce


def hpz_micro_seconds(*, weights: float, grads: float, dp: int, hpz: int, layers: int, dp_link: Link,
                      hpz_link: Link) -> float:
    """Seconds of one micro-batch of ZeRO++ hpZ traffic (before overlap; quantized weights/gradients, qwZ and qgZ,
    are not modelled: 16-bit traffic).

    Formula: AG(W, Nd) + RS(G, Nd) + 2 · layers · (Nd − 1) · α_Nd (forward gather and gradient reduce over all
    ranks) + AG(W, H) + layers · (H − 1) · α_H (the backward gather from the secondary partition).
    """
    seconds = _coll("all_gather", weights, dp, dp_link) + _coll("reduce_scatter", grads, dp, dp_link)
    seconds += 2 * layers * (dp - 1) * dp_link.lat
    return seconds + _coll("all_gather", weights, hpz, hpz_link) + layers * (hpz - 1) * hpz_link.lat
