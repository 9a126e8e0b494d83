"""The exact fit of one group's record columns, and its checks against the scalar model (``memplan.vector``):

* Probes: the scalar model at micro-batch b ∈ {1, 2} × up to three of the grid's sizes s (smallest,
  middle, largest), on a reference GPU. Each tier-component column (``gpu:weights/params_bytes``, ...) is
  fitted as ``b·g(s) + h(s)`` with g, h the exact (rational) polynomials through the probed sizes, whose
  coefficients must have small denominators (``MAX_COEFFICIENT_DENOMINATOR``).
* A column that this form misses may be a share of the other columns of its tier,
  ``ceil(k · Σ others)`` with a small rational k (the allocator reserve is ``ceil(5% of the rest)``).
* Checks: the scalar model at more points (b = 2·b_top + 3 and 7·b_top + 5 with b_top the largest swept
  batch or 4, b_top at the middle and the grid's other sizes, and for ``max-batch`` the batch the search
  finds and the one after, at both ends of the range it extrapolates to: ``vector_search.frontier``) must
  equal the fit exactly, column by column; tier totals must be the sums of their components, ``fits`` and
  ``headroom_bytes`` what the totals and capacities give, and every other column constant.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np

from memplan.units import GiB
from memplan.vector_probe import TIERS, NotExact, Probe, Prober, is_fitted, tier_of


def lagrange(xs: list[int], ys: list[int]) -> list[Fraction]:
    """Coefficients (constant first) of the polynomial through (xs, ys), exact."""
    n = len(xs)
    coef = [Fraction(0)] * n
    for i in range(n):
        basis, denom = [Fraction(1)], Fraction(1)
        for j in range(n):
            if j != i:
                basis = [Fraction(0), *basis]  # multiply by x
                for k in range(len(basis) - 1):
                    basis[k] -= xs[j] * basis[k + 1]
                denom *= xs[i] - xs[j]
        for k in range(n):
            coef[k] += ys[i] * basis[k] / denom
    return coef


def poly(coef: list[Fraction], x: Any) -> Any:
    out = 0
    for c in reversed(coef):
        out = out * x + c
    return out


@dataclass
class Fit:
    """The fitted columns of one reference GPU as exact ints per swept size: value = b·G + H, or for a
    share column ceil(k · the sum of its tier's other fitted columns)."""

    columns: list[str]
    """Every record column, in the scalar record's order."""
    gh: dict[int, dict[str, tuple[int, int]]]
    """size -> column -> (G, H)."""
    share: dict[str, tuple[Fraction, frozenset[str]]]
    """Share columns: (k, the columns of the tier left out of the peak it is a share of)."""
    phases: dict[str, Any]
    """Fitted column -> its phases (None: alive throughout), as the scalar rows carry them."""
    step: tuple
    """The step's phases."""

    alive: dict[tuple[str, frozenset[str]], list[list[str]]] = field(default_factory=dict, repr=False, compare=False)
    """(tier, skip) -> per phase of the step, the tier's columns (but ``skip``) alive in it (``peak``'s memo)."""
    peak_memo: dict[tuple[int, int], dict[str, int]] = field(default_factory=dict, repr=False, compare=False)
    """(b, s) -> each tier's peak (``peaks_at``'s memo; the fit no longer changes once checked)."""

    def peak(self, values: dict[str, Any], tier: str, skip: frozenset[str] = frozenset()) -> Any:
        """The tier's largest phase total over the step, as ``breakdown.peak``: per phase, the sum of the
        tier's columns (but ``skip``) alive in it. ``values``: ints, or numpy arrays (element-wise)."""
        per_phase = self.alive.get((tier, skip))
        if per_phase is None:
            cols = [c for c in self.phases if tier_of(c) == tier and c not in skip]
            per_phase = self.alive[(tier, skip)] = [
                [c for c in cols if self.phases[c] is None or phase in self.phases[c]] for phase in self.step]
        best: Any = None
        for alive in per_phase:
            tot = sum((values[c] for c in alive if c in values), 0)
            if best is None:
                best = tot
            elif isinstance(best, np.ndarray) or isinstance(tot, np.ndarray):
                best = np.maximum(best, tot)
            else:
                best = max(best, tot)
        return best

    def complete(self, out: dict[str, Any]) -> dict[str, Any]:
        """``out`` (the polynomial columns) with each share column added: ceil(k · its tier's peak of the
        columns not left out), as ``runtime.allocator_reserve_bytes`` of ``components.allocated_peak``."""
        for col, (k, left_out) in self.share.items():
            others = self.peak(out, tier_of(col), left_out)
            out[col] = -((-others * k.numerator) // k.denominator)
        return out

    def peaks_at(self, b: int, s: int) -> dict[str, int]:
        """Each tier's peak at (b, s), memoized (every GPU of a class is checked at the same points)."""
        if (b, s) not in self.peak_memo:
            values = self.at(b, s)
            self.peak_memo[(b, s)] = {t: self.peak(values, t) for t in TIERS}
        return self.peak_memo[(b, s)]

    def at(self, b: int, s: int) -> dict[str, int]:
        out = self.complete({c: b * g + h for c, (g, h) in self.gh[s].items()})
        return {c: out[c] for c in self.columns if c in out}


def find_share(p: Prober, fit: Fit, col: str, points: list[tuple[int, int]], top: dict[str, Any]) -> tuple:
    """(k, left out) such that ``col`` = ceil(k · the peak of its tier's other columns but those left out)
    at every point; the columns that may be left out are those constant over the points (a fixed
    overhead the share is not taken of: the runtime rows, the CUDA context). NotExact when no such form fits."""
    same = [c for c in fit.gh[points[0][1]] if c != col and tier_of(c) == tier_of(col)]
    constant = [c for c in same if len({p.at(b, s).record.get(c, 0) for b, s in points}) == 1]
    runtime = frozenset(c for c in constant if c.split(":", 1)[1].startswith("runtime/"))
    tier = tier_of(col)

    def others(rec: dict[str, Any], left_out: frozenset[str]) -> int:
        return fit.peak({c: rec.get(c, 0) for c in same}, tier, left_out)

    for left_out in dict.fromkeys([runtime, frozenset(), *(frozenset([c]) for c in constant), frozenset(constant)]):
        base = others(top, left_out)
        if base <= 0:
            continue
        k = Fraction(top[col], base).limit_denominator(SHARE_DENOMINATOR)
        if all(p.at(b, s).record[col] == -((-others(p.at(b, s).record, left_out) * k.numerator) // k.denominator)
               for b, s in points):
            return k, left_out
    raise NotExact(col)


def predict(fit: Fit, template: dict[str, Any], b: int, s: int, size_key: str) -> tuple[dict[str, Any], int]:
    """The record at (b, s) on the GPU whose record ``template`` is, and its slack (free bytes)."""
    rec = dict(template)
    rec["micro_batch"], rec[size_key] = b, s
    values = fit.at(b, s)
    totals: dict[str, int] = {}
    for col, v in values.items():
        rec[col] = v
        rec[col[:-6] + "_gib"] = round(v / GiB, 4)
        totals[tier_of(col)] = totals.get(tier_of(col), 0) + v
    peaks = {tier: fit.peak(values, tier) for tier in TIERS}  # fits and headroom: the peak (Estimate.fits)
    for tier in TIERS:
        total = totals.get(tier, 0)
        rec[f"{tier}_total_bytes"], rec[f"{tier}_total_gib"] = total, round(total / GiB, 4)
    rec["fits"], rec["headroom_bytes"], slack = verdict(peaks, rec)
    rec["ok"] = slack >= 0
    return rec, slack


def verdict(peaks: dict[str, int], rec: dict[str, Any]) -> tuple[bool, int, int]:
    """(fits, headroom, slack) of the tiers' ``peaks`` against the capacities and required headroom in ``rec``:
    as ``Estimate.fits`` and ``headroom_bytes`` (the GPU and each tier holding something) and the sweep's slack
    (``grid._Evaluator.slack``)."""
    headroom = min(rec[f"{t}_capacity_bytes"] - peaks[t] for t in TIERS if t == "gpu" or peaks[t] > 0)
    fits = all(rec[f"{t}_capacity_bytes"] >= peaks[t] for t in TIERS)
    return fits, headroom, min(headroom, rec["gpu_capacity_bytes"] - peaks["gpu"] - rec["required_headroom_bytes"])


def check_on_gpu(fit: Fit, prober: Prober, gpu: str, b: int, s: int, size_key: str) -> None:
    """``check`` of ``gpu``'s probe at (b, s), where the class's first GPU's probe at (b, s) is already checked:
    another GPU's record is that record with only the columns that read the GPU recomputed
    (``Prober.at``), so only those are checked here, against the fit's peaks."""
    probe, first = prober.at(b, s, gpu), prober.at(b, s)
    if probe is first:
        return
    fits, headroom, slack = verdict(fit.peaks_at(b, s), probe.record)
    rec = probe.record
    if (rec["fits"], rec["headroom_bytes"], rec["ok"], probe.slack) != (fits, headroom, slack >= 0, slack):
        raise NotExact(f"{gpu} at ({b}, {s})")


def check(fit: Fit, probe: Probe, b: int, s: int, size_key: str) -> None:
    """NotExact unless the fit gives this probe's record exactly, every column in the same order."""
    if probe.step != fit.step or any(fit.phases.get(c, ph) != ph for c, ph in probe.phases.items()):
        raise NotExact(f"phases at ({b}, {s})")
    rec, slack = predict(fit, probe.record, b, s, size_key)
    if list(probe.record) != fit.columns or rec != probe.record or slack != probe.slack:
        raise NotExact(f"probe ({b}, {s})")


def build_fit(p: Prober, sizes: list[int], b_top: int, size_key: str) -> Fit:
    """Fit every tier-component column on the prober's GPU and check it (module docstring)."""
    sp = sorted({sizes[0], sizes[len(sizes) // 2], sizes[-1]})
    columns = list(p.at(1, sp[0]).record)
    fitted = [c for c in columns if is_fitted(c)]
    gh: dict[int, dict[str, tuple[int, int]]] = {s: {} for s in sizes}
    off: set[str] = set()
    probes = {(b, s): p.at(b, s).record for b in (1, 2) for s in sp}
    for col in fitted:
        at = {key: rec.get(col, 0) for key, rec in probes.items()}
        if len(sp) == 1:  # one size: the line through b = 1 and 2, integer by construction
            gh[sp[0]][col] = (at[2, sp[0]] - at[1, sp[0]], 2 * at[1, sp[0]] - at[2, sp[0]])
            continue
        g = lagrange(sp, [at[2, s] - at[1, s] for s in sp])
        h = lagrange(sp, [2 * at[1, s] - at[2, s] for s in sp])
        values = [(poly(g, Fraction(s)), poly(h, Fraction(s))) for s in sizes]
        if any(gs.denominator != 1 or hs.denominator != 1 for gs, hs in values) or \
                any(c.denominator > MAX_COEFFICIENT_DENOMINATOR for c in (*g, *h)):
            off.add(col)
        for s, (gs, hs) in zip(sizes, values, strict=True):
            gh[s][col] = (int(gs), int(hs))
    checks = [*([(b_top, sp[1])] if len(sp) > 2 else []), (2 * b_top + 3, sizes[0]), (7 * b_top + 5, sizes[-1]),
              *((b_top, s) for s in sizes if s not in sp)]
    phases: dict[str, Any] = {}
    for b, s in [*((b, s) for b in (1, 2) for s in sp), *checks]:
        for c, ph in p.at(b, s).phases.items():
            if phases.setdefault(c, ph) != ph:
                raise NotExact(f"{c}: phases vary")
    fit = Fit(columns, gh, {}, phases, p.at(1, sp[0]).step)
    top = p.at(7 * b_top + 5, sizes[-1]).record
    for col in fitted:  # a column off the polynomial form may be a share of its tier's other columns
        if col not in off and all(p.at(b, s).record.get(col) == b * gh[s][col][0] + gh[s][col][1] for b, s in checks):
            continue  # a polynomial column is b·G + H whatever the share columns are (``Fit.at``)
        if any(tier_of(c) == tier_of(col) for c in fit.share):
            raise NotExact(col)
        fit.share[col] = find_share(p, fit, col, [*((b, s) for b in (1, 2) for s in sp), *checks], top)
        for s in sizes:
            gh[s].pop(col)
    for b, s in [*((b, s) for b in (1, 2) for s in sp), *checks]:
        check(fit, p.at(b, s), b, s, size_key)
    return fit


MAX_COEFFICIENT_DENOMINATOR = 64
"""A fitted polynomial's coefficients must be fractions with small denominators (a formula's /2 or /tp):
a rounded column (ceil of a share) interpolated through a few points gets large ones, and must not pass
as a polynomial that happens to agree at the check points (hypothesis found one such agreement)."""

SHARE_DENOMINATOR = 100
"""Largest denominator of a share k, found as the fraction nearest to (column / its tier's other columns):
a whole percentage (5% is 1/20), as ``allocator_reserve_pct`` is; any other k fails the checks (scalar path)."""


def fitted_arrays(fit: Fit, sizes: list[int], b: np.ndarray) -> dict[str, np.ndarray]:
    """Every fitted column (share columns included) at micro-batch ``b[i]`` and size ``sizes[i]``, int64."""
    out = {}
    for col in fit.gh[sizes[0]]:
        g = np.array([fit.gh[s][col][0] for s in sizes], dtype=np.int64)
        h = np.array([fit.gh[s][col][1] for s in sizes], dtype=np.int64)
        out[col] = b * g + h
    return fit.complete(out)
