"""Planning an inference/serving job: tp × pp, weight quantization, KV-cache dtype, batch and context.

Decode is memory-bandwidth bound (Pope et al. 2022): one step reads every weight byte and every
cached K/V byte of a stage; stages run one after another for a token. Throughput is
batch / step time. The throughput of each (tp, pp, quant, kv dtype, batch, context) row is a
factor-table value, and memory per stage is the sum of a weights factor and a KV/workspace factor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from itertools import product
from typing import Any

from memplan.arch.build import build_architecture
from memplan.config import Engine, JobConfig, Offload
from memplan.errors import MemplanError
from memplan.memory import components, runtime
from memplan.memory.breakdown import Tier, tier_total
from memplan.memory.context import Context
from memplan.planner import cost
from memplan.planner.dims import pp_candidates, tp_candidates
from memplan.planner.ilp import Entry, Factor, IlpBuilder, Problem
from memplan.planner.infer_capacity import ep_candidates, exact_values, plan_min_gpus
from memplan.planner.infer_layers import (
    BLOCK_NAME,
    LayerChoices,
    build_block,
    describe,
    is_gguf,
    layer_config,
    quality_extras,
)
from memplan.planner.recheck import verified_solutions
from memplan.planner.request import Candidate, PlanRequest, PlanResult, PlanStatus, rank_candidates
from memplan.planner.serve_cost import serve_cost
from memplan.planner.space import Objective

W_DIMS = ("tp", "pp", "ep", "quant")
KV_DIMS = ("tp", "pp", "ep", "kv_dtype", "batch", "context")
VALUE_DIMS = ("tp", "pp", "ep", "quant", "kv_dtype", "batch", "context")
TP_ALLREDUCE_LATENCY_S = 10e-6
"""Per all-reduce latency floor at decode's tiny messages (an assumption, NCCL ring on NVLink)."""


def infer_config(base: JobConfig, choice: dict[str, Any]) -> JobConfig:
    upd: dict[str, Any] = {k: choice[k] for k in ("tp", "pp", "ep", "quant") if k in choice}
    if "batch" in choice:
        upd["micro_batch"] = choice["batch"]
    infer = {k: choice[k] for k in ("kv_dtype", "context") if k in choice}
    data = {**base.model_dump(), **upd}
    if infer:
        data["infer"] = {**data["infer"], **infer}
    return JobConfig.model_validate(data)


def _stage_rows(req: Any, cfg: JobConfig) -> list[list]:
    from memplan.engines import serving

    arch = build_architecture(req.model)
    ctx = Context(arch, cfg, req.gpu, req.host)
    components.validate(ctx)
    if serving.has_own_rows(cfg):
        return [serving.stage_rows(ctx.at_stage(s)) for s in range(cfg.pp)]
    return [components.job_rows(ctx.at_stage(s), []) for s in range(cfg.pp)]


def _dims(req: Any, arch: Any) -> tuple[dict[str, tuple], list[str]]:
    base, space = req.base, req.space
    excluded: list[str] = []
    dims: dict[str, tuple] = {
        "tp": tp_candidates(arch, base, space, excluded),
        "pp": pp_candidates(arch, base, space, excluded),
        "ep": ep_candidates(arch, base, getattr(space, "ep", None)),
        "quant": space.quant or (base.quant,),
        "kv_dtype": space.kv_dtype or (base.infer.kv_dtype,),
        "batch": space.batch or (base.micro_batch,),
        "context": space.context or (base.infer.context,),
    }
    if _objective(req) is Objective.MAX_BATCH and not space.batch:
        dims["batch"] = exact_values(req, dims, "micro_batch", infer_config) or (base.micro_batch,)
    if req.objective is Objective.MAX_CONTEXT and not space.context:
        dims["context"] = exact_values(req, dims, "context", infer_config) or (base.infer.context,)
    return dims, excluded


def _objective(req: Any) -> Objective:
    """max-concurrency is max-batch by its serving name."""
    return Objective.MAX_BATCH if req.objective.value == "max-concurrency" else req.objective


