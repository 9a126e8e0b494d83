"""Solver failure paths: the CBC fallback when HiGHS is missing, a clear error when no solver is usable,
infeasible and unbounded models reported as such, time limits (best incumbent, or a clear message),
and ``--debug-lp`` writing the model that is actually solved."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pulp
import pytest
from typer.testing import CliRunner

from memplan.catalog.resolve import load_model
from memplan.catalog.schema import HostSpec
from memplan.catalog.store import catalog_gpu
from memplan.cli.app import app
from memplan.config import Job, JobConfig
from memplan.errors import MemplanError
from memplan.planner import ilp, solvers
from memplan.planner.ilp import Entry, Factor, IlpBuilder, Problem, Solution
from memplan.planner.plan import PlanRequest, plan
from memplan.planner.space import SearchSpace

RUNNER = CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1"})
REAL_LIST_SOLVERS = pulp.listSolvers
HIGHS, CBC, BUNDLED_CBC = "HiGHS", "COIN_CMD", "PULP_CBC_CMD"


def without(*names: str) -> Any:
    """A stand-in for ``pulp.listSolvers`` that reports ``names`` as not installed."""

    def fake(onlyAvailable: bool = False) -> list[str]:  # PuLP's own keyword name
        return [s for s in REAL_LIST_SOLVERS(onlyAvailable=onlyAvailable) if s not in names]

    return fake


@pytest.fixture(autouse=True)
def _every_row_through_the_solver(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests are about the solver's paths: rows the search answers without one (``ilp_fast``) would skip them."""
    from memplan.planner import ilp_search

    monkeypatch.setattr(ilp_search, "cheapest_plan", lambda problem: None)


