"""Build the ILP for a training job (pretrain, full, LoRA, QLoRA, GaLore) from exact memory functions.

Each factor table is filled by the same pure functions that ``estimate`` uses, evaluated on the
factor's own few dimensions (a Context per combination and per pipeline stage), so the ILP's
bytes are ``estimate``'s bytes; the chosen plan is re-checked by ``estimate`` anyway.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from fractions import Fraction
from itertools import product
from typing import Any, TypeVar

from memplan.config import JobConfig, Offload, Recompute
from memplan.engines import rules as engines_rules
from memplan.errors import MemplanError
from memplan.memory import activations as act
from memplan.memory import components, pp_schedule_flight, runtime
from memplan.memory.breakdown import TRAIN_PHASES, Phase, Tier, phase_totals, tier_total
from memplan.memory.context import Context
from memplan.planner import cost, hybrid, pp_schedule_dim, steptime, train_offload, train_phases, train_pipeline, train_quant
from memplan.planner.classes import layer_classes
from memplan.planner.ilp import Entry, Factor, LayerBlock, Problem
from memplan.planner.ilp_moments import ROWS as MOMENT_ROWS
from memplan.planner.ilp_moments import build as build_moments
from memplan.planner.ilp_moments import stage_maps
from memplan.planner.setting import SAVINGS, TrainSetting, config_for  # noqa: F401 - re-exported
from memplan.planner.setting import contexts as _contexts
from memplan.planner.train_reasons import MAX_REASON_CHARS, invalid_reasons  # noqa: F401 - re-exported
from memplan.planner.train_reasons import describe as _describe
from memplan.planner.train_recompute import layer_block, recompute_bounds

STATE_DIMS = ("tp", "pp", "placement", "optimizer", "quant")
SHAPE_DIMS = ("tp", "pp", "micro_batch", "seq_len")
COMM_DIMS = ("tp", "pp", "placement", "micro_batch", "seq_len")
NOT_LAYER_ROWS = ("activations/layers", "activations/recompute_workspace", "activations/layer_kwargs")


def _valid(cfg: JobConfig, setting: TrainSetting) -> bool:
    """Whether the micro-batch and data-parallel degree divide the global batch, and a named pipeline schedule takes
    the micro-batches per step (``pp_schedule_dim.takes``)."""
    return not setting.global_batch % (cfg.micro_batch * cfg.batch_dp) and pp_schedule_dim.takes(cfg)


def state_dims(dims: dict[str, tuple]) -> tuple[str, ...]:
    extra = tuple(d for d in ("ep", "opt_split", hybrid.DIM) if d in dims)
    return STATE_DIMS + extra


def states_factor(setting: TrainSetting, dims: dict[str, tuple],
                  layer_weights: bool = True) -> tuple[Factor, list[str]]:
    """Model states (weights, gradients, optimizer, engine buffers) per stage, and offload time. An
    ``opt_split = layers`` row leaves out the layers' optimizer-side states (the per-layer block's), and
    without ``layer_weights`` the layers' frozen weights (``train_quant``'s block holds them)."""
    entries: dict[tuple, Entry] = {}
    reasons: list[str] = []
    names = state_dims(dims)
    for key in product(*(dims[d] for d in names)):
        choice = dict(zip(names, key, strict=True))
        split = choice.get("opt_split") == train_offload.LAYERS
        if split and not (choice["pp"] == 1 and train_offload.splittable(choice["placement"], choice["optimizer"],
                                                                          setting.base.job)):
            continue
        try:
            cfg = config_for(setting.base, choice)
            # only combinations the engine runs (engines.rules), a named schedule with the step's micro-batches
            engines_rules.check(pp_schedule_dim.with_steps(cfg, setting.global_batch))
            if split:
                cfg = cfg.model_copy(update={"optimizer_gpu_layers": len(setting.arch.layers)})
            ctxs = _contexts(setting, cfg)
            components.validate(ctxs[0])
            per_stage = _state_rows(setting, cfg, ctxs)
        except (MemplanError, ValueError) as exc:
            reasons.append(f"{_describe(choice)}: {exc}")
            continue
        per_stage = [[r for r in rows if not r.component.startswith("activations")] for rows in per_stage]
        phases = train_phases.state_phases(per_stage, ctxs, cfg, split=split, layer_weights=layer_weights)
        phases = _with_nccl(phases, ctxs, runtime_terms(setting)[1])
        gpu = [max(per.values()) for per in phases]
        persist = tuple(train_phases.persisting(rows) for rows in per_stage) if cfg.pp == 1 else ()
        cpu = max(tier_total(rows, Tier.CPU) for rows in per_stage)
        nvme = max(tier_total(rows, Tier.NVME) for rows in per_stage)
        floor = 0
        if split:  # the block adds layers to the steady CPU bytes: keep the load peak apart (see _split_cpu)
            cpu, floor = _split_cpu(per_stage[0], cfg)
        entries[key] = Entry(gpu=tuple(gpu), cpu=cpu, nvme=nvme, seconds=offload_seconds(setting, cfg, per_stage),
                             cpu_floor=floor, persist_gpu=persist,
                             phase_gpu=tuple((p.value, tuple(per[p] for per in phases)) for p in TRAIN_PHASES))
    return Factor("states", names, entries), reasons


def _with_nccl(phases: list[dict], ctxs: list[Context], pct: float) -> list[dict]:
    """Each stage's phase totals plus its NCCL communicators (``memory.nccl_groups``), in every phase. The ILP scales
    the whole demand by the allocator reserve (1 + pct/100), which NCCL's own allocations do not take, so the row
    enters as ceil(bytes · 100 / (100 + pct)): scaled back, at least the row's bytes (within rounding of a byte)."""
    from memplan.memory import nccl_groups
    from memplan.units import ceil_div

    share = Fraction(str(pct))
    out = []
    for per, ctx in zip(phases, ctxs, strict=True):
        n = sum(r.bytes for r in nccl_groups.rows(ctx))
        n = ceil_div(n * 100 * share.denominator, 100 * share.denominator + share.numerator) if n else 0
        out.append({p: v + n for p, v in per.items()})
    return out


