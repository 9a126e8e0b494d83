"""Weight quantization formats: exact stored bytes of a tensor in each library's own layout.

Registry keys are the names users type (``--quant nf4-dq``). Every byte count is an int built
from the library's tensors (packed weights, scales, zeros, quantization-state constants); the
CUDA caching allocator's rounding of each allocation (512 B) is a runtime effect, not counted here.

Which tensors a library quantizes (``is_quantized``), as the libraries really do it:
- bitsandbytes via transformers ``load_in_4bit/8bit`` (``integrations/bitsandbytes.py``
  ``replace_with_bnb_linear``): only modules whose type is exactly ``nn.Linear`` (or GPT-2's
  ``Conv1D``); ``quantizers/base.py get_keys_to_not_convert`` skips the output embedding, tied
  weights and the last module. So embeddings, norms, lm_head and biases stay in the compute dtype.
  In transformers >= 5 MoE routers (e.g. ``MixtralTopKRouter``) and routed experts (fused 3-D
  ``nn.Parameter``s, e.g. ``MixtralExperts.gate_up_proj``) are not ``nn.Linear``: both stay in the
  compute dtype (bitsandbytes issue #1849). Shared experts are ``nn.Linear`` and are quantized.
- GPTQ (AutoGPTQ) and AWQ (AutoAWQ) quantize the linear layers inside the blocks, routed experts
  included (each expert is its own ``QuantLinear``); not lm_head, embeddings or routers.
- GGUF (llama.cpp ``src/llama-quant.cpp``, ``tensor_allows_quantization``) quantizes every
  2-D/3-D ``*.weight`` except norms, ``ffn_gate_inp`` (routers) and position embeddings: token_embd
  and output are quantized per the mix rules. ``convert_hf_to_gguf.py`` writes 1-D tensors, norms,
  routers and position embeddings as F32 and other 2-D tensors as F16.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum
from fractions import Fraction

from memplan.arch.tensors import Architecture, Role, Tensor
from memplan.catalog.schema import Family
from memplan.dtypes import Dtype
from memplan.errors import MemplanError, did_you_mean
from memplan.units import bits_to_bytes, ceil_div

FP32_BYTES = 4
FP16_BYTES = 2
INT32_BYTES = 4
BNB_4BIT_BLOCK = 64
"""bitsandbytes ``functional.quantize_4bit`` blocksize used by transformers (128 on ROCm builds)."""
BNB_NESTED_BLOCK = 256
"""Second-level blocksize of double quantization: ``quantize_blockwise(absmax - offset, blocksize=256)``."""
BNB_4BIT_CODE_ENTRIES = 16
"""``get_4bit_type``: the NF4/FP4 code, 16 fp32 values, a fresh copy in every QuantState."""
BNB_NESTED_CODE_ENTRIES = 256
"""``create_dynamic_map``: the 8-bit dynamic code of the nested state, 256 fp32 values copied per state."""
BNB_OFFSET_BYTES = FP32_BYTES
"""Double quantization's ``offset = absmax.mean()``: a 0-dim fp32 tensor."""
INT4_BITS = 4
"""NF4/FP4 codes, GPTQ/AWQ weights and zero points are 4-bit."""
INT4_PER_INT32 = 8
"""GPTQ/AWQ pack eight 4-bit values into one int32."""
NESTED_ABSMAX_BITS = 8
"""Double quantization stores each first-level absmax as one uint8."""
GROUP_SIZE = 128
"""GPTQ/AWQ quantization group along in_features (one fp16 scale and 4-bit zero per group and column)."""
QLORA_DEFAULT = "nf4-dq"
"""QLoRA (Dettmers et al. 2023, Sec. 3): NF4 with double quantization."""


class Library(StrEnum):
    BITSANDBYTES = "bitsandbytes"
    GPTQ = "gptq"
    AWQ = "awq"
    GGUF = "gguf"


