"""Per-chunk in-flight micro-batches of the interleaved 1F1B schedule (``memplan.arch.interleaved``), against the
schedule written out here on its own: every rank's list of actions as torch/distributed/pipelining/schedules.py
builds it (``_get_warmup_ops``, ``forward_stage_index``, ``backward_stage_index``, ``_get_1f1b_rank_ops``; Megatron's
``get_schedule_table`` gives the same order when p divides m), replayed across all ranks with the pipeline's data
dependencies (so the order is one the ranks can run), counting each chunk's live micro-batches at every instant."""

from __future__ import annotations

import pytest

from memplan.arch.interleaved import chunk_counts_after_forwards, chunk_layer_counts, peak_chunk_bytes
from memplan.arch.parallel import in_flight_micro_batches


def rank_actions(p: int, rank: int, v: int, m: int) -> list[tuple[str, int, int]]:
    """(kind, local chunk, micro-batch) in the order rank ``rank`` runs them."""
    rounds = max(1, m // p)
    per_round = m // rounds
    warm = min((v - 1) * per_round + 2 * (p - 1 - rank), m * v)
    fwd_next, bwd_next = [0] * v, [0] * v
    out: list[tuple[str, int, int]] = []

    def forward(op: int) -> None:
        chunk = (op // per_round) % v
        out.append(("F", chunk, fwd_next[chunk]))
        fwd_next[chunk] += 1

    def backward(op: int) -> None:
        chunk = v - 1 - ((op - warm) // per_round) % v
        out.append(("B", chunk, bwd_next[chunk]))
        bwd_next[chunk] += 1

    for op in range(warm):
        forward(op)
    for op in range(warm, m * v):
        forward(op)
        backward(op)
    for op in range(m * v, m * v + warm):
        backward(op)
    return out


def replay(p: int, v: int, m: int) -> dict[int, list[tuple[str, int, int]]]:
    """Runs every rank's actions in order, one action per rank per tick when its inputs exist (forward of virtual
    stage c·p + r needs that micro-batch's forward on c·p + r − 1; backward needs the forward here and the backward of
    c·p + r + 1); fails on a deadlock. Returns each rank's actions (unchanged order)."""
    plans = {r: rank_actions(p, r, v, m) for r in range(p)}
    done: set[tuple[str, int, int]] = set()
    pos = dict.fromkeys(plans, 0)
    last = p * v - 1
    while any(pos[r] < len(plans[r]) for r in plans):
        ready = []
        for r, plan in plans.items():
            if pos[r] == len(plan):
                continue
            kind, chunk, mb = plan[pos[r]]
            stage = chunk * p + r
            need = [("F", stage - 1, mb)] if kind == "F" and stage else []
            if kind == "B":
                need = [("F", stage, mb)] + ([("B", stage + 1, mb)] if stage < last else [])
            if all(n in done for n in need):
                ready.append((r, (kind, stage, mb)))
        assert ready, f"deadlock p={p} v={v} m={m}"
        for r, key in ready:
            done.add(key)
            pos[r] += 1
    return plans


def live_counts(actions: list[tuple[str, int, int]], v: int) -> list[tuple[int, ...]]:
    """Each chunk's live micro-batches after every action (forward adds one, backward frees one)."""
    counts, out = [0] * v, []
    for kind, chunk, _ in actions:
        counts[chunk] += 1 if kind == "F" else -1
        assert counts[chunk] >= 0
        out.append(tuple(counts))
    return out


CASES = [(4, 2, 8), (4, 2, 4), (4, 4, 8), (8, 2, 16), (4, 3, 12), (4, 2, 2), (2, 4, 6), (16, 8, 16), (16, 8, 32)]


@pytest.mark.parametrize(("p", "v", "m"), CASES)
def test_counts_after_forwards_are_the_written_out_schedule(p, v, m):
    plans = replay(p, v, m)
    for rank, actions in plans.items():
        after_forwards = [c for (kind, _, _), c in zip(actions, live_counts(actions, v), strict=True) if kind == "F"]
        assert set(chunk_counts_after_forwards(p, rank, v, m)) == set(after_forwards), (p, v, m, rank)


@pytest.mark.parametrize(("p", "v", "m"), CASES)
def test_weighted_peak_is_the_largest_instant(p, v, m):
    """Chunks of unequal saved bytes (uneven stages): the peak over every instant, forwards and backwards alike."""
    weights = tuple(3 + 5 * c % 7 for c in range(v))
    plans = replay(p, v, m)
    for rank, actions in plans.items():
        brute = max(sum(n * w for n, w in zip(c, weights, strict=True)) for c in live_counts(actions, v))
        assert peak_chunk_bytes(p, rank, m, weights)[0] == brute, (p, v, m, rank)
        # the whole-stage count rounds chunk micro-batches up to stages: never below the exact count
        exact = max(sum(c) for c in live_counts(actions, v))
        assert in_flight_micro_batches(p, rank, v, m) * v >= exact


def test_llama3_405b_stage_1_per_chunk():
    """p = 16, v = 8 (Llama 3 405B): at m = 16 stage 1's warm-up ((16 − 2)·2 + 7·16 = 140) covers the step's 128
    chunk forwards, so every chunk holds all 16; at m = 32 the peak is after forward 140: forwards 0-127 put 16 on
    every chunk, forwards 128-140 put 13 more on chunk 0 (141 in all, not 8·⌈141/8⌉ = 144)."""
    assert peak_chunk_bytes(16, 1, 16, (1,) * 8)[1] == (16,) * 8
    assert peak_chunk_bytes(16, 1, 32, (1,) * 8) == (141, (29,) + (16,) * 7)


def test_all_forwards_first_when_the_warm_up_covers_the_step():
    """m = p = 4, v = 2: rank 0 warms up (4 − 1)·2 + 4 = 10 ≥ 8 chunk forwards, so it runs every forward first
    (Megatron's ``are_all_microbatches_in_warmup``); the last rank warms up 4 and then alternates."""
    assert max(chunk_counts_after_forwards(4, 0, 2, 4), key=sum) == (4, 4)
    assert max(sum(c) for c in chunk_counts_after_forwards(4, 3, 2, 4)) == 5


def test_chunk_layers_follow_llama3_first_and_last_stages():
    """Llama 3 Sec. 3.3.2: 7 layers on the first and the last of 16 stages with v = 8: the first stage's chunk 0 has
    only the embedding, the last stage's chunk 7 only the output layer and the loss."""
    assert chunk_layer_counts(7, 8, first_stage=True) == (0,) + (1,) * 7
    assert chunk_layer_counts(7, 8) == (1,) * 7 + (0,)
    assert chunk_layer_counts(8, 8) == (1,) * 8
    assert chunk_layer_counts(10, 4) == (3, 3, 2, 2)


def test_last_stage_chunks_with_layers_hold_every_micro_batch():
    """Llama 3's last stage at m = 16 (p = 16, v = 8): its warm-up (7·16 = 112) covers chunks 0-6's forwards, which hold
    the 7 layers, and chunk 7 (output and loss only) alternates one forward with one backward: 7·16 = 112 layer
    micro-batches, more than the rounded whole-stage count ⌈113/8⌉ = 15 per layer (105) memplan used before."""
    from memplan.arch.parallel import in_flight_micro_batches

    assert peak_chunk_bytes(16, 15, 16, (1,) * 7 + (0,))[0] == 112
    assert in_flight_micro_batches(16, 15, 8, 16) * 7 == 105
