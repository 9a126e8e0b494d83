"""The step-time search (``planner.ilp_search``): the same optimum as the monolithic MIP, valid bounds, every global
row listed; ``--top`` never changes the best plan; ``--virtual-stages`` needs a pipeline."""

from __future__ import annotations

import json
from itertools import product

import pytest
from conftest import run_cli
from test_planner import gpu_with, tiny_model

from memplan.arch.build import build_architecture
from memplan.catalog.schema import HostSpec
from memplan.config import Job, JobConfig, Offload, Recompute
from memplan.planner import train
from memplan.planner.ilp import IlpBuilder
from memplan.planner.ilp_fast import cheapest_plan, proven_infeasible
from memplan.planner.ilp_search import RowSearch, joint_rows, lower_bound, restrict
from memplan.planner.space import placements


def small_problem(memory_mib: int = 3000):
    """A tiny model on 4 GPUs: tp 1/2, pp 1/2 (a 5-layer model: uneven stages), ZeRO 0-3 with offload, micro-batch
    1/2, per-layer recompute; memory tight enough that recompute and offload matter."""
    arch = build_architecture(tiny_model(1024, 5, 8, 4, 32000))
    base = JobConfig(job=Job.FULL, gpus_per_node=4, seq_len=2048, cuda_context_bytes=0, allocator_reserve_pct=5)
    offl = (Offload.NONE, Offload.CPU)
    place = tuple(placements(base.job, (0, 1, 2, 3), offl, offl))
    dims = {"tp": (1, 2), "pp": (1, 2), "placement": place, "optimizer": (base.optimizer,), "quant": (None,),
            "micro_batch": (1, 2), "seq_len": (2048,),
            "recompute": (Recompute.NONE, Recompute.SELECTIVE, Recompute.FULL)}
    # MiB of NCCL buffers (memory.nccl), kept out of the budget: every DeepSpeed layout of 4 GPUs holds its groups'
    # 2 x 32 channels x (10 + 2) MiB plus the default group's as much again (nccl_groups._default_group)
    nccl = 2 * 2 * 32 * (10 + 2)
    setting = train.TrainSetting(arch=arch, gpu=gpu_with(memory_mib + nccl), host=HostSpec(), base=base, global_batch=8)
    problem, _ = train.build_problem(setting, dims, "min_seconds")
    return problem


def test_joint_rows_are_exactly_the_combinations_every_table_holds():
    problem = small_problem()
    rows = joint_rows(problem)
    tables = [(f.dims, set(f.entries)) for f in problem.factors]
    tables += [(lb.key_dims, {k for per in lb.gpu for m in per.values() for k in m}) for lb in problem.blocks]
    names = list(problem.dims)
    brute = [dict(zip(names, combo, strict=True)) for combo in product(*(problem.dims[d] for d in names))]
    brute = [r for r in brute if all(tuple(r[d] for d in dims) in keys for dims, keys in tables)]
    canon = {repr([r[d] for d in names]) for r in rows}
    assert brute and len(rows) == len(canon) == len(brute) and canon == {repr([r[d] for d in names]) for r in brute}
    assert joint_rows(problem, limit=len(brute) - 1) is None  # over the limit: the caller falls back to the MIP


@pytest.mark.parametrize("memory_mib", [2200, 3000, 6000])
def test_row_search_finds_the_monolithic_mips_optimum_and_alternatives(memory_mib):
    """Two solution methods, the same answers: the best plan's and the next two's step times (after no-good cuts)."""
    problem = small_problem(memory_mib)
    search, mip = RowSearch(problem, joint_rows(problem)), IlpBuilder(problem)
    for i in range(3):
        a, b = search.solve(), mip.solve()
        assert a.status == b.status
        if a.status != "optimal":
            assert i > 0 or memory_mib == 2200
            break
        assert a.objective == pytest.approx(b.objective, rel=1e-6)
        search.exclude(a.choice, f"a{i}")
        mip.exclude(a.choice, f"a{i}")
    assert search.evaluated < len(search.rows)  # the bounds pruned part of the space


def test_every_rows_bound_is_at_most_its_optimum():
    problem = small_problem(2600)
    for row in joint_rows(problem):
        sol = IlpBuilder(restrict(problem, row)).solve()
        if sol.status == "optimal":
            assert lower_bound(problem, row) <= sol.objective * (1 + 1e-12)


@pytest.mark.parametrize("memory_mib", [2600, 3300])
def test_a_row_answered_without_the_mip_is_the_mips_answer(memory_mib):
    """Where every layer's fastest mode fits, ``cheapest_plan`` answers the row; the row's MIP agrees (status and
    step time), and where the MIP needs slower modes or finds nothing, ``cheapest_plan`` declines; a row
    ``proven_infeasible`` calls hopeless is infeasible for the MIP too."""
    problem = small_problem(memory_mib)
    answered = declined = proven = 0
    for row in joint_rows(problem):
        one = restrict(problem, row)
        fast, mip = cheapest_plan(one), IlpBuilder(one).solve()
        if proven_infeasible(one):
            proven += 1
            assert fast is None and mip.status == "infeasible"
            continue
        if fast is None:
            declined += 1
            assert mip.status != "optimal" or mip.objective > lower_bound(problem, row) * (1 + 1e-12) or any(
                m != "none" for m in mip.modes)
            continue
        answered += 1
        assert mip.status == "optimal" and fast.objective == pytest.approx(mip.objective, rel=1e-9)
        assert fast.choice == mip.choice
    assert answered and declined and proven  # every path is exercised


