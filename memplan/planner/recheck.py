"""The solve → exact re-check → no-good cut loop every plan goes through: each solution of the ILP (or of its
row search, ``ilp_search``) is re-checked by ``estimate`` with exact bytes at the phase peak, and cut off for
the next solve whether or not it fits, so no plan is ever reported that the exact model rejects."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from memplan.config import JobConfig
from memplan.errors import MemplanError
from memplan.estimator import Estimate, estimate
from memplan.planner.ilp import IlpBuilder
from memplan.planner.ilp_search import RowSearch
from memplan.planner.request import PlanRequest, PlanResult, seconds_left

MAX_REJECTED = 20
MAX_TIES = 4
"""Plans beyond ``--top`` still collected while their objective ties the best one's, so the documented ranking
(``rank_candidates``), not the solver's path, picks the best among ties and ``--top`` never changes it."""


def _ties(value: float, best: float | None) -> bool:
    """Whether an objective value equals the best one to 12 significant digits (``rank_candidates``' rounding)."""
    return best is not None and float(f"{value:.12g}") <= float(f"{best:.12g}")


def verified_solutions(req: PlanRequest, builder: IlpBuilder | RowSearch, result: PlanResult,
                       to_config: Callable[[Any], JobConfig]) -> Iterator[tuple[Any, JobConfig, Estimate]]:
    """Solve, re-check each solution with exact bytes, and cut it off for the next solve: yields up to
    ``req.top_k`` (solution, config, estimate) that fit; a solution the exact check rejects is cut and
    skipped (at most MAX_REJECTED). Sets ``result``'s solver status and the reason when none is found."""
    if req.debug_lp:
        builder.write_lp(req.debug_lp)
    found = rejected = 0
    best: float | None = None
    while (found < req.top_k + MAX_TIES) and rejected < MAX_REJECTED:
        limit = seconds_left(req)
        if limit <= 0:
            if not found:
                no_plan_reason("time_limit", req.time_limit_s, result)
            return
        sol = builder.solve(time_limit=limit, solver=req.solver)
        if found >= req.top_k and (sol.status not in ("optimal", "feasible") or not _ties(sol.objective, best)):
            return  # beyond top_k only plans tied with the best are collected, for a ranking independent of --top
        if sol.status not in ("optimal", "feasible"):
            no_plan_reason(sol.status, req.time_limit_s, result)
            return
        if sol.status == "feasible":
            result.solver_status = feasible_status(sol.gap)
        cfg = to_config(sol)
        builder.exclude(sol.choice, f"cut_{found}_{rejected}")
        try:
            est = estimate(req.model, req.gpu, cfg, host=req.host)
        except MemplanError:  # a combination the exact model rejects: cut, as one that does not fit
            rejected += 1
            continue
        if not est.fits:
            rejected += 1
            continue
        found += 1
        best = sol.objective if best is None else best
        yield sol, cfg, est


def feasible_status(gap: float | None) -> str:
    """The solver status of a plan the time limit cut short: the best found, and how far from optimal at most when
    the search knows its bound (``ilp_search``)."""
    if gap is None:
        return "feasible (time limit reached; best incumbent)"
    return f"feasible (time limit reached; best incumbent, within {gap:.2%} of the optimum)"


def no_plan_reason(status: str, time_limit_s: float, result: PlanResult) -> None:
    """After a solve that returned no plan: with no plan found so far, a time limit is an error the user
    can fix (a clear message, exit 2); any other status (infeasible, unbounded) is recorded as the
    solver's status of an infeasible result."""
    if result.candidates:
        if status == "time_limit":  # another part of the space was cut short: the best found may not be optimal
            result.solver_status = "feasible (time limit reached; best incumbent)"
        return
    if status == "time_limit":
        raise MemplanError(f"the solver reached its time limit ({time_limit_s:g} s) before finding any plan; "
                           "raise --time-limit.")
    result.solver_status = status


