"""What one training solve holds fixed (``TrainSetting``), and the ``JobConfig`` a choice of the plan's
dimensions describes (``config_for``): the small shared base of the training ILP's modules."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from memplan.arch.tensors import Architecture
from memplan.catalog.schema import GpuSpec, HostSpec
from memplan.config import JobConfig, Recompute
from memplan.memory.context import Context
from memplan.planner import hybrid
from memplan.planner.dims import with_sequence_parallel
from memplan.planner.split import LAYERS, gpu_layers

SAVINGS = {Recompute.NONE.value: 0, Recompute.SELECTIVE.value: 1, Recompute.OP.value: 2, Recompute.FULL.value: 3}


@dataclass(frozen=True)
class TrainSetting:
    """Everything fixed during one solve: model, hardware, the base config and the global batch."""

    arch: Architecture
    gpu: GpuSpec
    host: HostSpec
    base: JobConfig
    global_batch: int


def config_for(base: JobConfig, choice: dict[str, Any], *, global_batch: int | None = None,
               modes: Iterable[str] | None = None, optimizer_modes: list[str] | None = None) -> JobConfig:
    """The JobConfig a (partial) choice of dimensions describes (``optimizer_modes``: the per-layer
    optimizer placement of an ``opt_split = layers`` plan)."""
    upd: dict[str, Any] = {}
    for dim, value in choice.items():
        if dim == "placement":
            upd["zero"], upd["offload_optimizer"], upd["offload_params"] = value
        elif dim in ("tp", "pp", "ep", "micro_batch", "seq_len", "optimizer", "quant"):
            upd[dim] = value
    cfg = with_sequence_parallel(JobConfig.model_validate({**base.model_dump(), **upd}))
    if cfg.pp == 1 and cfg.engine_config.pp_schedule is not None:  # a pipeline schedule (and the chunks it runs)
        # applies to pp > 1 plans: the pp = 1 plans of every schedule are one plan
        cfg = cfg.model_copy(update={"engine_config": cfg.engine_config.model_copy(update={"pp_schedule": None}),
                                     "perf": cfg.perf.model_copy(update={"virtual_stages": 1})})
    if hybrid.DIM in choice:
        cfg = hybrid.apply(cfg, choice[hybrid.DIM])
    if global_batch is not None:
        cfg = cfg.model_copy(update={"grad_accum": max(1, global_batch // (cfg.micro_batch * cfg.batch_dp))})
    if modes is not None:
        modes = tuple(Recompute(m) for m in modes)
        used = {m for m in modes if m is not Recompute.NONE}
        mode = max(used, key=lambda m: SAVINGS[m.value]) if used else Recompute.NONE
        cfg = cfg.model_copy(update={"recompute": mode, "recompute_map": modes, "recompute_layers": None})
    if choice.get("opt_split") == LAYERS:
        n = gpu_layers(optimizer_modes) if optimizer_modes else None
        cfg = JobConfig.model_validate({**cfg.model_dump(), "optimizer_gpu_layers": n})
    return cfg


def contexts(setting: TrainSetting, cfg: JobConfig) -> list[Context]:
    ctx = Context(setting.arch, cfg, setting.gpu, setting.host)
    return [ctx.at_stage(s) for s in range(cfg.pp)]