def test_top_never_changes_the_best_plan(runner):
    """A space with step-time ties (micro-batches and ZeRO stages of gpt2 on two GPUs): the best plan is the same
    whatever --top asks for."""
    args = ["plan", "gpt2", "--gpu", "a100-sxm-40gb", "--gpus", "2", "--zero", "0,1,2,3", "--batch", "1,2,4",
            "--format", "json"]
    bests = [json.loads(run_cli(runner, *args, "--top", str(k)).stdout)["best"] for k in (1, 2, 5)]
    assert bests[0] == bests[1] == bests[2]


def test_virtual_stages_without_a_pipeline_is_refused(runner):
    result = run_cli(runner, "plan", "llama-3.1-8b", "--gpu", "h100-sxm-80gb", "--gpus", "8", "--pp", "1",
                     "--virtual-stages", "2", code=2)
    assert "--virtual-stages" in result.stderr and "pp > 1" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_virtual_stages_with_mixed_pp_apply_where_pp_is_above_one(runner):
    doc = json.loads(run_cli(runner, "plan", "llama-3.1-8b", "--gpu", "h100-sxm-80gb", "--gpus", "8", "--pp", "1,2",
                             "--virtual-stages", "2", "--top", "1", "--format", "json").stdout)
    assert "pp > 1" in doc["assumptions"]["virtual_stages"]



def test_a_time_limited_plan_says_how_far_from_optimal_it_may_be():
    """The label of a best incumbent carries the proven gap when the solver knows it (HiGHS's mip_gap, or the row
    search's smallest bound left), and stays the plain label when it does not."""
    from types import SimpleNamespace

    from memplan.planner.ilp import _highs_gap
    from memplan.planner.recheck import feasible_status

    highs = SimpleNamespace(solverModel=SimpleNamespace(getInfo=lambda: SimpleNamespace(mip_gap=0.0312)))
    assert _highs_gap(highs) == 0.0312
    assert _highs_gap(SimpleNamespace()) is None
    assert feasible_status(0.0312) == "feasible (time limit reached; best incumbent, within 3.12% of the optimum)"
    assert feasible_status(None) == "feasible (time limit reached; best incumbent)"


def test_a_stopped_row_search_returns_its_best_row_with_the_gap_to_the_bounds_left():
    problem = small_problem(3000)
    search = RowSearch(problem, joint_rows(problem))
    best = search.solve()
    assert best.status == "optimal"
    stopped = search._stopped(best.objective / 2)  # as if a row with half its step time as bound were left
    assert stopped.status == "feasible" and stopped.gap == pytest.approx(0.5)


def test_suggestions_carry_their_change_as_data(runner):
    """An infeasible full fine-tune of an 8B model on one T4 without offload: each verified way out names the request
    fields it changes, consistently with its flags (a space change's values are the flag's list)."""
    doc = json.loads(run_cli(runner, "plan", "llama-3.1-8b", "--gpu", "t4", "--job", "full", "--zero", "0",
                             "--offload-optimizer", "none", "--offload-params", "none", "--top", "1",
                             "--format", "json", code=1).stdout)
    by_flags = {s["flags"]: s["changes"] for s in doc["suggestions"]}
    for flags, changes in by_flags.items():
        assert changes and all(k.split(".")[0] in ("config", "space", "hardware") for k in changes), (flags, changes)
        words = flags.split()
        if words[0] == "--gpus":
            assert changes == {"hardware.gpus_per_node": int(words[1]), "hardware.nodes": int(words[3])}
        elif words[0] == "--gpu":
            assert changes == {"hardware.gpu": words[1]}
    offload = by_flags["--zero 1,2,3 --offload-optimizer none,cpu --offload-params none,cpu"]  # the ranges verified
    assert offload == {"space.zero": [1, 2, 3], "space.offload_optimizer": ["none", "cpu"],
                       "space.offload_params": ["none", "cpu"]}
    picked = next(s["change"] for s in doc["suggestions"] if s["changes"] == offload)
    # What the re-solve chose, named: 8.03e9 bf16 weights are 14.96 GiB, a T4's whole 15 GiB, so parameters leave
    # the GPU, which DeepSpeed does only under ZeRO-3; 12 bytes of fp32 states per parameter go with them.
    assert "ZeRO-3" in picked and "optimizer states in CPU memory, parameters in CPU memory" in picked, picked
    assert any(f.startswith("--gpus") for f in by_flags) and any(f.startswith("--gpu ") for f in by_flags)


def test_a_reason_every_placement_shares_is_said_once(runner):
    """An NCCL knob on one GPU refuses every ZeRO/offload placement for the same reason: one sentence, not one per
    placement."""
    result = run_cli(runner, "plan", "llama-3.1-8b", "--gpu", "h100-sxm-80gb", "--gpus", "1", "--nccl-buffsize", "8MiB",
                     code=2)
    assert result.stderr.count("creates no NCCL communicator") == 1
    assert "placement=" not in result.stderr


def test_distinct_reasons_keep_the_value_of_a_reason_of_one_value():
    from memplan.planner.train_plan import distinct_reasons

    excluded = ["tp=3: 3 does not divide 32 heads.", "placement=(zero 2): rule A.", "placement=(zero 3): rule A.",
                "a sentence without a value."]
    assert distinct_reasons(excluded) == "tp=3: 3 does not divide 32 heads.; rule A.; a sentence without a value."
    assert distinct_reasons(excluded, limit=1) == "tp=3: 3 does not divide 32 heads."
