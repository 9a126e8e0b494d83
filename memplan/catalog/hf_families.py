"""config.json readers of Gemma, Gemma-3, Phi, GPT-NeoX, GPT-J, GPT-BigCode, BLOOM, StableLM, OLMo-2,
Granite and Cohere (``memplan.catalog.hf`` holds the others and the dispatch).

Defaults for absent keys are those of the matching transformers 5.x ``configuration_<family>.py``
class; flags are read strictly (``hf_fields.flag``).
"""

from __future__ import annotations

from collections.abc import Callable

from memplan.catalog.hf_fields import Config, alias, decoder, flag, get, refuse
from memplan.catalog.schema import Family

GEMMA_HEAD_DIM = 256
"""``GemmaConfig.head_dim`` / ``Gemma3TextConfig.head_dim`` default."""
GPTJ_ROTARY_DIM = 64
"""``GPTJConfig.rotary_dim`` default (rotated dims per head)."""
GEMMA_KV_HEADS, GEMMA3_KV_HEADS = 16, 4
"""``GemmaConfig`` / ``Gemma3TextConfig`` num_key_value_heads defaults."""
GEMMA_ACT = "gelu_pytorch_tanh"
"""Gemma's activation; ``GemmaConfig`` rewrites the legacy ``"gelu"`` of the released configs to it."""
GEMMA3_WINDOW, GEMMA3_PATTERN = 4096, 6
"""``Gemma3TextConfig``: sliding_window 4096; every 6th layer full (``sliding_window_pattern``)."""
STABLELM_KV_HEADS = 32
"""``StableLmConfig.num_key_value_heads`` default (not num_attention_heads)."""


def _gemma(cfg: Config) -> Config:
    out = decoder(cfg, tied=True, act=GEMMA_ACT)
    act = cfg.get("hidden_activation") or out["hidden_act"]
    out.update(family=Family.GEMMA, head_dim=get(cfg, "head_dim", GEMMA_HEAD_DIM),
               num_key_value_heads=get(cfg, "num_key_value_heads", GEMMA_KV_HEADS),
               hidden_act=GEMMA_ACT if act == "gelu" else act, attention_bias=flag(cfg, "attention_bias"))
    return out


def _gemma3_text(cfg: Config) -> Config:
    """Gemma-3 text (``Gemma3TextConfig``): sliding layers from ``layer_types``, else layer i slides unless
    (i + 1) is a multiple of ``sliding_window_pattern``."""
    out = decoder(cfg, tied=True)
    layers = out["num_hidden_layers"]
    pattern = get(cfg, "sliding_window_pattern", get(cfg, "_sliding_window_pattern", GEMMA3_PATTERN))
    if out["layer_types"] is None and isinstance(layers, int) and isinstance(pattern, int) and pattern > 0:
        out["layer_types"] = tuple("sliding_attention" if (i + 1) % pattern else "full_attention"
                                   for i in range(min(layers, 10**5)))
    out.update(family=Family.GEMMA3, head_dim=get(cfg, "head_dim", GEMMA_HEAD_DIM), qk_norm=True,
               num_key_value_heads=get(cfg, "num_key_value_heads", GEMMA3_KV_HEADS),
               hidden_act=get(cfg, "hidden_activation", GEMMA_ACT), attention_bias=flag(cfg, "attention_bias"),
               sliding_window=get(cfg, "sliding_window", GEMMA3_WINDOW))
    return out


def _gemma3(cfg: Config) -> Config:
    """A Gemma-3 multimodal config: its language model (``text_config``); the vision tower is not counted."""
    text = cfg.get("text_config")
    if not isinstance(text, dict):
        raise refuse(cfg, "has no text_config object")
    return _gemma3_text({**text, "model_type": "gemma3_text"})


def rotary_dim(cfg: Config, *, head_dim: object, legacy: str, default: float) -> int | None:
    """Rotated dims per head, ``int(head_dim · partial_rotary_factor)`` (transformers ``rotary_ndims``);
    the factor from ``rope_parameters``, else the family's older top-level key, else its default;
    None when every dim rotates."""
    rope = cfg.get("rope_parameters")
    factor = rope.get("partial_rotary_factor") if isinstance(rope, dict) else None
    factor = get(cfg, legacy, default) if factor is None else factor
    if not isinstance(head_dim, int) or not isinstance(factor, int | float) or isinstance(factor, bool):
        return None  # the spec's own validation names the bad field
    dims = int(head_dim * factor)
    return None if dims >= head_dim else max(dims, 1)


def _per_head(cfg: Config) -> int | None:
    hidden, heads = cfg.get("hidden_size"), cfg.get("num_attention_heads")
    if isinstance(hidden, int) and isinstance(heads, int) and heads > 0:
        return hidden // heads
    return None


def _layernorm_decoder(cfg: Config, family: Family, **fields: object) -> Config:
    """A decoder with LayerNorms and a plain (not gated) MLP: Phi, GPT-NeoX."""
    out = decoder(cfg)
    out.update(family=family, norm="layernorm", mlp_gated=False, head_dim=None, **fields)
    return out


def _phi(cfg: Config) -> Config:
    """Phi-1/1.5/2 (``PhiConfig``): biases everywhere, parallel attention/MLP, gelu_new."""
    return _layernorm_decoder(cfg, Family.PHI, hidden_act=get(cfg, "hidden_act", "gelu_new"), attention_bias=True,
                              mlp_bias=True, parallel_attn=True, qk_norm=flag(cfg, "qk_layernorm"),
                              rotary_dim=rotary_dim(cfg, head_dim=_per_head(cfg), legacy="partial_rotary_factor",
                                                    default=0.5))


