"""The per-layer part of the ILP: layers grouped into interchangeable runs, integer counts of layers per
mode, the transportation linearization against the global choices, workspace, suffix ordering and the
expansion of counts back into one mode per layer. ``IlpBuilder`` mixes it in (see ``ilp``).
"""

from __future__ import annotations

import itertools
from typing import Any

from memplan.planner.ilp_model import Entry, Factor, LayerBlock, Problem, ceil_unit, safe_name, stage_of


class LayerBlocks:
    """Variables and constraints of ``Problem.blocks``; expects the builder's ``pulp``, ``p``, ``prob``,
    ``z`` and ``_factor``."""

    pulp: Any
    p: Problem
    prob: Any
    z: dict[tuple[str, tuple], Any]
    n: dict[tuple[int, Any, str], Any]
    any: dict[tuple[int, Any, str], Any]
    w: dict[tuple[int, Any, str, tuple], Any]
    ws: dict[tuple[int, int, int, int], Any]
    groups: list[dict[tuple[int, int], list[int]]]

    def _factor(self, f: Factor) -> None:  # provided by IlpBuilder
        raise NotImplementedError

    def _groups(self, lb: LayerBlock) -> dict[tuple[int, int], list[int]]:
        """Layers that share a class and a segment no pipeline stage boundary cuts (with ``contiguous``:
        runs of adjacent such layers), in layer order."""
        pps = self.p.dims.get("pp", (1,)) if lb.stages else (1,)
        n = self.p.num_layers
        classes = lb.classes or list(range(len(lb.gpu)))
        chunks = self.p.chunk_map
        place = [tuple((stage_of(layer, n, p, self.p.stage_map), chunks[p][layer] if p in chunks else 0) for p in pps)
                 for layer in range(len(lb.gpu))]
        segments = {s: i for i, s in enumerate(dict.fromkeys(place))}  # stages under every pp: no boundary inside
        groups: dict[tuple[int, int], list[int]] = {}
        run = -1
        for layer in range(len(lb.gpu)):
            seg = segments[place[layer]]
            if lb.contiguous:
                if layer == 0 or place[layer] != place[layer - 1] or classes[layer] != classes[layer - 1]:
                    run += 1
                key = (seg, run)
            else:
                key = (seg, classes[layer])
            groups.setdefault(key, []).append(layer)
        return groups

    def _layers(self, bi: int, lb: LayerBlock) -> None:
        """Per-layer modes. Layers that are identical and that no stage boundary separates are
        interchangeable, so a group G takes integer counts ``n[G, m]`` of layers per mode (the
        per-layer binaries with their symmetry removed; ``modes()`` expands them, most-saving mode
        on the earliest layers). The product with the key selector ``y`` is linearized per group in
        the tight transportation form: Σ_m v[G,m,k] = |G|·y[k] and Σ_k v[G,m,k] = n[G,m]."""
        pl = self.pulp
        keys = sorted({k for per in lb.gpu for m in per.values() for k in m}, key=repr)
        self._factor(Factor(f"layerkey{bi}", lb.key_dims, {k: Entry() for k in keys}))
        y = {k: self.z[f"layerkey{bi}", k] for k in keys}
        groups = self._groups(lb)
        self.groups.append(groups)
        for gi, (gkey, members) in enumerate(groups.items()):
            size, tag = len(members), f"{bi}_{gi}"
            for m in lb.modes:
                self.n[bi, gkey, m] = self.prob.add_variable(f"n_{tag}_{safe_name(m)}", lowBound=0, upBound=size, cat="Integer")
                self.any[bi, gkey, m] = self.prob.add_variable(f"any_{tag}_{safe_name(m)}", cat="Binary")
                self.prob += self.n[bi, gkey, m] <= size * self.any[bi, gkey, m], f"any_{tag}_{safe_name(m)}"
                for j, k in enumerate(keys):
                    allowed = k in lb.gpu[members[0]][m]  # a mode without an entry for a key is not available there
                    self.w[bi, gkey, m, k] = self.prob.add_variable(f"v_{tag}_{safe_name(m)}_{j}", lowBound=0,
                                                           upBound=None if allowed else 0)
            self.prob += pl.lpSum(self.n[bi, gkey, m] for m in lb.modes) == size, f"count_{tag}"
            for j, k in enumerate(keys):
                self.prob += (pl.lpSum(self.w[bi, gkey, m, k] for m in lb.modes) == size * y[k], f"vk_{tag}_{j}")
            for m in lb.modes:
                self.prob += (pl.lpSum(self.w[bi, gkey, m, k] for k in keys) == self.n[bi, gkey, m],
                              f"vm_{tag}_{safe_name(m)}")
        if lb.suffix_mode is not None:
            self._suffix(bi, lb.suffix_mode, groups)
        if lb.workspace is not None:
            self._workspace(bi, lb, y)
        if lb.key_bounds:
            layer_seconds = pl.lpSum(sec * self.w[bi, g, m, k] for g, members in groups.items()
                                     for m, keyed in lb.seconds[members[0]].items() for k, sec in keyed.items() if sec)
            self.prob += (layer_seconds >= pl.lpSum(b * y[k] for k, b in lb.key_bounds.items() if k in y),
                          f"bound_{bi}")

    def _suffix(self, bi: int, mode: str, groups: dict[tuple[int, int], list[int]]) -> None:
        """Layers in ``mode`` form a suffix: a group holding any of them makes every later group all ``mode``."""
        ordered = list(groups.items())
        for (gkey, _), (hkey, later) in itertools.pairwise(ordered):
            self.prob += (self.n[bi, hkey, mode] >= len(later) * self.any[bi, gkey, mode],
                          f"suffix_{bi}_{safe_name(gkey)}")

    def _workspace(self, bi: int, lb: LayerBlock, y: dict[tuple, Any]) -> None:
        """``ws[b, p, s, kind]``: bytes live while the largest layer of stage s (under pp = p) in a workspace mode
        runs: ws ≥ Σ_k W(k)·(any[G,m] + y[k] − 1) for every group G of that stage. ``kind`` 0 is ``workspace``,
        1 ``flight_workspace`` (× micro-batches in flight); when both are alive in the same phases they share
        one variable (kind 0)."""
        assert lb.workspace is not None
        split = lb.flight_workspace is not None and lb.workspace_phases != lb.flight_phases
        for p in self.p.dims.get("pp", (1,)):
            for s in range(p):
                if split:
                    self._ws_var(bi, lb, y, p, s, 0, work=True, held=False)
                    self._ws_var(bi, lb, y, p, s, 1, work=False, held=True)
                else:
                    self._ws_var(bi, lb, y, p, s, 0, work=True, held=True)

    def _ws_var(self, bi: int, lb: LayerBlock, y: dict[tuple, Any], p: int, s: int, kind: int, *, work: bool,
                held: bool) -> None:
        pl = self.pulp
        var = self.prob.add_variable(f"ws{bi}_pp{p}_s{s}" + ("_h" if kind else ""), lowBound=0)
        self.ws[bi, p, s, kind] = var
        for gi, (gkey, members) in enumerate(self.groups[bi].items()):
            rep = members[0]
            if stage_of(rep, self.p.num_layers, p, self.p.stage_map) != s:
                continue
            for m, keyed in lb.workspace[rep].items():  # type: ignore[index]
                extra = lb.flight_workspace[rep][m] if lb.flight_workspace and held else {}
                coef = {k: ceil_unit((n if work else 0) + self.p.key_flight(p, s, lb.key_dims, k) * extra.get(k, 0))
                        for k, n in keyed.items()
                        if "pp" not in lb.key_dims or k[lb.key_dims.index("pp")] == p}
                total = sum(coef.values())
                if total:
                    expr = total * self.any[bi, gkey, m] + pl.lpSum(c * y[k] for k, c in coef.items()) - total
                    self.prob += var >= expr, f"ws{bi}_{p}_{s}_{gi}_{safe_name(m)}" + ("_h" if kind else "")

    def modes(self, bi: int = 0) -> list[str]:
        """Per-layer modes of block ``bi`` in the solution: in each group the most-saving mode on its first
        layers (``suffix_mode`` on its last)."""
        lb = self.p.blocks[bi]
        out = [lb.modes[0]] * len(lb.gpu)
        order = sorted(lb.modes, key=lambda m: (m == lb.suffix_mode, -lb.savings_rank.get(m, 0)))
        for gkey, members in self.groups[bi].items():
            counts = {m: round(self.n[bi, gkey, m].value() or 0) for m in lb.modes}
            queue = [m for m in order for _ in range(counts[m])]
            for layer, m in zip(members, queue, strict=True):
                out[layer] = m
        return out

    def _block_terms(self, bi: int, lb: LayerBlock, p: int, s: int, phase: str | None = None,
                     moment: dict | None = None) -> list[Any]:
        """The block's GPU terms on stage ``s`` under pp = ``p`` alive in ``phase`` (None: all of them), the in-flight
        layers counted at ``moment`` (``ilp_moments``; None: the whole-stage count)."""
        if not lb.stages and p != 1:
            return []
        tables = [lb.gpu] if lb.alive(phase, lb.phases) else []
        if lb.phase_gpu is not None:
            tables += [t for ph, t in lb.phase_gpu.items() if phase is None or ph == phase]
        terms = []
        for gkey, members in self.groups[bi].items():
            rep = members[0]
            if stage_of(rep, self.p.num_layers, p, self.p.stage_map) != s:
                continue
            for m in lb.modes:
                for k in lb.gpu[rep][m]:
                    nbytes = sum(t[rep][m].get(k, 0) for t in tables)
                    if nbytes and ("pp" not in lb.key_dims or k[lb.key_dims.index("pp")] == p):
                        mult = self.p.layer_flight(p, s, rep, lb.key_dims, k, moment) if lb.in_flight else 1
                        terms.append(ceil_unit(nbytes * mult) * self.w[bi, gkey, m, k])
        if (bi, p, s, 0) in self.ws and lb.alive(phase, shared_phases(lb)):
            terms.append(self.ws[bi, p, s, 0])
        if (bi, p, s, 1) in self.ws and lb.alive(phase, lb.flight_phases):
            terms.append(self.ws[bi, p, s, 1])
        return terms

    def _block_sum(self, attr: str) -> list[Any]:
        return [v * self.w[bi, g, m, k] for bi, lb in enumerate(self.p.blocks) if getattr(lb, attr) is not None
                for g, members in self.groups[bi].items()
                for m, keyed in getattr(lb, attr)[members[0]].items() for k, v in keyed.items() if v]


def shared_phases(lb: LayerBlock) -> frozenset[str] | None:
    """Phases of the workspace variable of kind 0: ``workspace_phases``, or, when the in-flight workspace shares
    that variable (``_workspace``), the union of both (None: all phases)."""
    split = lb.flight_workspace is not None and lb.workspace_phases != lb.flight_phases
    if split or lb.flight_workspace is None:
        return lb.workspace_phases
    if lb.workspace_phases is None or lb.flight_phases is None:
        return None
    return lb.workspace_phases | lb.flight_phases
