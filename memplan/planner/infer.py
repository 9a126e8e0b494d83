"""Planning an inference/serving job: tp × pp, weight quantization, KV-cache dtype, batch and context.

Decode is memory-bandwidth bound (Pope et al. 2022): one step reads every weight byte and every
cached K/V byte of a stage; stages run one after another for a token. Throughput is
batch / step time. The throughput of each (tp, pp, quant, kv dtype, batch, context) row is a
factor-table value, and memory per stage is the sum of a weights factor and a KV/workspace factor.
"""

from __future__ import annotations

from itertools import product
from typing import Any

from memplan.arch.build import build_architecture
from memplan.config import JobConfig
from memplan.errors import MemplanError
from memplan.memory import components, runtime
from memplan.memory.breakdown import Tier, tier_total
from memplan.memory.context import Context
from memplan.planner import cost
from memplan.planner.dims import MAX_BATCH_SEARCH, MAX_CONTEXT_SEARCH, MIN_CONTEXT, pp_candidates, tp_candidates
from memplan.planner.ilp import Entry, Factor, IlpBuilder, Problem
from memplan.planner.space import Objective, powers_of_two

W_DIMS = ("tp", "pp", "quant")
KV_DIMS = ("tp", "pp", "kv_dtype", "batch", "context")
TP_ALLREDUCE_LATENCY_S = 10e-6
"""Per all-reduce latency floor at decode's tiny messages (an assumption, NCCL ring on NVLink)."""


def infer_config(base: JobConfig, choice: dict[str, Any]) -> JobConfig:
    upd: dict[str, Any] = {k: choice[k] for k in ("tp", "pp", "quant") if k in choice}
    if "batch" in choice:
        upd["micro_batch"] = choice["batch"]
    infer = {k: choice[k] for k in ("kv_dtype", "context") if k in choice}
    data = {**base.model_dump(), **upd}
    if infer:
        data["infer"] = {**data["infer"], **infer}
    return JobConfig.model_validate(data)


def _stage_rows(req: Any, cfg: JobConfig) -> list[list]:
    arch = build_architecture(req.model)
    ctx = Context(arch, cfg, req.gpu, req.host)
    components.validate(ctx)
    return [components.job_rows(ctx.at_stage(s), []) for s in range(cfg.pp)]


def _dims(req: Any, arch: Any) -> tuple[dict[str, tuple], list[str]]:
    base, space = req.base, req.space
    excluded: list[str] = []
    dims: dict[str, tuple] = {
        "tp": tp_candidates(arch, base, space, excluded),
        "pp": pp_candidates(arch, base, space, excluded),
        "quant": space.quant or (base.quant,),
        "kv_dtype": space.kv_dtype or (base.infer.kv_dtype,),
    }
    if req.objective is Objective.MAX_BATCH:
        dims["batch"] = space.batch or powers_of_two(MAX_BATCH_SEARCH)
    else:
        dims["batch"] = space.batch or (base.micro_batch,)
    if req.objective is Objective.MAX_CONTEXT:
        dims["context"] = space.context or tuple(s for s in powers_of_two(MAX_CONTEXT_SEARCH) if s >= MIN_CONTEXT)
    else:
        dims["context"] = space.context or (base.infer.context,)
    return dims, excluded


