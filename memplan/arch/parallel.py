"""How tensor, pipeline and expert parallelism divide a model's tensors among GPUs.

Megatron-LM (Shoeybi et al. 2019, Sec. 3): linear weights are split column- or row-wise
over ``tp`` ranks, the embedding and output layer vocabulary-parallel; norms and biases of
row-parallel layers are replicated. Pipeline stages (Narayanan et al. 2021) take
contiguous blocks of layers, the embeddings on the first stage and the head on the last;
when ``pp`` does not divide the layers, or the end stages carry the embedding and the head,
the boundaries are chosen to minimise the largest stage (``balanced_stage_sizes``).
Expert parallelism (Lepikhin et al. 2020, GShard) places ``copies/ep`` routed experts per rank.
"""

from __future__ import annotations

from memplan.arch.tensors import Architecture, Layer, Role, Tensor
from memplan.errors import MemplanError
from memplan.units import ceil_div


def stage_layer_ranges(num_layers: int, pp: int) -> list[range]:
    """Contiguous layer ranges per pipeline stage when every layer weighs the same and nothing else sits on
    the end stages: ``balanced_stage_sizes`` with unit weights (the ``L mod pp`` extra layers on the last
    stages, which hold the fewest in-flight micro-batches under 1F1B)."""
    sizes = balanced_stage_sizes((1,) * num_layers, pp, 0, 0)
    return _ranges(sizes)


def _ranges(sizes: tuple[int, ...]) -> list[range]:
    ranges, start = [], 0
    for size in sizes:
        ranges.append(range(start, start + size))
        start += size
    return ranges


def _fits(weights: tuple[int, ...], pp: int, first: int, last: int, cap: int) -> tuple[int, ...] | None:
    """Layers per stage, filled from the last stage backwards under ``cap`` with at least one layer per
    stage, or None when ``cap`` is too small."""
    n = len(weights)
    sizes = [0] * pp
    end = n
    for stage in range(pp - 1, -1, -1):
        load = (last if stage == pp - 1 else 0) + (first if stage == 0 else 0)
        start = end
        must_leave = stage  # every earlier stage keeps at least one layer
        while start > must_leave and load + weights[start - 1] <= cap:
            start -= 1
            load += weights[start]
        if stage == 0 and start > 0:
            return None
        if start == end:
            return None
        sizes[stage] = end - start
        end = start
    return tuple(sizes)


def balanced_stage_sizes(weights: tuple[int, ...], pp: int, first: int, last: int) -> tuple[int, ...]:
    """Layers per pipeline stage, contiguous, minimising the largest stage weight.

    A stage's weight is the sum of its layers' ``weights`` plus ``first`` on stage 0 (embeddings) and
    ``last`` on stage pp − 1 (final norm and output layer). Every stage holds at least one layer.
    Method: the smallest feasible bottleneck among the candidate stage sums (binary search over a
    greedy check, the linear-partition problem; Narayanan et al. 2021, Sec. 2.2 assume equal stages,
    Llama 3 (Dubey et al. 2024, Sec. 3.3.2) takes one layer off the first and last stages for the
    embedding and the output layer). Ties: the greedy fills from the last stage, so surplus layers
    land on the later stages, which hold the fewest in-flight micro-batches under 1F1B.
    """
    n = len(weights)
    if not 1 <= pp <= n:
        raise MemplanError(f"pp={pp} needs between 1 and {n} pipeline stages (one layer at least per stage).")
    lo = max(max(weights), first + weights[0], last + weights[-1])
    hi = first + last + sum(weights)
    while lo < hi:
        mid = (lo + hi) // 2
        if _fits(weights, pp, first, last, mid) is None:
            lo = mid + 1
        else:
            hi = mid
    sizes = _fits(weights, pp, first, last, lo)
    assert sizes is not None  # hi = the whole model always fits
    return sizes


_RANGES: dict[tuple[int, int], tuple[Architecture, tuple[range, ...]]] = {}


