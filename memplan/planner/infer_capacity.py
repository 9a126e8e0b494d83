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
from memplan.planner.request import Candidate
from memplan.planner.serve_cost import serve_cost


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
    from memplan.estimator import estimate
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


def _group_shape(total: int, gpus_per_node: int, tp: int, max_nodes: int) -> tuple[int, int] | None:
    """(GPUs used per node, nodes) for ``total`` GPUs: the most GPUs per node (at most ``gpus_per_node``, a
    multiple of tp, so a tensor-parallel group stays inside a node) that divides ``total``; None if none fits."""
    for per_node in range(min(total, gpus_per_node), 0, -1):
        if total % per_node == 0 and per_node % tp == 0 and total // per_node <= max_nodes:
            return per_node, total // per_node
    return None


def _layout(req: Any, choice: dict[str, Any], make_config: Any) -> tuple[JobConfig, int] | None:
    """The cheapest replica count for one (tp, pp, ep, quant, kv dtype) layout serving C sequences of T
    tokens: (config, GPUs), or None when one replica holds no sequence or the GPUs run out."""
    from memplan.estimator import estimate
    from memplan.search import largest_fitting

    base = req.base
    want = base.micro_batch
    group = choice["tp"] * choice["pp"]
    limit = base.gpus_per_node * base.nodes
    shape = _group_shape(group * choice["ep"], base.gpus_per_node, choice["tp"], base.nodes)  # ep must divide dp
    if shape is None:
        return None
    try:
        cfg = make_config(base, {**choice, "batch": 1})
        cfg = JobConfig.model_validate({**cfg.model_dump(), "gpus_per_node": shape[0], "nodes": shape[1]})
        per_replica = largest_fitting(estimate(req.model, req.gpu, cfg, host=req.host), "micro_batch")
    except (MemplanError, ValueError):
        return None
    if per_replica <= 0:
        return None
    replicas = max(choice["ep"], -(-want // per_replica))
    while replicas * group <= limit:
        shape = _group_shape(replicas * group, base.gpus_per_node, choice["tp"], base.nodes)
        if shape is not None and replicas % choice["ep"] == 0:
            out = {**cfg.model_dump(), "gpus_per_node": shape[0], "nodes": shape[1], "micro_batch": -(-want // replicas)}
            return JobConfig.model_validate(out), replicas * group
        replicas += 1
    return None


def plan_min_gpus(req: Any, dims: dict[str, tuple], make_config: Any, result: Any) -> None:
    """min-gpus / min-cost for serving: the fewest GPUs (tp × pp × data-parallel replicas) that hold
    ``micro_batch`` (C) concurrent sequences of ``infer.context`` (T) tokens, each replica holding
    ceil(C / replicas) of them; min-cost ranks the same layouts by price per hour. Every plan is
    re-estimated with exact bytes."""
    from memplan.estimator import estimate

    keys = ("tp", "pp", "ep", "quant", "kv_dtype")
    price = req.gpu.price_per_hour_usd or 0.0
    for key in product(*(dims[k] for k in keys)):
        found = _layout(req, dict(zip(keys, key, strict=True)), make_config)
        if found is None:
            continue
        cfg, gpus = found
        est = estimate(req.model, req.gpu, cfg, host=req.host)
        if not est.fits:
            continue
        from memplan.memory.context import Context

        sc = serve_cost(Context(est.arch, cfg, req.gpu, req.host))
        value = gpus * price if req.objective.value == "min-cost" else float(gpus)
        extras = {"ttft_s": sc.ttft_s, "tpot_s": sc.tpot_s, "tokens_per_s_replica": sc.tokens_per_s_replica,
                  "replicas": sc.replicas, "concurrent_sequences": cfg.micro_batch * sc.replicas}
        result.candidates.append(Candidate(cfg, est, sc.tpot_s, sc.tokens_per_s, value, "", extras))
