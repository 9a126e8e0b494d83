"""``max-batch`` over a class of GPUs at once: the fitted step as straight lines in the micro-batch, searched
with numpy over (GPU, size), and the few batches the search extrapolates to that are then checked exactly.

A ``vector.Fit`` gives each tier-component column as ``b·G + H`` per size (exact ints) and at most one
share column per tier, ``ceil(k · the tier's peak of the columns it is a share of)`` (the allocator
reserve). A tier's peak is its largest phase total (``breakdown.peak``). Per phase, the sum of the tier's
polynomial columns alive in it is itself a line ``b·G_p + H_p``, so

    peak_t(b) = max_p (b·G_p + H_p + [share alive in p] · ceil(k · max_q (b·G'_q + H'_q)))

with G'_q, H'_q the lines of the columns the share is taken of. That is what ``Fit.peak`` of
``fitted_arrays`` gives, element for element, with the phases stacked in one array (a few array operations per
tier and bisection step instead of one per column). The bytes do not depend on which GPU of the class runs
them (``vector_probe``); only the capacities and the required headroom do, so one search covers every GPU of
the class.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from memplan.search import MAX_BATCH
from memplan.vector_probe import TIERS, NotExact, tier_of

INT64_SAFE = 2**63
"""numpy int64: a tier's total at MAX_BATCH times a share's numerator must stay well below this."""


def tier_lines(fit: Any, sizes: list[int], tier: str) -> tuple[Any, Any, Any, Any] | None:
    """The tier's phases as stacked lines over ``sizes``: (G, H, on, share) with G, H int64 arrays of shape
    (phases, sizes) (the sum of the tier's polynomial columns alive in each phase), ``on`` a (phases, 1, 1)
    flag array (the share alive in the phase), and ``share`` None or (k, G', H'): the lines (one per phase) of
    the columns the share is taken of. None when the tier holds nothing (its peak is 0 at every batch)."""
    cols = [c for c in fit.gh[sizes[0]] if tier_of(c) == tier]
    share_col = next((c for c in fit.share if tier_of(c) == tier), None)
    if not cols and share_col is None:
        return None
    k, left_out = fit.share[share_col] if share_col else (None, frozenset())
    g = np.array([[fit.gh[s][c][0] for s in sizes] for c in cols], dtype=np.int64).reshape(len(cols), len(sizes))
    h = np.array([[fit.gh[s][c][1] for s in sizes] for c in cols], dtype=np.int64).reshape(len(cols), len(sizes))

    def alive(c: str, phase: Any) -> bool:
        return fit.phases[c] is None or phase in fit.phases[c]

    here = np.array([[alive(c, phase) for c in cols] for phase in fit.step], dtype=np.int64).reshape(len(fit.step), len(cols))
    kept = here * np.array([c not in left_out for c in cols], dtype=np.int64)
    on = np.array([share_col is not None and alive(share_col, phase) for phase in fit.step], dtype=bool)
    share = (k, kept @ g, kept @ h) if share_col else None  # per phase: the sum of its alive columns' lines
    return here @ g, here @ h, on[:, None, None], share


def tier_peak(lines: tuple[Any, Any, Any, Any], b: np.ndarray) -> np.ndarray:
    """The tier's phase peak at micro-batches ``b`` (shape (GPUs, sizes); exact int64), from ``tier_lines``:
    max over the phases of b·G_p + H_p (+ the share's ceil(k · max_q (b·G'_q + H'_q)) where it is alive)."""
    g, h, on, share = lines
    totals = b[None] * g[:, None, :] + h[:, None, :]
    if share is not None:
        k, gq, hq = share
        top = (b[None] * gq[:, None, :] + hq[:, None, :]).max(axis=0)
        reserve = -((-top * k.numerator) // k.denominator)
        totals = totals + on * reserve[None]
    return totals.max(axis=0)


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
    scalar slack: a bisection over a (GPU × size) array, every step exact int64 arithmetic.

    The slack (``grid._Evaluator.slack``) is min(headroom, GPU capacity − GPU peak − required headroom), the
    headroom counting the GPU and each other tier whose peak is above 0; so it is >= 0 exactly when the GPU
    peak is at most its capacity less max(required, 0) and every other tier's peak is at most its capacity
    or at most 0. A tier that holds nothing has a peak of 0 at every batch: left out, but for the GPU's bound."""
    check_int64(fit, sizes)
    lines = {t: tier_lines(fit, sizes, t) for t in TIERS}
    need = np.array([[max(r["required_headroom_bytes"], 0)] for r in templates], dtype=np.int64)
    bound = {t: np.array([[r[f"{t}_capacity_bytes"]] for r in templates], dtype=np.int64) for t in TIERS}
    bound["gpu"] = bound["gpu"] - need
    held_lines = {t: line for t in TIERS if (line := lines[t]) is not None}
    held = list(held_lines)

    def ok(b: np.ndarray) -> np.ndarray:
        good = np.ones(b.shape, dtype=bool) if lines["gpu"] is not None else np.broadcast_to(bound["gpu"] >= 0, b.shape)
        for t, line in held_lines.items():
            peak = tier_peak(line, b)
            good = good & ((peak <= bound[t]) if t == "gpu" else (peak <= bound[t]) | (peak <= 0))
        return good

    shape = (len(templates), len(sizes))
    lo, hi = np.ones(shape, dtype=np.int64), np.full(shape, MAX_BATCH + 1, dtype=np.int64)
    ok1 = ok(lo)
    if all(monotone(line) for line in held_lines.values()):
        lo, hi = narrowed(lines, bound, held, ok, ok1, lo, hi)
    while np.any(hi - lo > 1):
        mid = (lo + hi) // 2
        good = ok(mid)
        lo, hi = np.where(good, mid, lo), np.where(good, hi, mid)
    best = np.where(ok1, lo, 0).tolist()
    return [dict(zip(sizes, row, strict=True)) for row in best]


def monotone(lines: tuple[Any, Any, Any, Any]) -> bool:
    """Whether the tier's peak cannot fall as the batch grows: no line (nor share line) has a negative slope."""
    g, _, _, share = lines
    return bool((g >= 0).all()) and (share is None or (share[0] >= 0 and bool((share[1] >= 0).all())))


BRACKET_MARGIN = 2
"""Batches either side of the real-valued crossing that ``narrowed`` brackets (float rounding is far below 1)."""


def narrowed(lines: dict[str, Any], bound: dict[str, Any], held: list[str], ok: Any, ok1: Any, lo: Any,
             hi: Any) -> tuple[Any, Any]:
    """A narrow bisection bracket [lo, hi) per (GPU, size) around where the peaks cross their bounds, each one
    verified exactly (ok at lo, not ok at hi, or hi past MAX_BATCH); elements whose guess fails keep the full
    bracket, and those where even batch 1 fails are done (the answer is 0). With every peak monotone the
    bisection then ends on the same batch as from [1, MAX_BATCH + 1).

    Guess: the ceil of the share lies in [R, R + 1), R = k · max_q(b·G'_q + H'_q), so the peak is within 1 of
    max over phases p and share lines q of b·(G_p + on_p·k·G'_q) + H_p + on_p·k·H'_q, whose crossing of the
    bound C is min over (p, q) of (C − H_pq) / G_pq (float)."""
    guess = np.full(lo.shape, float(MAX_BATCH + 1))
    for t in held:
        g, h, on, share = lines[t]
        gs, hs = g[:, None, :].astype(float), h[:, None, :].astype(float)  # (phases, 1, sizes)
        if share is not None:
            k, gq, hq = float(share[0]), share[1].astype(float), share[2].astype(float)
            gs = gs + on * k * gq[None, :, :]  # (phases, share lines, sizes)
            hs = hs + on * k * hq[None, :, :]
        gs, hs = gs.reshape(-1, 1, gs.shape[-1]), hs.reshape(-1, 1, hs.shape[-1])
        room = bound[t].astype(float)[None] - hs  # (pairs, GPUs, sizes)
        with np.errstate(divide="ignore", invalid="ignore"):
            cross = np.where(gs > 0, room / np.where(gs > 0, gs, 1), np.where(room >= 0, np.inf, 0.0))
        guess = np.minimum(guess, cross.min(axis=0))
    base = np.floor(np.clip(guess, 0, MAX_BATCH + 1)).astype(np.int64)
    lo2 = np.clip(base - BRACKET_MARGIN, 1, MAX_BATCH)
    hi2 = np.clip(base + BRACKET_MARGIN + 1, 2, MAX_BATCH + 1)
    good = ok1 & ok(lo2) & ((hi2 > MAX_BATCH) | ~ok(np.minimum(hi2, MAX_BATCH)))
    done = ~ok1  # nothing fits: the answer is 0 whatever the bracket
    return np.where(good, lo2, lo), np.where(good, hi2, np.where(done, lo + 1, hi))


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