def arch_stage_ranges(arch: Architecture, pp: int, balanced: bool = True) -> tuple[range, ...]:
    """Layer ranges per stage of ``arch``: balanced by parameter count (embeddings on the first stage, the
    final norm, output layer and ``extra`` modules on the last), the training engines' uneven stages
    (Megatron ``--decoder-first/last-pipeline-num-layers``, DeepSpeed ``PipelineModule(partition_method=
    "parameters")``); or, not ``balanced``, an even split of the layers, as serving engines cut them (vLLM
    ``get_pp_indices``). Memoized per architecture object."""
    if pp == 1:
        return (range(len(arch.layers)),)
    if not balanced:
        return tuple(stage_layer_ranges(len(arch.layers), pp))
    hit = _RANGES.get((id(arch), pp))
    if hit is not None and hit[0] is arch:
        return hit[1]
    weights = tuple(layer.params for layer in arch.layers)
    first = sum(t.numel for t in arch.pre)
    last = sum(t.numel for t in arch.post) + sum(t.numel for t in arch.extra)
    out = tuple(_ranges(balanced_stage_sizes(weights, pp, first, last)))
    if len(_RANGES) > 1024:
        _RANGES.clear()
    _RANGES[(id(arch), pp)] = (arch, out)
    return out


def stage_index(arch: Architecture, pp: int) -> tuple[int, ...]:
    """The pipeline stage of every layer."""
    out: list[int] = []
    for stage, rng in enumerate(arch_stage_ranges(arch, pp)):
        out.extend([stage] * len(rng))
    return tuple(out)


def in_flight_micro_batches(pp: int, stage: int, virtual_stages: int = 1, micro_batches: int | None = None, *,
                            group: int | None = None, extra: int = 0) -> int:
    """Micro-batches whose activations a pipeline stage holds at its peak, in whole-stage units.

    1F1B (v = 1): p − s (Narayanan et al. 2021, Sec. 2.2.1: stage s runs p − s forwards before its first
    backward). Interleaved (v > 1): Megatron's warm-up of (p − s − 1)·2 + (v − 1)·p chunk micro-batches
    plus the one in flight, each a 1/v share of the stage's layers (megatron/core/pipeline_parallel/
    schedules.py, ``forward_backward_pipelining_with_interleaving``): ((p − s − 1)·2 + (v − 1)·p + 1)/v,
    rounded up; on the first stage p + (p − 1)/v, i.e. p·(1 + (p − 1)/(p·v)) (Korthikanti et al. 2022,
    Sec. 4.2.3).
    A step of ``micro_batches`` = m micro-batches per replica holds at most m: both schedules cap the warm-up at
    the step's forwards (schedules.py: ``num_warmup_microbatches = min(num_warmup_microbatches,
    num_microbatches)`` for 1F1B, ``min(..., total_num_microbatches)`` = m·v chunks when interleaved, which then
    runs every forward first). None: no cap (m at least p).
    The whole-stage count rounds the chunk micro-batches up to stages: the planner's linear model, the rotary and
    keyword-argument rows use it; ``estimate``'s saved blocks, embedding and loss are counted per chunk instead
    (``arch.interleaved.peak_chunk_bytes``), which can exceed this count times the stage's bytes when the chunks are
    uneven (a stage with fewer layers than chunks: its layered chunks hold more than the stage average).
    Megatron's ``microbatch_group_size_per_vp_stage`` g (``group``; None: p) replaces p in (v − 1)·p, and
    ``overlap_moe_expert_parallel_comm`` adds ``extra`` = 1 warm-up forward (``arch.interleaved``).
    """
    if virtual_stages <= 1 or pp <= 1:
        flight = pp - stage
    else:
        g = pp if group is None else group
        chunks = (pp - stage - 1) * 2 + (virtual_stages - 1) * g + extra + 1
        flight = ceil_div(chunks, virtual_stages)
    return flight if micro_batches is None else min(flight, micro_batches)


