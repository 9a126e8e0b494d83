"""Build the ILP for a training job (pretrain, full, LoRA, QLoRA, GaLore) from exact memory functions.

Each factor table is filled by the same pure functions that ``estimate`` uses, evaluated on the
factor's own few dimensions (a Context per combination and per pipeline stage), so the ILP's
bytes are ``estimate``'s bytes; the chosen plan is re-checked by ``estimate`` anyway.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import product
from typing import Any

from memplan.arch.tensors import Architecture
from memplan.catalog.schema import PCIE_GBPS_X16, GpuSpec, HostSpec
from memplan.config import JobConfig, Recompute
from memplan.errors import MemplanError
from memplan.memory import activations as act
from memplan.memory import components, runtime
from memplan.memory.breakdown import Tier, tier_total
from memplan.memory.context import Context
from memplan.planner import cost
from memplan.planner.ilp import Entry, Factor, LayerBlock, Problem

STATE_DIMS = ("tp", "pp", "placement", "optimizer", "quant")
SHAPE_DIMS = ("tp", "pp", "micro_batch", "seq_len")
LAYER_DIMS = ("tp", "pp", "micro_batch", "seq_len")
SAVINGS = {Recompute.NONE.value: 0, Recompute.SELECTIVE.value: 1, Recompute.FULL.value: 2}
NOT_LAYER_ROWS = ("activations/layers", "activations/recompute_workspace", "activations/layer_kwargs")


@dataclass(frozen=True)
class TrainSetting:
    """Everything fixed during one solve: model, hardware, the base config and the global batch."""

    arch: Architecture
    gpu: GpuSpec
    host: HostSpec
    base: JobConfig
    global_batch: int
    mfu: float = cost.DEFAULT_MFU


def config_for(base: JobConfig, choice: dict[str, Any], *, global_batch: int | None = None,
               modes: Iterable[str] | None = None) -> JobConfig:
    """The JobConfig a (partial) choice of dimensions describes."""
    upd: dict[str, Any] = {}
    for dim, value in choice.items():
        if dim == "placement":
            upd["zero"], upd["offload_optimizer"], upd["offload_params"] = value
        elif dim in ("tp", "pp", "micro_batch", "seq_len", "optimizer", "quant"):
            upd[dim] = value
    cfg = JobConfig.model_validate({**base.model_dump(), **upd})
    if global_batch is not None:
        cfg = cfg.model_copy(update={"grad_accum": max(1, global_batch // (cfg.micro_batch * cfg.dp))})
    if modes is not None:
        modes = tuple(Recompute(m) for m in modes)
        used = {m for m in modes if m is not Recompute.NONE}
        mode = max(used, key=lambda m: SAVINGS[m.value]) if used else Recompute.NONE
        cfg = cfg.model_copy(update={"recompute": mode, "recompute_map": modes, "recompute_layers": None})
    return cfg


def _valid(cfg: JobConfig, setting: TrainSetting) -> bool:
    """Whether the micro-batch and data-parallel degree divide the global batch."""
    return not setting.global_batch % (cfg.micro_batch * cfg.dp)


def _contexts(setting: TrainSetting, cfg: JobConfig) -> list[Context]:
    ctx = Context(setting.arch, cfg, setting.gpu, setting.host)
    return [ctx.at_stage(s) for s in range(cfg.pp)]


def states_factor(setting: TrainSetting, dims: dict[str, tuple]) -> tuple[Factor, list[str]]:
    """Model states (weights, gradients, optimizer, engine buffers) per stage, and offload time."""
    entries: dict[tuple, Entry] = {}
    reasons: list[str] = []
    for key in product(*(dims[d] for d in STATE_DIMS)):
        choice = dict(zip(STATE_DIMS, key, strict=True))
        try:
            cfg = config_for(setting.base, choice)
            ctxs = _contexts(setting, cfg)
            components.validate(ctxs[0])
            per_stage = [components.job_rows(c, []) for c in ctxs]
        except (MemplanError, ValueError) as exc:
            reasons.append(f"{_describe(choice)}: {exc}")
            continue
        per_stage = [[r for r in rows if not r.component.startswith("activations")] for rows in per_stage]
        gpu = tuple(tier_total(rows, Tier.GPU) for rows in per_stage)
        cpu = max(tier_total(rows, Tier.CPU) for rows in per_stage)
        nvme = max(tier_total(rows, Tier.NVME) for rows in per_stage)
        entries[key] = Entry(gpu=gpu, cpu=cpu, nvme=nvme, seconds=offload_seconds(setting, cfg, per_stage))
    return Factor("states", STATE_DIMS, entries), reasons


def offload_seconds(setting: TrainSetting, cfg: JobConfig, per_stage: list) -> float:
    """ZeRO-Offload / ZeRO-Infinity traffic and CPU update time per step (``cost.offload_seconds``)."""
    from memplan.config import Offload

    if cfg.offload_optimizer is Offload.NONE and cfg.offload_params is Offload.NONE:
        return 0.0
    nvme_bytes = max(tier_total(rows, Tier.NVME) for rows in per_stage)
    params = setting.arch.params // (cfg.tp * cfg.pp)
    pcie = (setting.host.pcie_gbps_per_gpu or PCIE_GBPS_X16[setting.gpu.pcie_gen]) * 1e9
    grad = 2 * params // cfg.dp
    seconds = cost.offload_seconds(bytes_to_host=grad, bytes_to_device=grad, pcie_bytes_per_s=pcie,
                                   cpu_update_params=params * cfg.gpus_per_node // max(cfg.dp, 1),
                                   cpu_adam_params_per_s=cost.DEFAULT_CPU_ADAM_PARAMS_PER_S,
                                   backward_s=0.0)
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


def shape_factor(setting: TrainSetting, dims: dict[str, tuple]) -> Factor:
    """Activations outside the blocks (embeddings, loss, logits) per stage, and step time by shape."""
    entries: dict[tuple, Entry] = {}
    for key, cfg in step_configs(setting, dims, SHAPE_DIMS):
        gpu = []
        for ctx in _contexts(setting, cfg):
            parts = act.breakdown(ctx) if act.modelled(ctx) else {}
            gpu.append(sum(v for k, v in parts.items() if k not in NOT_LAYER_ROWS))
        entries[key] = Entry(gpu=tuple(gpu), seconds=shape_seconds(setting, cfg))
    return Factor("shape", SHAPE_DIMS, entries)


def shape_seconds(setting: TrainSetting, cfg: JobConfig) -> float:
    """Compute (roofline over weight re-reads), pipeline bubble and tensor-parallel traffic per step."""
    arch, gpu = setting.arch, setting.gpu
    spec = arch.spec
    tokens = setting.global_batch * cfg.seq_len
    attn = (spec.num_attention_heads or 0) * spec.dim_per_head
    flops = cost.training_flops(active_params=arch.active_params, tokens=tokens, layers=len(arch.layers),
                                seq_len=cfg.seq_len, attn_width=attn)
    peak = gpu.bf16_dense_tflops * 1e12
    compute = cost.compute_seconds(flops=flops, gpus=cfg.world_size, peak_flops=peak, mfu=setting.mfu)
    micro_steps = max(1, setting.global_batch // (cfg.micro_batch * cfg.dp))
    weight_read = 3 * 2 * arch.params / (cfg.tp * cfg.pp) / (gpu.hbm_bandwidth_gbps * 1e9)
    compute = max(compute, weight_read * micro_steps)
    bubble = cost.pipeline_bubble_fraction(pp=cfg.pp, micro_batches=micro_steps)
    link = gpu.interconnect_gbps * 1e9
    tp_comm = cost.tp_comm_seconds(tokens_per_gpu_group=tokens // cfg.dp, hidden=spec.hidden_size or 0,
                                   layers=len(arch.layers) // cfg.pp, tp=cfg.tp, bytes_per_s=link)
    return compute / (1.0 - bubble) + tp_comm


def comm_factor(setting: TrainSetting, dims: dict[str, tuple]) -> Factor:
    """Data-parallel gradient traffic (and ZeRO-3 parameter gathers per micro-step)."""
    names = ("tp", "pp", "placement", "micro_batch")
    entries: dict[tuple, Entry] = {}
    for key, cfg in step_configs(setting, dims, names):
        grad_bytes = 2 * setting.arch.params // (cfg.tp * cfg.pp)
        intra = cfg.world_size <= cfg.gpus_per_node
        bw = setting.gpu.interconnect_gbps * 1e9 if intra else min(setting.gpu.interconnect_gbps * 1e9,
                                                                  cost.DEFAULT_INTER_NODE_BYTES_PER_S)
        seconds = cost.zero_dp_comm_seconds(grad_bytes=grad_bytes, dp=cfg.dp, zero=int(cfg.zero), bytes_per_s=bw,
                                            micro_steps=max(1, cfg.grad_accum))
        entries[key] = Entry(seconds=seconds)
    return Factor("comm", names, entries)


def layer_block(setting: TrainSetting, dims: dict[str, tuple]) -> LayerBlock | None:
    """Per-layer recompute modes: bytes per micro-batch by (tp, pp, micro-batch, seq), recompute seconds.

    Bytes do not depend on pp (only the stage a layer lands on does, which the ILP handles), and
    identical layers share their values, so each (class, tp, micro-batch, seq) is computed once.
    """
    arch = setting.arch
    modes = tuple(Recompute(m).value for m in dims["recompute"])
    classes = _classes(arch)
    first = {c: classes.index(c) for c in set(classes)}
    shape_dims = ("tp", "micro_batch", "seq_len")
    per_class: dict[tuple, tuple[dict, dict, dict]] = {}
    for key in product(*(dims[d] for d in shape_dims)):
        cfg = config_for(setting.base, dict(zip(shape_dims, key, strict=True)))
        ctx = Context(arch, cfg, setting.gpu, setting.host)
        if not act.modelled(ctx):
            return None
        counting = act.counting_for(cfg)
        for c, i in first.items():
            gpu, secs, work, held = {}, {}, {}, {}
            for m in modes:
                mode = Recompute(m)
                gpu[m] = act.layer_micro_bytes(ctx, i, mode)
                secs[m] = recompute_seconds(setting, cfg, arch.layers[i].params, mode)
                recomputed = mode is not Recompute.NONE
                work[m] = act.workspace_bytes(ctx, mode, {i}) if recomputed else 0
                held[m] = act.layer_kwargs_bytes(ctx, {i}, counting) if recomputed else 0
            per_class[(c, *key)] = (gpu, secs, work, held)
    gpu_t: list[dict[str, dict[tuple, int]]] = [{m: {} for m in modes} for _ in arch.layers]
    sec_t: list[dict[str, dict[tuple, float]]] = [{m: {} for m in modes} for _ in arch.layers]
    work_t: list[dict[str, dict[tuple, int]]] = [{m: {} for m in modes} for _ in arch.layers]
    held_t: list[dict[str, dict[tuple, int]]] = [{m: {} for m in modes} for _ in arch.layers]
    for tp, pp, mb, seq in product(*(dims[d] for d in LAYER_DIMS)):
        key = (tp, pp, mb, seq)
        for i, c in enumerate(classes):
            gpu, secs, work, held = per_class[(c, tp, mb, seq)]
            for m in modes:
                gpu_t[i][m][key] = gpu[m]
                sec_t[i][m][key] = secs[m]
                work_t[i][m][key] = work[m]
                held_t[i][m][key] = held[m]
    modes = _undominated(modes, gpu_t, sec_t)
    for table in (gpu_t, sec_t, work_t, held_t):
        for per in table:
            for m in [m for m in per if m not in modes]:
                del per[m]
    return LayerBlock(modes=modes, key_dims=LAYER_DIMS, gpu=gpu_t, seconds=sec_t, workspace=work_t,
                      flight_workspace=held_t, classes=classes, savings_rank={m: SAVINGS[m] for m in modes})


def _undominated(modes: tuple[str, ...], gpu: list, secs: list) -> tuple[str, ...]:
    """Drop a mode that, for every layer and key, costs at least the time of another allowed mode
    and saves no bytes over it (e.g. selective recompute with flash attention: no S×S core to drop)."""
    keep = []
    for m in modes:
        dominated = any(
            o != m and all(gpu[i][o][k] <= gpu[i][m][k] and secs[i][o][k] <= secs[i][m][k]
                           for i in range(len(gpu)) for k in gpu[i][m])
            and any(gpu[i][o][k] < gpu[i][m][k] or secs[i][o][k] < secs[i][m][k]
                    for i in range(len(gpu)) for k in gpu[i][m])
            for o in modes)
        if not dominated:
            keep.append(m)
    return tuple(keep)


def recompute_bounds(setting: TrainSetting, dims: dict[str, tuple], states: Factor, shape: Factor,
                     layers: LayerBlock, cap: int) -> dict[tuple, float | None]:
    """A lower bound on the recompute seconds any plan with layer key (tp, pp, micro-batch, seq) needs,
    or None when no plan with that key can fit (its layers cannot save enough even all recomputed).

    Per stage s of p: need = Σ_layers (p − s)·A_none + leanest states + shape − capacity; every byte
    saved costs at least the cheapest seconds-per-byte of any mode, so seconds ≥ need × that ratio.
    A valid inequality (it ignores the recompute workspace, which only adds need), it lets the ILP
    prune global choices whose per-layer optimum is dear without branching on them.
    """
    num = len(setting.arch.layers)
    lean: dict[tuple, list[int]] = {}
    for key, e in states.entries.items():
        tp, pp = key[0], key[1]
        cur = lean.setdefault((tp, pp), list(e.gpu))
        lean[tp, pp] = [min(a, b) for a, b in zip(cur, e.gpu, strict=True)]
    out: dict[tuple, float | None] = {}
    none = min(layers.modes, key=lambda m: layers.savings_rank.get(m, 0))  # the least-saving mode allowed
    for key in {k for per in layers.gpu for m in per.values() for k in m}:
        tp, pp = key[0], key[1]
        shp = shape.entries.get(key)
        if shp is None or (tp, pp) not in lean:
            out[key] = None
            continue
        total = 0.0
        for s in range(pp):
            members = range(s * num // pp, (s + 1) * num // pp)
            flight = pp - s
            base = sum(flight * layers.gpu[i][none][key] for i in members)
            need = base + lean[tp, pp][s] + shp.gpu[s] - cap
            if need <= 0:
                continue
            best_ratio, max_saving = None, 0
            for i in members:
                savings = [(flight * (layers.gpu[i][none][key] - layers.gpu[i][m][key]), layers.seconds[i][m][key])
                           for m in layers.modes if m != none]
                savings = [(sv, sec) for sv, sec in savings if sv > 0]
                if not savings:
                    continue
                max_saving += max(sv for sv, _ in savings)
                ratio = min(sec / sv for sv, sec in savings)
                best_ratio = ratio if best_ratio is None else min(best_ratio, ratio)
            if best_ratio is None or max_saving < need:
                total = -1.0
                break
            total += need * best_ratio
        out[key] = None if total < 0 else total
    return out


def recompute_seconds(setting: TrainSetting, cfg: JobConfig, layer_params: int, mode: Recompute) -> float:
    """Step time a recomputed layer adds: its forward again (full) or its attention core (selective)."""
    if mode is Recompute.NONE:
        return 0.0
    spec = setting.arch.spec
    tokens = setting.global_batch * cfg.seq_len
    attn = (spec.num_attention_heads or 0) * spec.dim_per_head
    if mode is Recompute.FULL:
        flops = cost.layer_forward_flops(layer_params=layer_params, tokens=tokens, seq_len=cfg.seq_len, attn_width=attn)
    else:
        flops = 2.0 * cfg.seq_len * attn * tokens
    return cost.compute_seconds(flops=flops, gpus=cfg.world_size, peak_flops=setting.gpu.bf16_dense_tflops * 1e12,
                                mfu=setting.mfu)


def _classes(arch: Architecture) -> list[int]:
    seen: dict[tuple, int] = {}
    out = []
    for layer in arch.layers:
        sig = (layer.moe, layer.sliding, tuple((t.name, t.shape, t.copies) for t in layer.tensors))
        out.append(seen.setdefault(sig, len(seen)))
    return out


def runtime_terms(setting: TrainSetting) -> tuple[int, float]:
    """(CUDA context + safety margin bytes, allocator reserve %) of the runtime rows, as the ILP applies
    them: both fixed byte rows come off the capacity, the reserve scales the demand."""
    st = runtime.settings(setting.gpu, setting.base)
    margin = runtime.safety_margin_bytes(capacity_bytes=setting.gpu.memory_bytes, pct=setting.base.safety_margin_pct)
    return st.context_bytes + margin, float(st.reserve_pct)


def build_problem(setting: TrainSetting, dims: dict[str, tuple], objective: str,
                  value_of: Callable[[dict[str, Any]], float] | None = None) -> tuple[Problem, list[str]]:
    """The training ILP over ``dims`` (each a tuple of candidate values; ``recompute`` lists the
    per-layer modes, which are not a global choice)."""
    layers = layer_block(setting, dims)
    dims = {d: v for d, v in dims.items() if d != "recompute"}
    states, reasons = states_factor(setting, dims)
    if not states.entries:
        raise MemplanError("no combination of the search space is valid: " + "; ".join(reasons[:3]))
    shape = shape_factor(setting, dims)
    if not shape.entries:
        raise MemplanError(f"no micro-batch divides the global batch of {setting.global_batch} sequences "
                           "over the data-parallel ranks; change --global-batch or --micro-batch.")
    factors = [states, shape, comm_factor(setting, dims)]
    if value_of is not None:
        shape.entries = {k: Entry(e.gpu, e.cpu, e.nvme, e.seconds, value_of(dict(zip(SHAPE_DIMS, k, strict=True))))
                         for k, e in shape.entries.items()}
    context, pct = runtime_terms(setting)
    host = setting.host
    if layers is not None:
        cap = int((setting.gpu.memory_bytes - context) / (1.0 + pct / 100.0))
        bounds = recompute_bounds(setting, dims, states, shape, layers, cap)
        keep = {k for k, b in bounds.items() if b is not None}
        for per in (layers.gpu, layers.seconds, layers.workspace or [], layers.flight_workspace or []):
            for layer in per:
                for m in layer:
                    layer[m] = {k: v for k, v in layer[m].items() if k in keep}
        layers.key_bounds = {k: b for k, b in bounds.items() if b}
    problem = Problem(dims=dims, factors=factors, layers=layers, num_layers=len(setting.arch.layers),
                      gpu_capacity=setting.gpu.memory_bytes - context, cpu_capacity=host.cpu_ram_bytes,
                      nvme_capacity=host.nvme_bytes, objective=objective, gpu_scale_pct=pct)
    return problem, reasons


def _describe(choice: dict[str, Any]) -> str:
    parts = []
    for k, v in choice.items():
        if k == "placement":
            z, oo, po = v
            parts.append(f"zero={int(z)} offload_optimizer={oo.value} offload_params={po.value}")
        else:
            parts.append(f"{k}={getattr(v, 'value', v)}")
    return " ".join(parts)
