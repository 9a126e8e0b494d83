"""Weight bytes per GPU: every parameter tensor in the job's precision or quantization format.

Row names (one scheme for every job):
- no quantization: one row ``weights/params`` (all tensors in ``cfg.dtype``);
- a quantization format: ``weights/quantized`` (quantized weights with their scales, zeros and
  quantization-state constants) and ``weights/unquantized`` (what the library leaves in the
  compute dtype, or GGUF's F32/F16 tensors); both GPU rows are always present.
GGUF (llama.cpp) keeps the input layer (token and position embeddings) in host memory ("there is
very little benefit to offloading the input layer", llama.cpp src/llama-model.cpp ``dev_input``):
those bytes are ``host_rows``: Tier.CPU rows of the same names, once per node (one llama.cpp
process), never in ``rows``. With tied embeddings the output layer loads a second copy
(``TENSOR_DUPLICATED``) on the last stage's GPU.

Per-layer formats (``JobConfig.quant_map``, LQ-LoRA-style mixed precision, Guo et al. 2024): layer
i's tensors are stored in ``quant_map[i]`` (None: ``cfg.dtype``), the tensors outside the blocks in
``effective_quant(cfg)``; ``layer_weight_bytes`` gives one layer's bytes for the planner. Layers that
an inference job offloads (``infer.offload_map``) are left out of these GPU rows; their CPU row and
GPU staging buffer are ``memplan.memory.weight_offload.offload_rows``.

``rows(ctx)`` is the case without ZeRO-3 and without parameter offload; the lead applies those to
``total_weight_bytes(ctx)`` (ZeRO-3: ceil_div over dp; offload: moved to CPU/NVMe).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields, replace
from functools import partial
from operator import attrgetter
from typing import TypeVar

from memplan.arch.parallel import sharded_numel
from memplan.arch.tensors import Architecture, Layer, Role, Tensor
from memplan.config import Job, JobConfig
from memplan.dtypes import Dtype
from memplan.errors import MemplanError
from memplan.memory.breakdown import Row, Tier
from memplan.memory.context import Context
from memplan.memory.memo import UNREAD, canonical_layers
from memplan.memory.quant import DEFAULT_TRAITS, QLORA_DEFAULT, Library, MixTraits, get_format, mix_traits, storage
from memplan.units import ceil_div

Placed = tuple[Tensor, int | None]
"""A tensor and the index of the block holding it (None: outside the blocks)."""
_T = TypeVar("_T")

HOST_INPUT_ROLES = (Role.EMBEDDING, Role.POSITION)
"""llama.cpp's input-layer tensors (``LLM_TENSOR_LAYER_INPUT``: token_embd, position_embd)."""

_KEPT_SOURCE = {
    Library.BITSANDBYTES: "transformers integrations/bitsandbytes.py replace_with_bnb_linear (type nn.Linear/Conv1D"
                          " only) and quantizers/base.py get_keys_to_not_convert (lm_head, tied weights)",
    Library.GPTQ: "AutoGPTQ: only the linear layers inside the blocks become QuantLinear",
    Library.AWQ: "AutoAWQ: only the linear layers inside the blocks become WQLinear (routers skipped)",
    Library.GGUF: "llama.cpp llama-quant.cpp tensor_allows_quantization; convert_hf_to_gguf.py F32 list",
}

_LIGHTNING_KEPT = ("lightning/fabric/plugins/precision/bitsandbytes.py module_init_context: every torch.nn.Linear "
                   "(lm_head included) becomes a bitsandbytes layer; embeddings and norms stay in the dtype")


def effective_quant(cfg: JobConfig) -> str | None:
    """The job's weight format: ``cfg.quant``, or NF4 with double quantization for QLoRA (Dettmers et al. 2023)."""
    if cfg.quant is None and cfg.job is Job.QLORA:
        return QLORA_DEFAULT
    if cfg.quant is not None:
        get_format(cfg.quant)
    return cfg.quant


def layer_format(cfg: JobConfig, layer_index: int | None) -> str | None:
    """The format of block ``layer_index``'s tensors: ``quant_map[i]`` when a map is set (None: ``cfg.dtype``),
    else ``effective_quant``; tensors outside the blocks (``layer_index`` None) always ``effective_quant``."""
    if layer_index is None or cfg.quant_map is None:
        return effective_quant(cfg)
    return cfg.quant_map[layer_index]


def job_formats(cfg: JobConfig) -> tuple[str, ...]:
    """Every quantization format the job stores weights in (``effective_quant`` and the map's), each once."""
    names = [effective_quant(cfg), *(cfg.quant_map or ())]
    return tuple(dict.fromkeys(n for n in names if n is not None))


