"""Per-layer optimizer-state placement for training: which layers' optimizer states stay on the GPU
and which go to the CPU (DeepSpeed ZeRO-3 partial offload, ``offload_optimizer.ratio``).

DeepSpeed assigns its parameter sub-groups, in parameter order, to the GPU first and the CPU last
(``stage3.py``: sub-group i goes to the CPU when i ≥ (1 − ratio)·n), so the offloaded layers are a
suffix of the layer order: the block's ``suffix_mode``. A global dimension ``opt_split`` says whether
a plan offloads all optimizer states ("all", plain ZeRO-Offload) or splits them by layer ("layers");
the states factor of a "layers" row holds everything but the layers' optimizer-side states, which the
per-layer block adds on the GPU or, ×1.5 with DeepSpeed's CPU buffer factor, in CPU RAM.
"""

from __future__ import annotations

from itertools import product
from typing import Any

from memplan.config import Accounting, JobConfig, Offload, ZeroStage
from memplan.planner import cost
from memplan.planner.classes import layer_classes
from memplan.planner.ilp import LayerBlock
from memplan.planner.setting import config_for
from memplan.planner.split import (  # noqa: F401 - re-exported: the per-layer optimizer placement's names
    ALL,
    BLOCK_NAME,
    KEY_DIMS,
    LAYERS,
    MODES,
    gpu_layers,
    partition,
    split_values,
    splittable,
)


def cpu_factor_pct(cfg: JobConfig) -> int:
    """DeepSpeed's estimator multiplies the CPU memory by 1.5 (``additional_buffer_factor``)."""
    from memplan.memory.model_states import DS_CPU_BUFFER_FACTOR_PCT

    return 100 + (DS_CPU_BUFFER_FACTOR_PCT if cfg.accounting is Accounting.DEEPSPEED else 0)


def layer_offload_seconds(setting: Any, cfg: JobConfig, shard_params: int) -> float:
    """Step time offloading ``shard_params`` parameters per GPU adds: their 16-bit gradients down and
    parameters up over one GPU's PCIe link, and the node's CPU-Adam update of its GPUs' partitions
    (``cost.offload_seconds`` without overlap credit, so linear in the parameters and additive over layers)."""
    pcie = cost.pcie_bytes_per_s(setting.gpu, setting.host)
    grad = 2 * shard_params // cfg.dp
    return cost.offload_seconds(bytes_to_host=grad, bytes_to_device=grad, pcie_bytes_per_s=pcie,
                                cpu_update_params=shard_params * cfg.gpus_per_node // max(cfg.dp, 1),
                                cpu_adam_params_per_s=cost.DEFAULT_CPU_ADAM_PARAMS_PER_S, backward_s=0.0)


def param_fetch_seconds(setting: Any, cfg: JobConfig) -> float:
    """PCIe time of ZeRO-Infinity's parameter offload: each GPU brings its 16-bit parameter partition in from
    the CPU for the forward and again for the backward pass of every micro-step.

    Formula: 2 · micro_steps · bytes(P / (tp·pp·dp)) / PCIe bandwidth.
    Source: Rajbhandari et al. 2021, "ZeRO-Infinity", Sec. 5.1 and 6.1 (parameters are offloaded and
    fetched layer by layer before use in forward and backward; the all-gather runs over the GPU links).
    """
    pcie = cost.pcie_bytes_per_s(setting.gpu, setting.host)
    shard = setting.arch.params * cfg.dtype.bits // 8 // (cfg.tp * cfg.pp * cfg.dp)
    return 2 * max(1, cfg.grad_accum) * shard / pcie


