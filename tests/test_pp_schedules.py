"""``arch.pp_schedules``: every rank's compute order equals the order the installed torch generates for the same
(p, m, v), and the in-flight counts follow from the order as the schedules' definitions state them."""

from __future__ import annotations

import pytest

from memplan.arch import pp_schedules as ps
from memplan.errors import MemplanError

CASES = [(2, 4), (4, 8), (4, 4), (3, 6), (4, 12), (8, 16)]


def _torch_order(name: str, p: int, m: int, v: int) -> dict[int, list[tuple[int, str, int]]]:
    """torch's own per-rank order, built without processes: the schedule object made with ``__new__`` and the
    attributes its ``_calculate_single_rank_operations`` / ``_get_pipeline_order`` read."""
    sch = pytest.importorskip("torch.distributed.pipelining.schedules",
                              reason="comparing with torch's schedules needs torch (pip install memplan[measure])")
    cls = sch.get_schedule_class(name)
    obj = object.__new__(cls)
    obj.pp_group_size, obj._n_microbatches, obj._num_stages = p, m, p * v
    obj.n_local_stages, obj.num_stages, obj._stages = v, p * v, [None] * v
    obj.number_of_rounds = max(1, m // p)
    obj.microbatches_per_round = m // obj.number_of_rounds
    kinds = {sch._ComputationType.FORWARD: ps.F, sch._ComputationType.FULL_BACKWARD: ps.B,
             sch._ComputationType.BACKWARD_INPUT: ps.IN, sch._ComputationType.BACKWARD_WEIGHT: ps.WT}
    single = name in ps.SINGLE
    orders = obj._get_pipeline_order() if single else {r: obj._calculate_single_rank_operations(r) for r in range(p)}
    out = {}
    for rank, actions in orders.items():
        stages = ps.chunk_stages(name, p, rank, v)
        flat = []
        for a in actions:
            if a is None:
                continue
            for sub in a.sub_actions or (a,):
                if sub.computation_type in kinds:
                    flat.append((stages.index(sub.stage_index), kinds[sub.computation_type], sub.microbatch_index))
        out[rank] = flat
    return out


@pytest.mark.parametrize("name,v", [("1F1B", 1), ("GPipe", 1), ("LoopedBFS", 2), ("LoopedBFS", 3),
                                    ("Interleaved1F1B", 2), ("Interleaved1F1B", 3), ("InterleavedZeroBubble", 2),
                                    ("ZBVZeroBubble", 2), ("DualPipeV", 2)])
@pytest.mark.parametrize("p,m", CASES)
def test_order_equals_torch(name: str, v: int, p: int, m: int) -> None:
    if name == "DualPipeV" and m < 2 * p:
        pytest.skip("ScheduleDualPipeV raises for fewer micro-batches than stages (2p)")
    if name in ("Interleaved1F1B", "InterleavedZeroBubble") and m % max(1, m // p):
        pytest.skip("torch's interleaved schedules raise when m is not a multiple of the rounds")
    torch_order = _torch_order(name, p, m, v)
    for rank in range(p):
        mine = list(ps.rank_actions(name, p, rank, v, m))
        if name == "1F1B":  # torch's 1F1B ``_get_pipeline_order`` (a drawing only; ``_step_microbatches`` runs the
            # schedule) numbers the last rank's forwards from 1: compare the (chunk, kind) order there
            mine, torch_order[rank] = [a[:2] for a in mine], [a[:2] for a in torch_order[rank]]
        assert mine == torch_order[rank], (name, p, m, v, rank)


@pytest.mark.parametrize("p,m", CASES)
def test_gpipe_holds_every_micro_batch(p: int, m: int) -> None:
    """GPipe runs every forward before any backward (``ScheduleGPipe._step_microbatches``): m on every rank."""
    for rank in range(p):
        assert ps.max_held("GPipe", p, rank, 1, m) == m


@pytest.mark.parametrize("p,m", CASES)
def test_one_f_one_b_is_p_minus_s(p: int, m: int) -> None:
    """1F1B: min(m, p − s) (Narayanan et al. 2021, Sec. 2.2.1)."""
    for rank in range(p):
        assert ps.max_held("1F1B", p, rank, 1, m) == min(m, p - rank)


@pytest.mark.parametrize("p,m", CASES)
def test_looped_bfs_holds_every_chunk_micro_batch(p: int, m: int) -> None:
    """LoopedBFS runs all forwards of all chunks first: v·m chunk micro-batches at once (Lamy-Poirier 2022)."""
    for rank in range(p):
        assert ps.max_held("LoopedBFS", p, rank, 2, m) == 2 * m


@pytest.mark.parametrize("p,m", [(2, 4), (4, 8), (4, 16)])
def test_interleaved_matches_megatron_replay(p: int, m: int) -> None:
    """torch's Interleaved1F1B with p | m is Megatron's order: the counts of ``arch.interleaved`` (written from
    Megatron's schedule) after each forward."""
    from memplan.arch.interleaved import chunk_counts_after_forwards

    for rank in range(p):
        mine = tuple(h for h, _ in ps.flight_states("Interleaved1F1B", p, rank, 2, m))
        assert set(mine) == set(chunk_counts_after_forwards(p, rank, 2, m))


def test_zero_bubble_keeps_graphs_until_w() -> None:
    """ZB1P on the first rank defers each W by ``rank`` = 0 steps, on rank s by s: the last rank of p = 4, m = 8
    holds more chunk micro-batches awaiting W than rank 0 (which runs W right after each I)."""
    first = max(sum(w) for _, w in ps.flight_states("InterleavedZeroBubble", 4, 0, 2, 8))
    last = max(sum(w) for _, w in ps.flight_states("InterleavedZeroBubble", 4, 3, 2, 8))
    assert first == 1 and last > first


def test_v_shape_places_first_and_last_stage_on_rank_zero() -> None:
    assert ps.chunk_stages("ZBVZeroBubble", 4, 0, 2) == (0, 7)
    assert ps.chunk_stages("DualPipeV", 4, 3, 2) == (3, 4)


def test_names_case_insensitive() -> None:
    """``get_schedule_class`` lowers the name: torchtitan's ``pipeline_parallel_schedule`` accepts any case."""
    assert ps.canonical("zbvzerobubble") == "ZBVZeroBubble"
    assert ps.canonical("gpipe") == "GPipe"
    with pytest.raises(MemplanError):
        ps.canonical("1F1B-flexible")
