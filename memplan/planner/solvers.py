"""Which MILP solver PuLP uses: HiGHS (highspy) first, CBC as the fallback, a clear error if neither works; and
how a solve's answer reads (its status in memplan's words, HiGHS's gap), which ``ilp`` re-exports."""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Iterator
from typing import Any

from memplan.errors import MemplanError

PREFERENCE = ("highs", "cbc")


def available() -> list[str]:
    import pulp

    names = set(pulp.listSolvers(onlyAvailable=True))
    out = []
    if "HiGHS" in names:
        out.append("highs")
    if names & {"COIN_CMD", "PULP_CBC_CMD"}:
        out.append("cbc")
    return out


def cbc_path() -> str:
    """The CBC executable: one on PATH (``pip install pulp[cbc]``, the route PuLP 4 keeps) if present, else the
    binary bundled with PuLP 3 (what its deprecated ``PULP_CBC_CMD`` runs), driven through ``COIN_CMD`` either way."""
    import shutil

    import pulp

    found = shutil.which("cbc")
    if found:
        return found
    bundled = getattr(getattr(pulp, "PULP_CBC_CMD", None), "pulp_cbc_path", None)  # gone in PuLP 4
    return str(bundled or "cbc")


MIP_REL_GAP = 1e-6
MIP_ABS_GAP = 0.0
"""Gaps both solvers stop at (HiGHS ``mip_rel_gap``/``mip_abs_gap``, CBC ``ratioGap``/``allowableGap``).
HiGHS's defaults (1e-4 relative, 1e-6 absolute) let it stop at a plan 0.01% slower than the best, or
10 ms slower than a 10 ms step: memplan's objectives are seconds, so the absolute gap must be 0."""


_DEADLINE: list[float] = []
"""Monotonic times by which every solve must end (innermost last): ``--time-limit`` bounds a whole command."""


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Within this block, each solve's time limit is cut to what is left of ``seconds`` from now."""
    import time

    _DEADLINE.append(time.monotonic() + seconds)
    try:
        yield
    finally:
        _DEADLINE.pop()


def remaining(time_limit: float | None) -> float | None:
    """``time_limit`` cut to the time left before the innermost deadline (at least 1 ms: the solver then stops
    at once and the planner reports the time limit)."""
    import time

    if not _DEADLINE:
        return time_limit
    left = max(_DEADLINE[-1] - time.monotonic(), 1e-3)
    return left if time_limit is None else min(time_limit, left)


def get_solver(name: str | None = None, *, time_limit: float | None = None) -> Any:
    """A PuLP solver object: ``name`` if given and usable, else the first usable of PREFERENCE."""
    import pulp

    time_limit = remaining(time_limit)

    usable = available()
    if name is not None and name not in PREFERENCE:
        raise MemplanError(f"unknown solver {name!r}; choose highs or cbc.")
    order = [name] if name else list(PREFERENCE)
    for candidate in order:
        if candidate in usable:
            if candidate == "highs":
                return pulp.HiGHS(msg=False, timeLimit=time_limit, gapRel=MIP_REL_GAP, gapAbs=MIP_ABS_GAP,
                                  output_flag=False, log_to_console=False)
            return pulp.COIN_CMD(path=cbc_path(), msg=False, timeLimit=time_limit, gapRel=MIP_REL_GAP, gapAbs=MIP_ABS_GAP)
    wanted = name or " or ".join(PREFERENCE)
    raise MemplanError(f"no usable MILP solver ({wanted}); install highspy (pip install highspy) "
                       "or a PuLP build that bundles CBC.")


@contextlib.contextmanager
def quiet_stdout() -> Iterator[None]:
    """Silence what native solver code writes to file descriptor 1 (HiGHS prints its banner there
    whatever ``output_flag`` says), so ``--format json`` keeps stdout pure JSON."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no real stdout (e.g. captured by a test runner): nothing to protect
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def _highs_gap(prob: Any) -> float | None:
    """HiGHS's relative MIP gap of the incumbent a time limit left (|primal − dual| / |primal|), when HiGHS solved."""
    model = getattr(prob, "solverModel", None)
    try:
        gap = float(model.getInfo().mip_gap) if model is not None else math.nan
    except (AttributeError, TypeError, ValueError):
        return None
    return gap if math.isfinite(gap) and gap >= 0 else None


def _status_name(label: str, prob: Any) -> str:
    """The solve's status in memplan's words. PuLP reports HiGHS's kUnboundedOrInfeasible (a MIP whose
    relaxation is unbounded) as Infeasible; memplan keeps HiGHS's own, undecided answer."""
    if label == "Infeasible":
        model = getattr(prob, "solverModel", None)
        if model is not None and getattr(model.getModelStatus(), "name", "") == "kUnboundedOrInfeasible":
            return "infeasible_or_unbounded"
        return "infeasible"
    if label == "Unbounded":
        return "unbounded"
    if label == "Not Solved":
        return "time_limit"
    return label.lower().replace(" ", "_")
