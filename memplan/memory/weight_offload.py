"""Per-layer weight offload for inference (accelerate ``device_map`` with "cpu" entries): the offloaded
layers' weights live in CPU RAM, each module's weights are copied to the GPU for its forward and freed
after it, and every forward pass (prefill and each decode step) streams them over PCIe again.
"""

from __future__ import annotations

from memplan.arch.tensors import Tensor
from memplan.config import JobConfig, Offload, ZeroStage
from memplan.errors import MemplanError
from memplan.memory import weights
from memplan.memory.breakdown import Row, Tier
from memplan.memory.context import Context
from memplan.memory.quant import Library, get_format

OFFLOAD_SOURCE = ("accelerate big_modeling.dispatch_model + hooks.py attach_align_device_hook: AlignDevicesHook"
                  "(offload=True) per module; pre_forward copies its weights to the GPU, post_forward frees them")
PER_EXPERT_MODULES = (Library.GPTQ, Library.AWQ)
"""Libraries that make every routed expert its own quantized linear module (see ``memory.quant``); otherwise
transformers 5 fuses a layer's routed experts into one module of 3-D parameters (``MixtralExperts``)."""


def check_offload_map(cfg: JobConfig, *, num_layers: int) -> None:
    """Reject an ``infer.offload_map`` that accelerate cannot run, in one sentence (a map with no True
    entry equals no map and needs only the right length)."""
    omap = cfg.infer.offload_map
    if omap is None:
        return
    if len(omap) != num_layers:
        raise MemplanError(f"infer.offload_map has {len(omap)} entries but the model has {num_layers} layers.")
    if not any(omap):
        return
    if cfg.tp > 1 or cfg.ep > 1:
        raise MemplanError("infer.offload_map needs tp = 1 and ep = 1: accelerate's device_map places whole layers "
                           "on devices and has no tensor or expert parallelism.")
    if cfg.pp > cfg.gpus_per_node:
        raise MemplanError(f"infer.offload_map needs pp ({cfg.pp}) ≤ gpus_per_node ({cfg.gpus_per_node}): accelerate "
                           "runs one model replica in one process, on one node.")
    if weights.job_library(cfg) is Library.GGUF:
        raise MemplanError("infer.offload_map does not apply to GGUF formats: llama.cpp runs the layers it keeps in "
                           "host memory on the CPU, which memplan does not model.")
    if cfg.offload_params is not Offload.NONE or cfg.zero >= ZeroStage.PARAMETERS:
        raise MemplanError("infer.offload_map (accelerate) cannot be combined with offload_params or ZeRO-3, which "
                           "place the parameters themselves (DeepSpeed).")


def offloaded_format(fmt: str | None) -> str | None:
    """The format an offloaded layer whose ``quant_map`` entry is ``fmt`` is stored in.

    bitsandbytes leaves modules mapped to "cpu" unquantized, in the load dtype (None): transformers
    ``quantizer_bnb_4bit``/``quantizer_bnb_8bit._process_model_before_weight_loading`` add the device_map's
    "cpu" keys to ``modules_to_not_convert`` (which needs ``llm_int8_enable_fp32_cpu_offload=True``).
    GPTQ/AWQ keep their packed buffers: assumes ``from_pretrained(..., offload_buffers=True)``; with the
    default False their qweight/qzeros/scales buffers would stay on the GPU (accelerate ``init_hook``).
    """
    if fmt is not None and get_format(fmt).library is Library.BITSANDBYTES:
        return None
    return fmt


def cpu_layer_bytes(ctx: Context, layer_index: int, fmt: str | None) -> int:
    """Bytes layer ``layer_index`` takes in CPU RAM when offloaded with ``quant_map`` entry ``fmt``, which is
    also what each forward pass copies over PCIe for it: layer_weight_bytes(i, offloaded_format(fmt))."""
    return weights.layer_weight_bytes(ctx, layer_index, offloaded_format(fmt))


def _hook_module(t: Tensor, per_expert: bool) -> tuple[str, int]:
    """(name of the module holding ``t``, copies of ``t`` in it): accelerate hooks each module with tensors."""
    if not t.routed or ".*." not in t.name:
        return t.module, t.copies
    return (t.name, 1) if per_expert else (t.name.split(".*.", 1)[0], t.copies)