def build_block(setting: Any, dims: dict[str, tuple]) -> LayerBlock | None:
    """GPU bytes (kept) or CPU bytes per node (offloaded) of each layer's optimizer-side states, and the
    seconds an offloaded layer adds, keyed by (tp, pp, optimizer, opt_split). Under "all" only ``gpu``
    exists at zero cost (the states factor already counts every state)."""
    from memplan.memory.breakdown import TRAIN_PHASES
    from memplan.memory.context import Context
    from memplan.memory.model_states import layer_optimizer_bytes

    if LAYERS not in dims.get("opt_split", ()):
        return None
    arch = setting.arch
    classes = layer_classes(arch, by_kind=False)
    first = {c: classes.index(c) for c in set(classes)}
    per_class: dict[tuple, tuple[dict, int, float]] = {}
    placement = (ZeroStage.PARAMETERS, Offload.CPU, Offload.NONE)
    for tp, pp, opt in product(dims["tp"], dims["pp"], dims["optimizer"]):
        if pp > 1 or not splittable(placement, opt, setting.base.job):  # one suffix per model: no pipeline stages
            continue
        try:
            cfg = config_for(setting.base, {"tp": tp, "pp": pp, "optimizer": opt, "placement": placement})
        except ValueError:
            continue
        cfg = cfg.model_copy(update={"optimizer_gpu_layers": len(arch.layers)})
        ctx = Context(arch, cfg, setting.gpu, setting.host)
        pct = cpu_factor_pct(cfg)
        for c, i in first.items():
            cpu_bytes = layer_optimizer_bytes(ctx, i)[1]
            shard = arch.layers[i].params // tp  # a layer sits whole on one pipeline stage
            per_class[c, tp, pp, opt] = (layer_phase_bytes(ctx, i), -(-cpu_bytes * pct // 100),
                                         layer_offload_seconds(setting, cfg, shard))
    gpu_t: list[dict[str, dict[tuple, int]]] = []
    cpu_t: list[dict[str, dict[tuple, int]]] = []
    sec_t: list[dict[str, dict[tuple, float]]] = []
    extra_t: dict[str, list[dict[str, dict[tuple, int]]]] = {p.value: [] for p in TRAIN_PHASES}
    for c in classes:
        extra: dict[str, dict[str, dict[tuple, int]]] = {p.value: {m: {} for m in MODES} for p in TRAIN_PHASES}
        gpu: dict[str, dict[tuple, int]] = {m: {} for m in MODES}
        cpu: dict[str, dict[tuple, int]] = {m: {} for m in MODES}
        sec: dict[str, dict[tuple, float]] = {m: {} for m in MODES}
        for tp, pp, opt, split in product(*(dims[d] for d in KEY_DIMS)):
            key = (tp, pp, opt, split)
            got = per_class.get((c, tp, pp, opt))
            if split == LAYERS and got is None:  # no such plan: no key (a zero-cost one would weaken the relaxation)
                continue
            if split == ALL:
                gpu["gpu"][key], cpu["gpu"][key], sec["gpu"][key] = 0, 0, 0.0
                continue
            assert got is not None  # split is LAYERS here: a missing plan continued above
            phases, h, s = got
            g = min(phases.values())  # alive in every phase; the rest per phase (fp32 gradients, step temporaries)
            gpu["gpu"][key], cpu["gpu"][key], sec["gpu"][key] = g, 0, 0.0
            gpu["cpu"][key], cpu["cpu"][key], sec["cpu"][key] = 0, h, s
            for p, n in phases.items():
                if n > g:
                    extra[p.value]["gpu"][key] = n - g
        gpu_t.append(gpu)
        cpu_t.append(cpu)
        sec_t.append(sec)
        for p, per in extra.items():
            extra_t[p].append(per)
    return LayerBlock(modes=MODES, key_dims=KEY_DIMS, gpu=gpu_t, seconds=sec_t, cpu=cpu_t, classes=classes,
                      in_flight=False, name=BLOCK_NAME, contiguous=True, suffix_mode="cpu", stages=False,
                      phase_gpu=extra_t)


def layer_phase_bytes(ctx: Any, layer_index: int) -> dict[Any, int]:
    """GPU bytes per training phase of layer ``layer_index``'s optimizer side when kept on the GPU: its buffers of
    ``model_states.set_buffers`` (master copy and states in every phase, the fp32 gradient partition at the
    optimizer step) and, with foreach AdamW, its share of the step temporaries (its second moments once more;
    ``optimizer_step.foreach_temp_bytes``). For-loop temporaries (the largest tensor) stay with the states factor.
    Evaluated as one micro-batch per step (persisting gradients are the ILP's ``Entry.persist_gpu``)."""
    from memplan.config import OptimizerImpl
    from memplan.memory import components, optimizer_step
    from memplan.memory.breakdown import TRAIN_PHASES, Row, Tier, phase_totals
    from memplan.memory.context import Context
    from memplan.memory.model_states import set_buffers, trained
    from memplan.memory.zero import place, shard_degree

    cfg = ctx.cfg.model_copy(update={"grad_accum": 1})
    ctx = Context(ctx.arch, cfg, ctx.gpu, ctx.host, ctx.stage_override)
    tensors = trained(list(ctx.arch.layers[layer_index].tensors))
    rows = [place(b, zero=cfg.zero, dp=shard_degree(cfg), gpus_per_node=cfg.gpus_per_node)
            for b in set_buffers(ctx, tensors=tensors, opt_tier=Tier.GPU)] if tensors else []
    rows = [r for r in rows if r.tier is Tier.GPU]
    if cfg.effective_optimizer_impl is OptimizerImpl.FOREACH:
        v = sum(r.bytes for r in rows if r.component == "optimizer/adam_v")
        temp = optimizer_step.temp_bytes(ctx, second_moment_bytes=v)
        if temp:
            rows.append(Row("optimizer/step_temporaries", Tier.GPU, temp))
    return phase_totals(components.with_phases(ctx, rows), Tier.GPU, TRAIN_PHASES)


def sub_groups(arch: Any, cfg: JobConfig, size: int) -> list[int]:
    """DeepSpeed's ZeRO-3 sub-groups of one rank, as the index of the last unit (-1: the tensors before the
    blocks, i: layer i, L: the tensors after them) whose tensors each sub-group ends in.

    Source: DeepSpeed ``stage3.py`` ``_create_fp16_sub_groups``: parameters in order join the open
    sub-group until its partitioned elements reach ``sub_group_size`` (or the parameters end).
    Assumptions: one parameter group in module order (HF Trainer's no-decay group of norms and biases
    moves those small tensors to the end).
    """
    from memplan.arch.parallel import sharded_numel
    from memplan.units import ceil_div

    units = [(-1, arch.pre)] + [(i, layer.tensors) for i, layer in enumerate(arch.layers)]
    units.append((len(arch.layers), (*arch.post, *arch.extra)))
    ends, open_size = [], 0
    flat = [(u, t) for u, tensors in units for t in tensors]
    for n, (u, t) in enumerate(flat):
        open_size += ceil_div(sharded_numel(t, cfg.tp, cfg.ep), cfg.dp)
        if open_size >= size or n == len(flat) - 1:
            ends.append(u)
            open_size = 0
    return ends


def deepspeed_settings(arch: Any, cfg: JobConfig) -> tuple[int, float]:
    """(sub_group_size, ratio) with which DeepSpeed keeps on the GPU the optimizer states of the
    embeddings and of at most the first ``optimizer_gpu_layers`` layers, offloading the rest.

    ``sub_group_size`` is the smallest layer's partition per rank, so sub-groups end at (or inside) layer
    boundaries. Sub-group i goes to the CPU when i ≥ int((1 − r)·k) (``stage3.py``); to keep the g
    leading sub-groups that end before layer N, r = (k − g − ½)/k (the ½ keeps the truncation away
    from an integer). A sub-group that straddles the boundary is offloaded, so the GPU holds at most
    what the plan counts (the CPU slightly more).
    """
    from memplan.arch.parallel import sharded_numel
    from memplan.units import ceil_div

    size = min(sum(ceil_div(sharded_numel(t, cfg.tp, cfg.ep), cfg.dp) for t in layer.tensors) for layer in arch.layers)
    ends = sub_groups(arch, cfg, size)
    kept = cfg.optimizer_gpu_layers or 0
    g = sum(1 for u in ends if u < kept)
    k = len(ends)
    return size, (k - g - 0.5) / k


def describe(cfg: JobConfig, ratio: float, num_layers: int) -> str:
    n = cfg.optimizer_gpu_layers or 0
    where = ("every layer on gpu, the tensors after them on cpu" if n >= num_layers else
             f"layers 0-{n - 1} on gpu, the rest on cpu" if n else "all layers on cpu")
    return f"optimizer states: {where} ({ratio:.1%} of parameters offloaded)"
