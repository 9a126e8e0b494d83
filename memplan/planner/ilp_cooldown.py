"""The cool-down of FSDP2 under an interleaved pipeline as exact linear rows of the ILP
(``engine_buffers.fsdp2_cooldown_rows``, ``arch.parallel.cooldown_gradient_excess``).

At the start of backward a stage holds its in-flight activations; in the cool-down that follows, chunk j's first
backward adds its accumulated gradients (j·g in all, g = ⌈G/v⌉) while the backwards before it have freed micro-batches
of the chunks they ran: Σ_l n_{j,l}·a_l, a_l layer l's saved bytes of one micro-batch in its recompute mode, n_{j,l}
the micro-batches of l's chunk freed by then. The excess over the in-flight peak, max(0, max_j (j·g − Σ_l n_{j,l}·a_l)),
is a maximum of terms linear in the per-layer choices, so the ILP carries it exactly: a variable e[p, s] ≥ 0 with
e ≥ j·g·y[k] − Σ n_{j,G}·a_G(m, k)·w[G, m, k] for every j and layer key k (y the key's selector, w the per-layer
counts; n_{j,G} the least over the group's layers, the safe side), added to the start-of-backward row of stage s.
Bytes are in ``UNIT``s: the gradients rounded up, the freed bytes down.

``Problem.cooldown`` holds the data: (pp, stage, layer key) → one (j·g bytes, {layer: n_{j,l}}) per j.
"""

from __future__ import annotations

from typing import Any

from memplan.planner.ilp_model import UNIT, LayerBlock, Problem, ceil_unit, stage_of

PHASE = "backward_start"
"""The phase the cool-down row is counted in (``registry``: ``gradients/fsdp_pp_cooldown``)."""


def add_rows(builder: Any) -> dict[tuple[int, int], Any]:
    """e[p, s] variables and their rows in ``builder`` (an ``IlpBuilder`` whose first block is the recompute block)."""
    P, pl = builder.p, builder.pulp
    out: dict[tuple[int, int], Any] = {}
    if not P.cooldown or P.layers is None:
        return out
    for tag, ((p, s, k), terms) in enumerate(P.cooldown.items()):
        if ("layerkey0", k) not in builder.z or ("pp" in P.dims and p not in P.dims["pp"]):
            continue  # builder.z holds a selector per layer key of the block (``IlpBuilder._layers``)
        var = out.get((p, s))
        if var is None:
            var = out[p, s] = builder.prob.add_variable(f"cooldown_pp{p}_s{s}", lowBound=0)
        y = builder.z["layerkey0", k]
        for j, (grad, freed) in enumerate(terms):
            gone = []
            for gkey, members in builder.groups[0].items():
                if stage_of(members[0], P.num_layers, p, P.stage_map) != s:
                    continue
                n = min(freed.get(layer, 0) for layer in members)
                for m, keyed in P.layers.gpu[members[0]].items():
                    c = (n * keyed.get(k, 0)) // UNIT
                    if c:
                        gone.append(c * builder.w[0, gkey, m, k])
            builder.prob += var >= ceil_unit(grad) * y - pl.lpSum(gone), f"cooldown_pp{p}_s{s}_{j}_{tag}"
    return out


def fast_units(problem: Problem, lb: LayerBlock | None, modes: list[str] | None, p: int, s: int, phase: str | None,
               key: tuple | None) -> int:
    """The cool-down units of stage ``s`` with per-layer ``modes`` at layer key ``key`` (``ilp_fast``'s arithmetic):
    max(0, max_j (⌈j·g⌉ − Σ_l ⌊n_{j,l}·a_l⌋)), per layer rather than per group (the MIP's least n is safer still)."""
    if phase not in (None, PHASE) or lb is None or modes is None or key is None:
        return 0
    terms = problem.cooldown.get((p, s, key))
    if not terms:
        return 0
    best = 0
    for grad, freed in terms:
        gone = sum((n * lb.gpu[layer][modes[layer]].get(key, 0)) // UNIT for layer, n in freed.items())
        best = max(best, ceil_unit(grad) - gone)
    return best
