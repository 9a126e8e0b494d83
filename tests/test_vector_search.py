"""``vector_search.largest_batches`` (stacked phase lines, a narrowed bisection) gives the scalar search's answer.

The fits here are built by hand: random straight lines per column, phases, and an allocator-style share
``ceil(k · the tier's peak)``. The reference is the scalar path's own search (``grid.largest_ok``) over the slack
that ``vector.Fit`` computes with Python ints (``Fit.at``, ``Fit.peak``) and ``vector.verdict``."""

from __future__ import annotations

from fractions import Fraction

from hypothesis import given, settings
from hypothesis import strategies as st

from memplan.grid import largest_ok
from memplan.search import MAX_BATCH
from memplan.vector import Fit, verdict
from memplan.vector_probe import TIERS
from memplan.vector_search import largest_batches

STEP = ("forward", "backward", "optimizer_step")
GIB = 2**30


@st.composite
def fits(draw: st.DrawFn) -> tuple[Fit, list[dict[str, int]], list[int]]:
    sizes = sorted(draw(st.lists(st.integers(1, 8192), min_size=1, max_size=3, unique=True)))
    columns, gh, phases = [], {s: {} for s in sizes}, {}
    for i in range(draw(st.integers(1, 4))):
        col = f"{draw(st.sampled_from(('gpu', 'gpu', 'cpu')))}:c{i}_bytes"
        columns.append(col)
        alive = draw(st.one_of(st.none(), st.frozensets(st.sampled_from(STEP), min_size=1)))
        phases[col] = alive
        for s in sizes:  # bytes per batch from 0 (constant) to a few GiB, as weights and activations give
            gh[s][col] = (draw(st.integers(0, 4 * GIB)) * (s if draw(st.booleans()) else 1) // 8192,
                          draw(st.integers(0, 80 * GIB)))
    share: dict = {}
    if draw(st.booleans()):
        share["gpu:runtime/reserve_bytes"] = (Fraction(draw(st.integers(1, 20)), 100), frozenset())
        columns.append("gpu:runtime/reserve_bytes")
        phases["gpu:runtime/reserve_bytes"] = None
    fit = Fit(columns, gh, share, phases, STEP)
    templates = [{"gpu_capacity_bytes": draw(st.integers(1, 200)) * GIB, "cpu_capacity_bytes": draw(st.integers(0, 2048)) * GIB,
                  "nvme_capacity_bytes": 0, "required_headroom_bytes": draw(st.sampled_from((0, GIB, 5 * GIB)))}
                 for _ in range(draw(st.integers(1, 4)))]
    return fit, templates, sizes


def scalar_largest(fit: Fit, template: dict[str, int], s: int) -> int:
    """The scalar sweep's search (``grid.largest_ok``) over the slack of the fit's exact int records."""
    def slack(b: int) -> int:
        values = fit.complete({c: b * g + h for c, (g, h) in fit.gh[s].items()})
        return verdict({t: fit.peak(values, t) for t in TIERS}, template)[2]

    return largest_ok(slack, hi=MAX_BATCH)


@settings(max_examples=200, deadline=None)
@given(drawn=fits())
def test_largest_batches_equal_the_scalar_search(drawn: tuple) -> None:
    fit, templates, sizes = drawn
    found = largest_batches(fit, templates, sizes)
    assert found == [{s: scalar_largest(fit, t, s) for s in sizes} for t in templates]