def choices_for(req: Any, dims: dict[str, tuple]) -> Any:
    """Which per-layer decisions the request allows (formats per layer, CPU offload of weights)."""
    from memplan.memory.quant import get_format

    formats = None
    if req.space.per_layer_quant:
        if not req.model.num_hidden_layers:
            raise MemplanError(f"per-layer quantization needs the model's layers; {req.model.name} knows only a "
                               "parameter count.")
        formats = tuple(dims["quant"])
        libraries = {get_format(f).library.value for f in formats if f is not None}
        if len(libraries) > 1:
            raise MemplanError("per-layer quantization mixes formats of one library, but --quant names "
                               f"{', '.join(sorted(libraries))} formats; keep one.")
        if len(formats) < 2:
            raise MemplanError("per-layer quantization (--per-layer-quant, --objective max-quality) needs at least "
                               "two --quant choices (none = 16-bit), e.g. --quant int8,nf4.")
    offload = Offload.CPU in offload_choices(req.space, req.base.effective_engine)
    if offload and req.space.offload_params is None and max(dims.get("ep", (1,))) > 1:
        # The per-layer block is keyed by (tp, pp, quant, batch): its layer bytes cannot follow expert
        # parallelism, so the default per-layer offload stays off when experts are sharded.
        offload = False
    if offload and not req.space.per_layer_offload:
        raise MemplanError("inference offloads weights layer by layer (accelerate device_map); "
                           "--offload-params cpu needs --per-layer-offload.")
    return LayerChoices(formats=formats, offload=offload and bool(req.model.num_hidden_layers))


def offload_choices(space: Any, engine: Engine | None = None) -> tuple[Offload, ...]:
    """Where inference weights may live: ``offload_params`` as given; by default GPU or CPU per layer when
    ``per_layer_offload`` is on (its documented default) and the engine streams layers from CPU RAM the way
    accelerate's ``device_map`` does (transformers); vLLM and llama.cpp keep their weights where their own
    knobs put them (llama.cpp ``n_gpu_layers``), so their default is the GPU."""
    if space.offload_params is not None:
        return tuple(space.offload_params)
    streams = engine in (None, Engine.TRANSFORMERS)
    return (Offload.NONE, Offload.CPU) if space.per_layer_offload and streams else (Offload.NONE,)


def _weights_entry(req: Any, arch: Any, cfg: JobConfig, stages: list[list], per_layer: bool) -> Entry:
    """Weight bytes per stage; with a per-layer block, only the tensors outside the blocks."""
    from memplan.arch.parallel import stage_layers
    from memplan.memory.weights import layer_weight_bytes

    gpu = []
    for s, rows in enumerate(stages):
        total = tier_total([r for r in rows if r.component.startswith("weights")], Tier.GPU)
        if per_layer:
            ctx = Context(arch, cfg, req.gpu, req.host)
            total -= sum(layer_weight_bytes(ctx, i, cfg.quant) for i, _ in stage_layers(arch, cfg.pp, s, balanced=False))
        gpu.append(total)
    cpu = max(tier_total([r for r in rows if r.component.startswith("weights")], Tier.CPU) for rows in stages)
    return Entry(gpu=tuple(gpu), cpu=cpu)


def _distinct_quants(dims: dict[str, tuple], weights: dict[tuple, Entry]) -> tuple:
    """With formats chosen per layer the global format only sets the tensors outside the blocks: keep one
    of the formats that store those identically (bitsandbytes, GPTQ and AWQ leave them all in 16 bits), so
    ranked alternatives differ in something real."""
    out: list = []
    seen: list[list] = []
    for q in sorted(dims["quant"], key=lambda f: f is not None):  # 16-bit first: the plain name for no format
        sig = [weights.get((tp, pp, ep, q)) for tp in dims["tp"] for pp in dims["pp"] for ep in dims["ep"]]
        if sig not in seen:
            seen.append(sig)
            out.append(q)
    return tuple(out)


