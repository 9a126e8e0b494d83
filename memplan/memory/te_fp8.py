"""Saved activations of fp8 training as the engines store them: which Linear inputs a block keeps in fp8.

The block's terms (``activations_block``, ``activations_ffn``, with ``activation_accounting="paper"``: the
Megatron-Core/TransformerEngine layout) count every saved tensor in 16 bits. This module returns, per block, the
signed difference fp8 training makes to them, one ``Term`` per Linear input (or SwiGLU input) whose stored dtype
changes; the caller adds them.

Engines:
- megatron + fp8 (``perf.fp8`` or ``dtype: fp8``): TransformerEngine. ``_Linear.forward``
  (transformer_engine/pytorch/module/linear.py) quantizes its input and saves the quantized tensor for the weight
  gradient (``saved_inputmat = inputmat`` after ``update_usage(rowwise_usage=False, columnwise_usage=True)``: one
  1-byte copy), unless ``save_original_input``, where it saves ``inp`` itself; ``_LayerNormLinear.forward``
  (layernorm_linear.py) saves the norm's 16-bit input, mu, rsigma and the quantized ``ln_out`` (no
  ``save_original_input``); ``_GroupedLinear.forward`` (grouped_linear.py, Megatron's TEGroupedLinear experts) saves
  one quantized input per expert. The fused attention (``TEDotProductAttention``, fp8_dpa off) keeps q, k, v, out
  in 16 bits, the norms (TENorm) their 16-bit input, Megatron's fused SwiGLU its 16-bit input
  (fusions/fused_bias_swiglu.py ``SwiGLUFunction``) unless ``activation_func_fp8_input_store``.
  Megatron-Core calls ``set_save_original_input`` (extensions/transformer_engine.py) on: linear_proj
  (attention.py, multi_latent_attention.py ``__init__``: fp8 recipe not delayed, TE >= 2.6: the attention already
  keeps its output), the shared experts' linear_fc1 (moe/shared_experts.py: recipe not delayed; the router keeps the
  norm output), the routed experts' linear_fc2 with ``moe_act`` recompute (moe/experts.py), and, with ``layernorm``
  recompute, the linears after a separate norm (transformer_layer.py: MLA's q/kv down-projections through
  ``set_for_recompute_input_layernorm``, the shared experts' fc1 through ``set_for_recompute_pre_mlp_layernorm``).
- fsdp2 / pytorch + fp8: torchao float8. ``matmul_with_hp_or_float8_args.forward``
  (torchao/float8/float8_linear.py) runs ``ctx.save_for_backward(input_hp, weight_hp_t)``: the high-precision input,
  re-cast in backward; the MoE grouped GEMM likewise saves ``padded_A`` in high precision
  (torchao/prototype/moe_training/fp8_grouped_mm.py). Nothing changes: no term.
- deepspeed + fp8 (TransformerEngine through accelerate, te.Linear swapped into the Hugging Face modules): counted in
  16 bits here. Each te.Linear keeps its own fp8 copy: q, k and v quantize the norm output apart (3 bytes against the
  shared 2), o_proj a copy beside SDPA's output (+1 per N·H), gate and up 2 against 2, down 1 against 2 per F: a
  dense block changes by B·S·(2D − F) bytes, so the 16-bit count over-counts (the safe direction) wherever F >= 2D,
  every catalog dense gated MLP; an MoE block (experts are grouped_mm parameters, not nn.Linear; router and shared
  expert quantize the norm output apart) holds more: ``memory.accelerate_fp8`` adds its terms.
Symbols as ``activations_terms``; ``Dims.seq_tokens`` rows for hidden-wide inputs (split with sequence parallelism:
TE saves the local shard and re-gathers it in backward), ``Dims.tokens`` rows for head- and ffn-wide ones.
Assumptions: every weight trains (megatron runs pretrain and full jobs); TransformerEngine >= 2.6 (Megatron's condition
for ``set_save_original_input``); balanced routing, without the experts' fp8 padding of each expert's rows to a
multiple of 16; the output layer (Megatron's own ColumnParallelLinear) stays 16-bit; ``--first-last-layers-bf16``,
fp8 attention (``--fp8-dot-product-attention``) and fine-grained activation offloading are not modelled.
"""

from __future__ import annotations

from memplan.arch.tensors import Layer
from memplan.catalog.schema import ModelSpec
from memplan.config import Engine, JobConfig
from memplan.dtypes import Dtype
from memplan.memory import activations_terms as t
from memplan.memory.activations_block import Dims, Term
from memplan.units import ceil_div