def _split_cpu(rows: list, cfg: JobConfig) -> tuple[int, int]:
    """(CPU bytes the per-layer block adds to, CPU floor) of an ``opt_split = layers`` row.

    DeepSpeed's CPU figure is 1.5 · max(load, steady) (``model_states.deepspeed_cpu_rows``). The block adds
    1.5 × each offloaded layer to the steady part, so the row carries 1.5 · steady, and the load peak is a
    separate floor: 1.5 · max(load, steady + layers) ≤ capacity holds exactly when both 1.5 · (steady +
    layers) ≤ capacity and the floor 1.5 · max(load, steady) ≤ capacity do.
    """
    from memplan.units import ceil_div

    total = tier_total(rows, Tier.CPU)
    engine = sum(r.bytes for r in rows if r.tier is Tier.CPU and r.component in ("runtime/model_load_fp32",
                                                                                 "runtime/cpu_buffer"))
    if not engine:
        return total, 0
    steady = total - engine
    return ceil_div(steady * train_offload.cpu_factor_pct(cfg), 100), total


def _state_rows(setting: TrainSetting, cfg: JobConfig, ctxs: list[Context]) -> list[list]:
    """``components.state_rows`` per stage, evaluated once per distinct stage: model states depend on which
    tensors a stage holds, not on its index, so the middle stages of a deep pipeline share one evaluation
    (not when something depends on the layer index: GGUF's mix rules, a per-layer format map, or a partial
    optimizer offload that does not keep every layer on the GPU)."""
    from memplan.memory.quant import Library
    from memplan.memory.weights import job_library

    split = cfg.optimizer_gpu_layers
    by_index = cfg.quant_map is not None or (split is not None and split < len(setting.arch.layers))
    if by_index or job_library(cfg) is Library.GGUF:
        return [train_phases.phased(c) for c in ctxs]
    classes = layer_classes(setting.arch)
    seen: dict[tuple, list] = {}
    out = []
    for c in ctxs:
        sig = (c.stage == 0, c.stage == cfg.pp - 1, tuple(classes[i] for i, _ in c.layers))
        if sig not in seen:
            seen[sig] = train_phases.phased(c)
        out.append(seen[sig])
    return out


