"""Activation offload in training plans: its step time, and the plan dimension (off / on where the engine runs it).

The bytes are ``memory.activation_offload``'s. The step time is each offloaded layer's PCIe traffic (its saved
activations down in the forward, up in the backward) less the layer compute the engine runs the copy beside:
torchtune's copy stream and TransformerEngine's double buffer overlap a layer's transfer with the next layer's
compute, DeepSpeed's cpu_checkpointing copies synchronously (``activation_offload.OVERLAP``).
"""

from __future__ import annotations

from memplan.arch.tensors import Architecture, Layer
from memplan.catalog.schema import GpuSpec, HostSpec
from memplan.config import Engine, JobConfig, Recompute
from memplan.memory import activation_offload as ao
from memplan.planner import cost, steptime
from memplan.planner.setting import TrainSetting, config_for

ENGINES = frozenset({Engine.PYTORCH, Engine.FSDP2, Engine.DEEPSPEED, Engine.MEGATRON})
"""Training engines that offload activations (``memory.activation_offload``)."""


def layer_compute_seconds(arch: Architecture, gpu: GpuSpec, cfg: JobConfig, layer: Layer) -> float:
    """Forward + backward seconds of one layer for one micro-batch on one GPU (``steptime``'s GEMM and attention
    terms at the shape's efficiency): what a layer's transfer can run beside."""
    tokens = cfg.micro_batch * cfg.seq_len
    gemm = steptime.linear_forward_flops(layer, tokens)
    core = steptime.attention_forward_flops(arch, layer, cfg.seq_len, tokens)
    eff = steptime.efficiency(gpu, cfg, arch.spec.hidden_size or 0)
    passes = steptime.FORWARD_PASSES + steptime.BACKWARD_PASSES_FULL
    return passes * (gemm / steptime.peak_flops(gpu, cfg) + core / steptime.attention_peak_flops(gpu)) / (cfg.tp * eff)


def layer_seconds(arch: Architecture, gpu: GpuSpec, host: HostSpec, cfg: JobConfig, global_batch: int, layer: Layer,
                  nbytes: int) -> float:
    """Step time one offloaded layer adds: micro-batches · ``activation_offload.transfer_seconds`` of its ``nbytes``
    (saved bytes of one micro-batch) beside its own compute, at the engine's overlap."""
    if not nbytes:
        return 0.0
    per_micro = ao.transfer_seconds(moved_bytes=nbytes, pcie_bytes_per_s=cost.pcie_bytes_per_s(gpu, host),
                                    hidden_s=layer_compute_seconds(arch, gpu, cfg, layer),
                                    overlap=ao.OVERLAP[cfg.effective_engine])
    return steptime.micro_batches(cfg, global_batch) * per_micro


def step_seconds(arch: Architecture, gpu: GpuSpec, host: HostSpec, cfg: JobConfig, global_batch: int) -> float:
    """Activation-offload time of one step: the slowest pipeline stage's offloaded layers (``layer_seconds``)."""
    if not cfg.offload_activations or not arch.layers:
        return 0.0
    from memplan.memory.activations import layer_micro_bytes, layer_modes
    from memplan.memory.context import Context

    worst = 0.0
    for stage in range(cfg.pp):
        ctx = Context(arch, cfg, gpu, host).at_stage(stage)
        modes = layer_modes(ctx)
        total = sum(layer_seconds(arch, gpu, host, cfg, global_batch, arch.layers[i],
                                  layer_micro_bytes(ctx, i, modes[i])) for i in ao.offloaded_layers(ctx))
        worst = max(worst, total)
    return worst


def choices(base: JobConfig, wanted: bool | None) -> tuple[bool, ...]:
    """Activation-offload settings a plan tries: the user's (``SearchSpace.offload_activations``), else off and, for a
    named training engine (``--engine``; what each offloads differs, so a plan of each combination's default engine
    does not try it), on. ``train_plan`` solves "on" only where "off" leaves room for it (``_offload_may_help``)."""
    if wanted is not None:
        return (wanted,)
    if base.offload_activations:
        return (True,)
    engine = base.engine
    return (False, True) if base.job.trains and engine in ENGINES else (False,)