def chunks_with_gradients_at_peak(pp: int, stage: int, virtual_stages: int, micro_batches: int) -> int:
    """Model chunks of a pipeline stage that hold gradients while the stage holds its largest count of in-flight
    micro-batches, counting the chunk whose backward runs right after that moment (its gradients appear while only
    one micro-batch's share of its activations is freed). A stage of v chunks; 1F1B is v = 1.

    Formula (the schedule of ``in_flight_micro_batches``): warm-up W = min((p − s − 1)·2 + (v − 1)·p, m·v) chunk
    forwards when v > 1, min(p − s − 1, m) when v = 1; then S = m·v − W steady steps of one forward and one
    backward, the count in flight being largest just after each steady forward (after the last forward when
    S = 0). Backward k runs chunk v − 1 − ⌊(k mod p·v)/p⌋ (megatron/core/pipeline_parallel/schedules.py
    ``get_model_chunk_id``; torch/distributed/pipelining/schedules.py ``ScheduleInterleaved1F1B`` keeps the same
    order), so backwards 0..S − 1 have touched min(v, max(1, ⌈S/p⌉)) chunks.
    A chunk whose first backward comes later, in the cool-down, is ``cooldown_gradient_excess``'s.
    """
    v, p, m = max(1, virtual_stages), pp, micro_batches
    steady = _steady_steps(p, stage, v, m)
    return min(v, max(1, ceil_div(steady, p)))


def _steady_steps(p: int, stage: int, v: int, m: int) -> int:
    """Steady one-forward-one-backward steps of stage ``stage`` (``chunks_with_gradients_at_peak``)."""
    warm = (p - stage - 1) * 2 + (v - 1) * p if v > 1 else p - stage - 1
    return m * v - min(warm, m * v)


def cooldown_gradient_excess(pp: int, stage: int, virtual_stages: int, micro_batches: int, *, chunk_grad: int,
                             unit_activations: int | tuple[int, ...]) -> int:
    """Bytes by which the cool-down of an interleaved stage can exceed its in-flight peak: after the peak only
    backwards run, each freeing one chunk micro-batch's activations, while a chunk that had no gradient yet gets
    ``chunk_grad`` bytes of them at its first backward.

    ``unit_activations``: one micro-batch's saved bytes of each chunk (chunk order 0..v − 1), or one figure for every
    chunk. Backward k runs (and frees a micro-batch of) chunk v − 1 − ⌊(k mod p·v)/p⌋.
    Formula: with c = ``chunks_with_gradients_at_peak``, S the steady steps and b = max(0, S − 1) the first backward
    after the peak, chunk c + j − 1 (0-based, in backward order) first runs at backward (c + j − 1)·p, when backwards
    b .. (c + j − 1)·p − 1 have freed their chunks' micro-batches: max(0, max over j = 1..v − c of j·chunk_grad −
    Σ_k a[chunk(k)]). With uneven chunks the freed micro-batches are those of the chunks that ran, not the stage's
    average (a chunk with fewer layers frees less). Same schedule as ``chunks_with_gradients_at_peak``.
    """
    v = max(1, virtual_stages)
    units = (unit_activations,) * v if isinstance(unit_activations, int) else tuple(unit_activations)
    return max([0] + [j * chunk_grad - sum(n * a for n, a in zip(freed, units, strict=True))
                      for j, freed in cooldown_freed(pp, stage, v, micro_batches)])