GGML_TYPES: dict[str, tuple[int, int]] = {
    "F32": (1, 4), "F16": (1, 2),
    "Q8_0": (32, 34), "Q4_0": (32, 18), "Q5_0": (32, 22), "Q5_1": (32, 24),
    "Q2_K": (256, 84), "Q3_K": (256, 110), "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210),
}
"""ggml type -> (elements per block, bytes per block); ggml ``ggml_type_traits`` (blck_size, type_size)."""


@dataclass(frozen=True, slots=True)
class QuantFormat:
    name: str
    library: Library
    nominal_bits: Fraction
    """Bits per parameter of a large matrix (per-row, per-tensor terms -> 0); GGUF mixes: the base type."""
    source: str
    gguf_base: str = ""
    """GGUF: ``llama_ftype_get_default_type`` of the file type."""


def _ggml_bits(ggml_type: str) -> Fraction:
    blck, size = GGML_TYPES[ggml_type]
    return Fraction(8 * size, blck)


_BNB = "bitsandbytes functional.quantize_4bit/QuantState; QLoRA (Dettmers et al. 2023) Sec. 3"
_GGUF = "llama.cpp src/llama-quant.cpp llama_tensor_get_type_impl (ggml-org/llama.cpp@007dbbf3)"
_NF4 = INT4_BITS + Fraction(8 * FP32_BYTES, BNB_4BIT_BLOCK)
_NF4_DQ = (INT4_BITS + Fraction(NESTED_ABSMAX_BITS, BNB_4BIT_BLOCK)
           + Fraction(8 * FP32_BYTES, BNB_4BIT_BLOCK * BNB_NESTED_BLOCK))
_INT4_GROUPED = INT4_BITS + Fraction(8 * FP16_BYTES + INT4_BITS, GROUP_SIZE)
FORMATS: dict[str, QuantFormat] = {f.name: f for f in (
    QuantFormat("int8", Library.BITSANDBYTES, Fraction(Dtype.INT8.bits),
                "bitsandbytes LLM.int8 Int8Params: CB int8 [out,in] + SCB fp32 [out] (Dettmers et al. 2022)"),
    QuantFormat("nf4", Library.BITSANDBYTES, _NF4, _BNB),
    QuantFormat("fp4", Library.BITSANDBYTES, _NF4, _BNB),
    QuantFormat("nf4-dq", Library.BITSANDBYTES, _NF4_DQ, _BNB),
    QuantFormat("fp4-dq", Library.BITSANDBYTES, _NF4_DQ, _BNB),
    QuantFormat("gptq-4bit", Library.GPTQ, _INT4_GROUPED,
                "AutoGPTQ exllama QuantLinear buffers qweight/qzeros/scales/g_idx, group size 128"),
    QuantFormat("awq-4bit", Library.AWQ, _INT4_GROUPED,
                "AutoAWQ WQLinear_GEMM buffers qweight/qzeros/scales, group size 128"),
    *(QuantFormat(name, Library.GGUF, _ggml_bits(base), _GGUF, base) for name, base in (
        ("q8_0", "Q8_0"), ("q6_k", "Q6_K"), ("q5_k_m", "Q5_K"), ("q4_k_m", "Q4_K"),
        ("q4_0", "Q4_0"), ("q3_k_m", "Q3_K"), ("q2_k", "Q2_K"))),
)}


def get_format(name: str) -> QuantFormat:
    """The registered format ``name``; MemplanError listing the known ones (with a suggestion) otherwise."""
    fmt = FORMATS.get(name)
    if fmt is None:
        raise MemplanError(
            f"unknown quantization format {name!r}; known: {', '.join(FORMATS)}.{did_you_mean(name, FORMATS)}"
        )
    return fmt


def int8_bytes(*, out_features: int, in_features: int) -> int:
    """Bytes of one LLM.int8 weight: int8 matrix plus one fp32 scale per output row.

    Formula: out·in + 4·out.
    Source: bitsandbytes ``int8_vectorwise_quant`` -> ``Int8Params.CB`` (int8) and ``SCB`` (fp32 [out]).
    Assumptions: ``has_fp16_weights=False`` (transformers' default), so no 16-bit copy is kept.
    """
    return out_features * in_features + FP32_BYTES * out_features


