"""transformers configs of the families added in issue 14 (the inverse of ``memplan.catalog.hf_families``),
and the module names peft targets in them. Used by ``memplan.measure.build.hf_config_fields``; dropout
probabilities are ``p`` where the family has hidden/attention dropout, else left at their 0 defaults.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from memplan.arch.build import build_architecture
from memplan.catalog.schema import Family, ModelSpec

Fields = tuple[str, dict[str, Any]]


def _layer_types(spec: ModelSpec) -> list[str]:
    return ["sliding_attention" if layer.sliding else "full_attention" for layer in build_architecture(spec).layers]


def _decoder(spec: ModelSpec) -> dict[str, Any]:
    return {"hidden_size": spec.hidden_size, "intermediate_size": spec.intermediate_size,
            "num_hidden_layers": spec.num_hidden_layers, "num_attention_heads": spec.num_attention_heads,
            "num_key_value_heads": spec.kv_heads, "vocab_size": spec.vocab_size,
            "max_position_embeddings": spec.max_position_embeddings or 4096,
            "tie_word_embeddings": spec.tie_word_embeddings, "hidden_act": spec.hidden_act, "attention_dropout": 0.0}


def _factor(spec: ModelSpec) -> float:
    """partial_rotary_factor giving ``rotary_dim`` rotated dims of each head (1.0: all)."""
    return (spec.rotary_dim or spec.dim_per_head) / spec.dim_per_head


def _gemma(spec: ModelSpec, _: float) -> Fields:
    return "gemma", {**_decoder(spec), "head_dim": spec.dim_per_head, "attention_bias": spec.attention_bias}


def _gemma3(spec: ModelSpec, _: float) -> Fields:
    fields = {**_decoder(spec), "head_dim": spec.dim_per_head, "hidden_activation": spec.hidden_act,
              "attention_bias": spec.attention_bias, "sliding_window": spec.sliding_window or 4096,
              "layer_types": _layer_types(spec)}
    return "gemma3_text", fields


def _phi(spec: ModelSpec, p: float) -> Fields:
    return "phi", {**_decoder(spec), "qk_layernorm": spec.qk_norm, "partial_rotary_factor": _factor(spec),
                   "resid_pdrop": p, "embd_pdrop": p}


def _qwen2_moe(spec: ModelSpec, _: float) -> Fields:
    types = _layer_types(spec)
    window = spec.sliding_window if "sliding_attention" in types else None
    return "qwen2_moe", {**_decoder(spec), "num_experts": spec.num_experts,
                         "num_experts_per_tok": spec.num_experts_per_tok,
                         "moe_intermediate_size": spec.moe_intermediate_size,
                         "shared_expert_intermediate_size": spec.shared_expert_intermediate_size,
                         "qkv_bias": spec.attention_bias, "decoder_sparse_step": 1, "mlp_only_layers": [],
                         "use_sliding_window": window is not None, "sliding_window": window,
                         **({"layer_types": types} if window else {})}


def _gpt_neox(spec: ModelSpec, p: float) -> Fields:
    fields = {**_decoder(spec), "use_parallel_residual": spec.parallel_attn, "attention_bias": spec.attention_bias,
              "rotary_pct": _factor(spec), "hidden_dropout": p}
    fields.pop("num_key_value_heads")
    return "gpt_neox", fields


def _gpt_style(spec: ModelSpec, p: float) -> dict[str, Any]:
    return {"n_embd": spec.hidden_size, "n_layer": spec.num_hidden_layers, "n_head": spec.num_attention_heads,
            "n_inner": spec.intermediate_size, "vocab_size": spec.vocab_size,
            "n_positions": spec.max_position_embeddings or 2048, "tie_word_embeddings": spec.tie_word_embeddings,
            "activation_function": spec.hidden_act, "resid_pdrop": p, "embd_pdrop": p, "attn_pdrop": p}


def _gptj(spec: ModelSpec, p: float) -> Fields:
    return "gptj", {**_gpt_style(spec, p), "rotary_dim": spec.rotary_dim or spec.dim_per_head}


def _gpt_bigcode(spec: ModelSpec, p: float) -> Fields:
    return "gpt_bigcode", {**_gpt_style(spec, p), "multi_query": spec.kv_heads == 1}


def _bloom(spec: ModelSpec, p: float) -> Fields:
    return "bloom", {"hidden_size": spec.hidden_size, "n_layer": spec.num_hidden_layers,
                     "n_head": spec.num_attention_heads, "vocab_size": spec.vocab_size,
                     "tie_word_embeddings": spec.tie_word_embeddings, "hidden_dropout": p, "attention_dropout": p}


def _falcon(spec: ModelSpec, _: float) -> Fields:
    heads, kv = spec.num_attention_heads or 1, spec.kv_heads
    return "falcon", {"hidden_size": spec.hidden_size, "num_hidden_layers": spec.num_hidden_layers,
                      "num_attention_heads": heads, "num_kv_heads": kv, "multi_query": kv == 1,
                      "new_decoder_architecture": 1 < kv < heads, "vocab_size": spec.vocab_size,
                      "ffn_hidden_size": spec.intermediate_size,
                      "max_position_embeddings": spec.max_position_embeddings or 2048, "bias": spec.attention_bias,
                      "tie_word_embeddings": spec.tie_word_embeddings, "parallel_attn": spec.parallel_attn,
                      "num_ln_in_parallel_attn": spec.parallel_norms, "alibi": spec.alibi,
                      "activation": spec.hidden_act, "attention_dropout": 0.0, "hidden_dropout": 0.0}


def _stablelm(spec: ModelSpec, _: float) -> Fields:
    return "stablelm", {**_decoder(spec), "use_qkv_bias": spec.attention_bias, "qk_layernorm": spec.qk_norm,
                        "use_parallel_residual": spec.parallel_attn, "partial_rotary_factor": _factor(spec),
                        "hidden_dropout": 0.0}


def _olmo2(spec: ModelSpec, _: float) -> Fields:
    return "olmo2", {**_decoder(spec), "attention_bias": spec.attention_bias}


def _granite(spec: ModelSpec, _: float) -> Fields:
    return "granite", {**_decoder(spec), "attention_bias": spec.attention_bias, "mlp_bias": spec.mlp_bias}


def _cohere(spec: ModelSpec, _: float) -> Fields:
    return "cohere", {**_decoder(spec), "attention_bias": spec.attention_bias, "use_qk_norm": spec.qk_norm}


FIELDS: dict[Family, Callable[[ModelSpec, float], Fields]] = {
    Family.GEMMA: _gemma, Family.GEMMA3: _gemma3, Family.PHI: _phi, Family.QWEN2_MOE: _qwen2_moe,
    Family.GPT_NEOX: _gpt_neox, Family.GPTJ: _gptj, Family.GPT_BIGCODE: _gpt_bigcode, Family.BLOOM: _bloom,
    Family.FALCON: _falcon, Family.STABLELM: _stablelm, Family.OLMO2: _olmo2, Family.GRANITE: _granite,
    Family.COHERE: _cohere,
}
"""(model_type, config fields) of the transformers model with ``spec``'s layout, per family."""

_FUSED_QKV = {"q": ["query_key_value"], "k": ["query_key_value"], "v": ["query_key_value"],
              "up": ["dense_h_to_4h"], "down": ["dense_4h_to_h"]}
LORA_MODULES: dict[Family, dict[str, list[str]]] = {
    Family.PHI: {"q": ["q_proj"], "k": ["k_proj"], "v": ["v_proj"], "o": ["dense"], "up": ["fc1"], "down": ["fc2"]},
    Family.GPT_NEOX: {**_FUSED_QKV, "o": ["attention.dense"]},
    Family.BLOOM: {**_FUSED_QKV, "o": ["self_attention.dense"]},
    Family.GPTJ: {"q": ["q_proj"], "k": ["k_proj"], "v": ["v_proj"], "o": ["out_proj"], "up": ["fc_in"],
                  "down": ["fc_out"]},
    Family.GPT_BIGCODE: {"q": ["c_attn"], "k": ["c_attn"], "v": ["c_attn"], "o": ["attn.c_proj"], "up": ["c_fc"],
                         "down": ["mlp.c_proj"]},
}
"""peft target module names where they differ from Llama's q_proj ... down_proj."""