def staging_bytes(ctx: Context, layer_index: int, fmt: str | None) -> int:
    """GPU bytes held while offloaded layer ``layer_index`` runs: its largest module's weights.

    Formula: max over the layer's modules m of Σ_{t in m} bytes(t) in ``offloaded_format(fmt)``.
    Source: accelerate ``attach_align_device_hook`` puts an ``AlignDevicesHook(offload=True)`` on every
    module with direct tensors; ``pre_forward`` copies them to the execution device (``weights_map``),
    ``post_forward`` sets them back to "meta", so modules are loaded one at a time.
    Assumptions: no ``preload_module_classes`` (which would load a whole layer at once); the caching
    allocator reuses the freed block for the next module (fragmentation is the allocator reserve's row).
    """
    cfg, arch = ctx.cfg, ctx.arch
    stored = offloaded_format(fmt)
    per_expert = stored is not None and get_format(stored).library in PER_EXPERT_MODULES
    modules: dict[str, int] = {}
    for t in arch.layers[layer_index].tensors:
        nbytes = weights.weight_bytes_per_gpu([(t, layer_index)], dtype=cfg.dtype, quant=stored, tp=cfg.tp,
                                              ep=cfg.ep, num_layers=len(arch.layers))
        name, copies = _hook_module(t, per_expert)
        modules[name] = modules.get(name, 0) + nbytes * copies // t.copies
    return max(modules.values(), default=0)


def offloaded_layer_bytes(ctx: Context) -> int:
    """Weight bytes one forward pass copies over the reported stage's PCIe link: Σ ``cpu_layer_bytes`` over
    its offloaded layers (each module's weights are copied again in every forward, prefill and decode)."""
    off = weights.offloaded_layers(ctx.cfg)
    return sum(cpu_layer_bytes(ctx, i, weights.layer_format(ctx.cfg, i)) for i, _ in ctx.layers if i in off)


def replicas_per_node(cfg: JobConfig) -> int:
    """Model replicas (accelerate processes) per node: max(1, gpus_per_node // (tp·pp))."""
    return max(1, cfg.gpus_per_node // (cfg.tp * cfg.pp))


def offload_rows(ctx: Context) -> list[Row]:
    """``weights/offload_buffer`` (GPU) and ``weights/cpu_offloaded`` (CPU, per node) of an offloaded job.

    Formula: buffer = max over the stage's offloaded layers of ``staging_bytes``; CPU = Σ over every
    offloaded layer of the model of ``cpu_layer_bytes`` × replicas per node.
    Source: accelerate ``dispatch_model`` keeps a "cpu" layer's state dict in host memory (``weights_map``)
    and hooks it (see ``staging_bytes``); one process holds one replica's CPU part.
    Assumptions: an offloaded layer runs on its pipeline stage's GPU (``attach_align_device_hook_on_blocks``
    with a per-module ``execution_device``; ``dispatch_model`` from a device_map runs every "cpu" layer on its
    main device instead); the KV cache of every layer stays on the GPU that runs it (transformers'
    ``DynamicCache`` is built on the device of the keys), so ``kv_cache.rows`` is unchanged.
    """
    cfg = ctx.cfg
    check_offload_map(cfg, num_layers=len(ctx.arch.layers))
    off = weights.offloaded_layers(cfg)
    if not off:
        return []
    here = [i for i, _ in ctx.layers if i in off]
    buffer = max((staging_bytes(ctx, i, weights.layer_format(cfg, i)) for i in here), default=0)
    model = sum(cpu_layer_bytes(ctx, i, weights.layer_format(cfg, i)) for i in sorted(off))
    reps = replicas_per_node(cfg)
    return [
        Row("weights/offload_buffer", Tier.GPU, buffer, OFFLOAD_SOURCE,
            f"transient: largest module of the {len(here)} offloaded layers on this stage"),
        Row("weights/cpu_offloaded", Tier.CPU, model * reps, OFFLOAD_SOURCE,
            f"{len(off)} offloaded layers × {reps} replicas per node"),
    ]
