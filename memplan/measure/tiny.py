"""Tiny models with each family's real layout, for the accuracy benchmark and the measurement tests.

Each is a ``config.json``-style dict read by ``memplan.catalog.hf.spec_from_hf_config``, with the
dimensions shrunk (hidden 64-128, 2 layers) and the structure of the family's published config kept:
grouped-query ratios, head_dim ≠ hidden/heads, tied embeddings, fused projections, sliding windows
shorter than the sequence, experts, multi-head latent attention. ``SEQ`` is the training sequence
length each is run at (shorter for the MoE and MLA models, whose experts make CPU steps slower).
"""

from __future__ import annotations

from typing import Any

from memplan.catalog.hf import spec_from_hf_config
from memplan.catalog.schema import ModelSpec

_BASE = {"num_hidden_layers": 2, "max_position_embeddings": 512}
CONFIGS: dict[str, dict[str, Any]] = {
    # Llama-3 70B's 8:1 query/kv grouping, untied head
    "llama": {"model_type": "llama", **_BASE, "hidden_size": 128, "intermediate_size": 344,
              "num_attention_heads": 8, "num_key_value_heads": 1, "vocab_size": 2048},
    # Qwen2.5-0.5B: q/k/v biases, tied embeddings
    "qwen2": {"model_type": "qwen2", **_BASE, "hidden_size": 128, "intermediate_size": 352,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1536, "tie_word_embeddings": True},
    # Qwen3-8B: q/k RMSNorms, head_dim set explicitly (here ≠ hidden/heads)
    "qwen3": {"model_type": "qwen3", **_BASE, "hidden_size": 128, "intermediate_size": 384,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 48, "vocab_size": 2048},
    # Mistral-7B v0.1: a sliding window shorter than the sequence
    "mistral": {"model_type": "mistral", **_BASE, "hidden_size": 128, "intermediate_size": 448,
                "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 2048, "sliding_window": 64},
    # Gemma-2: head_dim·heads ≠ hidden, four norms, soft-capping, alternating sliding layers, tied embeddings
    "gemma2": {"model_type": "gemma2", **_BASE, "hidden_size": 128, "intermediate_size": 512,
               "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 2048,
               "sliding_window": 64},
    # GPT-2: fused c_attn, gelu_new, LayerNorm, learned positions, tied embeddings
    "gpt2": {"model_type": "gpt2", "n_embd": 128, "n_layer": 2, "n_head": 4, "vocab_size": 2000, "n_positions": 512},
    # Phi-3: fused qkv_proj and gate_up_proj, 4:1 grouping
    "phi3": {"model_type": "phi3", **_BASE, "hidden_size": 128, "intermediate_size": 320,
             "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 2048},
    # Mixtral-8x7B: 8 experts, top-2, 4:1 grouping
    "mixtral": {"model_type": "mixtral", **_BASE, "hidden_size": 64, "intermediate_size": 160,
                "num_attention_heads": 4, "num_key_value_heads": 1, "vocab_size": 1000, "num_local_experts": 8,
                "num_experts_per_tok": 2},
    # Qwen3-30B-A3B: 8 small experts, top-2, q/k norms
    "qwen3_moe": {"model_type": "qwen3_moe", **_BASE, "hidden_size": 64, "intermediate_size": 160,
                  "moe_intermediate_size": 48, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                  "vocab_size": 1000, "num_experts": 8, "num_experts_per_tok": 2},
    # DeepSeek-V3: MLA (q/kv low rank, rope split), first layer dense, sigmoid router, shared expert
    "deepseek_v3": {"model_type": "deepseek_v3", **_BASE, "hidden_size": 64, "intermediate_size": 160,
                    "moe_intermediate_size": 48, "num_attention_heads": 4, "num_key_value_heads": 4,
                    "vocab_size": 1000, "n_routed_experts": 8, "num_experts_per_tok": 2, "n_shared_experts": 1,
                    "first_k_dense_replace": 1, "q_lora_rank": 32, "kv_lora_rank": 24, "qk_nope_head_dim": 16,
                    "qk_rope_head_dim": 8, "v_head_dim": 16, "num_nextn_predict_layers": 0},
    # DeepSeek-V2-Lite: MLA without a q low rank (q_proj), greedy router without a correction bias
    "deepseek_v2": {"model_type": "deepseek_v2", **_BASE, "hidden_size": 64, "intermediate_size": 160,
                    "moe_intermediate_size": 48, "num_attention_heads": 4, "num_key_value_heads": 4,
                    "vocab_size": 1000, "n_routed_experts": 8, "num_experts_per_tok": 2, "n_shared_experts": 2,
                    "first_k_dense_replace": 1, "q_lora_rank": None, "kv_lora_rank": 24, "qk_nope_head_dim": 16,
                    "qk_rope_head_dim": 8, "v_head_dim": 16, "topk_method": "greedy"},
}
SEQ = {"mixtral": 64, "qwen3_moe": 64, "deepseek_v3": 64, "deepseek_v2": 64}
"""Training sequence length per family; 128 where not listed."""
DEFAULT_SEQ = 128
FAMILIES = tuple(CONFIGS)


def spec_from_config(config: dict[str, Any], *, name: str) -> ModelSpec:
    """A ModelSpec from a config.json-style dict, as ``memplan`` reads a config file."""
    return spec_from_hf_config(config, name=name, source="memplan.measure.tiny")


def tiny_spec(family: str, **fields: Any) -> ModelSpec:
    """The tiny ModelSpec of ``family`` (a key of CONFIGS), config fields overridden by ``fields``."""
    return spec_from_config({**CONFIGS[family], **fields}, name=f"tiny-{family}")


def seq_len(family: str) -> int:
    return SEQ.get(family, DEFAULT_SEQ)