def _gpt_neox(cfg: Config) -> Config:
    """GPT-NeoX / Pythia (``GPTNeoXConfig``): parallel residual by default, biased attention by default."""
    return _layernorm_decoder(cfg, Family.GPT_NEOX, hidden_act=get(cfg, "hidden_act", "gelu"),
                              num_key_value_heads=None, attention_bias=flag(cfg, "attention_bias", True),
                              mlp_bias=True, parallel_attn=flag(cfg, "use_parallel_residual", True),
                              rotary_dim=rotary_dim(cfg, head_dim=_per_head(cfg), legacy="rotary_pct", default=0.25))


def _gpt_style(cfg: Config, family: Family, *, act: str, tied: bool) -> Config:
    """GPT-2-named keys (``n_embd``, ``n_layer``, ``n_head``, ``n_inner``, ``n_positions``)."""
    hidden = alias(cfg, "n_embd", "hidden_size")
    return {"family": family, "hidden_size": hidden, "intermediate_size": get(cfg, "n_inner", 4 * hidden)
            if isinstance(hidden, int) else None,
            "num_hidden_layers": alias(cfg, "n_layer", "num_hidden_layers"),
            "num_attention_heads": alias(cfg, "n_head", "num_attention_heads"), "vocab_size": get(cfg, "vocab_size"),
            "max_position_embeddings": alias(cfg, "n_positions", "max_position_embeddings", None),
            "tie_word_embeddings": flag(cfg, "tie_word_embeddings", tied),
            "hidden_act": get(cfg, "activation_function", act), "mlp_gated": False, "norm": "layernorm",
            "mlp_bias": True}


def _gptj(cfg: Config) -> Config:
    """GPT-J (``GPTJConfig``): one LayerNorm, parallel attention (no biases) and MLP (biases)."""
    out = _gpt_style(cfg, Family.GPTJ, act="gelu_new", tied=False)
    heads, hidden = out["num_attention_heads"], out["hidden_size"]
    per_head = hidden // heads if isinstance(hidden, int) and isinstance(heads, int) and heads > 0 else None
    rotary = get(cfg, "rotary_dim", GPTJ_ROTARY_DIM)
    return {**out, "parallel_attn": True, "rotary_dim": None if per_head and rotary >= per_head else rotary}


def _gpt_bigcode(cfg: Config) -> Config:
    """StarCoder / SantaCoder (``GPTBigCodeConfig``): multi-query unless ``multi_query`` is false."""
    if flag(cfg, "add_cross_attention"):
        raise refuse(cfg, "sets add_cross_attention: true")
    out = _gpt_style(cfg, Family.GPT_BIGCODE, act="gelu_pytorch_tanh", tied=True)
    out["max_position_embeddings"] = alias(cfg, "n_positions", "max_position_embeddings", 1024)
    return {**out, "attention_bias": True, "num_key_value_heads": 1 if flag(cfg, "multi_query", True) else None}


def _bloom(cfg: Config) -> Config:
    """BLOOM (``BloomConfig``; older files say ``n_embed``): ALiBi, 4·D MLP, tied embeddings."""
    hidden = alias(cfg, "hidden_size", "n_embed")
    return {"family": Family.BLOOM, "hidden_size": hidden,
            "num_hidden_layers": alias(cfg, "n_layer", "num_hidden_layers"),
            "num_attention_heads": alias(cfg, "n_head", "num_attention_heads"), "vocab_size": get(cfg, "vocab_size"),
            "tie_word_embeddings": flag(cfg, "tie_word_embeddings", True), "hidden_act": "bloom_gelu",
            "mlp_gated": False, "norm": "layernorm", "attention_bias": True, "mlp_bias": True, "alibi": True}


def _stablelm(cfg: Config) -> Config:
    """StableLM (``StableLmConfig``): LayerNorms, gated MLP, ``use_qkv_bias``, ``qk_layernorm``,
    ``use_parallel_residual``."""
    out = decoder(cfg)
    out.update(family=Family.STABLELM, norm="layernorm", head_dim=None, attention_bias=flag(cfg, "use_qkv_bias"),
               num_key_value_heads=get(cfg, "num_key_value_heads", STABLELM_KV_HEADS),
               qk_norm=flag(cfg, "qk_layernorm"), parallel_attn=flag(cfg, "use_parallel_residual"),
               rotary_dim=rotary_dim(cfg, head_dim=_per_head(cfg), legacy="partial_rotary_factor", default=0.25))
    return out


def _olmo2(cfg: Config) -> Config:
    return {**decoder(cfg), "family": Family.OLMO2, "qk_norm": True, "attention_bias": flag(cfg, "attention_bias")}


def _granite(cfg: Config) -> Config:
    """Granite (``GraniteConfig``): the Llama layout; its multipliers add no parameters."""
    return {**decoder(cfg), "family": Family.GRANITE, "attention_bias": flag(cfg, "attention_bias"),
            "mlp_bias": flag(cfg, "mlp_bias")}


def _cohere(cfg: Config) -> Config:
    """Command-R (``CohereConfig``): parallel attention and MLP, tied embeddings, ``use_qk_norm``."""
    return {**decoder(cfg, tied=True), "family": Family.COHERE, "norm": "layernorm", "parallel_attn": True,
            "attention_bias": flag(cfg, "attention_bias"), "qk_norm": flag(cfg, "use_qk_norm")}


READERS: dict[str, Callable[[Config], Config]] = {
    "gemma": _gemma, "gemma3": _gemma3, "gemma3_text": _gemma3_text, "phi": _phi, "gpt_neox": _gpt_neox,
    "gptj": _gptj, "gpt_bigcode": _gpt_bigcode, "bloom": _bloom, "stablelm": _stablelm, "olmo2": _olmo2,
    "granite": _granite, "cohere": _cohere,
}