def variant(base: JobConfig, offload: bool) -> JobConfig:
    """The base configuration of a plan with activation offload ``offload``: on DeepSpeed, whose offload is
    cpu_checkpointing, every layer recomputes in full (``restrict`` keeps that mode only)."""
    update: dict[str, object] = {"offload_activations": offload}
    if offload and base.engine is Engine.DEEPSPEED:
        update["recompute"] = Recompute.FULL
    return base.model_copy(update=update)


def restrict(base: JobConfig, dims: dict[str, tuple]) -> dict[str, tuple]:
    """A plan's dimensions with activation offload on: pp = 1 (Megatron refuses pipelines with it; memplan's ILP
    times and places the offloaded layers of one stage), on Megatron no recompute (its rule), on DeepSpeed full
    recompute (cpu_checkpointing offloads the checkpoints)."""
    if not base.offload_activations:
        return dims
    out = {**dims, "pp": tuple(p for p in dims["pp"] if p == 1)}
    need = {Engine.MEGATRON: Recompute.NONE, Engine.DEEPSPEED: Recompute.FULL}.get(base.engine) if base.engine else None
    if need is not None:  # only where the user's space allows it: an empty tuple is refused by the caller
        out["recompute"] = tuple(m for m in dims.get("recompute", (need,)) if m is need)
    return out


def adjust_block(setting: TrainSetting, classes: list[int], gpu: list[dict], seconds: list[dict],
                 workspace: list[dict]) -> tuple[list[dict] | None, list[int]]:
    """The recompute block's tables (per layer, mode, key (tp, pp, micro-batch, seq)) with activation offload on:
    an offloaded layer's saved bytes leave ``gpu`` for the returned CPU table (× GPUs per node), its transfer time
    joins ``seconds`` and ``LAYERS_IN_TRANSIT`` copies of it join ``workspace`` (the largest counts, as the in-transit
    row of ``memory.activation_offload``). Which layers and modes: every one on pytorch/fsdp2, the recompute-full
    ones on deepspeed, Megatron's first ``cpu_offloading_num_layers`` (the others get classes of their own). In place;
    returns (CPU table or None when off, classes)."""
    base, arch = setting.base, setting.arch
    if not base.offload_activations:
        return None, classes
    n = len(classes)
    off = range(n)
    if base.engine is Engine.MEGATRON:
        off = range(ao.megatron_layers(base.engine_config.cpu_offloading_num_layers, n))
        top = max(classes, default=0) + 1
        classes = [c if i in off else top + i for i, c in enumerate(classes)]
    modes = {Recompute.FULL.value} if base.engine is Engine.DEEPSPEED else None
    cpu: list[dict] = [{m: dict.fromkeys(per, 0) for m, per in layer.items()} for layer in gpu]
    cfgs: dict[tuple, JobConfig] = {}
    for i in off:
        for m, per in gpu[i].items():
            if modes is not None and m not in modes:
                continue
            for key, nbytes in per.items():
                if key not in cfgs:
                    choice = dict(zip(("tp", "pp", "micro_batch", "seq_len"), key, strict=True))
                    cfgs[key] = config_for(base, choice, global_batch=setting.global_batch)
                cpu[i][m][key] = nbytes * base.gpus_per_node
                seconds[i][m][key] += layer_seconds(arch, setting.gpu, setting.host, cfgs[key],
                                                    setting.global_batch, arch.layers[i], nbytes)
                workspace[i][m][key] += ao.LAYERS_IN_TRANSIT * nbytes
                per[key] = 0
    return cpu, classes


def workspace_phases(base: JobConfig, phases: frozenset[str]) -> frozenset[str]:
    """The recompute workspace's phases, with the in-transit tensors' (forward, start of backward, backward) when
    activation offload is on (the recompute workspace is then counted in those phases too: the safe side)."""
    if not base.offload_activations:
        return phases
    from memplan.memory import registry

    return phases | frozenset(p.value for p in registry.lookup("activations/offload_buffer").phases)
