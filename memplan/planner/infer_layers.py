"""Per-layer decisions of an inference plan: each layer's weight format (LQ-LoRA-style mixed precision)
and whether its weights stay on the GPU or live in CPU RAM and stream over PCIe each forward pass.

One ``LayerBlock`` holds both: its modes are the allowed formats, each also as ``<format>@cpu`` when
offload is allowed. Bytes come from ``memory.weights.layer_weight_bytes`` (the function ``estimate``
sums), quality loss from ``memory.quant_error.layer_error`` (relative MSE of round-to-nearest
quantization of Gaussian weights), decode time from bytes over HBM or PCIe bandwidth.

Guo et al. 2023, "LQ-LoRA", Sec. 3.2: an ILP assigns each matrix a quantization configuration
minimising total reconstruction error under a memory budget; here the budget is the GPU itself
(every byte ``estimate`` counts) and the unit of choice is a decoder layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product
from typing import Any

from memplan.arch.tensors import Architecture
from memplan.config import JobConfig
from memplan.planner import cost
from memplan.planner.classes import layer_classes
from memplan.planner.ilp import LayerBlock
from memplan.planner.request import runs

CPU_SUFFIX = "@cpu"
BLOCK_NAME = "weights"
KEY_DIMS = ("tp", "pp", "quant", "batch")


@dataclass(frozen=True)
class LayerChoices:
    """What the per-layer block may choose: formats per layer (None: only the global ``quant``) and offload."""

    formats: tuple[str | None, ...] | None
    offload: bool

    @property
    def active(self) -> bool:
        return self.offload or self.formats is not None


def fmt_label(fmt: str | None, dtype: str) -> str:
    return fmt if fmt is not None else dtype


def mode_format(mode: str, dtype: str, global_fmt: str | None, per_layer: bool) -> str | None:
    """The ``quant_map`` entry a mode stands for (``global_fmt`` when formats are not chosen per layer);
    an offloaded mode is named after the format its layer is stored in on the host."""
    if not per_layer:
        return global_fmt
    name = mode.removesuffix(CPU_SUFFIX)
    return None if name == dtype else name


def is_offloaded(mode: str) -> bool:
    return mode.endswith(CPU_SUFFIX) or mode == "cpu"


def is_gguf(fmt: str | None) -> bool:
    """Whether ``fmt`` is a llama.cpp (GGUF) format."""
    from memplan.memory.quant import Library, get_format

    return fmt is not None and get_format(fmt).library is Library.GGUF


def modes_for(choices: LayerChoices, dtype: str) -> tuple[str, ...]:
    """GPU modes, one per format; offloaded modes, one per format a host copy is stored in (bitsandbytes
    leaves offloaded layers in 16 bits, so int8@cpu and nf4@cpu are one mode: bf16@cpu)."""
    from memplan.memory.weight_offload import offloaded_format

    if choices.formats is None:
        return ("gpu", "cpu") if choices.offload else ("gpu",)
    out = [fmt_label(f, dtype) for f in choices.formats]
    if choices.offload:
        for f in choices.formats:
            mode = fmt_label(offloaded_format(f), dtype) + CPU_SUFFIX
            if not is_gguf(f) and mode not in out:
                out.append(mode)
    return tuple(out)


def offload_allowed(base: JobConfig, tp: int, pp: int, fmt: str | None) -> bool:
    """Whether accelerate can offload a layer here, as ``weight_offload.check_offload_map`` demands: no
    tensor or expert parallelism, one process per replica on one node, no DeepSpeed parameter placement,
    and not GGUF (llama.cpp computes its CPU layers on the CPU)."""
    from memplan.config import Offload, ZeroStage

    return (tp == 1 and base.ep == 1 and pp <= base.gpus_per_node and base.offload_params is Offload.NONE
            and base.zero < ZeroStage.PARAMETERS and not is_gguf(fmt))


def _layer_figures(req: Any, arch: Architecture, i: int, tp: int, q: str | None, fmt: str | None,
                   off: bool) -> tuple[int, int, float]:
    """(bytes, staging bytes, error) of layer ``i``: kept, its GPU bytes; offloaded, its host bytes (what
    crosses PCIe each forward) and the largest module the GPU stages at once."""
    from memplan.memory.context import Context
    from memplan.memory.quant_error import layer_error
    from memplan.memory.weight_offload import cpu_layer_bytes, offloaded_format, staging_bytes
    from memplan.memory.weights import layer_weight_bytes

    cfg = JobConfig.model_validate({**req.base.model_dump(), "tp": tp, "quant": q, "quant_map": None})
    ctx = Context(arch, cfg, req.gpu, req.host)
    if off:
        return cpu_layer_bytes(ctx, i, fmt), staging_bytes(ctx, i, fmt), layer_error(arch, i, offloaded_format(fmt))
    return layer_weight_bytes(ctx, i, fmt), 0, layer_error(arch, i, fmt)


def build_block(req: Any, arch: Architecture, dims: dict[str, tuple], choices: LayerChoices) -> LayerBlock:
    """The per-layer block over keys (tp, pp, quant, batch); seconds are per sequence (step ÷ batch), errors
    relative MSE × parameters over all the model's parameters (``weights_error``'s units)."""
    from memplan.memory.weight_offload import replicas_per_node

    dtype = req.base.dtype.value
    modes = modes_for(choices, dtype)
    per_layer = choices.formats is not None
    gguf = any(is_gguf(f) for f in (*dims["quant"], *(choices.formats or ())))
    classes = list(range(len(arch.layers))) if gguf else layer_classes(arch, by_kind=False)  # GGUF mixes by index
    first = {c: classes.index(c) for c in set(classes)}
    hbm = req.gpu.hbm_bandwidth_gbps * 1e9
    pcie = cost.pcie_bytes_per_s(req.gpu, req.host)
    params = arch.params or 1
    figures: dict[tuple, tuple[int, int, float]] = {}
    tables: dict[str, list[dict[str, dict[tuple, Any]]]] = {k: [] for k in ("gpu", "sec", "cpu", "work", "err")}
    for c in classes:
        row: dict[str, dict[str, dict[tuple, Any]]] = {k: {m: {} for m in modes} for k in tables}
        for key in product(*(dims[d] for d in KEY_DIMS)):
            tp, pp, q, b = key
            for m in modes:
                fmt, off = mode_format(m, dtype, q, per_layer), is_offloaded(m)
                if off and not offload_allowed(req.base, tp, pp, fmt):
                    continue
                if (c, tp, q, fmt, off) not in figures:
                    figures[c, tp, q, fmt, off] = _layer_figures(req, arch, first[c], tp, q, fmt, off)
                nbytes, staged, err = figures[c, tp, q, fmt, off]
                row["err"][m][key] = err / params
                if off:  # the host copy crosses PCIe, then is read once from HBM
                    row["gpu"][m][key], row["work"][m][key] = 0, staged
                    row["cpu"][m][key] = nbytes * replicas_per_node(req.base.model_copy(update={"tp": tp, "pp": pp}))
                    row["sec"][m][key] = (nbytes / pcie + nbytes / hbm) / b
                else:
                    row["gpu"][m][key], row["work"][m][key], row["cpu"][m][key] = nbytes, 0, 0
                    row["sec"][m][key] = nbytes / hbm / b
        for k in tables:
            tables[k].append(row[k])
    rank = {m: (-1 if is_offloaded(m) else 0) for m in modes}  # offloaded layers last, like accelerate's auto map
    return LayerBlock(modes=modes, key_dims=KEY_DIMS, gpu=tables["gpu"], seconds=tables["sec"], cpu=tables["cpu"],
                      classes=classes, workspace=tables["work"], in_flight=False, savings_rank=rank, name=BLOCK_NAME,
                      error=tables["err"] if per_layer else None)


def layer_config(cfg: JobConfig, modes: list[str], choices: LayerChoices) -> JobConfig:
    """The config a solution's per-layer modes describe: ``quant_map`` and ``infer.offload_map``."""
    dtype = cfg.dtype.value
    upd: dict[str, Any] = {}
    if choices.formats is not None:
        upd["quant_map"] = tuple(mode_format(m, dtype, cfg.quant, True) for m in modes)
    if choices.offload and any(is_offloaded(m) for m in modes):
        upd["infer"] = cfg.infer.model_copy(update={"offload_map": tuple(is_offloaded(m) for m in modes)})
    return cfg.model_copy(update=upd) if upd else cfg


