"""Presenting ``memplan check``: one human line per recipe, the JSON contract, and the summary."""

from __future__ import annotations

from typing import Any

from memplan.check import Outcome, exit_code
from memplan.report.json_out import SCHEMA_VERSION, estimate_dict
from memplan.report.plan_out import _choice as choice_text
from memplan.report.schemas import validated

LABEL = {"fits": "PASS", "does_not_fit": "FAIL", "error": "ERROR"}
CONTINUED = " " * 6
"""Where a recipe's further lines start (its plan, and the rest of a line folded to 80 columns in a pipe)."""


def plan_summary(o: Outcome) -> str:
    """``plan: tp=2 pp=1 ...`` for a planned recipe whose plan fits, else ''."""
    best = o.plan.best if o.plan is not None else None
    if best is None or o.estimate is None:
        return ""
    layers = f"; {best.layer_map}" if best.layer_map else ""
    return f"plan: {choice_text(best)}{layers}"


def outcome_line(o: Outcome) -> str:
    """``PASS  name  fits: 71.32 GiB of 79.65 GiB (10.4% headroom)``, with the plan when one was made."""
    line = f"{LABEL[o.status]:<5} {o.name}  {o.reason}"
    summary = plan_summary(o)
    return f"{line}\n{CONTINUED}{summary}" if summary else line


def summary_line(outcomes: list[Outcome]) -> str:
    counts = status_counts(outcomes)
    parts = [f"{counts['fits']} fit", f"{counts['does_not_fit']} do not fit"]
    if counts["error"]:
        parts.append(f"{counts['error']} invalid")
    n = len(outcomes)
    return f"{n} recipe{'s' if n != 1 else ''}: {', '.join(parts)}"


def status_counts(outcomes: list[Outcome]) -> dict[str, int]:
    return {"total": len(outcomes), **{s: sum(1 for o in outcomes if o.status == s) for s in LABEL}}


def plan_dict(o: Outcome) -> dict[str, Any] | None:
    if o.plan is None:
        return None
    best = o.plan.best if o.estimate is not None else None
    return {
        "status": o.plan.status if best is not None else "infeasible",
        "objective": o.plan.objective.value,
        "solver_status": o.plan.solver_status,
        "configuration": plan_summary(o).removeprefix("plan: ") or None,
        "step_time_s": round(best.step_time_s, 6) if best else None,
        "tokens_per_s": round(best.tokens_per_s, 3) if best else None,
    }


def outcome_dict(o: Outcome) -> dict[str, Any]:
    return {
        "name": o.name,
        "path": str(o.path),
        "status": o.status,
        "ok": o.ok,
        "reason": o.reason,
        "mode": o.mode,
        "seconds": round(o.seconds, 3),
        "tiers": [{"tier": t.tier.value, "total_bytes": t.total, "capacity_bytes": t.capacity,
                   "headroom_bytes": t.headroom, "headroom_pct": round(t.headroom_pct, 3),
                   "required_headroom_bytes": t.required, "ok": t.ok} for t in o.tiers],
        "plan": plan_dict(o),
        "estimate": estimate_dict(o.estimate) if o.estimate is not None else None,
    }


def check_dict(outcomes: list[Outcome]) -> dict[str, Any]:
    """The check JSON contract (memplan/schema/check.schema.json), validated by its pydantic model."""
    code = exit_code(outcomes)
    return validated("check", {
        "schema_version": SCHEMA_VERSION,
        "ok": code == 0,
        "exit_code": code,
        "counts": status_counts(outcomes),
        "recipes": [outcome_dict(o) for o in outcomes],
    })


def render_outcome(o: Outcome, fmt: str) -> None:
    """As each recipe is checked: its error once on stderr; in the table, one line per recipe on stdout (an
    invalid recipe's line names it and points to stderr rather than repeat the error)."""
    import sys

    if o.status == "error":
        sys.stderr.write(f"memplan: {o.reason}\n")
    if fmt == "table":
        from memplan.report.table import piped

        line = f"{LABEL[o.status]:<5} {o.name}  (the error is on stderr)" if o.status == "error" else outcome_line(o)
        sys.stdout.write(piped(line, indent=CONTINUED) + "\n")


def render_outcomes(outcomes: list[Outcome], fmt: str, junit: Any, *, timings: bool = True) -> None:
    """After every recipe: the JSON document or the summary line, and the JUnit file when asked for."""
    import sys

    if fmt == "json":
        from memplan.report.json_out import dumps

        sys.stdout.write(dumps(check_dict(outcomes)) + "\n")
    else:
        sys.stdout.write(summary_line(outcomes) + "\n")
    if junit is not None:
        from memplan.errors import MemplanError
        from memplan.report.junit import write_junit

        try:
            write_junit(outcomes, junit, timings=timings)
        except OSError as exc:
            raise MemplanError(f"--junit: cannot write {junit}: {exc.strerror or exc}.") from None
