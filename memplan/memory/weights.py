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

``rows(ctx)`` is the case without ZeRO-3 and without parameter offload; the lead applies those to
``total_weight_bytes(ctx)`` (ZeRO-3: ceil_div over dp; offload: moved to CPU/NVMe).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

from memplan.arch.parallel import sharded_numel
from memplan.arch.tensors import Role, Tensor
from memplan.config import Job, JobConfig
from memplan.dtypes import Dtype
from memplan.memory.breakdown import Row, Tier
from memplan.memory.context import Context
from memplan.memory.quant import DEFAULT_TRAITS, QLORA_DEFAULT, Library, MixTraits, get_format, mix_traits, storage
from memplan.units import ceil_div

Placed = tuple[Tensor, int | None]
"""A tensor and the index of the block holding it (None: outside the blocks)."""

HOST_INPUT_ROLES = (Role.EMBEDDING, Role.POSITION)
"""llama.cpp's input-layer tensors (``LLM_TENSOR_LAYER_INPUT``: token_embd, position_embd)."""

_KEPT_SOURCE = {
    Library.BITSANDBYTES: "transformers integrations/bitsandbytes.py replace_with_bnb_linear (type nn.Linear/Conv1D"
                          " only) and quantizers/base.py get_keys_to_not_convert (lm_head, tied weights)",
    Library.GPTQ: "AutoGPTQ: only the linear layers inside the blocks become QuantLinear",
    Library.AWQ: "AutoAWQ: only the linear layers inside the blocks become WQLinear (routers skipped)",
    Library.GGUF: "llama.cpp llama-quant.cpp tensor_allows_quantization; convert_hf_to_gguf.py F32 list",
}


def effective_quant(cfg: JobConfig) -> str | None:
    """The job's weight format: ``cfg.quant``, or NF4 with double quantization for QLoRA (Dettmers et al. 2023)."""
    if cfg.quant is None and cfg.job is Job.QLORA:
        return QLORA_DEFAULT
    if cfg.quant is not None:
        get_format(cfg.quant)
    return cfg.quant