def build(req: Any) -> tuple[Problem, list[str], Any]:
    from memplan.engines import serving

    arch = build_architecture(req.model)
    dims, excluded = _dims(req, arch)
    choices = choices_for(req, dims)
    weights: dict[tuple, Entry] = {}
    for key in product(*(dims[d] for d in W_DIMS)):
        try:
            cfg = infer_config(req.base, dict(zip(W_DIMS, key, strict=True)))
            stages = _stage_rows(req, cfg.model_copy(update={"infer": cfg.infer.model_copy(update={"context": 1}),
                                                              "micro_batch": 1}))
        except (MemplanError, ValueError) as exc:
            excluded.append(str(exc))
            continue
        entry = _weights_entry(req, arch, cfg, stages, choices.active)
        if choices.formats is not None:
            from memplan.planner.infer_layers import outside_error

            entry = replace(entry, error=outside_error(arch, cfg.quant) / (arch.params or 1))
        if serving.has_own_rows(cfg):  # serving engines' non-weight rows come with the KV factor
            entry = replace(entry, gpu=tuple(0 for _ in entry.gpu))
        weights[key] = entry
    kv: dict[tuple, Entry] = {}
    for key in product(*(dims[d] for d in KV_DIMS)):
        try:
            cfg = infer_config(req.base, dict(zip(KV_DIMS, key, strict=True)))
            stages = _stage_rows(req, cfg)
        except (MemplanError, ValueError) as exc:
            excluded.append(str(exc))
            continue
        krows = stages if serving.has_own_rows(cfg) else [
            [r for r in rows if not r.component.startswith("weights")] for rows in stages]
        kv[key] = Entry(gpu=tuple(tier_total(r, Tier.GPU) for r in krows))
    if choices.formats is not None:

        if any(is_gguf(f) for f in choices.formats):  # llama.cpp keeps the input layer on the host only for GGUF
            dims["quant"] = tuple(q for q in dims["quant"] if q is not None)
        dims["quant"] = _distinct_quants(dims, weights)
        weights = {k: e for k, e in weights.items() if k[W_DIMS.index("quant")] in dims["quant"]}
    if not weights or not kv:
        raise MemplanError("no inference configuration in the search space is valid: " + "; ".join(excluded[:3]))
    value_dims = VALUE_DIMS
    values: dict[tuple, Entry] = {}
    for key in product(*(dims[d] for d in value_dims)):
        c = dict(zip(value_dims, key, strict=True))
        w = weights.get(tuple(c[d] for d in W_DIMS))
        k = kv.get(tuple(c[d] for d in KV_DIMS))
        if w is None or k is None:
            continue
        step = decode_seconds(req, c, w, k)
        replicas = req.base.world_size // (c["tp"] * c["pp"])  # data-parallel replicas serve side by side
        total = replicas if req.objective.value == "max-concurrency" else 1  # sequences over all replicas
        values[key] = Entry(seconds=step / (c["batch"] * replicas), value=_value(_objective(req), c) * total)
    factors = [Factor("weights", W_DIMS, weights), Factor("kv", KV_DIMS, kv), Factor("speed", value_dims, values)]
    st = runtime.settings(req.gpu, req.base)
    margin = runtime.safety_margin_bytes(capacity_bytes=req.gpu.capacity_bytes, pct=req.base.safety_margin_pct)
    context, pct = st.context_bytes + margin, st.reserve_pct  # fixed rows (context, safety margin) off the capacity
    if serving.has_own_rows(req.base):  # vLLM / llama.cpp rows are the whole GPU: no PyTorch context or reserve
        context, pct = margin, 0.0
    kind = {"min-memory": "min_gpu_bytes", "max-batch": "max_value", "max-concurrency": "max_value",
            "max-context": "max_value", "max-quality": "min_error"}.get(req.objective.value, "min_seconds")
    block = build_block(req, arch, dims, choices) if choices.active else None
    problem = Problem(dims=dims, factors=factors, layers=None, num_layers=len(arch.layers) or 1,
                      gpu_capacity=req.gpu.capacity_bytes - context, cpu_capacity=req.host.cpu_ram_bytes,
                      nvme_capacity=req.host.nvme_bytes, objective=kind, gpu_scale_pct=float(pct),
                      extra_blocks=[block] if block is not None else [])
    return problem, excluded, choices