@pytest.fixture
def solver_log(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Class names of the PuLP solvers that ``get_solver`` hands to the ILP, in order."""
    used: list[str] = []
    real = solvers.get_solver

    def spy(*args: Any, **kwargs: Any) -> Any:
        chosen = real(*args, **kwargs)
        used.append(type(chosen).__name__)
        return chosen

    monkeypatch.setattr(solvers, "get_solver", spy)
    return used


def request(model: str = "gpt2", *, job: str = "full", gpus: int = 2, **space: Any) -> PlanRequest:
    base = JobConfig(job=Job(job), gpus_per_node=gpus, **({} if job == "infer" else {"seq_len": 1024}))
    return PlanRequest(model=load_model(model), gpu=catalog_gpu("a100-sxm-40gb"), host=HostSpec(), base=base,
                       space=SearchSpace(**space), top_k=2, time_limit_s=60.0, suggest=False)


def summary(result: Any) -> list[tuple[Any, ...]]:
    """What a plan answers: per candidate its configuration, its exact GPU bytes and its step time."""
    from memplan.memory.breakdown import Tier

    return [(c.config.model_dump_json(), c.estimate.total(Tier.GPU), round(c.step_time_s, 9)) for c in result.candidates]


# -- fallback ------------------------------------------------------------------------------------

def test_both_solvers_are_installed_here() -> None:
    """The fallback test below is only meaningful when both solvers exist to begin with."""
    assert solvers.available() == ["highs", "cbc"]


@pytest.mark.parametrize("job,space", [("full", {"tp": (1, 2), "pp": (1, 2), "zero": (0, 3), "micro_batch": (2,)}),
                                       ("infer", {"batch": (1, 8), "context": (1024, 4096)})])
def test_cbc_fallback_gives_the_same_answer(monkeypatch: pytest.MonkeyPatch, solver_log: list[str],
                                            job: str, space: dict[str, Any]) -> None:
    with_highs = plan(request(job=job, **space))
    assert solver_log and set(solver_log) == {"HiGHS"}
    solver_log.clear()
    monkeypatch.setattr(pulp, "listSolvers", without(HIGHS))
    assert solvers.available() == ["cbc"]
    with_cbc = plan(request(job=job, **space))
    assert solver_log and set(solver_log) == {"COIN_CMD"}  # CBC through COIN_CMD, not the deprecated PULP_CBC_CMD
    assert with_cbc.status == with_highs.status == "optimal"
    assert summary(with_cbc)[0] == summary(with_highs)[0]  # this space has a unique fastest plan
    assert [c.step_time_s for c in with_cbc.candidates] == pytest.approx([c.step_time_s for c in with_highs.candidates])


def test_no_usable_solver_is_one_clear_sentence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pulp, "listSolvers", without(HIGHS, CBC, BUNDLED_CBC))
    with pytest.raises(MemplanError, match="no usable MILP solver"):
        solvers.get_solver()
    result = RUNNER.invoke(app, ["plan", "gpt2", "--gpus", "2"])
    assert result.exit_code == 2, result.stdout
    assert result.stderr.count("\n") == 1 and "pip install highspy" in result.stderr


def test_asking_for_a_missing_solver_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pulp, "listSolvers", without(CBC, BUNDLED_CBC))
    result = RUNNER.invoke(app, ["plan", "gpt2", "--gpus", "2", "--solver", "cbc"])
    assert result.exit_code == 2 and "no usable MILP solver (cbc)" in result.stderr, result.stderr
    result = RUNNER.invoke(app, ["plan", "gpt2", "--gpus", "2", "--solver", "glpk"])
    assert result.exit_code == 2 and "unknown solver 'glpk'" in result.stderr, result.stderr


# -- statuses ------------------------------------------------------------------------------------

def toy_problem(capacity: int) -> Problem:
    """One choice, x in {a, b}; row a needs 10 MiB on the GPU, row b 20 MiB."""
    mib = 2**20
    factor = Factor("toy", ("x",), {("a",): Entry(gpu=(10 * mib,), seconds=2.0),
                                    ("b",): Entry(gpu=(20 * mib,), seconds=1.0)})
    return Problem(dims={"x": ("a", "b")}, factors=[factor], layers=None, num_layers=1,
                   gpu_capacity=capacity, cpu_capacity=2**40, nvme_capacity=0)


@pytest.mark.parametrize("solver", ["highs", "cbc"])
def test_statuses_of_a_toy_problem(solver: str) -> None:
    mib = 2**20
    assert IlpBuilder(toy_problem(64 * mib)).solve(solver=solver).choice == {"x": "b"}  # faster, fits
    assert IlpBuilder(toy_problem(15 * mib)).solve(solver=solver).choice == {"x": "a"}  # only a fits
    assert IlpBuilder(toy_problem(5 * mib)).solve(solver=solver).status == "infeasible"


@pytest.mark.parametrize("solver,status", [("highs", "infeasible_or_unbounded"), ("cbc", "unbounded")])
def test_an_unbounded_model_is_reported_as_unbounded(solver: str, status: str) -> None:
    """CBC proves unboundedness; HiGHS's MIP solver says 'unbounded or infeasible', which PuLP would
    report as plain 'Infeasible' - memplan keeps HiGHS's undecided answer instead."""
    builder = IlpBuilder(toy_problem(64 * 2**20))
    y = builder.prob.add_variable("y", lowBound=0)
    builder.prob.setObjective(-1 * y + builder.seconds_expr())  # minimize -y with y unbounded above
    builder.prob += y >= 1, "y_floor"
    assert builder.solve(solver=solver).status == status


def test_a_time_limit_before_any_incumbent_is_not_taken_for_a_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    """PuLP maps HiGHS's kTimeLimit to 'integer feasible' even with no incumbent; the values are then not
    a choice (not one value per dimension) and memplan reports a time limit, not a plan."""
    builder = IlpBuilder(toy_problem(64 * 2**20))
    real_solve = pulp.LpProblem.solve

    def no_incumbent(self: Any, solver: Any = None, **kw: Any) -> int:
        status = real_solve(self, solver, **kw)
        for var in self.variables():
            var.varValue = 0.0
        self.sol_status = pulp.LpSolutionIntegerFeasible
        return status

    monkeypatch.setattr(pulp.LpProblem, "solve", no_incumbent)
    assert builder.solve().status == "time_limit"


def test_infeasible_plan_is_an_answer_with_exit_1() -> None:
    result = RUNNER.invoke(app, ["plan", "qwen2.5-7b", "--gpu", "rtx-4090", "--zero", "0", "--format", "json"])
    assert result.exit_code == 1, result.stderr
    doc = json.loads(result.stdout)
    assert doc["status"] == "infeasible" and doc["best"] is None
    assert doc["solver_status"] in ("infeasible", "optimal"), doc["solver_status"]


def test_unbounded_or_infeasible_solver_status_is_recorded(monkeypatch: pytest.MonkeyPatch) -> None:
    def unbounded(self: IlpBuilder, **kw: Any) -> Solution:
        return Solution("unbounded", {}, [], float("nan"), float("nan"))

    monkeypatch.setattr(IlpBuilder, "solve", unbounded)
    result = plan(request())
    assert result.status == "infeasible" and result.best is None
    assert result.solver_status == "unbounded"


# -- time limits ---------------------------------------------------------------------------------

def test_time_limit_with_an_incumbent_reports_it_as_such(monkeypatch: pytest.MonkeyPatch) -> None:
    """A solve stopped by its time limit with a plan in hand returns that plan, labelled a best incumbent."""
    real = IlpBuilder.solve

    def stopped_early(self: IlpBuilder, **kw: Any) -> Solution:
        sol = real(self, **kw)
        return Solution("feasible", sol.choice, sol.modes, sol.objective, sol.seconds) if sol.choice else sol

    monkeypatch.setattr(IlpBuilder, "solve", stopped_early)
    result = plan(request())
    assert result.best is not None
    assert result.solver_status == "feasible (time limit reached; best incumbent)"
    result = plan(request(job="infer", batch=(1, 8)))
    assert result.best is not None and "best incumbent" in result.solver_status


def test_time_limit_without_an_incumbent_is_a_clear_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(IlpBuilder, "solve", lambda self, **kw: Solution("time_limit", {}, [], 0.0, 0.0))
    with pytest.raises(MemplanError, match=r"time limit \(60 s\).*raise --time-limit"):
        plan(request())
    result = RUNNER.invoke(app, ["plan", "gpt2", "--gpus", "2", "--time-limit", "5"])
    assert result.exit_code == 2 and "raise --time-limit" in result.stderr, result.stderr


def test_a_real_time_limit_ends_in_an_answer_or_the_message() -> None:
    """HiGHS under a 1 ms limit on a large problem: a labelled incumbent, or the time-limit message."""
    result = RUNNER.invoke(app, ["plan", "llama-3.1-70b", "--gpus", "8", "--nodes", "2", "--time-limit", "0.001",
                                 "--format", "json"])
    if result.exit_code == 2:
        assert "time limit" in result.stderr, result.stderr
    else:
        doc = json.loads(result.stdout)
        assert result.exit_code in (0, 1), result.stderr
        assert doc["solver_status"] in ("optimal", "infeasible") or "best incumbent" in doc["solver_status"]


# -- --debug-lp ----------------------------------------------------------------------------------

def test_debug_lp_writes_the_model_that_is_solved(tmp_path: Path) -> None:
    path = tmp_path / "plan.lp"
    result = RUNNER.invoke(app, ["plan", "gpt2", "--gpus", "2", "--zero", "0,1,2,3", "--top", "1",
                                 "--debug-lp", str(path), "--format", "json"])
    assert result.exit_code == 0, result.stderr
    text = path.read_text()
    for section in ("Minimize", "Subject To", "gpu_mem_pp1_stage0", "Binaries", "End"):
        assert section in text, section
    highspy = pytest.importorskip("highspy", reason="re-solving the written LP needs highspy")
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    assert h.readModel(str(path)) == highspy.HighsStatus.kOk
    h.run()
    best = json.loads(result.stdout)["best"]
    from memplan.planner.ilp import SECONDS_SCALE  # the LP's objective is in milliseconds

    assert h.getInfo().objective_function_value / SECONDS_SCALE == pytest.approx(best["objective_value"], rel=1e-6)


@pytest.mark.parametrize("target", ["directory", "missing_parent"])
def test_debug_lp_to_an_unwritable_path_is_exit_2(tmp_path: Path, target: str) -> None:
    path = tmp_path if target == "directory" else tmp_path / "no" / "such" / "plan.lp"
    result = RUNNER.invoke(app, ["plan", "gpt2", "--gpus", "2", "--debug-lp", str(path)])
    assert result.exit_code == 2, result.stderr
    assert result.stderr.startswith("memplan: --debug-lp: cannot write"), result.stderr


def test_lp_unit_rounding_is_conservative() -> None:
    """Demand rounds up and capacity down to the ILP's unit, so a tolerance cannot admit an overfull plan."""
    assert ilp.ceil_unit(1) == 1 and ilp.ceil_unit(ilp.UNIT) == 1 and ilp.ceil_unit(ilp.UNIT + 1) == 2
