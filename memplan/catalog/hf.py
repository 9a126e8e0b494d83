"""Read a Hugging Face ``config.json`` into a ModelSpec.

Each supported ``model_type`` has a reader that maps its keys (which differ between
families: GPT-2's ``n_embd``, OPT's ``ffn_dim``, Mixtral's ``num_local_experts``) onto
ModelSpec's fields. Defaults for absent keys are those of the matching transformers
``*Config`` class (transformers 5.x ``configuration_*.py``). Layouts memplan cannot count
exactly are refused with a MemplanError rather than estimated.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from memplan.catalog.schema import Family, ModelSpec
from memplan.errors import MemplanError

Config = dict[str, Any]
_REQUIRED = object()


def _get(cfg: Config, key: str, default: Any = _REQUIRED) -> Any:
    """``cfg[key]``; a missing (or null) required key is a MemplanError naming it."""
    value = cfg.get(key)
    if value is not None:
        return value
    if default is _REQUIRED:
        raise MemplanError(f"config.json (model_type {cfg.get('model_type')!r}) is missing the required field {key!r}.")
    return default


def _alias(cfg: Config, key: str, old: str) -> Any:
    """``cfg[key]``, or its older name ``old`` (Falcon's RW configs say ``n_head``, ``n_layer``)."""
    return _get(cfg, key) if cfg.get(key) is not None or cfg.get(old) is None else cfg[old]


def _refuse(cfg: Config, what: str) -> MemplanError:
    return MemplanError(f"config.json (model_type {cfg.get('model_type')!r}) {what}, which memplan cannot count yet.")


def _decoder(cfg: Config, *, tied: bool = False) -> Config:
    """Fields shared by the Llama-style decoders (Llama, Mistral, Qwen, Gemma-2, Phi-3, Mixtral)."""
    heads = _get(cfg, "num_attention_heads")
    return {
        "hidden_size": _get(cfg, "hidden_size"),
        "intermediate_size": _get(cfg, "intermediate_size"),
        "num_hidden_layers": _get(cfg, "num_hidden_layers"),
        "num_attention_heads": heads,
        "num_key_value_heads": _get(cfg, "num_key_value_heads", heads),
        "head_dim": cfg.get("head_dim"),
        "vocab_size": _get(cfg, "vocab_size"),
        "max_position_embeddings": cfg.get("max_position_embeddings"),
        "tie_word_embeddings": bool(_get(cfg, "tie_word_embeddings", tied)),
        "hidden_act": _get(cfg, "hidden_act", "silu"),
        "layer_types": tuple(cfg["layer_types"]) if cfg.get("layer_types") else None,
    }


def _qwen_window(cfg: Config, out: Config) -> Config:
    """Qwen2/Qwen3: a window only when ``use_sliding_window``, on layers >= ``max_window_layers``
    (transformers ``Qwen2Config.__init__``)."""
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window") else None
    out["sliding_window"] = window
    if window is not None and out["layer_types"] is None:
        first = _get(cfg, "max_window_layers", out["num_hidden_layers"])
        out["layer_types"] = tuple("sliding_attention" if i >= first else "full_attention"
                                   for i in range(out["num_hidden_layers"]))
    return out


def _no_o_bias(cfg: Config) -> None:
    if cfg.get("attention_bias"):
        raise _refuse(cfg, "sets attention_bias: true, which also biases o_proj")


def _llama(cfg: Config) -> Config:
    _no_o_bias(cfg)
    out = _decoder(cfg)
    out.update(family=Family.LLAMA, mlp_bias=bool(cfg.get("mlp_bias", False)),
               sliding_window=cfg.get("sliding_window"))
    return out


def _qwen2(cfg: Config) -> Config:
    """Qwen2/2.5 always have q/k/v biases and no o_proj bias (``Qwen2Attention``)."""
    return _qwen_window(cfg, {**_decoder(cfg), "family": Family.LLAMA, "attention_bias": True})


def _qwen3(cfg: Config) -> Config:
    _no_o_bias(cfg)
    return _qwen_window(cfg, {**_decoder(cfg), "family": Family.LLAMA, "qk_norm": True})


def _qwen3_moe(cfg: Config) -> Config:
    if _get(cfg, "decoder_sparse_step", 1) != 1 or cfg.get("mlp_only_layers"):
        raise _refuse(cfg, "mixes dense and MoE blocks (decoder_sparse_step / mlp_only_layers)")
    out = _qwen_window(cfg, {**_decoder(cfg), "family": Family.QWEN3_MOE, "qk_norm": True})
    out.update(attention_bias=bool(cfg.get("attention_bias", False)), num_experts=_get(cfg, "num_experts"),
               num_experts_per_tok=_get(cfg, "num_experts_per_tok"),
               moe_intermediate_size=_get(cfg, "moe_intermediate_size"))
    return out


def _mixtral(cfg: Config) -> Config:
    return {**_decoder(cfg), "family": Family.MIXTRAL, "sliding_window": cfg.get("sliding_window"),
            "num_experts": _get(cfg, "num_local_experts"), "num_experts_per_tok": _get(cfg, "num_experts_per_tok")}


def _gemma2(cfg: Config) -> Config:
    out = _decoder(cfg, tied=True)
    out.update(family=Family.GEMMA2, head_dim=_get(cfg, "head_dim", 256),
               hidden_act=_get(cfg, "hidden_activation", _get(cfg, "hidden_act", "gelu_pytorch_tanh")),
               attention_bias=bool(cfg.get("attention_bias", False)), sliding_window=cfg.get("sliding_window"))
    return out


def _phi3(cfg: Config) -> Config:
    return {**_decoder(cfg), "family": Family.PHI3, "sliding_window": cfg.get("sliding_window")}


def _gpt2(cfg: Config) -> Config:
    """GPT-2: Conv1D blocks with biases, learned positions, GELU MLP of ``n_inner`` (default 4D)."""
    hidden = _get(cfg, "n_embd")
    return {"family": Family.GPT2, "hidden_size": hidden, "intermediate_size": _get(cfg, "n_inner", 4 * hidden),
            "num_hidden_layers": _get(cfg, "n_layer"), "num_attention_heads": _get(cfg, "n_head"),
            "vocab_size": _get(cfg, "vocab_size"), "max_position_embeddings": _get(cfg, "n_positions"),
            "tie_word_embeddings": bool(_get(cfg, "tie_word_embeddings", True)),
            "hidden_act": _get(cfg, "activation_function", "gelu_new"), "mlp_gated": False, "norm": "layernorm",
            "attention_bias": True, "mlp_bias": True}


def _opt(cfg: Config) -> Config:
    hidden = _get(cfg, "hidden_size")
    proj = _get(cfg, "word_embed_proj_dim", hidden)
    if proj != hidden:
        raise _refuse(cfg, f"has word_embed_proj_dim {proj} != hidden_size {hidden} (project_in/out)")
    if not _get(cfg, "do_layer_norm_before", True) or not _get(cfg, "layer_norm_elementwise_affine", True):
        raise _refuse(cfg, "uses post-LayerNorm or LayerNorms without weights")
    bias = bool(_get(cfg, "enable_bias", True))
    return {"family": Family.OPT, "hidden_size": hidden, "intermediate_size": _get(cfg, "ffn_dim"),
            "num_hidden_layers": _get(cfg, "num_hidden_layers"),
            "num_attention_heads": _get(cfg, "num_attention_heads"),
            "vocab_size": _get(cfg, "vocab_size"), "max_position_embeddings": _get(cfg, "max_position_embeddings"),
            "tie_word_embeddings": bool(_get(cfg, "tie_word_embeddings", True)),
            "hidden_act": _get(cfg, "activation_function", "relu"), "mlp_gated": False, "norm": "layernorm",
            "attention_bias": bias, "mlp_bias": bias}


def _falcon(cfg: Config) -> Config:
    """Falcon-7B layout: parallel attention/MLP, one input LayerNorm, MQA when ``multi_query``."""
    if cfg.get("new_decoder_architecture") or not _get(cfg, "parallel_attn", True):
        raise _refuse(cfg, "uses new_decoder_architecture or sequential attention (parallel_attn: false)")
    hidden = _get(cfg, "hidden_size")
    heads = _alias(cfg, "num_attention_heads", "n_head")
    bias = bool(_get(cfg, "bias", False))
    return {"family": Family.FALCON, "hidden_size": hidden,
            "intermediate_size": _get(cfg, "ffn_hidden_size", 4 * hidden),
            "num_hidden_layers": _alias(cfg, "num_hidden_layers", "n_layer"), "num_attention_heads": heads,
            "num_key_value_heads": 1 if _get(cfg, "multi_query", True) else heads,
            "vocab_size": _get(cfg, "vocab_size"),
            "max_position_embeddings": _get(cfg, "max_position_embeddings", 2048),
            "tie_word_embeddings": bool(_get(cfg, "tie_word_embeddings", True)), "hidden_act": "gelu",
            "mlp_gated": False, "norm": "layernorm", "attention_bias": bias, "mlp_bias": bias}


def _deepseek(cfg: Config) -> Config:
    """DeepSeek-V2/V3: MLA attention, ``first_k_dense_replace`` dense blocks, then MoE blocks."""
    if _get(cfg, "moe_layer_freq", 1) != 1:
        raise _refuse(cfg, "sets moe_layer_freq != 1")
    out = _decoder(cfg)
    v3 = cfg.get("model_type") == "deepseek_v3"
    out.update(family=Family.DEEPSEEK, moe_intermediate_size=_get(cfg, "moe_intermediate_size"),
               num_experts=_get(cfg, "n_routed_experts"), num_experts_per_tok=_get(cfg, "num_experts_per_tok"),
               n_shared_experts=_get(cfg, "n_shared_experts", 0),
               first_k_dense_replace=_get(cfg, "first_k_dense_replace", 0),
               topk_method=_get(cfg, "topk_method", "noaux_tc" if v3 else "greedy"),
               q_lora_rank=cfg.get("q_lora_rank"), kv_lora_rank=_get(cfg, "kv_lora_rank"),
               qk_nope_head_dim=_get(cfg, "qk_nope_head_dim"), qk_rope_head_dim=_get(cfg, "qk_rope_head_dim"),
               v_head_dim=_get(cfg, "v_head_dim"), num_nextn_predict_layers=_get(cfg, "num_nextn_predict_layers", 0),
               head_dim=None)
    return out


_READERS: dict[str, Callable[[Config], Config]] = {
    "llama": _llama, "mistral": _llama, "qwen2": _qwen2, "qwen3": _qwen3, "qwen3_moe": _qwen3_moe,
    "mixtral": _mixtral, "gemma2": _gemma2, "phi3": _phi3, "gpt2": _gpt2, "opt": _opt, "falcon": _falcon,
    "deepseek_v2": _deepseek, "deepseek_v3": _deepseek,
}
SUPPORTED_MODEL_TYPES = tuple(sorted(_READERS))


def _validation_sentence(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        msg = str(err["msg"]).removeprefix("Value error, ")
        loc = ".".join(str(p) for p in err["loc"])
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def spec_from_hf_config(cfg: dict[str, Any], *, name: str, source: str) -> ModelSpec:
    """A ModelSpec (``published_params`` None) from the parsed ``config.json`` of a supported model_type."""
    model_type = cfg.get("model_type")
    reader = _READERS.get(str(model_type))
    if reader is None:
        raise MemplanError(f"config.json model_type {model_type!r} is not supported; "
                           f"memplan reads {', '.join(SUPPORTED_MODEL_TYPES)}.")
    fields = reader(cfg)
    try:
        return ModelSpec(name=name, source=source, **fields)
    except ValidationError as exc:
        raise MemplanError(f"config.json for {name!r}: {_validation_sentence(exc)}.") from None


def _config_path(path: Path) -> Path:
    try:
        path.stat()
    except FileNotFoundError:
        raise MemplanError(f"config file {path} does not exist.") from None
    except (OSError, ValueError) as exc:  # a name too long, a symlink loop, a file used as a directory
        raise MemplanError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}.") from None
    if path.is_dir():
        found = path / "config.json"
        if not found.is_file():
            raise MemplanError(f"directory {path} has no config.json.")
        return found
    if not path.is_file():  # it exists (stat succeeded): a FIFO, a socket, a device
        raise MemplanError(f"{path} is not a regular file; give a config.json or the directory holding it.")
    return path


def read_config_json(path: Path) -> Config:
    """The JSON object in ``path`` (a config.json or a directory holding one)."""
    file = _config_path(Path(path))
    try:
        cfg = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise MemplanError(f"{file} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MemplanError(f"cannot read {file}: {exc}.") from None
    except ValueError:  # Python's int digit limit (sys.get_int_max_str_digits): a number no config needs
        raise MemplanError(f"{file} holds a number too long to read (thousands of digits); check its fields.") from None
    if not isinstance(cfg, dict):
        raise MemplanError(f"{file} must hold a JSON object of config fields.")
    return cfg


def load_config_file(path: Path, *, name: str | None = None) -> ModelSpec:
    """A ModelSpec from a config.json path or a directory holding one; named after its directory
    (or the file's stem when the file is not called config.json) unless ``name`` is given."""
    file = _config_path(Path(path))
    default = file.parent.resolve().name if file.name == "config.json" else file.stem
    return spec_from_hf_config(read_config_json(file), name=name or default, source=str(file.resolve()))
