"""Megatron-Core's ``microbatch_group_size_per_vp_stage`` (g) and ``overlap_moe_expert_parallel_comm`` (one more
warm-up forward) in the interleaved 1F1B's per-chunk in-flight counts (``memplan.arch.interleaved``), written out
by hand from megatron/core/pipeline_parallel/schedules.py (``get_pp_rank_microbatches``: W = (p − s − 1)·2 +
(v − 1)·g (+ 1 with the overlap), ``get_schedule_table``, ``get_model_chunk_id``: backward k runs chunk
v − 1 − table[k]; the steady phase runs forward W + k, then backward k), and the CLI refusing what Megatron-Core
refuses (exit 2)."""

from __future__ import annotations

import pytest
from test_interleaved import CASES
from typer.testing import CliRunner

from memplan.arch.interleaved import _chunk_table, chunk_counts_after_forwards
from memplan.arch.parallel import in_flight_micro_batches
from memplan.catalog.store import catalog_gpu, catalog_model
from memplan.cli.app import app
from memplan.config import JobConfig
from memplan.estimator import estimate


def test_schedule_table_is_megatrons_docstring_example():
    """model_parallel_config.py, ``microbatch_group_size_per_vp_stage``: "When microbatch_group_size_per_vp_stage=3,
    num_microbatches = 5, we have rank 0 | 0 1 2 0 1 2 3 4 3 4" with PP=2 VP=2; the chunks of those forwards are
    0 0 0 1 1 1 0 0 1 1 (schedules.py's own comment: PP2 N3M5 with VP2)."""
    assert _chunk_table(5, 2, 3) == (0, 0, 0, 1, 1, 1, 0, 0, 1, 1)
    assert _chunk_table(4, 2, 2) == (0, 0, 1, 1, 0, 0, 1, 1)  # "rank 0 | 0 1 0 1 2 3 2 3"


# p = 2, v = 2, m = 4, stage 0. The counts (chunk 0, chunk 1) after each forward, distinct, in order.
# g = 2: table 0 0 1 1 0 0 1 1, W = 1·2 + 1·2 = 4 forwards: (1,0) (2,0) (2,1) (2,2); then F4 (chunk 0) → (3,2),
# B0 frees chunk 1 − table[0] = 1 → (3,1); F5 (chunk 0) → (4,1), B1 frees chunk 1 → (4,0); F6 (chunk 1) → (4,1);
# B2 frees chunk 1 − 1 = 0 → (3,1); F7 (chunk 1) → (3,2).
G2 = ((1, 0), (2, 0), (2, 1), (2, 2), (3, 2), (4, 1))
# g = 4: table 0 0 0 0 1 1 1 1, W = 2 + 4 = 6: (1,0) (2,0) (3,0) (4,0) (4,1) (4,2); F6 (chunk 1) → (4,3), B0 frees
# chunk 1 → (4,2); F7 → (4,3).
G4 = ((1, 0), (2, 0), (3, 0), (4, 0), (4, 1), (4, 2), (4, 3))
# g = 2 with the EP overlap: W = 4 + 1 = 5: (1,0) (2,0) (2,1) (2,2) (3,2); F5 (chunk 0) → (4,2), B0 frees chunk 1 →
# (4,1); F6 (chunk 1) → (4,2), B1 frees chunk 1 → (4,1); F7 (chunk 1) → (4,2).
G2_OVERLAP = ((1, 0), (2, 0), (2, 1), (2, 2), (3, 2), (4, 2))
# stage 1, g = 4: W = 0 + 4: (1,0) .. (4,0); F4 (chunk 1) → (4,1), B0 frees chunk 1 → (4,0); the same after.
G4_STAGE1 = ((1, 0), (2, 0), (3, 0), (4, 0), (4, 1))


def test_group_size_counts_written_out():
    assert chunk_counts_after_forwards(2, 0, 2, 4, group=2) == G2
    assert chunk_counts_after_forwards(2, 0, 2, 4, group=4) == G4
    assert chunk_counts_after_forwards(2, 1, 2, 4, group=4) == G4_STAGE1
    assert max(map(sum, G4)) - max(map(sum, G2)) == 2  # (v − 1)·(g − p) more warm-up forwards on every stage


def test_overlap_adds_one_warm_up_forward():
    assert chunk_counts_after_forwards(2, 0, 2, 4, group=2, extra=1) == G2_OVERLAP
    assert max(map(sum, G2_OVERLAP)) == max(map(sum, G2)) + 1


