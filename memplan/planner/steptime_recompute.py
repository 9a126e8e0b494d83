"""The step time recomputation adds: per layer and mode, the forward it repeats and, with tensor or context
parallelism, the forward's exchanges.

Part of ``planner.steptime`` (which re-exports every name). Seconds are floats.
"""

from __future__ import annotations

from memplan.arch.tensors import Architecture, Layer
from memplan.catalog.schema import GpuSpec
from memplan.config import JobConfig, Recompute
from memplan.memory import megatron_recompute
from memplan.planner import cost
from memplan.planner.steptime_comm import cp_layer_split, links
from memplan.planner.steptime_compute import (
    ACTIVATION_BYTES,
    _tokens_micro,
    attention_forward_flops,
    attention_peak_flops,
    attention_share,
    attention_widths,
    efficiency,
    linear_forward_flops,
    peak_flops,
)


def recompute_seconds(arch: Architecture, gpu: GpuSpec, cfg: JobConfig, global_batch: int, layer: Layer,
                      mode: Recompute) -> float:
    """Step time a recomputed layer adds, over the whole global batch, spread over all GPUs.

    Full: the layer's forward again plus its two forward tensor-parallel collectives (Korthikanti et al.
    2022, Sec. 4: one extra forward); op-level: 2 FLOPs per weight element and token of the matmuls it does not
    keep (``activations_op.recomputed_mm_numel``; its elementwise ops are memory-bound and left out);
    selective: the attention core, 2·S·(d_qk + d_v) per token (Korthikanti
    et al. 2022, Sec. 5: QKᵀ, softmax and attention over V); on megatron, what its ``--recompute-modules`` rerun
    (``megatron_recompute.recompute_flops``). Assumption: the pipeline bubble does not
    stretch recomputation (the ILP adds it per layer, without the pipeline degree).
    """
    if mode is Recompute.NONE:
        return 0.0
    tokens = global_batch * cfg.seq_len
    if mode is Recompute.OP:
        from memplan.memory.activations_op import recomputed_mm_numel

        flops = 2.0 * tokens * recomputed_mm_numel(layer, 1)  # the matmuls op-level checkpointing does not keep
    elif mode is Recompute.FULL:
        flops = linear_forward_flops(layer, tokens) + attention_share(cfg) * attention_forward_flops(
            arch, layer, cfg.seq_len, tokens)
    else:
        d_qk, d_v = attention_widths(arch)
        flops = attention_share(cfg) * 2.0 * cfg.seq_len * (d_qk + d_v) * tokens
        if (mods := megatron_recompute.modules(cfg)) is not None:  # Megatron's --recompute-modules
            flops = megatron_recompute.recompute_flops(arch.spec, tokens=tokens, core_flops=flops, mods=mods, tp=1)
    seconds = flops / (cfg.world_size * peak_flops(gpu, cfg) * efficiency(gpu, cfg, arch.spec.hidden_size or 0))
    if mode is Recompute.FULL and cfg.tp > 1:
        bw, lat = links(gpu, cfg).pick(True)
        nbytes = _tokens_micro(cfg) * (arch.spec.hidden_size or 0) * ACTIVATION_BYTES
        per_micro = 2 * cost.collective_seconds(kind="all_reduce", nbytes=nbytes, ranks=cfg.tp, bytes_per_s=bw,
                                                latency_s=lat)
        seconds += per_micro * global_batch / cfg.micro_batch / (cfg.world_size // (cfg.tp * cfg.cp))
    if mode in (Recompute.FULL, Recompute.SELECTIVE) and cfg.cp > 1:
        seconds += _cp_recompute_seconds(arch, gpu, cfg, global_batch, layer)
    return seconds


def _cp_recompute_seconds(arch: Architecture, gpu: GpuSpec, cfg: JobConfig, global_batch: int, layer: Layer) -> float:
    """The forward exchange a recomputed attention repeats (Megatron recomputes ``core_attention``, with its
    context-parallel communication, under full and selective recompute), per step and spread over the pipeline's
    stages as the ILP sums it over all layers: global batch / (micro-batch · replicas · pp) per layer."""
    core = attention_share(cfg) * attention_forward_flops(arch, layer, cfg.seq_len, _tokens_micro(cfg))
    core_s = core / (cfg.tp * efficiency(gpu, cfg, arch.spec.hidden_size or 0) * attention_peak_flops(gpu))
    forward, _ = cp_layer_split(arch, gpu, cfg, core_s)
    return forward * global_batch / (cfg.micro_batch * cfg.batch_dp * cfg.pp)


def layer_recompute_modes(cfg: JobConfig, num_layers: int) -> list[Recompute]:
    """Each layer's recompute mode: ``recompute_map``, else ``recompute`` on the first ``recompute_layers``."""
    if cfg.recompute_map is not None:
        return list(cfg.recompute_map)
    n = num_layers if cfg.recompute_layers is None else min(cfg.recompute_layers, num_layers)
    return [cfg.recompute] * n + [Recompute.NONE] * (num_layers - n)
