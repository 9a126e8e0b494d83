"""What PyTorch AMP (autocast to a 16-bit dtype over fp32 parameters) saves beyond a pure 16-bit model.

Under ``torch.autocast`` only the ops on autocast's lower-precision list run in 16 bits (``linear``/``matmul``/
``addmm``, ``scaled_dot_product_attention``: torch/csrc/autograd/autocast_mode.cpp); the others follow type
promotion. In a Hugging Face decoder with fp32 parameters:

- the embedding output is fp32 and every residual add is fp32 + 16-bit = fp32, so the residual stream is fp32;
- RMSNorm (``LlamaRMSNorm``: ``hidden_states.to(torch.float32)`` is the fp32 input itself, ``.to(input_dtype)`` stays
  fp32) multiplies its fp32 weight by an fp32 normalized tensor, which it saves for the weight's gradient in fp32
  instead of 16 bits; ``layer_norm`` is on autocast's fp32 list, so a LayerNorm saves its fp32 input;
- the norm's output is fp32, and each linear reading it casts it to 16 bits itself (autocast caches casts of leaf
  parameters only, ``cached_cast``): q, k and v (gate and up) each save their own 16-bit copy where a 16-bit model
  saves one shared input. Inputs that are 16-bit already (o_proj's, down_proj's) are not cast;
- the rotary cos/sin are made in the hidden states' dtype (``LlamaRotaryEmbedding.forward``: ``cos.to(x.dtype)``), fp32.

The bytes here are added to the 16-bit model's terms (``activations.block_terms``); measured on CPU with
``torch.autocast("cpu", torch.bfloat16)`` over a tiny fp32 Hugging Face model (tests/test_measure_amp.py).
Assumptions: MoE layers' expert inputs and MLA's latent paths are left as in the 16-bit model; Gemma-style norms
already save fp32 tensors (no difference).
"""

from __future__ import annotations

from memplan.arch.tensors import Layer, Role
from memplan.catalog.schema import Family, ModelSpec
from memplan.memory import activations_block as blk
from memplan.memory import activations_terms as t
from memplan.memory.context import Context

ATTENTION_INPUT = frozenset({"q", "k", "v"})
MLP_INPUT = frozenset({"gate", "up"})
_FP32_NORMED = blk.GEMMA_RMS_NORM
"""Norms that already save their normalized tensor in fp32 (``Gemma2RMSNorm``): no AMP difference."""


def autocast_amp(ctx: Context) -> bool:
    """Whether the job runs PyTorch AMP: the pytorch engine keeping fp32 parameters under a 16-bit autocast, every
    weight trained (adapter jobs keep a 16-bit frozen base, whose residual stream stays 16-bit)."""
    from memplan.config import Engine, Job
    from memplan.dtypes import Dtype
    from memplan.memory.engine_states import mixed, param_dtype

    cfg = ctx.cfg
    return (cfg.job not in (Job.LORA, Job.QLORA, Job.INFER) and cfg.effective_engine is Engine.PYTORCH
            and mixed(ctx) and param_dtype(ctx) is Dtype.FP32)


def norm_extra_bytes(spec: ModelSpec, *, tokens: int, width: int) -> int:
    """One norm on the fp32 residual stream: its fp32 normalized tensor (RMSNorm) or fp32 input (LayerNorm)
    instead of a 16-bit one: tokens·width·(4 − 2) bytes; 0 for norms that save fp32 tensors anyway."""
    if spec.family in _FP32_NORMED or spec.family in (Family.COHERE, Family.OLMO2):
        return 0
    return t.tensor_bytes(count=tokens * width, bits=t.FP32_BITS) - t.tensor_bytes(count=tokens * width, bits=16)


def _readers(layer: Layer, projections: frozenset[str]) -> int:
    """Linear weights of the block that read the norm output feeding ``projections`` (a fused qkv counts once)."""
    return sum(1 for w in layer.tensors if w.role is Role.LINEAR and len(w.shape) == 2 and not w.routed
               and projections & w.projections)


def block_extra_bytes(spec: ModelSpec, layer: Layer, dm: blk.Dims) -> int:
    """Bytes one block saves under AMP beyond the 16-bit model (module docstring).

    Formula: norms · norm_extra_bytes + Σ over norm outputs (readers − 1) · B·S·D·2, readers counted per output
    (parallel blocks with one norm: attention's and the MLP's readers together).
    Source: transformers ``LlamaDecoderLayer``/``LlamaRMSNorm``/``LlamaMLP`` (and the families copied from them);
    torch autocast_mode.cpp (``cached_cast`` casts parameters once, activations at every op).
    """
    tokens, d = dm.seq_tokens, dm.d
    cast = t.tensor_bytes(count=tokens * d, bits=16)
    attn = 0 if spec.is_mla else _readers(layer, ATTENTION_INPUT)
    mlp = 0 if layer.moe else _readers(layer, MLP_INPUT)
    if spec.parallel_attn:
        count = blk.BLOCK_INPUT_NORMS.get(spec.family, spec.parallel_norms)
        outputs = [attn + mlp] if count == 1 else [attn, mlp]
        norms = 1 if spec.norm == "layernorm" else count  # LayerNorms on the block input save it once
    else:
        outputs, norms = [attn, mlp], (4 if spec.family in blk.FOUR_NORMS else 2)
    extra_casts = sum(max(readers - 1, 0) for readers in outputs) * cast
    return norms * norm_extra_bytes(spec, tokens=tokens, width=d) + extra_casts
