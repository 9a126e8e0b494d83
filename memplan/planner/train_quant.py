"""Per-layer weight formats for LoRA/QLoRA fine-tuning: LQ-LoRA's setting (Guo et al. 2023, Sec. 3.2: an
ILP gives each matrix of the frozen base model a quantization configuration, minimising the total
reconstruction error under a memory budget). Here the budget is the GPU (every byte ``estimate``
counts) and the unit of choice is a decoder layer; the error is ``memory.quant_error``'s proxy.

The frozen weights must sit whole on each GPU (no ZeRO-3 partitioning, no parameter offload): the
states factor then holds everything but the layers' weights, which this block adds per layer.
"""

from __future__ import annotations

from itertools import product
from typing import Any

from memplan.config import Job, Offload, ZeroStage
from memplan.errors import MemplanError
from memplan.planner.classes import layer_classes
from memplan.planner.ilp import LayerBlock
from memplan.planner.infer_layers import fmt_label

BLOCK_NAME = "weights"
KEY_DIMS = ("tp", "pp")


PROBE_OBJECTIVES = ("max-quality", "min-memory", "max-context")
"""max-quality is the user's; min-memory and max-context are the diagnosis' probes (``suggest``)."""


def check(job: Job, formats: tuple[str | None, ...], objective: str) -> None:
    """One sentence when per-layer formats cannot apply to this training request."""
    from memplan.memory.quant import Library, get_format

    if job not in (Job.LORA, Job.QLORA):
        raise MemplanError("per-layer weight formats apply to a frozen base model: use --job lora or qlora "
                           "(or --job infer).")
    if len(formats) < 2 or not any(formats):
        raise MemplanError("per-layer quantization (--per-layer-quant, --objective max-quality) needs at least "
                           "two --quant choices, one of them a format (none = 16-bit), e.g. --quant nf4-dq,int8.")
    libraries = {get_format(f).library for f in formats if f is not None}
    if len(libraries) > 1:
        raise MemplanError("per-layer quantization mixes formats of one library, but --quant names "
                           f"{', '.join(sorted(lib.value for lib in libraries))} formats; keep one.")
    if Library.GGUF in libraries:
        raise MemplanError("GGUF formats are for llama.cpp inference; transformers dequantizes them on load, so a "
                           "LoRA/QLoRA job cannot keep them per layer.")
    if objective not in PROBE_OBJECTIVES:
        raise MemplanError("a fine-tuning job chooses per-layer weight formats by --objective max-quality "
                           "(the least quantization error that fits).")


def restrict(dims: dict[str, tuple], formats: tuple[str | None, ...]) -> dict[str, tuple]:
    """The space with whole weights on every GPU, and one global format: the first quantized one (it sets
    the tensors outside the blocks, which bitsandbytes, GPTQ and AWQ leave in 16 bits, and the library a
    QLoRA job loads with)."""
    places = tuple(p for p in dims["placement"] if p[0] < ZeroStage.PARAMETERS and p[2] is Offload.NONE)
    if not places:
        raise MemplanError("per-layer weight formats need the weights whole on each GPU; allow --zero 0, 1 or 2 "
                           "without --offload-params.")
    return {**dims, "placement": places, "quant": (next(f for f in formats if f is not None),)}


def build_block(setting: Any, dims: dict[str, tuple], formats: tuple[str | None, ...]) -> LayerBlock:
    """GPU bytes and error of each layer's frozen weights in each format, keyed by (tp, pp)."""
    from memplan.config import JobConfig
    from memplan.memory.context import Context
    from memplan.memory.quant_error import layer_error
    from memplan.memory.weights import layer_weight_bytes

    arch, base = setting.arch, setting.base
    dtype = base.dtype.value
    modes = tuple(fmt_label(f, dtype) for f in formats)
    classes = layer_classes(arch, by_kind=False)
    first = {c: classes.index(c) for c in set(classes)}
    params = arch.params or 1
    per: dict[tuple, tuple[int, float]] = {}
    for c, i in first.items():
        for tp, f in product(dims["tp"], formats):
            cfg = JobConfig.model_validate({**base.model_dump(), "tp": tp, "quant_map": None})
            per[c, tp, f] = (layer_weight_bytes(Context(arch, cfg, setting.gpu, setting.host), i, f),
                             layer_error(arch, i, f) / params)
    gpu, sec, err = [], [], []
    for c in classes:
        keys = list(product(*(dims[d] for d in KEY_DIMS)))
        gpu.append({m: {k: per[c, k[0], f][0] for k in keys} for m, f in zip(modes, formats, strict=True)})
        err.append({m: {k: per[c, k[0], f][1] for k in keys} for m, f in zip(modes, formats, strict=True)})
        sec.append({m: {k: 0.0 for k in keys} for m in modes})
    return LayerBlock(modes=modes, key_dims=KEY_DIMS, gpu=gpu, seconds=sec, classes=classes, in_flight=False,
                      name=BLOCK_NAME, error=err)


def quant_map(modes: list[str], formats: tuple[str | None, ...], dtype: str) -> tuple[str | None, ...]:

    by_label = {fmt_label(f, dtype): f for f in formats}
    return tuple(by_label[m] for m in modes)