FP8_BITS = 8
"""float8_e4m3fn / e5m2: one byte per element."""
MXFP8_BLOCK = 32
"""MXFP8: one E8M0 (1-byte) scale per 32 elements (transformer_engine/pytorch/constants.py MXFP8_BLOCK_SCALING_SIZE)."""
BLOCKWISE_BLOCK = 128
"""Float8 block scaling: one fp32 scale per 128 elements (tensor/storage/float8_blockwise_tensor_storage.py
``block_len = 128``; DeepSeek-AI 2024 Sec. 3.3.2: 1x128 activation tiles)."""


def fp8_training(cfg: JobConfig) -> bool:
    """Whether the job's GEMMs run in fp8 (``perf.fp8`` or ``dtype: fp8``, as ``planner.steptime_compute``)."""
    return cfg.perf.fp8 or cfg.dtype is Dtype.FP8


def fp8_tensor_bytes(*, count: int, recipe: str, tensors: int = 1) -> int:
    """Bytes of ``tensors`` quantized saved tensors of ``count`` elements in all: 1 byte per element plus the scales.

    Formula: count + 4·tensors (delayed, tensorwise: one fp32 ``scale_inv`` per tensor, Float8Tensor);
    count + ceil(count/32) (mxfp8: E8M0 per 32, MXFP8Tensor); count + 4·ceil(count/128) (blockwise: fp32 per 128,
    Float8BlockwiseQTensor). Only the column-wise copy is kept (linear.py ``update_usage(rowwise_usage=False)``);
    the scale tensors' padding is not counted.
    """
    data = t.tensor_bytes(count=count, bits=FP8_BITS)
    if recipe == "mxfp8":
        return data + ceil_div(count, MXFP8_BLOCK)
    if recipe == "blockwise":
        return data + t.tensor_bytes(count=ceil_div(count, BLOCKWISE_BLOCK), bits=t.FP32_BITS)
    return data + t.tensor_bytes(count=tensors, bits=t.FP32_BITS)


def _swap(name: str, *, count: int, bits: int, recipe: str, tensors: int = 1) -> Term:
    """A 16-bit saved Linear input that TE keeps quantized instead: fp8 bytes − 16-bit bytes (negative)."""
    return Term(name, fp8_tensor_bytes(count=count, recipe=recipe, tensors=tensors) - t.tensor_bytes(count=count,
                                                                                                      bits=bits))


def _extra(name: str, *, count: int, recipe: str, tensors: int = 1) -> Term:
    """A quantized copy TE saves beside a 16-bit tensor another op keeps (positive)."""
    return Term(name, fp8_tensor_bytes(count=count, recipe=recipe, tensors=tensors))


def swiglu_store_delta(*, count: int, bits: int) -> int:
    """Bytes ``activation_func_fp8_input_store`` changes for a SwiGLU input of ``count`` elements: count − b/8·count.

    Source: Megatron-Core fusions/fused_bias_swiglu.py (``input.to(torch.float8_e4m3fn) if fp8_input_store``: a plain
    cast, no scale, cast back to the original dtype in backward).
    """
    return t.tensor_bytes(count=count, bits=FP8_BITS) - t.tensor_bytes(count=count, bits=bits)


def applies(cfg: JobConfig) -> bool:
    """Whether a block's saved bytes differ from the 16-bit count: megatron with fp8 or the fp8 SwiGLU store."""
    knobs = cfg.engine_config
    return cfg.effective_engine is Engine.MEGATRON and (fp8_training(cfg) or knobs.activation_func_fp8_input_store)


def attention_terms(spec: ModelSpec, cfg: JobConfig, dm: Dims, mods: frozenset[str]) -> list[Term]:
    """The attention half: the QKV (or MLA down/up projection) inputs and linear_proj's input."""
    recipe, bits, hidden = cfg.engine_config.fp8_recipe, dm.bits, dm.seq_tokens * dm.d
    out: list[Term] = []
    if spec.is_mla:  # TENorm, then q_down (or linear_q_proj) and kv_down each quantize the norm output
        if "layernorm" not in mods:  # with it both save the original, which the recompute discards
            out.append(Term("fp8/qkv_down_input", 2 * fp8_tensor_bytes(count=hidden, recipe=recipe)
                            - t.tensor_bytes(count=hidden, bits=bits)))
        if "mla_up_proj" not in mods:  # q_up / kv_up: TELayerNormColumnParallelLinear over the latent (ln_out)
            for rank in (spec.q_lora_rank, spec.kv_lora_rank):
                if rank:
                    out.append(_swap("fp8/qkv_up_input", count=dm.seq_tokens * rank, bits=bits, recipe=recipe))
        proj = dm.tokens * dm.n * (spec.v_head_dim or 0)
    else:  # linear_qkv: TELayerNormColumnParallelLinear saves ln_out quantized
        out.append(_swap("fp8/qkv_input", count=hidden, bits=bits, recipe=recipe))
        proj = dm.tokens * dm.n * dm.h
    if recipe == "delayed":  # no save_original_input: a quantized copy of the output the attention keeps
        if "core_attn" in mods:  # checkpointed core attention keeps no output: linear_proj's copy is the only one
            out.append(_swap("fp8/proj_input", count=proj, bits=bits, recipe=recipe))
        else:
            out.append(_extra("fp8/proj_input", count=proj, recipe=recipe))
    return out