def describe(modes: list[str], choices: LayerChoices) -> str:
    """'weights: int8 layers 0-39, nf4 layers 40-79; cpu: layers 70-79' (empty when nothing varies)."""
    parts = []
    if choices.formats is not None:
        parts.append("weights " + runs([m.removesuffix(CPU_SUFFIX) for m in modes]))
    off = [("cpu" if is_offloaded(m) else "gpu") for m in modes]
    if any(m == "cpu" for m in off):
        parts.append("placement " + runs(off))
    return "; ".join(parts)


def outside_error(arch: Architecture, fmt: str | None) -> float:
    """Squared error (σ² · elements) of the tensors outside the blocks stored in ``fmt`` (GGUF quantizes
    token_embd and output; bitsandbytes, GPTQ and AWQ leave them in 16 bits: 0)."""
    from memplan.memory.quant import mix_traits
    from memplan.memory.quant_error import tensors_error

    outside = [(t, None) for t in (*arch.pre, *arch.post, *arch.extra)]
    return tensors_error(fmt, outside, num_layers=len(arch.layers), traits=mix_traits(arch)) if fmt else 0.0


def weights_error(arch: Architecture, cfg: JobConfig) -> float:
    """Mean relative MSE of all the model's weights as stored (``quant_map`` or ``quant`` per layer, an
    offloaded bitsandbytes layer in 16 bits, ``quant`` outside the blocks), weighted by parameters."""
    from memplan.memory.quant_error import layer_error
    from memplan.memory.weight_offload import offloaded_format
    from memplan.memory.weights import effective_quant, layer_format, offloaded_layers

    off = offloaded_layers(cfg)
    fmts = [offloaded_format(layer_format(cfg, i)) if i in off else layer_format(cfg, i) for i in range(len(arch.layers))]
    total = sum(layer_error(arch, i, f) for i, f in enumerate(fmts)) + outside_error(arch, effective_quant(cfg))
    return total / (arch.params or 1)


def quality_extras(arch: Architecture, cfg: JobConfig) -> dict[str, Any]:
    """The plan's ``layer_plan`` quality facts: mean relative MSE and SQNR (None when nothing is quantized)."""
    from memplan.memory.quant_error import sqnr_db

    mse = weights_error(arch, cfg)
    return {"weights_relative_mse": float(f"{mse:.6g}"), "weights_sqnr_db": round(sqnr_db(mse), 3) if mse else None}


def describe_formats(cfg: JobConfig) -> str:
    """'weights nf4-dq: layers 0-39, int8: layers 40-79' of a plan's ``quant_map``."""
    if cfg.quant_map is None:
        return ""
    return "weights " + runs([fmt_label(f, cfg.dtype.value) for f in cfg.quant_map])
