"""How tensor, pipeline and expert parallelism divide a model's tensors among GPUs.

Megatron-LM (Shoeybi et al. 2019, Sec. 3): linear weights are split column- or row-wise
over ``tp`` ranks, the embedding and output layer vocabulary-parallel; norms and biases of
row-parallel layers are replicated. Pipeline stages (Narayanan et al. 2021) take
contiguous blocks of layers, the embeddings on the first stage and the head on the last.
Expert parallelism (Lepikhin et al. 2020, GShard) places ``copies/ep`` routed experts per rank.
"""

from __future__ import annotations

from memplan.arch.tensors import Architecture, Layer, Role, Tensor
from memplan.units import ceil_div


def stage_layer_ranges(num_layers: int, pp: int) -> list[range]:
    """Contiguous layer ranges per pipeline stage; the first ``L mod pp`` stages take one more layer."""
    base, extra = divmod(num_layers, pp)
    ranges, start = [], 0
    for stage in range(pp):
        size = base + (1 if stage < extra else 0)
        ranges.append(range(start, start + size))
        start += size
    return ranges


def sharded_numel(tensor: Tensor, tp: int, ep: int = 1) -> int:
    """Elements of ``tensor`` held by one rank: split over tp (and ep for routed experts), rounded up.

    Norm weights and 1-D biases of row-parallel layers are replicated; every other tensor
    (linear weights, embeddings, lm_head, column-parallel biases) is split.
    """
    copies = ceil_div(tensor.copies, ep) if tensor.routed else tensor.copies
    each = tensor.numel_each
    if tensor.role in (Role.NORM, Role.ROUTER, Role.OTHER, Role.POSITION):
        return each * copies
    return ceil_div(each, tp) * copies


def stage_tensors(arch: Architecture, pp: int, stage: int) -> list[Tensor]:
    """Tensors resident on one pipeline stage (``extra`` modules such as MTP sit on the last)."""
    ranges = stage_layer_ranges(len(arch.layers), pp)
    out: list[Tensor] = []
    if stage == 0:
        out.extend(arch.pre)
    for i in ranges[stage]:
        out.extend(arch.layers[i].tensors)
    if stage == pp - 1:
        out.extend(arch.post)
        out.extend(arch.extra)
    return out


def stage_layers(arch: Architecture, pp: int, stage: int) -> list[tuple[int, Layer]]:
    """(layer index, layer) pairs on one pipeline stage."""
    return [(i, arch.layers[i]) for i in stage_layer_ranges(len(arch.layers), pp)[stage]]


def stage_numel(arch: Architecture, pp: int, stage: int, tp: int, ep: int = 1) -> int:
    return sum(sharded_numel(t, tp, ep) for t in stage_tensors(arch, pp, stage))


def heaviest_stage(arch: Architecture, pp: int, tp: int, ep: int = 1) -> int:
    """The pipeline stage holding the most parameter elements per GPU (ties: the first)."""
    sizes = [stage_numel(arch, pp, s, tp, ep) for s in range(pp)]
    return max(range(pp), key=lambda s: (sizes[s], -s))