def job_library(cfg: JobConfig) -> Library | None:
    """The one library (runtime) that loads the job's checkpoint; None when nothing is quantized."""
    formats = job_formats(cfg)
    return get_format(formats[0]).library if formats else None


def check_quant_map(cfg: JobConfig, *, num_layers: int) -> None:
    """Reject a ``quant_map`` of the wrong length, with unknown names, or mixing libraries.

    One runtime loads one checkpoint: transformers applies one ``quantization_config`` (bitsandbytes,
    GPTQ or AWQ) to the whole model, and llama.cpp reads one GGUF file, so every per-layer format and
    ``quant`` (QLoRA: its default nf4-dq) must belong to one ``Library``. Like ``quant``, a map is
    accepted for every job (full-weight training counts the stored bytes the same way).
    """
    qmap = cfg.quant_map
    if qmap is None:
        return
    if len(qmap) != num_layers:
        raise MemplanError(f"quant_map has {len(qmap)} entries but the model has {num_layers} layers.")
    libraries = {name: get_format(name).library for name in job_formats(cfg)}
    if len(set(libraries.values())) > 1:
        listed = ", ".join(f"{n} ({lib.value})" for n, lib in libraries.items())
        raise MemplanError(f"quant_map and quant mix formats of several libraries ({listed}); one runtime loads the "
                           "checkpoint, so every per-layer format and quant must come from one library.")


def offloaded_layers(cfg: JobConfig) -> frozenset[int]:
    """Indices of the layers an inference job keeps in CPU RAM (``infer.offload_map`` True)."""
    return frozenset(i for i, off in enumerate(cfg.infer.offload_map or ()) if off)


def sharded_bytes(tensor: Tensor, *, bytes_each: int, tp: int, ep: int = 1) -> int:
    """Bytes of ``tensor`` on one rank when one copy takes ``bytes_each`` bytes.

    Formula: ceil(bytes_each · numel_rank / numel_each) · copies_rank, where numel_rank is one
    copy's elements on a tp rank and copies_rank = ceil(copies / ep) for routed experts.
    Source: Megatron-LM tensor parallelism and GShard expert parallelism, via ``sharded_numel``.
    Assumptions: a quantized tensor's scales and zeros split with its elements (rounded up).
    """
    one = Tensor(tensor.name, tensor.shape, tensor.role, tensor.projections)  # one copy, not routed
    per_rank = ceil_div(bytes_each * sharded_numel(one, tp), tensor.numel_each)
    copies = ceil_div(tensor.copies, ep) if tensor.routed else tensor.copies
    return per_rank * copies


@dataclass(frozen=True, slots=True)
class WeightBytes:
    """Weight bytes of one rank, split the way ``rows`` reports them."""

    quantized: int = 0
    unquantized: int = 0
    host_quantized: int = 0
    host_unquantized: int = 0

    @property
    def gpu(self) -> int:
        return self.quantized + self.unquantized