def swiglu(spec: ModelSpec) -> bool:
    """A SwiGLU MLP, the only activation whose input Megatron can store in fp8 (transformer_config.py)."""
    return spec.mlp_gated and spec.hidden_act in ("silu", "swish")


def _dense_mlp(name: str, spec: ModelSpec, cfg: JobConfig, *, rows: int, ffn: int, bits: int, fp8: bool,
               tensors: int = 1) -> list[Term]:
    """SwiGLU input (2F, with the fp8 store) and fc2's input (F, quantized) of a dense MLP or of experts."""
    out = []
    if cfg.engine_config.activation_func_fp8_input_store and swiglu(spec):
        out.append(Term(f"{name}/swiglu_input", swiglu_store_delta(count=rows * 2 * ffn, bits=bits)))
    if fp8:
        out.append(_swap(f"{name}/fc2_input", count=rows * ffn, bits=bits, recipe=cfg.engine_config.fp8_recipe,
                         tensors=tensors))
    return out


def mlp_terms(spec: ModelSpec, layer: Layer, cfg: JobConfig, dm: Dims, mods: frozenset[str]) -> list[Term]:
    """The MLP half: fc1's input (the fused norm's ln_out), the SwiGLU input, fc2's input; for an MoE layer the
    routed experts' (TEGroupedLinear, one quantized tensor per local expert) and the shared experts'."""
    fp8, recipe, bits = fp8_training(cfg), cfg.engine_config.fp8_recipe, dm.bits
    hidden = dm.seq_tokens * dm.d
    if not layer.moe:  # linear_fc1: TELayerNormColumnParallelLinear
        fc1 = [_swap("fp8/fc1_input", count=hidden, bits=bits, recipe=recipe)] if fp8 else []
        return fc1 + _dense_mlp("fp8/mlp", spec, cfg, rows=dm.tokens, ffn=dm.f, bits=bits, fp8=fp8)
    top_k = layer.experts_per_token or spec.num_experts_per_tok or 0
    pairs, local = dm.seq_tokens * top_k, ceil_div(spec.num_experts or 0, cfg.ep)
    expert_ffn = ceil_div(spec.moe_intermediate_size or spec.intermediate_size or 0, dm.tp)
    out = [_swap("fp8/experts_fc1_input", count=pairs * dm.d, bits=bits, recipe=recipe, tensors=local)] if fp8 else []
    if "moe_act" not in mods:  # with it the checkpoint keeps the 16-bit SwiGLU input, fc2 the discarded original
        out += _dense_mlp("fp8/experts", spec, cfg, rows=pairs, ffn=expert_ffn, bits=bits, fp8=fp8, tensors=local)
    if spec.n_shared_experts:
        full = spec.shared_expert_intermediate_size or (
            (spec.moe_intermediate_size or spec.intermediate_size or 0) * spec.n_shared_experts)
        if fp8 and recipe == "delayed" and "layernorm" not in mods:  # fc1 quantizes the norm output the router keeps
            out.append(_extra("fp8/shared_fc1_input", count=hidden, recipe=recipe))
        out += _dense_mlp("fp8/shared", spec, cfg, rows=dm.tokens, ffn=ceil_div(full, dm.tp), bits=bits, fp8=fp8)
    return out


def block_terms(spec: ModelSpec, layer: Layer, cfg: JobConfig, dm: Dims, mods: frozenset[str]) -> list[Term]:
    """Signed differences fp8 training makes to one block's 16-bit saved bytes (one micro-batch, one rank) under
    Megatron's recompute ``mods`` (empty without selective recompute); [] where nothing changes."""
    if not applies(cfg):
        return []
    attention = attention_terms(spec, cfg, dm, mods) if fp8_training(cfg) else []
    return attention + mlp_terms(spec, layer, cfg, dm, mods)