def build(req: Any) -> tuple[Problem, list[str], dict[tuple, float]]:
    arch = build_architecture(req.model)
    dims, excluded = _dims(req, arch)
    weights: dict[tuple, Entry] = {}
    for key in product(*(dims[d] for d in W_DIMS)):
        try:
            cfg = infer_config(req.base, dict(zip(W_DIMS, key, strict=True)))
            stages = _stage_rows(req, cfg.model_copy(update={"infer": cfg.infer.model_copy(update={"context": 1})}))
        except (MemplanError, ValueError) as exc:
            excluded.append(str(exc))
            continue
        wrows = [[r for r in rows if r.component.startswith("weights")] for rows in stages]
        weights[key] = Entry(gpu=tuple(tier_total(r, Tier.GPU) for r in wrows), cpu=max(tier_total(r, Tier.CPU) for r in wrows))
    kv: dict[tuple, Entry] = {}
    for key in product(*(dims[d] for d in KV_DIMS)):
        try:
            cfg = infer_config(req.base, dict(zip(KV_DIMS, key, strict=True)))
            stages = _stage_rows(req, cfg)
        except (MemplanError, ValueError) as exc:
            excluded.append(str(exc))
            continue
        krows = [[r for r in rows if not r.component.startswith("weights")] for rows in stages]
        kv[key] = Entry(gpu=tuple(tier_total(r, Tier.GPU) for r in krows))
    if not weights or not kv:
        raise MemplanError("no inference configuration in the search space is valid: " + "; ".join(excluded[:3]))
    value_dims = ("tp", "pp", "quant", "kv_dtype", "batch", "context")
    speed: dict[tuple, float] = {}
    values: dict[tuple, Entry] = {}
    for key in product(*(dims[d] for d in value_dims)):
        c = dict(zip(value_dims, key, strict=True))
        w = weights.get((c["tp"], c["pp"], c["quant"]))
        k = kv.get(tuple(c[d] for d in KV_DIMS))
        if w is None or k is None:
            continue
        step = decode_seconds(req, c, w, k)
        speed[key] = c["batch"] / step
        values[key] = Entry(seconds=step, value=_value(req.objective, c, speed[key]))
    factors = [Factor("weights", W_DIMS, weights), Factor("kv", KV_DIMS, kv), Factor("speed", value_dims, values)]
    st = runtime.settings(req.gpu, req.base)
    margin = runtime.safety_margin_bytes(capacity_bytes=req.gpu.memory_bytes, pct=req.base.safety_margin_pct)
    context, pct = st.context_bytes + margin, st.reserve_pct  # fixed rows (context, safety margin) off the capacity
    kind = {"min-memory": "min_gpu_bytes"}.get(req.objective.value, "max_value")
    problem = Problem(dims=dims, factors=factors, layers=None, num_layers=len(arch.layers) or 1,
                      gpu_capacity=req.gpu.memory_bytes - context, cpu_capacity=req.host.cpu_ram_bytes,
                      nvme_capacity=req.host.nvme_bytes, objective=kind, gpu_scale_pct=float(pct))
    return problem, excluded, speed


def _value(objective: Objective, c: dict[str, Any], tokens_per_s: float) -> float:
    if objective is Objective.MAX_BATCH:
        return float(c["batch"])
    if objective is Objective.MAX_CONTEXT:
        return float(c["context"])
    return tokens_per_s


def decode_seconds(req: Any, c: dict[str, Any], w: Entry, k: Entry) -> float:
    """One decode step: every stage reads its weights and KV cache; stages run in sequence;
    tensor parallelism adds two all-reduces of B·D per layer (Megatron-LM Sec. 3)."""
    bw = req.gpu.hbm_bandwidth_gbps * 1e9
    read = sum(w.gpu) + sum(k.gpu)
    seconds = cost.decode_seconds_per_token(bytes_read=read, hbm_bytes_per_s=bw)
    spec = req.model
    layers = spec.num_hidden_layers or 0
    if c["tp"] > 1:
        nbytes = c["batch"] * (spec.hidden_size or 0) * 2
        seconds += 2 * layers * (TP_ALLREDUCE_LATENCY_S + cost.ring_allreduce_seconds(
            nbytes=nbytes, ranks=c["tp"], bytes_per_s=req.gpu.interconnect_gbps * 1e9))
    return seconds


def plan_inference(req: Any) -> Any:
    from memplan.planner.plan import Candidate, PlanResult

    result = PlanResult(status="infeasible", objective=req.objective)
    problem, excluded, speed = build(req)
    result.excluded = sorted(set(excluded))
    from memplan.planner.plan import verified_solutions

    for sol, cfg, est in verified_solutions(req, IlpBuilder(problem), result,
                                            lambda sol: infer_config(req.base, sol.choice)):
        key = tuple(sol.choice[d] for d in ("tp", "pp", "quant", "kv_dtype", "batch", "context"))
        tps = speed[key]
        result.candidates.append(Candidate(cfg, est, cfg.micro_batch / tps, tps, sol.objective, ""))
    if result.candidates:
        from memplan.planner.plan import rank_candidates

        rank_candidates(result.candidates)
        result.status = "optimal"
    elif req.suggest:
        from memplan.planner.suggest import diagnose

        diagnose(req, result)
    return result
