"""Activation offload to CPU (``JobConfig.offload_activations``), as each training engine runs it.

The saved activations of the offloaded layers leave the GPU during the forward pass for pinned CPU memory and come
back for their backward; the GPU keeps the layers not offloaded plus the tensors in transit (the layer being copied
out or prefetched back, and the one computing beside it). What each engine offloads:

- ``pytorch``/``fsdp2``: ``torch.autograd.graph.save_on_cpu(pin_memory=True)`` around the decoder layers (torchtune
  ``training/_activation_offloading.py`` ``OffloadActivations``, a ``saved_tensors_hooks`` context with a copy stream
  and backward prefetch; HF accelerate/Trainer users wrap the model the same way): every layer's saved tensors.
- ``deepspeed``: ``activation_checkpointing.cpu_checkpointing`` (deepspeed/runtime/activation_checkpointing/
  checkpointing.py, with ``partition_activations``, a no-op split at tp = 1): the inputs of the checkpointed layers
  (recompute full), copied back for their recomputation; layers that are not checkpointed stay on the GPU.
- ``megatron``: ``--cpu-offloading`` with ``--cpu-offloading-num-layers N`` (TransformerEngine
  ``transformer_engine/pytorch/cpu_offload.py`` ``get_cpu_offload_context``, ``AsyncDoubleBufferGroupOffloadHandler``):
  the first N of the stage's layers (Megatron allows N ≤ layers − 1), double-buffered.

Rows: ``activations/layers`` keeps the GPU part, ``activations/offload_buffer`` (GPU) the tensors in transit,
``activations/cpu_offloaded`` (CPU, per node) what the node's processes hold in pinned memory.
"""

from __future__ import annotations

from dataclasses import replace

from memplan.config import Engine, Recompute
from memplan.errors import MemplanError
from memplan.memory.breakdown import Row, Tier
from memplan.memory.context import Context

LAYERS_IN_TRANSIT = 2
"""Layers whose saved tensors sit on the GPU beside the kept ones: the one being copied out (forward) or back
(backward) and the next one prefetched or computing (TransformerEngine's double buffer; torchtune's copy stream
overlaps one layer's transfer with the next layer's compute)."""
SOURCES = {
    Engine.PYTORCH: "torch/autograd/graph.py save_on_cpu(pin_memory=True); torchtune OffloadActivations",
    Engine.FSDP2: "torch/autograd/graph.py save_on_cpu(pin_memory=True); torchtune OffloadActivations",
    Engine.DEEPSPEED: "deepspeed/runtime/activation_checkpointing/checkpointing.py (cpu_checkpointing)",
    Engine.MEGATRON: "Megatron-Core --cpu-offloading; transformer_engine/pytorch/cpu_offload.py",
}
OVERLAP = {Engine.PYTORCH: 1.0, Engine.FSDP2: 1.0, Engine.DEEPSPEED: 0.0, Engine.MEGATRON: 1.0}
"""Share of the PCIe traffic each engine runs beside compute: torchtune's offload uses a separate copy stream and
prefetches in backward, TransformerEngine's handler is asynchronous and double-buffered; DeepSpeed's
cpu_checkpointing copies with a blocking ``.to('cpu')`` and back before the recomputation."""


def offloaded_layers(ctx: Context) -> list[int]:
    """Layer indices of the reported stage whose saved activations the engine moves to the CPU (module docstring)."""
    from memplan.memory.activations import layer_modes

    cfg = ctx.cfg
    if not cfg.offload_activations:
        return []
    stage = [i for i, _ in ctx.layers]
    engine = cfg.effective_engine
    if engine is Engine.DEEPSPEED:
        modes = layer_modes(ctx)
        return [i for i in stage if modes[i] is Recompute.FULL]
    if engine is Engine.MEGATRON:
        return stage[:megatron_layers(cfg.engine_config.cpu_offloading_num_layers, len(stage))]
    return stage


