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
    # Gemma 2B: multi-query, head_dim 256 of a 2048 hidden (here 64 of 128), GeGLU, tied embeddings
    "gemma": {"model_type": "gemma", **_BASE, "hidden_size": 128, "intermediate_size": 512,
              "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 64, "vocab_size": 2048},
    # Gemma-3: q/k norms, five sliding layers per full one (here one of two), window shorter than the sequence
    "gemma3_text": {"model_type": "gemma3_text", **_BASE, "hidden_size": 128, "intermediate_size": 512,
                    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 2048,
                    "sliding_window": 64, "sliding_window_pattern": 2},
    # Phi-2: biases, one LayerNorm, parallel attention and fc1/fc2 MLP, partial rotary 0.4
    "phi": {"model_type": "phi", **_BASE, "hidden_size": 128, "intermediate_size": 512, "num_attention_heads": 4,
            "vocab_size": 2048, "partial_rotary_factor": 0.4},
    # Qwen1.5-MoE-A2.7B: 4 of 60 experts (here 2 of 8) plus a gated shared expert, q/k/v biases
    "qwen2_moe": {"model_type": "qwen2_moe", **_BASE, "hidden_size": 64, "intermediate_size": 160,
                  "moe_intermediate_size": 48, "shared_expert_intermediate_size": 96, "num_attention_heads": 4,
                  "num_key_value_heads": 4, "vocab_size": 1000, "num_experts": 8, "num_experts_per_tok": 2},
    # Pythia: fused query_key_value, two LayerNorms, parallel residual, rotary on a quarter of each head
    "gpt_neox": {"model_type": "gpt_neox", **_BASE, "hidden_size": 128, "intermediate_size": 512,
                 "num_attention_heads": 4, "vocab_size": 2048},
    # GPT-J: one LayerNorm, parallel attention and MLP, rotary_dim 64 of 256 (here 8 of 32), biased lm_head
    "gptj": {"model_type": "gptj", "n_embd": 128, "n_layer": 2, "n_head": 4, "rotary_dim": 8, "vocab_size": 2048,
             "n_positions": 512},
    # StarCoder: multi-query c_attn, learned positions, tied embeddings (dropout off)
    "gpt_bigcode": {"model_type": "gpt_bigcode", "n_embd": 128, "n_layer": 2, "n_head": 4, "vocab_size": 2048,
                    "n_positions": 512, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0},
    # BLOOM: ALiBi, fused query_key_value, embedding LayerNorm, tied embeddings
    "bloom": {"model_type": "bloom", "hidden_size": 128, "n_layer": 2, "n_head": 4, "vocab_size": 2048},
    # Falcon-40B: new decoder architecture, 8:1 grouped query_key_value, ln_attn and ln_mlp
    "falcon": {"model_type": "falcon", "hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 8,
               "num_kv_heads": 2, "new_decoder_architecture": True, "vocab_size": 2048},
    # StableLM-2: LayerNorms, q/k/v biases, gated MLP, partial rotary 0.25
    "stablelm": {"model_type": "stablelm", **_BASE, "hidden_size": 128, "intermediate_size": 352,
                 "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 2048, "use_qkv_bias": True},
    # OLMo-2: post-norms, q/k RMSNorms over all heads
    "olmo2": {"model_type": "olmo2", **_BASE, "hidden_size": 128, "intermediate_size": 344,
              "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 2048},
    # Granite-3: Llama layout with embedding/residual/attention/logit multipliers, 4:1 grouping, tied
    "granite": {"model_type": "granite", **_BASE, "hidden_size": 128, "intermediate_size": 384,
                "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 2048, "tie_word_embeddings": True,
                "embedding_multiplier": 12.0, "residual_multiplier": 0.22, "attention_multiplier": 0.0078125,
                "logits_scaling": 8.0},
    # Command-R: bias-free fp32 LayerNorm, parallel attention and MLP, tied embeddings, logit scale
    "cohere": {"model_type": "cohere", **_BASE, "hidden_size": 128, "intermediate_size": 352,
               "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 2048},
}
SEQ = {"mixtral": 64, "qwen3_moe": 64, "deepseek_v3": 64, "deepseek_v2": 64, "qwen2_moe": 64}
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