def bnb4_bytes(*, numel: int, double_quant: bool) -> int:
    """Bytes of one bitsandbytes 4-bit tensor (NF4 or FP4) with its QuantState.

    Formula: nb = ceil(n/64); no DQ: ceil(n/2) + 4·nb + 64; DQ: ceil(n/2) + nb + 4·ceil(nb/256)
    + 4 (offset) + 64 (code) + 1024 (nested code).
    Source: bitsandbytes ``functional.quantize_4bit`` (packed uint8 ``(n+1)//2``, fp32 absmax per
    block; with ``compress_statistics`` the absmax is quantized by ``quantize_blockwise`` at block 256);
    QLoRA Sec. 3. Checked against bitsandbytes 0.50.2 on CPU.
    Assumptions: ``quant_storage=uint8`` (other storages hold the same bytes).
    """
    blocks = ceil_div(numel, BNB_4BIT_BLOCK)  # one absmax per block
    packed = bits_to_bytes(numel, INT4_BITS)
    code = BNB_4BIT_CODE_ENTRIES * FP32_BYTES
    if not double_quant:
        return packed + FP32_BYTES * blocks + code
    nested = FP32_BYTES * ceil_div(blocks, BNB_NESTED_BLOCK) + BNB_OFFSET_BYTES + BNB_NESTED_CODE_ENTRIES * FP32_BYTES
    return packed + bits_to_bytes(blocks, NESTED_ABSMAX_BITS) + nested + code


def gptq_bytes(*, out_features: int, in_features: int) -> int:
    """Bytes of one 4-bit GPTQ linear layer's buffers (without bias).

    Formula: g = ceil(in/128); qweight 4·ceil(in/8)·out + qzeros 4·g·ceil(out/8) + scales 2·g·out
    + g_idx 4·in.
    Source: AutoGPTQ ``nn_modules/qlinear/qlinear_exllama(v2).py`` QuantLinear ``register_buffer`` calls.
    Assumptions: exllama asserts in % 32 == 0 and out % 32 == 0; other shapes are rounded up.
    """
    groups = ceil_div(in_features, GROUP_SIZE)
    qweight = INT32_BYTES * ceil_div(in_features, INT4_PER_INT32) * out_features
    qzeros = INT32_BYTES * groups * ceil_div(out_features, INT4_PER_INT32)
    return qweight + qzeros + FP16_BYTES * groups * out_features + INT32_BYTES * in_features


def awq_bytes(*, out_features: int, in_features: int) -> int:
    """Bytes of one 4-bit AWQ GEMM linear layer's buffers (without bias).

    Formula: g = ceil(in/128); qweight 4·in·ceil(out/8) + qzeros 4·g·ceil(out/8) + scales 2·g·out.
    Source: AutoAWQ ``awq/modules/linear/gemm.py`` WQLinear_GEMM ``register_buffer`` calls.
    Assumptions: AutoAWQ asserts in % 128 == 0 and out % 8 == 0; other shapes are rounded up.
    """
    groups = ceil_div(in_features, GROUP_SIZE)
    packed_cols = ceil_div(out_features, INT4_PER_INT32)
    return INT32_BYTES * (in_features + groups) * packed_cols + FP16_BYTES * groups * out_features