@pytest.mark.parametrize(("p", "v", "m"), [c for c in CASES if c[2] % c[0] == 0])
def test_group_p_is_the_default_schedule(p, v, m):
    """g = p (Megatron's default) replays exactly what memplan counted before the knob: unset outputs unchanged."""
    for stage in range(p):
        assert chunk_counts_after_forwards(p, stage, v, m, group=p) == chunk_counts_after_forwards(p, stage, v, m)


def test_whole_stage_count_follows_the_group():
    """p = 4, v = 2, m = 16, stage 0: (4 − 1)·2 + (2 − 1)·g chunk forwards plus the one in flight, over v chunks,
    rounded up: g = 4 → ⌈11/2⌉ = 6; g = 8 → ⌈15/2⌉ = 8; g = 8 with the overlap → ⌈16/2⌉ = 8; stage 3, g = 8 →
    ⌈(0 + 8 + 1)/2⌉ = 5."""
    assert in_flight_micro_batches(4, 0, 2, 16) == in_flight_micro_batches(4, 0, 2, 16, group=4) == 6
    assert in_flight_micro_batches(4, 0, 2, 16, group=8) == 8
    assert in_flight_micro_batches(4, 0, 2, 16, group=8, extra=1) == 8
    assert in_flight_micro_batches(4, 3, 2, 16, group=8) == 5
    for stage in range(4):  # the planner's whole-stage count never below the exact per-chunk count
        for group, extra in ((4, 0), (8, 0), (8, 1), (16, 1)):
            exact = max(map(sum, chunk_counts_after_forwards(4, stage, 2, 16, group=group, extra=extra)))
            assert in_flight_micro_batches(4, stage, 2, 16, group=group, extra=extra) * 2 >= exact


def _rows(**engine_config: object) -> dict[str, int]:
    cfg = JobConfig(job="pretrain", engine="megatron", gpus_per_node=8, tp=2, pp=4, grad_accum=16, seq_len=2048,
                    perf={"virtual_stages": 2}, engine_config=engine_config)
    return {r.component: r.bytes for r in estimate(catalog_model("llama-3.1-8b"), catalog_gpu("h100"), cfg).rows}


def test_estimate_unchanged_at_g_equal_p_and_larger_at_g_2p():
    default, same, double = _rows(), _rows(microbatch_group_size_per_vp_stage=4), _rows(
        microbatch_group_size_per_vp_stage=8)
    assert default == same
    # every stage s runs (v − 1)·(g − p) = 4 more warm-up forwards at g = 8 (stage 0: 7 + 4 = 11 chunk micro-batches
    # at its peak, 8 + 7 = 15 at g = 8; stage 3: 5 against 9), so the reported stage's saved layers grow
    assert double["activations/layers"] > default["activations/layers"]


MIXTRAL = ["estimate", "mixtral-8x7b", "--engine", "megatron", "--gpu", "h100-sxm-80gb", "--gpus", "8", "--nodes",
           "2", "--ep", "4", "--pp", "2", "--job", "pretrain", "--grad-accum", "8"]
GROUP = "--microbatch-group-size-per-virtual-pipeline-stage"
OVERLAP = "--overlap-moe-expert-parallel-comm"


@pytest.mark.parametrize(("extra", "why"), [
    ([GROUP, "2"], "virtual_stages > 1 only"),  # no interleaving
    (["--virtual-stages", "2", GROUP, "1"], "1 < pp = 2"),
    (["--virtual-stages", "2", GROUP, "16"], "16 > the 8 micro-batches"),
    (["--virtual-stages", "2", GROUP, "2", "--engine", "fsdp2"], "knob of megatron"),
    ([OVERLAP], "needs a virtual pipeline"),
    (["--virtual-stages", "2", OVERLAP, "--recompute", "full"], "disable full recomputation"),
])
def test_refused_where_megatron_refuses(extra, why):
    result = CliRunner().invoke(app, [*MIXTRAL, *extra])
    assert result.exit_code == 2, result.output
    assert why in result.stderr and len([x for x in result.stderr.splitlines() if x.strip()]) == 1


