"""``max-batch`` over a class of GPUs at once: the fitted step as straight lines in the micro-batch, searched
with numpy over (GPU, size), and the few batches the search extrapolates to that are then checked exactly.

A ``vector.Fit`` gives each tier-component column as ``b·G + H`` per size (exact ints) and at most one
share column per tier, ``ceil(k · the tier's peak of the columns it is a share of)`` (the allocator
reserve). A tier's peak is its largest phase total (``breakdown.peak``). Per phase, the sum of the tier's
polynomial columns alive in it is itself a line ``b·G_p + H_p``, so

    peak_t(b) = max_p (b·G_p + H_p + [share alive in p] · ceil(k · max_q (b·G'_q + H'_q)))

with G'_q, H'_q the lines of the columns the share is taken of. That is what ``Fit.peak`` of
``fitted_arrays`` gives, element for element, with a handful of array operations per phase instead of one
per column. The bytes do not depend on which GPU of the class runs them (``vector_probe``); only the
capacities and the required headroom do, so one search covers every GPU of the class.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from memplan.search import MAX_BATCH
from memplan.vector_probe import TIERS, NotExact, tier_of

INT64_SAFE = 2**63
"""numpy int64: a tier's total at MAX_BATCH times a share's numerator must stay well below this."""


def tier_lines(fit: Any, sizes: list[int], tier: str) -> tuple[list[tuple[Any, Any, bool]], Any]:
    """The tier's phases as lines: [(G_p, H_p, share alive in p)] (arrays over ``sizes``), and the share as
    (k, [(G'_q, H'_q)]) or None."""
    cols = [c for c in fit.gh[sizes[0]] if tier_of(c) == tier]
    g = {c: np.array([fit.gh[s][c][0] for s in sizes], dtype=np.int64) for c in cols}
    h = {c: np.array([fit.gh[s][c][1] for s in sizes], dtype=np.int64) for c in cols}
    share_col = next((c for c in fit.share if tier_of(c) == tier), None)
    k, left_out = fit.share[share_col] if share_col else (None, frozenset())

    def alive(c: str, phase: Any) -> bool:
        return fit.phases[c] is None or phase in fit.phases[c]

    def line(chosen: list[str]) -> tuple[Any, Any]:
        zero = np.zeros(len(sizes), dtype=np.int64)
        return sum((g[c] for c in chosen), zero), sum((h[c] for c in chosen), zero)

    phases, others = [], []
    for phase in fit.step:
        here = [c for c in cols if alive(c, phase)]
        phases.append((*line(here), share_col is not None and alive(share_col, phase)))
        others.append(line([c for c in here if c not in left_out]))
    return phases, (k, others) if share_col else None


def tier_peak(lines: tuple[list[tuple[Any, Any, bool]], Any], b: np.ndarray) -> np.ndarray:
    """The tier's phase peak at micro-batches ``b`` (exact int64), from ``tier_lines``."""
    phases, share = lines
    reserve: Any = 0
    if share is not None:
        k, others = share
        top = np.maximum.reduce([b * g + h for g, h in others])
        reserve = -((-top * k.numerator) // k.denominator)
    return np.maximum.reduce([b * g + h + (reserve if on else 0) for g, h, on in phases])


def check_int64(fit: Any, sizes: list[int]) -> None:
    """NotExact when a tier's total at MAX_BATCH, times its share's numerator, could overflow int64."""
    share = {tier_of(c): k for c, (k, _) in fit.share.items()}
    for t in TIERS:
        bound = max(sum(abs(fit.gh[s][c][0]) * MAX_BATCH + abs(fit.gh[s][c][1]) for c in fit.gh[s] if tier_of(c) == t)
                    for s in sizes)
        if 2 * bound * (share[t].numerator if t in share else 1) >= INT64_SAFE // 4:
            raise NotExact("int64")


def largest_batches(fit: Any, templates: list[dict[str, Any]], sizes: list[int]) -> list[dict[int, int]]:
    """Per GPU (its record template: capacities and required headroom) and size, the largest micro-batch in
    [1, MAX_BATCH] whose slack on the tiers' phase peaks is >= 0 (0: none), as ``grid.largest_ok`` on the
    scalar slack: a bisection over a (GPU × size) array, every step exact int64 arithmetic."""
    check_int64(fit, sizes)
    lines = {t: tier_lines(fit, sizes, t) for t in TIERS}
    cap = {t: np.array([[r[f"{t}_capacity_bytes"]] for r in templates], dtype=np.int64) for t in TIERS}
    need = np.array([[r["required_headroom_bytes"]] for r in templates], dtype=np.int64)

    def slack(b: np.ndarray) -> np.ndarray:
        peaks = {t: tier_peak(lines[t], b) for t in TIERS}
        worst = cap["gpu"] - need - peaks["gpu"]
        for t in TIERS:
            room = cap[t] - peaks[t]
            worst = np.minimum(worst, room if t == "gpu" else np.where(peaks[t] > 0, room, worst))
        return worst

    shape = (len(templates), len(sizes))
    lo, hi = np.ones(shape, dtype=np.int64), np.full(shape, MAX_BATCH + 1, dtype=np.int64)
    ok1 = slack(lo) >= 0
    while np.any(hi - lo > 1):
        mid = (lo + hi) // 2
        good = slack(mid) >= 0
        lo, hi = np.where(good, mid, lo), np.where(good, hi, mid)
    best = np.where(ok1, lo, 0).tolist()
    return [dict(zip(sizes, row, strict=True)) for row in best]


def frontier(members: list[Any], found: list[dict[int, int]], b_top: int) -> list[tuple[str, int, int]]:
    """The (GPU, batch, size) points to check exactly after a search: for the largest and for the smallest
    batch found beyond the fit's probes, that batch and the next (within MAX_BATCH). The fit is checked at
    b = 1, 2, 2·b_top + 3 and 7·b_top + 5 (``vector.build_fit``); these points check the straight lines
    where the search extrapolates to, at both ends of that range."""
    probed = 7 * b_top + 5
    beyond = [(b, m.gpu, s) for m, per in zip(members, found, strict=True) for s, b in per.items() if b + 1 > probed]
    if not beyond:
        return []
    points = []
    for b, gpu, s in dict.fromkeys([max(beyond), min(beyond)]):
        points += [(gpu, v, s) for v in (b, b + 1) if v <= MAX_BATCH]
    return points
