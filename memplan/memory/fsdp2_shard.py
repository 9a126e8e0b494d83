"""FSDP2 (``fully_shard``) per-rank shards: dim-0 chunks padded to the shard group, tensor by tensor.

FSDP2 shards every parameter on its dim 0 with ``torch.chunk`` (torch 2.13
torch/distributed/fsdp/_fully_shard/_fsdp_param.py ``FSDPParam._init_sharded_param``: ``_chunk_with_empty``,
``padded_sharded_size = chunks[0].size()``). Each rank's parameter storage is padded to chunk 0's size
(``_sharded_param_data = padded_sharded_param.view(-1)``), and its gradient is a view of the reduce-scatter output,
a flat buffer of the padded sizes over N (_fsdp_collectives.py ``foreach_reduce``: ``_get_dim0_padded_size``,
``torch.as_strided(reduce_output, ...)``): parameters and gradients hold ceil(d0/N)·rest elements per tensor on
every rank. The optimizer states are ``zeros_like`` of the unpadded local shard: rank r holds its chunk only,
clamp(d0 − r·c, 0, c)·rest with c = ceil(d0/N). Rank 0 always holds a full chunk, so it is the largest rank.

Routed experts (transformers >= 5 stores them as 3-D ``(E, F, D)`` parameters) are chunked on E; every other
tensor on its own dim 0 (1-D norms and biases on their length; a ``(1, D)`` gate such as Qwen2-MoE's
``shared_expert_gate`` gives rank 0 the whole row and the other ranks nothing but padding).
Buffers are not sharded (``fully_shard`` manages parameters only, _fsdp_init.py ``_get_managed_states``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from memplan.arch.parallel import sharded_numel
from memplan.arch.tensors import Tensor
from memplan.units import ceil_div


def chunk_rows(d0: int, n: int, rank: int) -> int:
    """Rows of a dim of ``d0`` that ``torch.chunk(t, n)`` gives ``rank`` (0 past the last chunk).

    Formula: c = ceil(d0 / n); clamp(d0 − rank·c, 0, c). Source: torch ``chunk`` semantics, FSDP2
    ``_chunk_with_empty`` (_fsdp_common.py)."""
    c = ceil_div(d0, n)
    return max(0, min(c, d0 - rank * c))


def dim0_groups(tensor: Tensor, tp: int = 1, ep: int = 1) -> list[tuple[int, int]]:
    """(dim 0, elements per dim-0 row) of each parameter ``tensor`` stands for, per tp/ep rank.

    Routed experts are one 3-D parameter of dim 0 = the local expert count; other tensors with ``copies`` are
    that many parameters. The tp-local dim 0 is the local elements over the row width (tp = 1: ``shape[0]``)."""
    local = sharded_numel(tensor, tp, ep)
    if local == 0:
        return []
    if tensor.routed:
        return [(ceil_div(tensor.copies, ep), local // ceil_div(tensor.copies, ep))]
    each = local // tensor.copies
    rest = math.prod(tensor.shape[1:])
    d0 = max(1, ceil_div(each, rest))
    return [(d0, ceil_div(each, d0))] * tensor.copies


def padded_shard_numel(tensors: Iterable[Tensor], n: int, *, tp: int = 1, ep: int = 1) -> int:
    """Elements of the padded parameter (and gradient) shard every rank holds: Σ ceil(d0 / n)·rest."""
    return sum(ceil_div(d0, n) * rest for t in tensors for d0, rest in dim0_groups(t, tp, ep))


def rank_shard_numel(tensors: Iterable[Tensor], n: int, rank: int, *, tp: int = 1, ep: int = 1) -> int:
    """Elements of rank ``rank``'s unpadded shard (its optimizer states): Σ chunk_rows(d0, n, rank)·rest."""
    return sum(chunk_rows(d0, n, rank) * rest for t in tensors for d0, rest in dim0_groups(t, tp, ep))