def megatron_layers(requested: int | None, stage_layers: int) -> int:
    """Layers Megatron offloads: ``--cpu-offloading-num-layers`` (it must be below the layer count), or, when not
    given, every layer but the last, the most Megatron-Core allows (transformer_config.py: "CPU offloading can be
    done only for layers less than num_layers")."""
    if requested is None:
        return max(0, stage_layers - 1)
    if requested >= stage_layers:
        raise MemplanError(f"engine_config.cpu_offloading_num_layers={requested}: Megatron-Core offloads fewer layers "
                           f"than the model's {stage_layers} (transformer_config.py); use at most {stage_layers - 1}.")
    return requested


def split_bytes(per_layer: dict[int, int], flight: int | dict[int, int]) -> tuple[int, int]:
    """(bytes leaving the GPU, bytes in transit on the GPU) for the offloaded layers' per-micro-batch saved bytes.

    Formula: moved = Σ_offloaded F_i · A_i with F_i the micro-batches layer i holds in flight (``flight``, one count
    for every layer or one per layer: every micro-batch in flight is offloaded); in transit = min(2, n) · max_i A_i
    (``LAYERS_IN_TRANSIT`` of one micro-batch). Both 0 without offloaded layers.
    """
    if not per_layer:
        return 0, 0
    moved = sum((flight if isinstance(flight, int) else flight[i]) * a for i, a in per_layer.items())
    transit = min(LAYERS_IN_TRANSIT, len(per_layer)) * max(per_layer.values())
    return moved, transit


def apply(ctx: Context, rows: list[Row]) -> list[Row]:
    """``rows`` (training activations of the reported stage) with the offloaded layers' bytes moved to the CPU.

    Formula: activations/layers − moved on the GPU; offload_buffer = in transit (``split_bytes``);
    cpu_offloaded = moved · GPUs per node (each process of the node pins its own). Source: module docstring.
    Assumptions: the rotary tables, masks, embeddings and loss tensors stay on the GPU (torchtune keeps the
    output layer's; the loss runs outside the wrapped layers).
    """
    from memplan.memory.activations import counting_for, layer_flights, layer_micro_bytes, layer_modes

    cfg = ctx.cfg
    if not cfg.offload_activations:
        return rows
    if not rows:
        raise MemplanError("offload_activations moves the layers' saved activations; this model's are not modelled "
                           "(a parameter-count-only model): drop --offload-activations.")
    modes = layer_modes(ctx)
    per_layer = {i: layer_micro_bytes(ctx, i, modes[i]) for i in offloaded_layers(ctx)}
    flights = layer_flights(ctx, modes, counting_for(cfg))  # per chunk under the interleaved schedule
    moved, transit = split_bytes(per_layer, flights)
    source = SOURCES[cfg.effective_engine]
    out = [replace(r, bytes=r.bytes - moved, note=f"{r.note}; {len(per_layer)} layers offloaded")
           if r.component == "activations/layers" else r for r in rows]
    out.append(Row("activations/offload_buffer", Tier.GPU, transit, source,
                   f"saved tensors of up to {LAYERS_IN_TRANSIT} offloaded layers in transit"))
    out.append(Row("activations/cpu_offloaded", Tier.CPU, moved * cfg.gpus_per_node, source,
                   f"pinned: {len(per_layer)} layers' saved activations × {cfg.gpus_per_node} processes per node"))
    return out


def transfer_seconds(*, moved_bytes: int, pcie_bytes_per_s: float, hidden_s: float, overlap: float) -> float:
    """Step time activation offload adds on one GPU: its offloaded bytes over PCIe each way, less what compute hides.

    Formula: t = 2 · moved / PCIe (down in forward, up in backward); exposed = max(0, t − overlap · hidden_s),
    ``hidden_s`` the forward + backward compute of the step the copies can run beside, ``overlap`` the engine's
    share (``OVERLAP``). Source: the engines' mechanisms (module docstring); PCIe as ``planner.cost``.
    """
    seconds = 2.0 * moved_bytes / pcie_bytes_per_s
    return max(0.0, seconds - overlap * hidden_s)
