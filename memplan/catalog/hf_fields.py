"""Reading single fields of a Hugging Face ``config.json``: required keys, old key names, and
strict booleans.

JSON has real booleans, so a flag written as a string (``"tie_word_embeddings": "false"``) is
refused: Python (and transformers, which stores the value as given) would read the non-empty
string as true, so the model transformers builds would not be the one the file seems to describe.
"""

from __future__ import annotations

from typing import Any

from memplan.errors import MemplanError

Config = dict[str, Any]
REQUIRED = object()


def get(cfg: Config, key: str, default: Any = REQUIRED) -> Any:
    """``cfg[key]``; a missing (or null) required key is a MemplanError naming it."""
    value = cfg.get(key)
    if value is not None:
        return value
    if default is REQUIRED:
        raise MemplanError(f"config.json (model_type {cfg.get('model_type')!r}) is missing the required field {key!r}.")
    return default


def count(cfg: Config, key: str) -> int:
    """``get(cfg, key)`` for a size the reader computes with before the spec is validated (GPT-2's ``n_embd`` gives
    the default ``n_inner`` of 4·n_embd): a positive JSON integer, else a MemplanError naming the field."""
    value = get(cfg, key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise MemplanError(f"config.json field {key!r} must be a positive integer, got {type(value).__name__} "
                           f"{value!r}.")
    return value


def alias(cfg: Config, key: str, old: str, default: Any = REQUIRED) -> Any:
    """``cfg[key]``, or its older name ``old`` (Falcon's RW configs say ``n_head``, ``n_layer``)."""
    if cfg.get(key) is None and cfg.get(old) is not None:
        return cfg[old]
    return get(cfg, key, default)


def flag(cfg: Config, key: str, default: bool = False) -> bool:
    """``cfg[key]`` as a JSON boolean; absent or null gives ``default``; anything else is refused."""
    value = cfg.get(key)
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    shown = f"the string {value!r}" if isinstance(value, str) else f"{type(value).__name__} {value!r}"
    raise MemplanError(f"config.json field {key!r} must be true or false, got {shown}; "
                       "write a JSON boolean without quotes.")


def refuse(cfg: Config, what: str) -> MemplanError:
    return MemplanError(f"config.json (model_type {cfg.get('model_type')!r}) {what}, which memplan cannot count yet.")


def decoder(cfg: Config, *, tied: bool = False, act: str = "silu") -> Config:
    """Fields shared by the Llama-style decoders (Llama, Mistral, Qwen, Gemma, Phi-3, Mixtral, ...)."""
    heads = get(cfg, "num_attention_heads")
    types = cfg.get("layer_types")
    return {
        "hidden_size": get(cfg, "hidden_size"),
        "intermediate_size": get(cfg, "intermediate_size"),
        "num_hidden_layers": get(cfg, "num_hidden_layers"),
        "num_attention_heads": heads,
        "num_key_value_heads": get(cfg, "num_key_value_heads", heads),
        "head_dim": cfg.get("head_dim"),
        "vocab_size": get(cfg, "vocab_size"),
        "max_position_embeddings": cfg.get("max_position_embeddings"),
        "tie_word_embeddings": flag(cfg, "tie_word_embeddings", tied),
        "hidden_act": get(cfg, "hidden_act", act),
        "layer_types": tuple(types) if isinstance(types, list | tuple) and types else types or None,
    }