def _value(objective: Objective, c: dict[str, Any]) -> float:
    if objective is Objective.MAX_BATCH:
        return float(c["batch"])
    if objective is Objective.MAX_CONTEXT:
        return float(c["context"])
    return 0.0


def decode_seconds(req: Any, c: dict[str, Any], w: Entry, k: Entry) -> float:
    """One decode step of one replica: the roofline of ``planner.serve_cost`` (weights of the touched experts and
    the KV read at effective bandwidth, or FLOPs at effective peak; stages in sequence), plus tensor
    parallelism's two all-reduces of B·D per layer (Megatron-LM Sec. 3)."""

    cfg = infer_config(req.base, c)
    seconds = serve_cost(Context(build_architecture(req.model), cfg, req.gpu, req.host)).tpot_s
    spec = req.model
    layers = spec.num_hidden_layers or 0
    if c["tp"] > 1:
        nbytes = c["batch"] * (spec.hidden_size or 0) * 2
        seconds += 2 * layers * (TP_ALLREDUCE_LATENCY_S + cost.ring_allreduce_seconds(
            nbytes=nbytes, ranks=c["tp"], bytes_per_s=req.gpu.interconnect_gbps * 1e9))
    return seconds


def plan_inference(req: PlanRequest, explain: Callable[[PlanRequest, PlanResult], None]) -> PlanResult:
    """The best serving plans for ``req``; ``explain`` (``plan.explain_infeasible``) fills the binding constraint
    and the verified ways out when none fits and ``req.suggest``."""
    result = PlanResult(status=PlanStatus.INFEASIBLE, objective=req.objective)
    if req.objective in (Objective.MIN_GPUS, Objective.MIN_COST) and not req.space.per_layer_quant:
        dims, excluded = _dims(req, build_architecture(req.model))
        result.excluded = sorted(set(excluded))
        plan_min_gpus(req, dims, infer_config, result)
        if result.candidates:
            rank_candidates(result.candidates)
            result.candidates = result.candidates[: req.top_k]
            result.status = PlanStatus.OPTIMAL
        return result
    problem, excluded, choices = build(req)
    result.excluded = sorted(set(excluded))

    def to_config(sol: Any) -> JobConfig:
        cfg = infer_config(req.base, sol.choice)
        modes = sol.block_modes.get(BLOCK_NAME)
        return layer_config(cfg, modes, choices) if modes else cfg

    for sol, cfg, est in verified_solutions(req, IlpBuilder(problem), result, to_config):
        modes = sol.block_modes.get(BLOCK_NAME) or []
        sc, extras = _extras(req, cfg, choices)
        # the plan reports (and ranks by) the serving model's tokens/s: time per output token and replicas × batch
        # / TPOT, the figures the serving line prints (the ILP's own per-token seconds only choose the candidates)
        value = -sc.tokens_per_s if req.objective is Objective.THROUGHPUT else sol.objective
        result.candidates.append(Candidate(cfg, est, sc.tpot_s, sc.tokens_per_s, value,
                                           describe(modes, choices) if modes else "", extras))
    if result.candidates:
        rank_candidates(result.candidates)
        result.candidates = result.candidates[: req.top_k]  # ties beyond --top were collected to rank them
        result.status = PlanStatus.OPTIMAL
    elif req.suggest:
        explain(req, result)
    return result


def _extras(req: Any, cfg: JobConfig, choices: Any) -> tuple[Any, dict[str, Any]]:
    """The serving cost (``serve_cost``) and the plan's extras: serving latency (TTFT, TPOT, tokens/s per
    replica, replicas) and, for plans that choose formats per layer, the quality of the chosen weight formats."""

    arch = build_architecture(req.model)
    sc = serve_cost(Context(arch, cfg, req.gpu, req.host))
    out: dict[str, Any] = {"ttft_s": sc.ttft_s, "tpot_s": sc.tpot_s, "tokens_per_s_replica": sc.tokens_per_s_replica,
                           "replicas": sc.replicas}
    if choices.formats is None:
        return sc, out
    return sc, {**out, **quality_extras(arch, cfg)}