def weight_bytes(
    placed: Iterable[Placed], *, dtype: Dtype, quant: str | None, tp: int, ep: int,
    num_layers: int, traits: MixTraits = DEFAULT_TRAITS, quant_map: Sequence[str | None] | None = None,
    head: bool = False,
) -> WeightBytes:
    """GPU weight bytes of the ``placed`` tensors on one rank, split into quantized and not.

    Formula: Σ sharded_bytes(t, bytes_each = storage(fmt_t, t).bytes / copies), fmt_t = quant_map[i]
    for a tensor of block i when a map is given, else ``quant``.
    Source: ``memplan.memory.quant.storage`` (formats, GGUF mix rules per layer index), ``sharded_bytes`` (tp/ep).
    Assumptions: ``placed`` holds only GPU-resident tensors (see ``placed_tensors``).
    """
    def one(fmt: str | None, tensor: Tensor, layer: int | None) -> tuple[int, bool]:
        st = storage(fmt, tensor, layer_index=layer, num_layers=num_layers, dtype=dtype, traits=traits, head=head)
        return sharded_bytes(tensor, bytes_each=st.bytes // tensor.copies, tp=tp, ep=ep), st.quantized

    q = u = 0
    alike: dict[tuple, tuple[int, bool]] = {}
    gguf: dict[str | None, bool] = {}
    for tensor, layer in placed:
        fmt = quant if quant_map is None or layer is None else quant_map[layer]
        if fmt not in gguf:
            gguf[fmt] = fmt is not None and get_format(fmt).library is Library.GGUF
        if gguf[fmt]:  # llama-quant.cpp's type rules read the tensor's name and its layer index
            nbytes, quantized = one(fmt, tensor, layer)
        else:
            key = alike_key(fmt, tensor, layer)
            hit = alike.get(key)
            if hit is None:
                hit = alike[key] = one(fmt, replace(tensor, name=UNREAD), None if layer is None else UNREAD)
            nbytes, quantized = hit
        q, u = (q + nbytes, u) if quantized else (q, u + nbytes)
    return WeightBytes(q, u)


NAME_FREE_FIELDS = tuple(f.name for f in fields(Tensor) if f.name != "name")
"""A tensor's fields but its name."""
_name_free = attrgetter(*NAME_FREE_FIELDS)


def alike_key(fmt: str | None, tensor: Tensor, layer: int | None) -> tuple:
    """What a tensor's stored and sharded bytes read outside GGUF: its format, its fields but the name, and whether
    it sits in a block (bitsandbytes/GPTQ/AWQ quantize block linears). ``weight_bytes`` and the bitsandbytes
    workspace weigh each alike tensor of a model once, on a copy whose name and layer index are ``memo.UNREAD``:
    reading either raises (``SizeRead``), so one tensor's bytes can never be given to another that differs in what
    was read."""
    return fmt, layer is None, _name_free(tensor)


def weight_bytes_per_gpu(
    placed: Iterable[Placed], *, dtype: Dtype, quant: str | None, tp: int, ep: int,
    num_layers: int, traits: MixTraits = DEFAULT_TRAITS, head: bool = False,
) -> int:
    """GPU bytes of the ``placed`` weights on one rank (see ``weight_bytes``)."""
    return weight_bytes(placed, dtype=dtype, quant=quant, tp=tp, ep=ep, num_layers=num_layers, traits=traits,
                        head=head).gpu


def quantized_head(cfg: JobConfig) -> bool:
    """Whether the output layer is quantized too: bitsandbytes layers built by Lightning Fabric
    (``JobConfig.bnb_integration``; ``quant.is_quantized``)."""
    return cfg.bnb_integration == "lightning"


def host_tensors(ctx: Context) -> list[Tensor]:
    """Tensors the runtime keeps in host memory: GGUF's input layer (llama.cpp ``dev_input``), else none."""
    if job_library(ctx.cfg) is not Library.GGUF:
        return []
    return [t for t in ctx.arch.pre if t.role in HOST_INPUT_ROLES]


def placed_tensors(ctx: Context) -> list[Placed]:
    """GPU-resident tensors of the reported stage with their block index (as ``parallel.stage_tensors``).

    Layers an inference job offloads to CPU RAM (``infer.offload_map``) are left out.
    GGUF: the input layer is left out (``host_tensors``); with tied embeddings the output layer's
    duplicate of the embedding (llama.cpp ``TENSOR_DUPLICATED``) is a LM_HEAD tensor on the last stage.
    """
    pre, post = _placed_ends(ctx)
    return [*pre, *((t, i) for i, layer in gpu_layers(ctx) for t in layer.tensors), *post]


def alike_placed(ctx: Context) -> list[Placed]:
    """``placed_tensors`` but the blocks after the first of each (class of alike blocks, format): what a walk that
    skips a tensor alike to one already seen (``alike_key``: the format and the fields but the name) reads, in the
    same order. A later block of a class (``memo.canonical_layers``: equal but for the names) in the same format
    holds only tensors alike to the first's."""
    pre, post = _placed_ends(ctx)
    classes = canonical_layers(ctx.arch)
    seen: set[tuple] = set()
    blocks: list[Placed] = []
    for i, layer in gpu_layers(ctx):
        key = (classes[i][0], layer_format(ctx.cfg, i))
        if key not in seen:
            seen.add(key)
            blocks += [(t, i) for t in layer.tensors]
    return [*pre, *blocks, *post]


def gpu_layers(ctx: Context) -> list[tuple[int, Layer]]:
    """The reported stage's (index, block) pairs whose tensors sit on the GPU (``placed_tensors``)."""
    off = offloaded_layers(ctx.cfg)
    return [(i, layer) for i, layer in ctx.layers if i not in off]


def _placed_ends(ctx: Context) -> tuple[list[Placed], list[Placed]]:
    """The GPU-resident tensors outside the blocks before them and after them (``placed_tensors``)."""
    arch, stage = ctx.arch, ctx.stage
    host = host_tensors(ctx)
    pre: list[Placed] = [(t, None) for t in arch.pre if t not in host] if stage == 0 else []
    post: list[Placed] = []
    if ctx.holds_output:
        post += [(t, None) for t in arch.post + arch.extra]
        if host and _traits(arch).tied:
            post += [(replace(t, role=Role.LM_HEAD), None) for t in host if t.role is Role.EMBEDDING]
    return pre, post


def _gpu_weight_bytes(ctx: Context, quant: str | None, traits: MixTraits) -> WeightBytes:
    """``weight_bytes(placed_tensors(ctx), ...)`` with each class of alike blocks weighed once and counted.

    Outside GGUF and a per-layer map every block tensor is in ``quant`` and weighs what ``alike_key`` reads: its
    fields but the name, never the index. Blocks of one class of ``memo.canonical_layers`` (equal but for their
    tensors' names) then weigh alike, and the stage's bytes are Σ count(class) · bytes(class) + the ends' bytes,
    integer sums, exactly ``weight_bytes`` over every tensor. GGUF (its rules read names and indices) and a map
    weigh every tensor."""
    cfg = ctx.cfg
    weigh = partial(weight_bytes, dtype=cfg.dtype, quant=quant, tp=cfg.tp, ep=cfg.ep, num_layers=len(ctx.arch.layers),
                    traits=traits, head=quantized_head(cfg))
    if cfg.quant_map is not None or (quant is not None and get_format(quant).library is Library.GGUF):
        return weigh(placed_tensors(ctx), quant_map=cfg.quant_map)
    pre, post = _placed_ends(ctx)
    ends = weigh([*pre, *post])
    classes = canonical_layers(ctx.arch)
    count = Counter(classes[i][0] for i, _ in gpu_layers(ctx))
    q, u = ends.quantized, ends.unquantized
    for first, n in count.items():
        one = weigh([(t, first) for t in ctx.arch.layers[first].tensors])
        q, u = q + n * one.quantized, u + n * one.unquantized
    return WeightBytes(q, u)


_CACHE: dict[tuple, tuple[object, object]] = {}
_CACHE_LIMIT = 4096


def _memo(key: tuple, arch: object, compute: Callable[[], _T]) -> _T:
    """``compute()`` memoized under ``key``; the architecture object is kept with the entry and compared
    by identity, so a recycled ``id(arch)`` in the key can never return another model's bytes."""
    hit = _CACHE.get(key)
    if hit is not None and hit[0] is arch:
        return hit[1]  # type: ignore[return-value]
    result = compute()
    if len(_CACHE) >= _CACHE_LIMIT:
        _CACHE.clear()
    _CACHE[key] = (arch, result)
    return result


def _traits(arch: Architecture) -> MixTraits:
    return _memo(("traits", id(arch)), arch, lambda: mix_traits(arch))


def context_weight_bytes(ctx: Context) -> WeightBytes:
    """Weight bytes of the reported GPU and of the node's host (GGUF input layer), before ZeRO-3 and offload.

    Memoized per (architecture, dtype, quant, quant_map, offload_map, tp, ep, pp, stage): the planner and
    sweeps evaluate the same weights under many other choices.
    """
    cfg = ctx.cfg
    key = ("stage", id(ctx.arch), cfg.dtype, effective_quant(cfg), cfg.quant_map, cfg.infer.offload_map,
           cfg.tp, cfg.ep, cfg.pp, ctx.stage, ctx.balanced, ctx.v_shape, quantized_head(cfg))
    return _memo(key, ctx.arch, lambda: _context_weight_bytes(ctx))


def _context_weight_bytes(ctx: Context) -> WeightBytes:
    cfg = ctx.cfg
    layers = len(ctx.arch.layers)
    check_quant_map(cfg, num_layers=layers)
    quant = effective_quant(cfg)
    traits = _traits(ctx.arch) if job_formats(cfg) else DEFAULT_TRAITS
    gpu = _gpu_weight_bytes(ctx, quant, traits)
    hq = hu = 0
    for t in host_tensors(ctx):
        st = storage(quant, t, layer_index=None, num_layers=layers, dtype=cfg.dtype, traits=traits)
        hq, hu = (hq + st.bytes, hu) if st.quantized else (hq, hu + st.bytes)
    return replace(gpu, host_quantized=hq, host_unquantized=hu)


def layer_weight_bytes(ctx: Context, layer_index: int, fmt: str | None) -> int:
    """GPU bytes of block ``layer_index``'s tensors on one rank (tp/ep sharded) stored in ``fmt``.

    Formula: Σ over the block's tensors of sharded_bytes(t, storage(fmt, t, layer_index).bytes / copies);
    ``fmt`` None: every tensor in ``cfg.dtype``.
    Source: ``quant.storage`` (GGUF: llama-quant.cpp's mix rules at this layer index), ``sharded_bytes``.
    Assumptions: the planner's per-layer unit; Σ over a stage's GPU layers of layer_weight_bytes(ctx, i,
    layer_format(cfg, i)) + ``non_layer_weight_bytes(ctx)`` equals ``total_weight_bytes(ctx)`` exactly.
    """
    cfg, arch = ctx.cfg, ctx.arch
    key = ("layer", id(arch), layer_index, fmt, cfg.dtype, cfg.tp, cfg.ep)
    tensors = [(t, layer_index) for t in arch.layers[layer_index].tensors]
    return _memo(key, arch, lambda: weight_bytes_per_gpu(
        tensors, dtype=cfg.dtype, quant=fmt, tp=cfg.tp, ep=cfg.ep, num_layers=len(arch.layers),
        traits=_traits(arch) if fmt is not None else DEFAULT_TRAITS))


def non_layer_weight_bytes(ctx: Context) -> int:
    """GPU bytes on one rank of the reported stage's tensors outside the blocks (embeddings on the first
    stage, final norm, head and ``extra`` modules on the last; GGUF's input layer excluded, its tied
    duplicate included), in ``effective_quant(cfg)``; see ``placed_tensors``."""
    cfg = ctx.cfg
    outside = [(t, i) for t, i in placed_tensors(ctx) if i is None]
    quant = effective_quant(cfg)
    return weight_bytes_per_gpu(outside, dtype=cfg.dtype, quant=quant, tp=cfg.tp, ep=cfg.ep,
                                num_layers=len(ctx.arch.layers),
                                traits=_traits(ctx.arch) if quant is not None else DEFAULT_TRAITS,
                                head=quantized_head(cfg))


def total_weight_bytes(ctx: Context) -> int:
    """Weight bytes on the reported GPU before ZeRO-3 partitioning and parameter offload."""
    return context_weight_bytes(ctx).gpu


def _format_mix(ctx: Context) -> str:
    """The stage's GPU layers counted by format, e.g. ``int8 ×40, nf4 ×40`` (None layers under the dtype)."""
    off = offloaded_layers(ctx.cfg)
    counts = Counter(layer_format(ctx.cfg, i) or ctx.cfg.dtype.value for i, _ in ctx.layers if i not in off)
    return ", ".join(f"{name} ×{n}" for name, n in counts.items()) or "no layers"


def rows(ctx: Context) -> list[Row]:
    """Weight rows of the reported GPU (all Tier.GPU), without ZeRO-3 and without offload."""
    cfg = ctx.cfg
    formats = job_formats(cfg)
    wb = context_weight_bytes(ctx)
    dtype = cfg.dtype.value
    off = len(offloaded_layers(cfg) & {i for i, _ in ctx.layers})
    where = f"; {off} layers offloaded to CPU (weights/cpu_offloaded)" if off else ""
    if not formats:
        note = f"all parameters in {dtype}, split over tp={cfg.tp}, ep={cfg.ep}{where}"
        return [Row("weights/params", Tier.GPU, wb.gpu, "numel · bits / 8 per tensor (Megatron-LM tp split)", note)]
    library = get_format(formats[0]).library
    source = "; ".join(dict.fromkeys(get_format(f).source for f in formats))
    kept = "F32 (1-D, norms, routers) or F16" if library is Library.GGUF else dtype
    if cfg.quant_map is None:
        qnote = f"{formats[0]}: packed weights + scales/zeros"
    else:
        qnote = f"per-layer formats: {_format_mix(ctx)}; outside the blocks: {effective_quant(cfg) or dtype}"
        if library is Library.GGUF and None in cfg.quant_map:
            kept += f"; layers without a format in {dtype}"
    return [
        Row("weights/quantized", Tier.GPU, wb.quantized, source, qnote + where),
        Row("weights/unquantized", Tier.GPU, wb.unquantized,
            _LIGHTNING_KEPT if quantized_head(cfg) else _KEPT_SOURCE[library], f"kept in {kept}"),
    ]


def host_rows(ctx: Context) -> list[Row]:
    """Tier.CPU rows of weights the runtime keeps in host memory (GGUF's input layer), per node; else []."""
    wb = context_weight_bytes(ctx)
    source = "llama.cpp src/llama-model.cpp: the input layer (dev_input) always stays on the CPU"
    out = []
    if wb.host_quantized:
        out.append(Row("weights/quantized", Tier.CPU, wb.host_quantized, source, "token_embd, per node"))
    if wb.host_unquantized:
        out.append(Row("weights/unquantized", Tier.CPU, wb.host_unquantized, source, "input layer, per node"))
    return out
