"""FSDP2 under ``torch.distributed.pipelining``: gradients accumulated unsharded in fp32 until the step's last backward
(pipelining/stage.py ``backward_maybe_with_nosync``), counted by chunk at the stage's in-flight peak, and one round
of sharded-state traffic per step; and the training ILP's in-flight count capped at the step's micro-batches."""

from __future__ import annotations

import pytest

import memplan
from memplan.arch.parallel import chunks_with_gradients_at_peak, in_flight_micro_batches
from memplan.memory.breakdown import Phase, Tier

# Llama-3.1-8B (config.json): hidden 4096, 32 layers, intermediate 14336, 8 KV heads of 128.
H, F, KV_DIM, V = 4096, 14336, 8 * 128, 128256
BLOCK = H * H + 2 * H * KV_DIM + H * H + 3 * H * F + 2 * H
EMBED = V * H


def simulate(p: int, s: int, v: int, m: int) -> tuple[int, int]:
    """Megatron's interleaved 1F1B on stage s, written out event by event (schedules.py: warm-up of
    (p − s − 1)·2 + (v − 1)·p chunk forwards, capped at m·v, or p − s − 1 under plain 1F1B; then one forward and one
    backward per step, then the remaining backwards; backward k runs chunk v − 1 − ⌊(k mod p·v)/p⌋): (largest count
    of chunk micro-batches in flight, chunks that have run a backward once the first backward after the last moment
    at that count has run)."""
    total = m * v
    warm = min((p - s - 1) * 2 + (v - 1) * p if v > 1 else p - s - 1, total)
    events = ["F"] * warm + ["F", "B"] * (total - warm) + ["B"] * warm
    alive = best = last = 0
    for i, e in enumerate(events):
        alive += 1 if e == "F" else -1
        if e == "F" and alive >= best:
            best, last = alive, i
    backwards_then = events[:last].count("B") + 1
    return best, len({v - 1 - (k % (p * v)) // p for k in range(backwards_then)})


@pytest.mark.parametrize(("p", "v", "m"), [(16, 8, 16), (16, 8, 32), (4, 1, 8), (4, 1, 2), (8, 2, 16), (4, 4, 8),
                                           (16, 2, 64)])  # interleaved: m a multiple of p, as Megatron requires
def test_chunks_with_gradients_match_the_schedule_written_out(p, v, m):
    for s in range(p):
        in_flight, chunks = simulate(p, s, v, m)
        assert chunks_with_gradients_at_peak(p, s, v, m) == chunks, (p, s, v, m)
        assert in_flight_micro_batches(p, s, v, m) * v >= in_flight  # the activations' count is the same schedule's


def test_llama3_405b_16k_gpus_runs_every_forward_before_a_backward():
    """Llama 3 on 16,384 GPUs: p = 16, v = 8, m = 16 per replica; stage 1's warm-up ((16 − 2)·2 + 7·16 = 140) covers
    the step's 128 chunk forwards, so only the first backward's chunk has gradients at the peak; at 8,192 GPUs
    (m = 32) the steady phase runs 256 − 140 = 116 backwards first: ⌈116/16⌉ = 8 chunks, all of them."""
    assert chunks_with_gradients_at_peak(16, 1, 8, 16) == 1
    assert chunks_with_gradients_at_peak(16, 1, 8, 32) == 8


def _pp_estimate(engine_config: dict | None = None, **kw):
    """Stage 0 binds: without ``pp_return_outputs=False`` the last stage's returned logits (``memory.pp_outputs``,
    m = 16 of them) make stage 3 the reported one."""
    knobs = {"pp_return_outputs": False, **(engine_config or {})}
    return memplan.estimate("llama-3.1-8b", "h100-sxm-80gb", job="pretrain", engine="fsdp2", gpus_per_node=8,
                            nodes=2, pp=4, seq_len=2048, engine_config=knobs, **kw)


def _rows(est) -> dict[str, object]:
    return {r.component: r for r in est.rows if r.tier is Tier.GPU}


def test_fsdp2_pipeline_accumulates_fp32_gradients_of_the_whole_stage():
    """1F1B (v = 1) with more micro-batches than stages: every backward's stage gradients exist at the in-flight peak,
    unsharded in fp32 (4 bytes per stage parameter), the running unit's bf16 gradient and fp32 copy (6 bytes per
    unit) apart; the sharded gradients appear only after the last backward's reduce-scatter. Stage 0 of pp 4 holds
    the embedding (its root unit, the largest) and 7 blocks (the split [7, 9, 9, 7])."""
    est = _pp_estimate(grad_accum=16, engine_config={"reshard_after_forward": False})
    rows = _rows(est)
    assert est.stage == 0
    stage_numel = EMBED + 7 * BLOCK
    unit = max(EMBED, BLOCK)
    assert rows["weights/fsdp_all_gather"].bytes == 2 * stage_numel
    assert rows["gradients/fsdp_pp_accumulated"].bytes == 4 * stage_numel
    assert rows["gradients/fsdp_pp_accumulated_at_peak"].bytes == 4 * stage_numel - 4 * unit
    assert rows["gradients/fsdp_reduce_scatter"].bytes == 6 * unit
    assert Phase.BACKWARD_START in rows["gradients/fsdp_pp_accumulated_at_peak"].phases
    assert Phase.BACKWARD_START not in rows["gradients/fsdp_pp_accumulated"].phases
    assert Phase.BACKWARD_START not in rows["gradients"].phases


def test_fsdp2_pipeline_keeps_no_all_gather_output_at_the_peak():
    """reshard_after_forward=False under a pipeline: units stay gathered across micro-batches, so only the step's first
    forward all-gathers; no kept all-gather output sits beside the in-flight activations."""
    rows = _rows(_pp_estimate(grad_accum=16, engine_config={"reshard_after_forward": False}))
    assert "weights/fsdp_kept_all_gather" not in rows


def test_fsdp2_pipeline_counts_more_than_before_on_1f1b():
    """The safe direction: the accumulated gradients raise the start of backward's total by at least the stage's fp32
    gradients less one block (what the reduce-scatter row held already)."""
    with_pp = _pp_estimate(grad_accum=16)
    rows = _rows(with_pp)
    at_bs = sum(r.bytes for r in rows.values() if r.phases is None or Phase.BACKWARD_START in r.phases)
    act = sum(r.bytes for n, r in rows.items() if n.startswith("activations"))
    assert at_bs - act >= 4 * 7 * BLOCK


def test_fsdp2_pipeline_step_time_has_one_round_of_sharded_traffic():
    """pipelining/stage.py: no reduce-scatter before the last backward and no re-gather between micro-batches with
    reshard_after_forward=False: the data-parallel time does not grow with the micro-batch count."""
    from memplan.catalog.store import catalog_gpu, catalog_model
    from memplan.config import JobConfig
    from memplan.planner.budget import step_time

    base = dict(job="pretrain", engine="fsdp2", gpus_per_node=8, nodes=4, pp=4, seq_len=2048, micro_batch=1,
                engine_config={"reshard_after_forward": False}, perf={"comm_overlap": 0.0})
    spec, gpu = catalog_model("llama-3.1-8b"), catalog_gpu("h100-sxm-80gb")
    few = step_time(spec, gpu, JobConfig(**base, grad_accum=4)).data_parallel_s
    many = step_time(spec, gpu, JobConfig(**base, grad_accum=32)).data_parallel_s
    assert few > 0 and many == pytest.approx(few)


def test_ilp_in_flight_count_is_capped_at_the_step():
    """The ILP holds a stage's in-flight micro-batches at the step's micro-batches per replica, as ``estimate`` does:
    16,384 GPUs, tp 8, pp 16, micro-batch 1, 2,048 sequences: 128 replicas of 16 micro-batches."""
    from memplan.planner.ilp_model import Problem

    problem = Problem(dims={}, factors=[], layers=None, num_layers=126, gpu_capacity=1, cpu_capacity=1,
                      nvme_capacity=1, virtual_stages=8, global_batch=2048, world=16384)
    dims = ("tp", "pp", "micro_batch", "seq_len")
    assert problem.micro_batches(dims, (8, 16, 1, 8192)) == 16
    assert problem.key_flight(16, 1, dims, (8, 16, 1, 8192)) == 16
    assert problem.key_flight(16, 1, dims, (8, 8, 1, 8192)) < problem.flight(16, 1)  # 8 micro-batches per replica
    assert problem.flight(16, 1) == -(-((16 - 2) * 2 + 7 * 16 + 1) // 8)


def test_fsdp2_pipeline_keeps_units_gathered_after_a_backward():
    """reshard_after_forward=True under a pipeline: set_reshard_after_backward(False) leaves every unit a backward
    gathered until the next forward's post_forward, so the stage's bf16 parameters are all gathered beside the
    in-flight activations: the root (embedding) and prefetched block are the all-gather row, the rest this row."""
    rows = _rows(_pp_estimate(grad_accum=16))
    kept = rows["weights/fsdp_pp_kept_after_backward"]
    assert kept.bytes == 2 * (EMBED + 7 * BLOCK - EMBED - BLOCK)
    assert rows["weights/fsdp_all_gather"].bytes == 2 * (EMBED + BLOCK)
    assert Phase.BACKWARD_START in kept.phases


def simulate_bytes(p: int, s: int, v: int, m: int, a: int, g: int) -> tuple[int, int]:
    """The same schedule as ``simulate`` with bytes: each chunk micro-batch in flight holds ``a`` bytes, a chunk's
    accumulated gradients ``g`` from the start of its first backward; (largest units in flight, largest total)."""
    total = m * v
    warm = min((p - s - 1) * 2 + (v - 1) * p if v > 1 else p - s - 1, total)
    events = ["F"] * warm + ["F", "B"] * (total - warm) + ["B"] * warm
    alive = backwards = most = units = 0
    touched: set[int] = set()
    for e in events:
        if e == "F":
            alive += 1
        else:
            touched.add(v - 1 - (backwards % (p * v)) // p)
            backwards += 1
        most = max(most, alive * a + len(touched) * g)
        units = max(units, alive)
        if e == "B":
            alive -= 1
    return units, most


@pytest.mark.parametrize(("p", "v", "m", "a", "g"), [(4, 4, 4, 1, 100), (4, 4, 8, 3, 10), (16, 8, 16, 5, 3),
                                                     (8, 2, 16, 1, 50), (4, 2, 4, 2, 9), (16, 8, 32, 1, 1)])
def test_cooldown_excess_completes_the_peak_of_the_schedule_written_out(p, v, m, a, g):
    """In-flight peak plus the chunks' gradients there plus the cool-down excess is the schedule's largest total
    (micro-batches a multiple of p, as Megatron's interleaved schedule requires)."""
    from memplan.arch.parallel import cooldown_gradient_excess

    for s in range(p):
        units, most = simulate_bytes(p, s, v, m, a, g)
        bound = (units * a + chunks_with_gradients_at_peak(p, s, v, m) * g
                 + cooldown_gradient_excess(p, s, v, m, chunk_grad=g, unit_activations=a))
        assert bound == most, (p, s, v, m)


def test_short_sequences_count_the_cooldown_gradients():
    """Interleaved (v = 4) with every forward first and short sequences: one chunk's fp32 gradients outweigh the
    activations 4 backwards free, so the cool-down, not the in-flight peak, holds the most."""
    est = _pp_estimate(grad_accum=4, perf={"virtual_stages": 4})
    rows = _rows(est)
    assert rows["gradients/fsdp_pp_cooldown"].bytes > 0


def test_cooldown_frees_the_bytes_of_the_chunks_that_ran():
    """Uneven chunks: the backwards between the peak and a chunk's first backward free micro-batches of the chunks
    they run, not the stage's average. p = 4, v = 2, m = 4, last stage (s = 3): warm-up (4 − 3 − 1)·2 + 1·4 = 4 chunk
    forwards, S = 8 − 4 = 4 steady steps, so backwards 0..3 (chunk 1, the last in forward order) ran by the peak and
    only chunk 1 has gradients (c = 1); b = S − 1 = 3 is the first backward after it, and chunk 0 first runs at
    backward 1·4 = 4. Between them backward 3 frees one micro-batch of chunk 2 − 1 − ⌊3/4⌋ = 1: 10 bytes when chunk 1
    holds one layer of 10 bytes and chunk 0 two (20). Excess: 25 − 10 = 15 (the stage average, 15, gave 10)."""
    from memplan.arch.parallel import cooldown_gradient_excess

    assert cooldown_gradient_excess(4, 3, 2, 4, chunk_grad=25, unit_activations=(20, 10)) == 15
    assert cooldown_gradient_excess(4, 3, 2, 4, chunk_grad=25, unit_activations=(10, 20)) == 5
    assert cooldown_gradient_excess(4, 3, 2, 4, chunk_grad=25, unit_activations=15) == 10
    # p = 2, v = 3, m = 2, stage 1: warm-up 0 + 2·2 = 4, S = 6 − 4 = 2, c = ⌈2/2⌉ = 1, b = 1. Chunk order of backwards
    # 0..5: 2, 2, 1, 1, 0, 0. Chunk 1 (j = 1) first runs at backward 2: backward 1 (chunk 2) freed; chunk 0 (j = 2) at
    # backward 4: backwards 1..3 (chunks 2, 1, 1) freed. Chunks of 3, 5 and 7 bytes, 40 bytes of gradients each:
    # max(40 − 7, 80 − (7 + 5 + 5)) = 63.
    assert cooldown_gradient_excess(2, 1, 3, 2, chunk_grad=40, unit_activations=(3, 5, 7)) == 63