def cooldown_freed(pp: int, stage: int, virtual_stages: int, micro_batches: int) -> list[tuple[int, tuple[int, ...]]]:
    """(j, micro-batches of each chunk freed) at the first backward of each chunk that had no gradient at the peak,
    j = 1..v − c (``cooldown_gradient_excess``: backwards b .. (c + j − 1)·p − 1, backward k freeing one of chunk
    v − 1 − ⌊(k mod p·v)/p⌋)."""
    v, p = max(1, virtual_stages), pp
    chunks = chunks_with_gradients_at_peak(pp, stage, v, micro_batches)
    k = max(0, _steady_steps(p, stage, v, micro_batches) - 1)
    freed = [0] * v
    out = []
    for j in range(1, v - chunks + 1):
        while k < (chunks + j - 1) * p:
            freed[v - 1 - (k % (p * v)) // p] += 1
            k += 1
        out.append((j, tuple(freed)))
    return out


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


def v_chunk_ranges(arch: Architecture, pp: int) -> tuple[tuple[range, range], ...]:
    """Per rank, the layer ranges of its two chunks under a V-shaped schedule (torch's ``ScheduleZBVZeroBubble``,
    ``ScheduleDualPipeV``): 2p stages balanced like ``arch_stage_ranges`` (embeddings on stage 0, the output layer
    on stage 2p − 1), rank s holding stages s and 2p − 1 − s (torch/distributed/pipelining/_utils.py
    ``generate_stage_to_rank_mapping(style="v")``), so rank 0 holds both ends."""
    ranges = arch_stage_ranges(arch, 2 * pp)
    return tuple((ranges[s], ranges[2 * pp - 1 - s]) for s in range(pp))


def rank_layer_indices(arch: Architecture, pp: int, stage: int, balanced: bool = True,
                       v_shape: bool = False) -> list[int]:
    """Layer indices pipeline rank ``stage`` holds, in its chunks' order (``v_chunk_ranges`` when ``v_shape``)."""
    if v_shape and pp > 1:
        return [i for rng in v_chunk_ranges(arch, pp)[stage] for i in rng]
    return list(arch_stage_ranges(arch, pp, balanced)[stage])


def stage_tensors(arch: Architecture, pp: int, stage: int, balanced: bool = True,
                  v_shape: bool = False) -> list[Tensor]:
    """Tensors resident on one pipeline stage (``extra`` modules such as MTP sit with the output layer: the last
    stage, or rank 0 under a V-shaped schedule)."""
    out: list[Tensor] = []
    if stage == 0:
        out.extend(arch.pre)
    for i in rank_layer_indices(arch, pp, stage, balanced, v_shape):
        out.extend(arch.layers[i].tensors)
    if stage == (0 if v_shape else pp - 1):
        out.extend(arch.post)
        out.extend(arch.extra)
    return out


def stage_layers(arch: Architecture, pp: int, stage: int, balanced: bool = True,
                 v_shape: bool = False) -> list[tuple[int, Layer]]:
    """(layer index, layer) pairs on one pipeline stage."""
    return [(i, arch.layers[i]) for i in rank_layer_indices(arch, pp, stage, balanced, v_shape)]


_NUMEL: dict[tuple, tuple[Architecture, int]] = {}
_NUMEL_LIMIT = 4096


def stage_numel(arch: Architecture, pp: int, stage: int, tp: int, ep: int = 1, balanced: bool = True,
                v_shape: bool = False) -> int:
    """Parameter elements one GPU of ``stage`` holds (after tp and ep); memoized per architecture object (the
    planner asks for the same stage thousands of times; the entry keeps ``arch`` and is compared by identity,
    so a recycled ``id`` never answers for another model)."""
    key = (id(arch), pp, stage, tp, ep, balanced, v_shape)
    hit = _NUMEL.get(key)
    if hit is not None and hit[0] is arch:
        return hit[1]
    numel = sum(sharded_numel(t, tp, ep) for t in stage_tensors(arch, pp, stage, balanced, v_shape))
    if len(_NUMEL) >= _NUMEL_LIMIT:
        _NUMEL.clear()
    _NUMEL[key] = (arch, numel)
    return numel


def heaviest_stage(arch: Architecture, pp: int, tp: int, ep: int = 1, balanced: bool = True,
                   v_shape: bool = False) -> int:
    """The pipeline stage holding the most parameter elements per GPU (ties: the first)."""
    sizes = [stage_numel(arch, pp, s, tp, ep, balanced, v_shape) for s in range(pp)]
    return max(range(pp), key=lambda s: (sizes[s], -s))
