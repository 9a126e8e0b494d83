"""Which model chunk of an interleaved pipeline stage holds how many micro-batches at the stage's peak.

Interleaved 1F1B (Narayanan et al. 2021, Sec. 2.2.2) gives every pipeline rank v model chunks. Its forwards do not
visit the chunks evenly: at the moment a stage holds the most chunk micro-batches, its first chunk holds more of them
than its last. ``arch.parallel.in_flight_micro_batches`` counts the whole stage in whole-stage units, rounded up;
this module counts per chunk, so the stage's saved activations are Σ over chunks of (micro-batches held by the chunk)
× (one micro-batch's bytes of the chunk's layers), with chunks of unequal layer counts (uneven stages) included.

Source (the schedule written out): megatron/core/pipeline_parallel/schedules.py (Megatron-LM main, d98e8a6),
``get_pp_rank_microbatches``: W = (p − s − 1)·2 + (v − 1)·g warm-up chunk forwards on rank s, W = m·v ("all
micro-batches in warm-up") when that is at least the step's m·v; ``get_schedule_table``: virtual micro-batch k runs
chunk ⌊(k mod g·v)/g⌋ within groups of g micro-batches (``microbatch_group_size_per_vp_stage``, default p), the last
group taking the remainder; ``get_model_chunk_id(k, forward=False)``: backward k runs chunk v − 1 − (that chunk);
the steady phase runs forward W + k, then backward k. torch/distributed/pipelining/schedules.py
``ScheduleInterleaved1F1B`` (``_get_warmup_ops``, ``forward_stage_index``, ``backward_stage_index``,
``_get_1f1b_rank_ops``) runs the same order with g = ``microbatches_per_round`` = m // max(1, m // p), which is p when
p divides m. A chunk micro-batch's saved tensors live from its forward to its backward, so the count per chunk is
largest right after a forward.

Two Megatron-Core knobs change the replay (``ModelParallelConfig``): ``microbatch_group_size_per_vp_stage`` (g,
``--microbatch-group-size-per-virtual-pipeline-stage``, Llama 3's flexible N, Dubey et al. 2024 Sec. 3.3.2 and
Fig. 6; ``group``), and ``overlap_moe_expert_parallel_comm`` (``extra`` = 1): ``get_pp_rank_microbatches`` "schedule[s]
one extra micro-batch forward step before the 1f1b stages" (W + 1), whose steady steps then run forward W + 1 + k
against backward k layer by layer (``combined_1f1b_schedule_for_interleaved_pipelining``; models/common/
model_chunk_schedule_plan.py pairs forward layer i with the backward of the last layer not yet run). The replay
still counts each forward whole before its paired backward: an upper bound on the paired step by at most one
chunk micro-batch less one layer (the safe side).
"""

from __future__ import annotations

from functools import lru_cache


def group_size(pp: int, micro_batches: int, group: int | None = None) -> int:
    """Micro-batches per group of the interleaved schedule: ``group`` (Megatron's ``microbatch_group_size_per_vp_stage``)
    when given, else torch's ``microbatches_per_round`` m // max(1, m // p) (p when p divides m, Megatron's default
    g = p; m when m < p)."""
    return group if group is not None else micro_batches // max(1, micro_batches // pp)


def warmup_chunk_forwards(pp: int, stage: int, virtual_stages: int, micro_batches: int, *,
                          group: int | None = None, extra: int = 0) -> int:
    """Chunk forwards stage ``stage`` runs before its first backward: min((p − s − 1)·2 + (v − 1)·g + e, m·v), e = 1
    with Megatron's ``overlap_moe_expert_parallel_comm`` (schedules.py ``get_pp_rank_microbatches``), else 0."""
    v, g = virtual_stages, group_size(pp, micro_batches, group)
    return min((pp - stage - 1) * 2 + (v - 1) * g + extra, micro_batches * v)


def _chunk_table(micro_batches: int, v: int, g: int) -> tuple[int, ...]:
    """Chunk of each virtual micro-batch, forward order (Megatron ``get_schedule_table``: groups of g, the last group
    the remainder)."""
    out: list[int] = []
    for start in range(0, micro_batches, g):
        out.extend(c for c in range(v) for _ in range(min(g, micro_batches - start)))
    return tuple(out)


@lru_cache(maxsize=256)
def chunk_counts_after_forwards(pp: int, stage: int, virtual_stages: int, micro_batches: int, *,
                                group: int | None = None, extra: int = 0) -> tuple[tuple[int, ...], ...]:
    """The distinct per-chunk counts of micro-batches in flight on stage ``stage`` right after each of its forwards
    (the only moments a count grows), in schedule order; a tuple of v counts each. ``group``, ``extra``: as in
    ``warmup_chunk_forwards``."""
    v, g = virtual_stages, group_size(pp, micro_batches, group)
    table = _chunk_table(micro_batches, v, g)
    return _steady(table, warmup_chunk_forwards(pp, stage, v, micro_batches, group=g, extra=extra), v)


def _steady(table: tuple[int, ...], warm: int, v: int) -> tuple[tuple[int, ...], ...]:
    """Replays the schedule: W forwards, then (forward W + j, backward j) pairs; the counts after every forward."""
    counts, out, seen = [0] * v, [], set()

    def record() -> None:
        state = tuple(counts)
        if state not in seen:
            seen.add(state)
            out.append(state)

    for k in range(warm):
        counts[table[k]] += 1
        record()
    for j in range(len(table) - warm):
        counts[table[warm + j]] += 1
        record()
        counts[v - 1 - table[j]] -= 1
    return tuple(out)


def chunk_layer_counts(layers: int, virtual_stages: int, *, first_stage: bool = False) -> tuple[int, ...]:
    """Layers of each of a stage's v chunks when the stage holds ``layers`` layers, as even as possible.

    The extra layers go on the earliest chunks, which hold the most micro-batches at the peak (the safe side where the
    split is not published), so a stage with fewer layers than chunks leaves its last chunks empty: on the last stage
    that is the chunk of the output layer and the loss. On the first stage the order is reversed: the embedding sits
    on chunk 0, so the layers the stage balance gave up for it are chunk 0's. Llama 3 (Dubey et al. 2024, Sec. 3.3.2)
    does exactly this: "the first model chunk on the first stage has only the embedding, and the last model chunk on
    the last stage has only output projection and loss calculation"."""
    base, extra = divmod(layers, virtual_stages)
    counts = tuple(base + (1 if c < extra else 0) for c in range(virtual_stages))
    return counts[::-1] if first_stage else counts


def peak_chunk_bytes(pp: int, stage: int, micro_batches: int, chunk_bytes: tuple[int, ...], *,
                     group: int | None = None, extra: int = 0) -> tuple[int, tuple[int, ...]]:
    """(bytes, per-chunk counts): the largest Σ_c count_c · ``chunk_bytes[c]`` over the moments right after each
    forward of stage ``stage`` (v = len(chunk_bytes) chunks, m = ``micro_batches`` per step), and the counts then.
    ``chunk_bytes[c]``: one micro-batch's saved bytes of chunk c's layers; ``group``, ``extra``: as in
    ``warmup_chunk_forwards``."""
    v = len(chunk_bytes)
    states = chunk_counts_after_forwards(pp, stage, v, micro_batches, group=group, extra=extra)
    best = max(states, key=lambda counts: sum(n * b for n, b in zip(counts, chunk_bytes, strict=True)))
    return sum(n * b for n, b in zip(best, chunk_bytes, strict=True)), best