def offload_seconds(setting: TrainSetting, cfg: JobConfig, per_stage: list) -> float:
    """ZeRO-Offload / ZeRO-Infinity traffic and CPU update time per step (``cost.offload_seconds``); with
    partial offload (``optimizer_gpu_layers``) only the offloaded layers and the tensors after the blocks."""
    if cfg.offload_optimizer is Offload.NONE and cfg.offload_params is Offload.NONE:
        return 0.0
    nvme_bytes = max(tier_total(rows, Tier.NVME) for rows in per_stage)
    arch = setting.arch
    shards = [arch.params // (cfg.tp * cfg.pp)]  # whole-model offload: every stage offloads its share at once
    if cfg.optimizer_gpu_layers is not None:  # partial: the tensors after the blocks, then each offloaded layer
        kept = min(cfg.optimizer_gpu_layers, len(arch.layers))
        shards = [sum(t.numel for t in arch.post + arch.extra) // cfg.tp]
        shards += [layer.params // cfg.tp for layer in arch.layers[kept:]]  # summed over stages, as the ILP does
    seconds = 0.0
    if cfg.offload_optimizer is not Offload.NONE:
        seconds = sum(train_offload.layer_offload_seconds(setting, cfg, s) for s in shards)
    if nvme_bytes:
        seconds += cost.nvme_seconds(bytes_read=nvme_bytes, bytes_written=nvme_bytes,
                                     read_bytes_per_s=setting.host.nvme_read_gbps * 1e9,
                                     write_bytes_per_s=setting.host.nvme_write_gbps * 1e9)
    return seconds


def step_configs(setting: TrainSetting, dims: dict[str, tuple], names: tuple[str, ...]) -> Iterator[tuple[tuple, JobConfig]]:
    """(key, config) for every combination of ``names`` that is a valid config whose micro-batch and
    data-parallel degree divide the global batch."""
    for key in product(*(dims[d] for d in names)):
        try:
            cfg = config_for(setting.base, dict(zip(names, key, strict=True)), global_batch=setting.global_batch)
        except ValueError:
            continue
        if _valid(cfg, setting):
            yield key, cfg


def shape_factor(setting: TrainSetting, dims: dict[str, tuple], layers: LayerBlock | None = None,
                 modes: tuple[str, ...] = (), cooldown: dict | None = None, moments: dict | None = None) -> Factor:
    """Activations outside the blocks (embeddings, loss, logits) per stage, FSDP2's size-dependent rows
    (``train_pipeline``; ``layers``: the recompute block, ``modes``: its modes), and step time by shape; ``cooldown``
    collects FSDP2's cool-down terms by (pp, stage, key) (``Problem.cooldown``); ``moments``: the in-flight moment rows
    by (pp, stage, key) (``ilp_moments``), which hold the embedding, final norm, loss and I-to-W rows there."""
    entries: dict[tuple, Entry] = {}
    cache: dict = {}
    for key, cfg in step_configs(setting, dims, SHAPE_DIMS):
        per_stage = []
        for ctx in _contexts(setting, cfg):
            # act.rows, not act.breakdown: each row's own phases (a quantized output layer's dequantization next to
            # the logits at the start of backward), the attention kernels' backward workspace and the legacy
            # transformers rows, as estimate has them; the per-layer block's rows are the ILP's own
            held = (cfg.pp, ctx.stage, key) in (moments or {})  # the moment rows (``ilp_moments``) hold those
            skip = NOT_LAYER_ROWS + (MOMENT_ROWS if held else ())
            rows = [r for r in act.rows(ctx) if r.component not in skip] if act.modelled(ctx) else []
            rows += train_pipeline.extra_rows(ctx, rows, layers, key, modes, cache)
            terms = train_pipeline.cooldown_terms(ctx, cache) if cooldown is not None and layers is not None else []
            if terms and cooldown is not None:
                cooldown[cfg.pp, ctx.stage, key] = terms
            per_stage.append(phase_totals(components.with_phases(ctx, rows), Tier.GPU, TRAIN_PHASES))
        entries[key] = Entry(gpu=tuple(max(per.values()) for per in per_stage), seconds=shape_seconds(setting, cfg),
                             phase_gpu=tuple((p.value, tuple(per[p] for per in per_stage)) for p in TRAIN_PHASES),
                             accumulates=cfg.grad_accum > 1)
    return Factor("shape", SHAPE_DIMS, entries)


def shape_seconds(setting: TrainSetting, cfg: JobConfig) -> float:
    """Pipelined compute with tensor-parallel, expert and p2p traffic per step (``steptime.shape_seconds``)."""
    return steptime.shape_seconds(setting.arch, setting.gpu, cfg, setting.global_batch)


def comm_factor(setting: TrainSetting, dims: dict[str, tuple]) -> Factor:
    """Data-parallel gradient traffic, ZeRO-3 parameter gathers (the part compute does not hide,
    ``steptime.dp_comm_seconds``) and ZeRO-Infinity parameter fetches over PCIe, per step."""
    names = COMM_DIMS + tuple(d for d in ("ep", hybrid.DIM) if d in dims)
    entries: dict[tuple, Entry] = {}
    for key, cfg in step_configs(setting, dims, names):
        seconds = steptime.dp_comm_seconds(setting.arch, setting.gpu, cfg, setting.global_batch)
        seconds += steptime.ep_seconds(setting.arch, setting.gpu, cfg, setting.global_batch)
        if cfg.offload_params is not Offload.NONE:  # per micro-step: here the accumulation steps are known
            seconds += train_offload.param_fetch_seconds(setting, cfg)
        entries[key] = Entry(seconds=seconds)
    return Factor("comm", names, entries)


def runtime_terms(setting: TrainSetting) -> tuple[int, float]:
    """(CUDA context + safety margin bytes, allocator reserve %) of the runtime rows, as the ILP applies
    them: both fixed byte rows come off the capacity, the reserve scales the demand."""
    st = runtime.settings(setting.gpu, setting.base)
    margin = runtime.safety_margin_bytes(capacity_bytes=setting.gpu.capacity_bytes, pct=setting.base.safety_margin_pct)
    return st.context_bytes + margin, float(st.reserve_pct)


_V = TypeVar("_V", int, float)


def _keep_keys(per: list[dict[str, dict[tuple, _V]]], keep: set[tuple]) -> None:
    """Drop from each layer's per-mode tables the keys not in ``keep`` (in place, per table)."""
    for layer in per:
        for m in layer:
            layer[m] = {k: v for k, v in layer[m].items() if k in keep}


def build_problem(setting: TrainSetting, dims: dict[str, tuple], objective: str,
                  value_of: Callable[[dict[str, Any]], float] | None = None,
                  formats: tuple[str | None, ...] | None = None) -> tuple[Problem, list[str]]:
    """The training ILP over ``dims`` (each a tuple of candidate values; ``recompute`` lists the
    per-layer modes, which are not a global choice); ``formats``: a weight format per layer among these."""
    layers = layer_block(setting, dims)
    modes = tuple(Recompute(m).value for m in dims.get("recompute", ()))
    dims = {d: v for d, v in dims.items() if d != "recompute"}
    states, reasons = states_factor(setting, dims, layer_weights=formats is None)
    if not states.entries:
        raise MemplanError("no combination of the search space is valid: " + invalid_reasons(dims, reasons))
    cooldown: dict = {}
    moments, moment_chunks = build_moments(setting, dims, layers)
    shape = shape_factor(setting, dims, layers, modes, cooldown, moments)
    if not shape.entries:
        raise MemplanError(f"no micro-batch divides the global batch of {setting.global_batch} sequences "
                           "over the data-parallel ranks; change --global-batch or --micro-batch.")
    factors = [states, shape, comm_factor(setting, dims)]
    extra = [b for b in (train_offload.build_block(setting, dims),) if b is not None]
    if formats is not None:
        extra.append(train_quant.build_block(setting, dims, formats))
    if value_of is not None:
        shape.entries = {k: replace(e, value=value_of(dict(zip(SHAPE_DIMS, k, strict=True))))
                         for k, e in shape.entries.items()}
    context, pct = runtime_terms(setting)
    host = setting.host
    stage_map = stage_maps(setting.arch, setting.base, dims["pp"])
    if layers is not None:
        cap = int((setting.gpu.capacity_bytes - context) / (1.0 + pct / 100.0))
        bounds = recompute_bounds(setting, dims, states, shape, layers, cap, stage_map, moments, moment_chunks)
        keep = {k for k, b in bounds.items() if b is not None}
        _keep_keys(layers.gpu, keep)
        _keep_keys(layers.seconds, keep)
        _keep_keys(layers.workspace or [], keep)
        _keep_keys(layers.flight_workspace or [], keep)
        _keep_keys(layers.cpu or [], keep)
        layers.key_bounds = {k: b for k, b in bounds.items() if b}
    chunk_map = train_pipeline.chunk_maps(setting.arch, setting.base.perf.virtual_stages, cooldown) | moment_chunks
    problem = Problem(dims=dims, factors=factors, layers=layers, num_layers=len(setting.arch.layers),
                      gpu_capacity=setting.gpu.capacity_bytes - context, cpu_capacity=host.cpu_ram_bytes,
                      nvme_capacity=host.nvme_bytes, objective=objective, gpu_scale_pct=pct,
                      extra_blocks=extra, phases=tuple(p.value for p in TRAIN_PHASES),
                      persist_phases=(Phase.FORWARD.value, Phase.BACKWARD_START.value),
                      stage_map=stage_map, moments=moments,
                      virtual_stages=setting.base.perf.virtual_stages, global_batch=setting.global_batch,
                      vp_group=act.interleave_knobs(setting.base)[0], vp_extra=act.interleave_knobs(setting.base)[1],
                      pp_schedule=pp_schedule_flight.named(setting.base.model_copy(update={"pp": 2})),
                      world=setting.base.world_size, cp=setting.base.cp, cooldown=cooldown,
                      chunk_map=chunk_map)
    return problem, reasons