@pytest.mark.parametrize(("args", "why"), [
    (["estimate", "gpt2", "--engine", "megatron", OVERLAP], "only supported with expert model parallelism"),
    (["estimate", "mixtral-8x7b", "--engine", "megatron", "--gpus", "4", "--ep", "4", OVERLAP], "not modelled"),
    # m = 5, g = 4: 5 mod 4 = 1 < pp = 2 ("dependency bubbles")
    (["estimate", "gpt2", "--engine", "megatron", "--gpus", "2", "--pp", "2", "--virtual-stages", "2",
      "--grad-accum", "5", GROUP, "4"], "0 or at least pp"),
])
def test_refused_elsewhere(args, why):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert why in result.stderr


def test_accepted_where_megatron_runs_it():
    for extra in (["--virtual-stages", "2", OVERLAP], ["--virtual-stages", "2", GROUP, "3"]):  # 8 mod 3 = 2 ≥ pp
        assert CliRunner().invoke(app, [*MIXTRAL, *extra, "--format", "json"]).exit_code in (0, 1)


def _rank_actions(p: int, rank: int, v: int, m: int, g: int) -> list[tuple[str, int, int]]:
    """(kind, chunk, micro-batch) in the order Megatron's rank ``rank`` runs them: its schedule table (groups of g,
    the last one the remainder), W = min((v − 1)·g + 2·(p − 1 − rank), m·v) forwards, then forward W + j and
    backward j (backward j runs chunk v − 1 − table[j]), then the remaining backwards."""
    table = [c for start in range(0, m, g) for c in range(v) for _ in range(min(g, m - start))]
    warm = min((v - 1) * g + 2 * (p - 1 - rank), m * v)
    nxt = {"F": [0] * v, "B": [0] * v}
    out: list[tuple[str, int, int]] = []

    def act(kind: str, chunk: int) -> None:
        out.append((kind, chunk, nxt[kind][chunk]))
        nxt[kind][chunk] += 1

    for k in range(warm):
        act("F", table[k])
    for j in range(m * v - warm):
        act("F", table[warm + j])
        act("B", v - 1 - table[j])
    for j in range(m * v - warm, m * v):
        act("B", v - 1 - table[j])
    return out


def _ticks(p: int, v: int, m: int, g: int) -> tuple[int, dict[int, list[tuple[str, int, int]]]]:
    """Every rank runs one action per tick when its inputs exist (forward of virtual stage c·p + r needs the
    micro-batch's forward on c·p + r − 1; backward the forward here and the backward on c·p + r + 1), equal
    forward and backward times; fails on a deadlock. (ticks to finish, each rank's actions)"""
    plans = {r: _rank_actions(p, r, v, m, g) for r in range(p)}
    done: set[tuple[str, int, int]] = set()
    pos, ticks = dict.fromkeys(plans, 0), 0
    while any(pos[r] < len(plans[r]) for r in plans):
        ready = []
        for r, plan in plans.items():
            if pos[r] < len(plan):
                kind, chunk, mb = plan[pos[r]]
                stage = chunk * p + r
                need = [("F", stage - 1, mb)] if kind == "F" and stage else []
                if kind == "B":
                    need = [("F", stage, mb)] + ([("B", stage + 1, mb)] if stage < p * v - 1 else [])
                if all(n in done for n in need):
                    ready.append((r, (kind, stage, mb)))
        assert ready, f"deadlock p={p} v={v} m={m} g={g}"
        for r, key in ready:
            done.add(key)
            pos[r] += 1
        ticks += 1
    return ticks, plans


@pytest.mark.parametrize(("p", "v", "m", "g"), [(4, 2, 16, 8), (4, 2, 16, 6), (2, 2, 8, 3), (4, 3, 12, 7), (8, 2, 16, 16)])
def test_group_counts_and_bubble_on_the_replayed_pipeline(p, v, m, g):
    """Any g Megatron accepts: the per-chunk counts after each forward are those of ``arch.interleaved``, and the
    step takes 2·m·v + 2·(p − 1) chunk slots as at g = p, so the bubble stays (p − 1)/(v·m) (Narayanan et al.
    2021, Sec. 2.2.2): g moves memory, not the step time (``planner.cost`` unchanged)."""
    ticks, plans = _ticks(p, v, m, g)
    assert ticks == _ticks(p, v, m, p)[0] == 2 * m * v + 2 * (p - 1)
    for rank, actions in plans.items():
        counts, after = [0] * v, set()
        for kind, chunk, _ in actions:
            counts[chunk] += 1 if kind == "F" else -1
            if kind == "F":
                after.add(tuple(counts))
        assert set(chunk_counts_after_forwards(p, rank, v, m, group=g)) == after, rank