def sharded_bytes(tensor: Tensor, *, bytes_each: int, tp: int, ep: int = 1) -> int:
    """Bytes of ``tensor`` on one rank when one copy takes ``bytes_each`` bytes.

    Formula: ceil(bytes_each · numel_rank / numel_each) · copies_rank, where numel_rank is one
    copy's elements on a tp rank and copies_rank = ceil(copies / ep) for routed experts.
    Source: Megatron-LM tensor parallelism and GShard expert parallelism, via ``sharded_numel``.
    Assumptions: a quantized tensor's scales and zeros split with its elements (rounded up).
    """
    one = replace(tensor, copies=1, routed=False)
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
    num_layers: int, traits: MixTraits = DEFAULT_TRAITS,
) -> WeightBytes:
    """GPU weight bytes of the ``placed`` tensors on one rank, split into quantized and not.

    Formula: Σ sharded_bytes(t, bytes_each = storage(quant, t).bytes / copies).
    Source: ``memplan.memory.quant.storage`` (formats), ``sharded_bytes`` (tp/ep).
    Assumptions: ``placed`` holds only GPU-resident tensors (see ``placed_tensors``).
    """
    q = u = 0
    for tensor, layer in placed:
        st = storage(quant, tensor, layer_index=layer, num_layers=num_layers, dtype=dtype, traits=traits)
        nbytes = sharded_bytes(tensor, bytes_each=st.bytes // tensor.copies, tp=tp, ep=ep)
        q, u = (q + nbytes, u) if st.quantized else (q, u + nbytes)
    return WeightBytes(q, u)


def weight_bytes_per_gpu(
    placed: Iterable[Placed], *, dtype: Dtype, quant: str | None, tp: int, ep: int,
    num_layers: int, traits: MixTraits = DEFAULT_TRAITS,
) -> int:
    """GPU bytes of the ``placed`` weights on one rank (see ``weight_bytes``)."""
    return weight_bytes(placed, dtype=dtype, quant=quant, tp=tp, ep=ep, num_layers=num_layers, traits=traits).gpu


def _is_gguf(quant: str | None) -> bool:
    return quant is not None and get_format(quant).library is Library.GGUF


def host_tensors(ctx: Context) -> list[Tensor]:
    """Tensors the runtime keeps in host memory: GGUF's input layer (llama.cpp ``dev_input``), else none."""
    if not _is_gguf(effective_quant(ctx.cfg)):
        return []
    return [t for t in ctx.arch.pre if t.role in HOST_INPUT_ROLES]


def placed_tensors(ctx: Context) -> list[Placed]:
    """GPU-resident tensors of the reported stage with their block index (as ``parallel.stage_tensors``).

    GGUF: the input layer is left out (``host_tensors``); with tied embeddings the output layer's
    duplicate of the embedding (llama.cpp ``TENSOR_DUPLICATED``) is a LM_HEAD tensor on the last stage.
    """
    arch, pp, stage = ctx.arch, ctx.cfg.pp, ctx.stage
    host = host_tensors(ctx)
    out: list[Placed] = [(t, None) for t in arch.pre if t not in host] if stage == 0 else []
    out += [(t, i) for i, layer in ctx.layers for t in layer.tensors]
    if stage == pp - 1:
        out += [(t, None) for t in arch.post + arch.extra]
        if host and mix_traits(arch).tied:
            out += [(replace(t, role=Role.LM_HEAD), None) for t in host if t.role is Role.EMBEDDING]
    return out


_CACHE: dict[tuple, tuple[object, WeightBytes]] = {}
_CACHE_LIMIT = 4096


def context_weight_bytes(ctx: Context) -> WeightBytes:
    """Weight bytes of the reported GPU and of the node's host (GGUF input layer), before ZeRO-3 and offload.

    Memoized per (architecture, dtype, quant, tp, ep, pp, stage): the planner and sweeps evaluate the
    same weights under many other choices. The architecture object is kept with the entry and
    compared by identity, so a recycled ``id`` can never return another model's bytes.
    """
    cfg = ctx.cfg
    key = (id(ctx.arch), cfg.dtype, effective_quant(cfg), cfg.tp, cfg.ep, cfg.pp, ctx.stage)
    hit = _CACHE.get(key)
    if hit is not None and hit[0] is ctx.arch:
        return hit[1]
    result = _context_weight_bytes(ctx)
    if len(_CACHE) >= _CACHE_LIMIT:
        _CACHE.clear()
    _CACHE[key] = (ctx.arch, result)
    return result


def _context_weight_bytes(ctx: Context) -> WeightBytes:
    quant = effective_quant(ctx.cfg)
    traits = mix_traits(ctx.arch) if quant is not None else DEFAULT_TRAITS
    layers = len(ctx.arch.layers)
    gpu = weight_bytes(placed_tensors(ctx), dtype=ctx.cfg.dtype, quant=quant, tp=ctx.cfg.tp, ep=ctx.cfg.ep,
                       num_layers=layers, traits=traits)
    hq = hu = 0
    for t in host_tensors(ctx):
        st = storage(quant, t, layer_index=None, num_layers=layers, dtype=ctx.cfg.dtype, traits=traits)
        hq, hu = (hq + st.bytes, hu) if st.quantized else (hq, hu + st.bytes)
    return replace(gpu, host_quantized=hq, host_unquantized=hu)


def total_weight_bytes(ctx: Context) -> int:
    """Weight bytes on the reported GPU before ZeRO-3 partitioning and parameter offload."""
    return context_weight_bytes(ctx).gpu


def rows(ctx: Context) -> list[Row]:
    """Weight rows of the reported GPU (all Tier.GPU), without ZeRO-3 and without offload."""
    quant = effective_quant(ctx.cfg)
    wb = context_weight_bytes(ctx)
    dtype = ctx.cfg.dtype.value
    if quant is None:
        note = f"all parameters in {dtype}, split over tp={ctx.cfg.tp}, ep={ctx.cfg.ep}"
        return [Row("weights/params", Tier.GPU, wb.gpu, "numel · bits / 8 per tensor (Megatron-LM tp split)", note)]
    fmt = get_format(quant)
    kept = "F32 (1-D, norms, routers) or F16" if fmt.library is Library.GGUF else dtype
    return [
        Row("weights/quantized", Tier.GPU, wb.quantized, fmt.source, f"{quant}: packed weights + scales/zeros"),
        Row("weights/unquantized", Tier.GPU, wb.unquantized, _KEPT_SOURCE[fmt.library], f"kept in {kept}"),
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
