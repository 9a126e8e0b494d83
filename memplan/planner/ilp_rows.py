"""The ILP's rows besides the GPU memory rows (``ilp.IlpBuilder``): the gradients kept across micro-batches when the
chosen shape accumulates, and the host tiers (CPU and NVMe per node). Functions of the builder."""

from __future__ import annotations

import math
from typing import Any

from memplan.planner.ilp_model import UNIT, ceil_unit


def persist_rows(builder: Any) -> dict[tuple[int, int], Any]:
    """``u[p, s]`` = the persisting bytes (gradients kept across micro-batches) of the chosen states row when
    the chosen shape row accumulates: u ≥ Σ_k c_k·z_k − M·(1 − Σ_accumulating z), u ≥ 0."""
    pl, P = builder.pulp, builder.p
    out: dict[tuple[int, int], Any] = {}
    if not P.persist_phases:
        return out
    for p in P.dims.get("pp", (1,)):
        accum = [builder.z[f.name, k] for f in P.factors for k, e in f.entries.items() if e.accumulates
                 and ("pp" not in f.dims or k[f.dims.index("pp")] == p)]
        for s in range(p):
            terms, big = [], 0
            for f in P.factors:
                for k, e in f.entries.items():
                    if s < len(e.persist_gpu) and e.persist_gpu[s] and (
                            "pp" not in f.dims or k[f.dims.index("pp")] == p):
                        c = ceil_unit(e.persist_gpu[s])
                        terms.append(c * builder.z[f.name, k])
                        big = max(big, c)
            if not terms or not accum:
                continue
            var = builder.prob.add_variable(f"persist_pp{p}_s{s}", lowBound=0)
            out[p, s] = var
            builder.prob += var >= pl.lpSum(terms) - big * (1 - pl.lpSum(accum)), f"persist_pp{p}_s{s}"
    return out


def host_rows(builder: Any) -> None:
    """CPU and NVMe per node (factors and the blocks' CPU bytes), and the CPU floor."""
    pl, P = builder.pulp, builder.p
    for tier, capacity in (("cpu", P.cpu_capacity), ("nvme", P.nvme_capacity)):
        terms = [ceil_unit(getattr(e, tier)) * builder.z[f.name, k]
                 for f in P.factors for k, e in f.entries.items() if getattr(e, tier)]
        if tier == "cpu":
            terms += [ceil_unit(n) * builder.w[bi, g, m, k] for bi, lb in enumerate(P.blocks) if lb.cpu is not None
                      for g, members in builder.groups[bi].items()
                      for m, keyed in lb.cpu[members[0]].items() for k, n in keyed.items() if n]
        if terms:
            builder.prob += pl.lpSum(terms) <= math.floor(capacity / UNIT) - 1, f"{tier}_mem"
    floors = [ceil_unit(e.cpu_floor) * builder.z[f.name, k] for f in P.factors for k, e in f.entries.items()
              if e.cpu_floor]
    if floors:
        builder.prob += pl.lpSum(floors) <= math.floor(P.cpu_capacity / UNIT) - 1, "cpu_mem_floor"