def test_receive_queues_at_g_above_p():
    """schedules.py: the first stage keeps g − p + 1 forward receive slots and the last g − p + 1 backward ones; the
    tensors received g − p iterations ahead of use are g − p boundary tensors [seq, micro_batch, hidden] beyond the
    default g = p: gpt2 (hidden 768) at seq 1024, micro-batch 1, bf16: 768 · 1024 · 2 bytes each."""
    from memplan.arch.build import build_architecture
    from memplan.catalog.schema import HostSpec
    from memplan.memory import components, megatron_pp_buffers
    from memplan.memory.context import Context

    x = 768 * 1024 * 2
    for g, want in ((2, 0), (4, 2 * x), (6, 4 * x)):
        cfg = JobConfig(job="pretrain", engine="megatron", gpus_per_node=2, pp=2, grad_accum=12, seq_len=1024,
                        dtype="bf16", perf={"virtual_stages": 2}, engine_config={"microbatch_group_size_per_vp_stage": g})
        ctx = Context(build_architecture(catalog_model("gpt2")), cfg, catalog_gpu("h100"), HostSpec())
        first, last = ctx.at_stage(0), ctx.at_stage(1)
        assert sum(r.bytes for r in megatron_pp_buffers.rows(first)) == want
        rows = {r.component: r.bytes for r in components.job_rows(last, [])}
        assert rows.get("activations/megatron_pp_grad_recv_queue", 0) == want
        assert "activations/megatron_pp_recv_queue" not in rows


def test_recipe_key(tmp_path):
    """A recipe's ``fixed.engine_config`` takes the knobs under Megatron's names; a value Megatron refuses is exit 2."""
    body = """model: llama-3.1-8b
hardware:
  gpu: h100-sxm-80gb
  gpus_per_node: 8
job:
  type: pretrain
  seq_len: 2048
  micro_batch: 1
  global_batch: 16
fixed:
  engine: megatron
  tp: 2
  pp: 4
  perf: {virtual_stages: 2}
  engine_config: {microbatch_group_size_per_vp_stage: %d}
"""
    from memplan.recipe_load import load_recipe

    peaks = {}
    for g in (4, 8, 3):
        path = tmp_path / f"g{g}.yaml"
        path.write_text(body % g)
        if g == 3:
            result = CliRunner().invoke(app, ["check", str(path)])
            assert result.exit_code == 2 and "3 < pp = 4" in result.stderr, result.output
            continue
        loaded = load_recipe(path)
        assert loaded.config.engine_config.microbatch_group_size_per_vp_stage == g
        est = estimate(loaded.model, loaded.gpu, loaded.config, host=loaded.host)
        peaks[g] = {r.component: r.bytes for r in est.rows}["activations/layers"]
    assert peaks[8] > peaks[4]


def test_ep_overlap_hides_all_to_alls_in_the_steady_steps():
    """Mixtral 8x7B, pp 2, v 2, m 8, ep 4: stage 0 runs W = (2 − 0 − 1)·2 + (2 − 1)·2 + 1 = 5 warm-up chunk forwards
    alone (and 5 cool-down backwards), f = 5/16 of its chunk steps; the paired rest hides each micro-batch's
    all-to-alls A behind the other's compute C: exposed f·A·(1 − o) + (1 − f)·min(A·(1 − o), max(0, A − C))."""
    from memplan.arch.build import build_architecture
    from memplan.planner import steptime

    arch = build_architecture(catalog_model("mixtral-8x7b"))
    gpu = catalog_gpu("h100-sxm-80gb")
    base = {"job": "pretrain", "engine": "megatron", "gpus_per_node": 8, "nodes": 2, "ep": 4, "pp": 2,
            "grad_accum": 8, "perf": {"virtual_stages": 2}}
    plain = JobConfig(**base)
    on = JobConfig(**{**base, "engine_config": {"overlap_moe_expert_parallel_comm": True}})
    a = steptime.stage_ep_seconds(arch, gpu, on, 0, exposed=1.0)
    c = steptime.stage_micro_seconds(arch, gpu, on, 0)
    o = steptime.overlap(on)
    f = 5 / 16
    want = f * a * (1 - o) + (1 - f) * min(a * (1 - o), max(0.0, a - c))
    assert a > 0 and steptime.ep_overlap_seconds(arch, gpu, on, 0, 8) == pytest.approx(want)
    batch = 8 * on.batch_dp
    assert steptime.ep_seconds(arch, gpu, on, batch) < steptime.ep_seconds(arch, gpu, plain, batch)