def ggml_bytes(ggml_type: str, *, numel: int, ncols: int) -> int:
    """Bytes of a ggml tensor of ``numel`` elements with rows of ``ncols`` (ne[0]) elements.

    Formula: rows · (ncols / block) · block_bytes (``ggml_row_size``).
    Source: ggml ``ggml_type_traits``; GGUF requires ncols % block == 0.
    """
    blck, size = GGML_TYPES[ggml_type]
    if ncols % blck:
        raise ValueError(f"{ggml_type} needs rows that are a multiple of {blck} elements, got {ncols}")
    return (numel // ncols) * (ncols // blck) * size


@dataclass(frozen=True, slots=True)
class MixTraits:
    """What llama.cpp's mix rules read from the model (``hparams``, ``model.type``, ``arch``)."""

    gqa: int = 1
    experts: int = 1
    falcon: bool = False
    is_70b: bool = False
    tied: bool = False
    """No output tensor: token_embd is quantized by the output rule."""


DEFAULT_TRAITS = MixTraits()
"""A dense, untied, non-Falcon model: no trait-dependent mix rule fires."""


def mix_traits(arch: Architecture) -> MixTraits:
    """MixTraits of an architecture. ``is_70b``: llama.cpp's LLM_TYPE_70B (80 layers with GQA, llama family)."""
    spec = arch.spec
    gqa = (spec.num_attention_heads or 1) // spec.kv_heads
    return MixTraits(
        gqa=gqa,
        experts=spec.num_experts or 1,
        falcon=spec.family is Family.FALCON,
        is_70b=spec.family is Family.LLAMA and len(arch.layers) == 80 and gqa > 1,
        tied=not any(t.role is Role.LM_HEAD for t in arch.all_tensors()),
    )


def gguf_category(tensor: Tensor) -> str:
    """llama.cpp's ``tensor_get_category`` for a memplan tensor, from its role and projections."""
    if tensor.role is Role.LM_HEAD:
        return "output"
    if tensor.role is Role.EMBEDDING:
        return "token_embd"
    p = tensor.projections
    if tensor.role is not Role.LINEAR or not p:
        return "other"
    if "kv_b" in tensor.name:
        return "attn_kv_b"
    if {"q", "k", "v"} <= p:
        return "attn_qkv"
    if "up" in p:
        return "ffn_up"  # fused gate_up (Phi-3) is llama.cpp's ffn_up
    single = {frozenset({"v"}): "attn_v", frozenset({"k"}): "attn_k", frozenset({"q"}): "attn_q",
              frozenset({"o"}): "attn_output", frozenset({"gate"}): "ffn_gate", frozenset({"down"}): "ffn_down"}
    return single.get(frozenset(p), "other")


def _gguf_kept(tensor: Tensor) -> bool:
    """Never quantized by llama-quantize, and written as F32 by convert_hf_to_gguf.py."""
    return len(tensor.shape) < 2 or tensor.role in (Role.NORM, Role.BIAS, Role.ROUTER, Role.POSITION)


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp ``use_more_bits``: the first and last eighth of the layers and every third between."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def _attn_v_type(ftype: str, base: str, i: int, n: int, tr: MixTraits) -> str:
    new = base
    if ftype == "q2_k":
        new = "Q4_K" if tr.gqa >= 4 else "Q3_K"
    elif ftype == "q3_k_m":
        new = "Q5_K" if i < 2 else "Q4_K"
    elif ftype in ("q4_k_m", "q5_k_m") and use_more_bits(i, n):
        new = "Q6_K"
    if tr.is_70b and new in ("Q3_K", "Q4_K"):
        new = "Q5_K"
    return "Q8_0" if tr.experts == 8 else new


def _ffn_down_type(ftype: str, base: str, i: int, n: int, tr: MixTraits) -> str:
    more = use_more_bits(i, n)
    if ftype == "q2_k":
        return "Q3_K"
    if ftype == "q3_k_m":
        return "Q5_K" if i < n // 16 else "Q4_K" if (not tr.falcon or more) else "Q3_K"
    if ftype == "q4_k_m" and tr.falcon:
        return "Q6_K" if i < n // 16 else "Q5_K" if more else "Q4_K"
    if ftype in ("q4_k_m", "q5_k_m") and more:
        return "Q6_K"
    return base


def _attn_output_type(ftype: str, base: str, tr: MixTraits) -> str:
    if tr.falcon:
        return base
    if tr.experts == 8:
        return "Q5_K" if ftype in ("q2_k", "q3_k_m", "q4_k_m") else base
    return {"q2_k": "Q3_K", "q3_k_m": "Q4_K"}.get(ftype, base)


_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
"""llama-quant.cpp ``tensor_type_fallback`` (older releases sent Q2_K/Q3_K to IQ4_NL: same 18 B/32)."""


def gguf_tensor_type(
    fmt: str, tensor: Tensor, *, layer_index: int | None, num_layers: int, traits: MixTraits = DEFAULT_TRAITS
) -> str:
    """The ggml type llama-quantize gives ``tensor`` in file type ``fmt`` (e.g. "Q6_K", "F32").

    Formula: kept tensors (1-D, norms, biases, routers, position embeddings) -> F32; else the mix
    rule of the tensor's category (output/tied token_embd -> Q6_K unless Falcon or ncols % block;
    attn_v and ffn_down -> a bigger type on ``use_more_bits`` layers; 8-expert models -> Q8_0 attn_v/k),
    then the shape fallback when ncols (= in_features) is not a multiple of the block.
    Source: llama.cpp src/llama-quant.cpp ``tensor_allows_quantization``, ``llama_tensor_get_type_impl``,
    ``tensor_type_fallback``; convert_hf_to_gguf.py (F32 list).
    Assumptions: no imatrix, no --pure/--tensor-type overrides; the i-th attn_v tensor is layer i
    (tensors outside the blocks count as layer ``num_layers``, like an MTP block).
    """
    base = get_format(fmt).gguf_base
    if _gguf_kept(tensor):
        return "F32"
    cat = gguf_category(tensor)
    i = num_layers if layer_index is None else layer_index
    ncols = tensor.shape[-1]
    if cat == "output" or (cat == "token_embd" and traits.tied):
        new = "Q8_0" if traits.falcon or ncols % GGML_TYPES[base][0] else base if base == "Q8_0" else "Q6_K"
    elif cat in ("attn_v", "attn_qkv", "attn_kv_b"):
        new = _attn_v_type(fmt, base, i, num_layers, traits)
    elif cat == "attn_k":
        new = "Q8_0" if traits.experts == 8 else base
    elif cat == "ffn_down":
        new = _ffn_down_type(fmt, base, i, num_layers, traits)
    elif cat == "attn_output":
        new = _attn_output_type(fmt, base, traits)
    else:
        new = base
    return _fallback(new, ncols, tensor.name)


def _fallback(ggml_type: str, ncols: int, name: str) -> str:
    if ncols % GGML_TYPES[ggml_type][0] == 0:
        return ggml_type
    if ggml_type not in _FALLBACK:
        raise MemplanError(
            f"{name}: rows of {ncols} elements are not a multiple of {GGML_TYPES[ggml_type][0]}; llama-quantize "
            f"stops with 'no tensor type fallback is defined for type {ggml_type.lower()}'."
        )
    new = _FALLBACK[ggml_type]
    return new if ncols % GGML_TYPES[new][0] == 0 else "F16"


@dataclass(frozen=True, slots=True)
class Storage:
    """How one tensor (all its copies) is stored: bytes, whether quantized, and the kind."""

    bytes: int
    quantized: bool
    kind: str
    """The format name (``nf4-dq``), the ggml type (``Q6_K``) or the dtype (``bf16``)."""


def is_quantized(fmt: QuantFormat, tensor: Tensor, *, layer_index: int | None, head: bool = False) -> bool:
    """Whether the library quantizes ``tensor`` (GGUF: whether it is a candidate; see module docstring).

    ``head``: bitsandbytes layers built by Lightning Fabric's ``BitsandbytesPrecision`` (litgpt), which replaces
    every ``torch.nn.Linear``, the output layer included (lightning/fabric/plugins/precision/bitsandbytes.py
    ``module_init_context``: ``_ClassReplacementContextManager({"torch.nn.Linear": self._linear_cls})``)."""
    if fmt.library is Library.GGUF:
        return not _gguf_kept(tensor)
    if head and fmt.library is Library.BITSANDBYTES and tensor.role is Role.LM_HEAD and len(tensor.shape) == 2:
        return True
    if tensor.role is not Role.LINEAR or len(tensor.shape) != 2:
        return False
    if fmt.library is Library.BITSANDBYTES:
        return not tensor.routed
    return layer_index is not None


def _linear_bytes(fmt: QuantFormat, out_f: int, in_f: int) -> int:
    if fmt.library is Library.GPTQ:
        return gptq_bytes(out_features=out_f, in_features=in_f)
    if fmt.library is Library.AWQ:
        return awq_bytes(out_features=out_f, in_features=in_f)
    if fmt.name == "int8":
        return int8_bytes(out_features=out_f, in_features=in_f)
    return bnb4_bytes(numel=out_f * in_f, double_quant=fmt.name.endswith("-dq"))


def storage(
    fmt: str | None, tensor: Tensor, *, layer_index: int | None, num_layers: int,
    dtype: Dtype = Dtype.BF16, traits: MixTraits = DEFAULT_TRAITS, head: bool = False,
) -> Storage:
    """Stored bytes of every copy of ``tensor`` under format ``fmt`` (None: unquantized in ``dtype``);
    ``head``: bitsandbytes quantizes the output layer too (``is_quantized``).

    Formula: copies · per-copy bytes (see ``bnb4_bytes``, ``int8_bytes``, ``gptq_bytes``,
    ``awq_bytes``, ``ggml_bytes``); unquantized tensors: copies · ceil(numel · bits / 8).
    Source: the per-format functions; which tensors are quantized: module docstring.
    Assumptions: linear weights have shape (out, in) as nn.Linear stores them; ``dtype`` is the
    compute/load dtype of everything a bitsandbytes/GPTQ/AWQ model leaves unquantized; a 1-D
    LINEAR pseudo-tensor (a params-only model) counts at ``nominal_bits``, as papers do.
    """
    if fmt is None:
        return Storage(tensor.copies * bits_to_bytes(tensor.numel_each, dtype.bits), False, dtype.value)
    qf = get_format(fmt)
    if tensor.role is Role.LINEAR and len(tensor.shape) == 1:  # params-only model: a paper's count
        nbytes = math.ceil(tensor.numel_each * qf.nominal_bits / 8)
        return Storage(tensor.copies * nbytes, True, fmt)
    if qf.library is Library.GGUF:
        kind = gguf_tensor_type(fmt, tensor, layer_index=layer_index, num_layers=num_layers, traits=traits)
        each = ggml_bytes(kind, numel=tensor.numel_each, ncols=tensor.shape[-1] if tensor.shape else 1)
        return Storage(tensor.copies * each, kind not in ("F32", "F16"), kind)
    if not is_quantized(qf, tensor, layer_index=layer_index, head=head):
        return storage(None, tensor, layer_index=layer_index, num_layers=num_layers, dtype=dtype)
    out_f, in_f = tensor.shape
    return Storage(tensor.copies * _linear_bytes(qf, out_f, in_f), True, fmt)


def tensor_bytes(
    fmt: str, tensor: Tensor, *, layer_index: int | None, num_layers: int,
    dtype: Dtype = Dtype.BF16, traits: MixTraits = DEFAULT_TRAITS,
) -> int:
    """Exact stored bytes of ``tensor`` (all ``copies``) under ``fmt``, scales and zeros included."""
    return storage(fmt, tensor, layer_index=layer_index, num_layers=num_layers, dtype=dtype, traits=traits).bytes


def bits_per_param(fmt: str, *, shape: tuple[int, int] | None = None) -> Fraction:
    """Bits per parameter of a linear weight under ``fmt``.

    Formula: shape None: the large-matrix rate, e.g. nf4 4 + 32/64 = 4.5, nf4-dq
    4 + 8/64 + 32/(64·256) = 4.127, gptq/awq 4 + (16 + 4)/128; shape (out, in): 8·bytes/(out·in)
    of a mid-model attention projection (GGUF: the base type).
    Source: QLoRA (Dettmers et al. 2023) Sec. 3; the per-format byte functions.
    """
    qf = get_format(fmt)
    if shape is None:
        return qf.nominal_bits
    probe = Tensor("probe.weight", shape, Role.LINEAR, frozenset({"q"}))
    nbytes = tensor_bytes(fmt, probe, layer_index=0, num_layers=1)
    return Fraction(8 * nbytes, probe.numel)
