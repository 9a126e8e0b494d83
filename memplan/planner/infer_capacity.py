"""Exact capacity candidates for inference plans, and expert-parallel choices for MoE models.

``plan --objective max-concurrency`` (``max-batch``) and ``max-context`` used to try powers of two only,
so they disagreed with ``estimate --max-batch``. Here, for every (tp, pp, ep, quant, kv dtype) layout the
exact largest batch (or context) comes from the same search ``estimate`` uses (``memplan.search``), and
those integers become the candidates; the ILP then picks the layout with the largest one, and the plan's
answer is the very integer ``estimate --max-batch`` prints for that layout.
"""

from __future__ import annotations

from itertools import product
from typing import Any

from memplan.arch.tensors import Architecture
from memplan.config import JobConfig
from memplan.errors import MemplanError


def ep_candidates(arch: Architecture, base: JobConfig, space_ep: tuple[int, ...] | None) -> tuple[int, ...]:
    """Expert-parallel degrees to try: 1 for dense models; for MoE, powers of two up to the GPU count that
    divide the number of experts (vLLM ``--enable-expert-parallel``: experts spread over the tp × dp ranks)."""
    if space_ep:
        return space_ep
    experts = arch.spec.num_experts or 0
    if not experts:
        return (1,)
    out, e = [], 1
    while e <= base.world_size:
        if experts % e == 0:
            out.append(e)
        e *= 2
    return tuple(out)


def exact_values(req: Any, dims: dict[str, tuple], field: str, make_config: Any) -> tuple[int, ...]:
    """The exact largest ``field`` ("micro_batch" or "context") of every layout in ``dims``, positive ones only."""
    from memplan.estimate import estimate
    from memplan.search import largest_fitting

    keys = ("tp", "pp", "ep", "quant", "kv_dtype", "context" if field == "micro_batch" else "batch")
    found: set[int] = set()
    for key in product(*(dims[k] for k in keys)):
        try:
            cfg = make_config(req.base, dict(zip(keys, key, strict=True)))
            value = largest_fitting(estimate(req.model, req.gpu, cfg, host=req.host), field)  # type: ignore[arg-type]
        except (MemplanError, ValueError):
            continue
        if value > 0:
            found.add(value)
    return tuple(sorted(found))
