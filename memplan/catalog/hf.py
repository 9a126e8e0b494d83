"""Read a Hugging Face ``config.json`` into a ModelSpec.

Each supported ``model_type`` has a reader that maps its keys (which differ between
families: GPT-2's ``n_embd``, OPT's ``ffn_dim``, Mixtral's ``num_local_experts``) onto
ModelSpec's fields. Defaults for absent keys are those of the matching transformers
``*Config`` class (transformers 5.x ``configuration_*.py``). Layouts memplan cannot count
exactly are refused with a MemplanError rather than estimated.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from memplan.catalog import hf_families
from memplan.catalog.hf_fields import Config, alias, count, decoder, flag, get, refuse
from memplan.catalog.schema import Family, ModelSpec
from memplan.errors import MemplanError


def _qwen_window(cfg: Config, out: Config) -> Config:
    """Qwen2/Qwen3: a window only when ``use_sliding_window``, on layers >= ``max_window_layers``
    (transformers ``Qwen2Config.__init__``)."""
    window = cfg.get("sliding_window") if flag(cfg, "use_sliding_window") else None
    out["sliding_window"] = window
    if window is not None and out["layer_types"] is None:
        first = get(cfg, "max_window_layers", out["num_hidden_layers"])
        out["layer_types"] = tuple("sliding_attention" if i >= first else "full_attention"
                                   for i in range(out["num_hidden_layers"]))
    return out


def _no_o_bias(cfg: Config) -> None:
    if flag(cfg, "attention_bias"):
        raise refuse(cfg, "sets attention_bias: true, which also biases o_proj")


def _llama(cfg: Config) -> Config:
    _no_o_bias(cfg)
    out = decoder(cfg)
    out.update(family=Family.LLAMA, mlp_bias=flag(cfg, "mlp_bias"),
               sliding_window=cfg.get("sliding_window"))
    return out


def _qwen2(cfg: Config) -> Config:
    """Qwen2/2.5 always have q/k/v biases and no o_proj bias (``Qwen2Attention``)."""
    return _qwen_window(cfg, {**decoder(cfg), "family": Family.LLAMA, "attention_bias": True})


def _qwen3(cfg: Config) -> Config:
    _no_o_bias(cfg)
    return _qwen_window(cfg, {**decoder(cfg), "family": Family.LLAMA, "qk_norm": True})


def _qwen3_moe(cfg: Config) -> Config:
    if get(cfg, "decoder_sparse_step", 1) != 1 or cfg.get("mlp_only_layers"):
        raise refuse(cfg, "mixes dense and MoE blocks (decoder_sparse_step / mlp_only_layers)")
    out = _qwen_window(cfg, {**decoder(cfg), "family": Family.QWEN3_MOE, "qk_norm": True})
    out.update(attention_bias=flag(cfg, "attention_bias"), num_experts=get(cfg, "num_experts"),
               num_experts_per_tok=get(cfg, "num_experts_per_tok"),
               moe_intermediate_size=get(cfg, "moe_intermediate_size"))
    return out


def _mixtral(cfg: Config) -> Config:
    return {**decoder(cfg), "family": Family.MIXTRAL, "sliding_window": cfg.get("sliding_window"),
            "num_experts": get(cfg, "num_local_experts"), "num_experts_per_tok": get(cfg, "num_experts_per_tok")}


def _gemma2(cfg: Config) -> Config:
    out = decoder(cfg, tied=True)
    out.update(family=Family.GEMMA2, head_dim=get(cfg, "head_dim", 256),
               hidden_act=get(cfg, "hidden_activation", get(cfg, "hidden_act", "gelu_pytorch_tanh")),
               attention_bias=flag(cfg, "attention_bias"), sliding_window=cfg.get("sliding_window"))
    return out


def _phi3(cfg: Config) -> Config:
    return {**decoder(cfg), "family": Family.PHI3, "sliding_window": cfg.get("sliding_window")}


def _gpt2(cfg: Config) -> Config:
    """GPT-2: Conv1D blocks with biases, learned positions, GELU MLP of ``n_inner`` (default 4D)."""
    hidden = count(cfg, "n_embd")
    return {"family": Family.GPT2, "hidden_size": hidden, "intermediate_size": get(cfg, "n_inner", 4 * hidden),
            "num_hidden_layers": get(cfg, "n_layer"), "num_attention_heads": get(cfg, "n_head"),
            "vocab_size": get(cfg, "vocab_size"), "max_position_embeddings": get(cfg, "n_positions"),
            "tie_word_embeddings": flag(cfg, "tie_word_embeddings", True),
            "hidden_act": get(cfg, "activation_function", "gelu_new"), "mlp_gated": False, "norm": "layernorm",
            "attention_bias": True, "mlp_bias": True}


def _opt(cfg: Config) -> Config:
    hidden = get(cfg, "hidden_size")
    proj = get(cfg, "word_embed_proj_dim", hidden)
    if proj != hidden:
        raise refuse(cfg, f"has word_embed_proj_dim {proj} != hidden_size {hidden} (project_in/out)")
    if not flag(cfg, "do_layer_norm_before", True) or not flag(cfg, "layer_norm_elementwise_affine", True):
        raise refuse(cfg, "uses post-LayerNorm or LayerNorms without weights")
    bias = flag(cfg, "enable_bias", True)
    return {"family": Family.OPT, "hidden_size": hidden, "intermediate_size": get(cfg, "ffn_dim"),
            "num_hidden_layers": get(cfg, "num_hidden_layers"),
            "num_attention_heads": get(cfg, "num_attention_heads"),
            "vocab_size": get(cfg, "vocab_size"), "max_position_embeddings": get(cfg, "max_position_embeddings"),
            "tie_word_embeddings": flag(cfg, "tie_word_embeddings", True),
            "hidden_act": get(cfg, "activation_function", "relu"), "mlp_gated": False, "norm": "layernorm",
            "attention_bias": bias, "mlp_bias": bias}


def _falcon(cfg: Config) -> Config:
    """Falcon (``FalconConfig`` / ``FalconAttention``): parallel attention/MLP unless ``parallel_attn`` is
    false; K = ``num_kv_heads`` in the new decoder architecture (Falcon-40B/180B), else 1 with
    ``multi_query`` (Falcon-7B) or N; two parallel LayerNorms when ``num_ln_in_parallel_attn`` is 2
    (its default in the new architecture); ALiBi instead of rotary when ``alibi``."""
    hidden = count(cfg, "hidden_size")
    heads = alias(cfg, "num_attention_heads", "n_head")
    new = flag(cfg, "new_decoder_architecture")
    multi_query = 1 if flag(cfg, "multi_query", True) else heads
    kv = alias(cfg, "num_kv_heads", "n_head_kv", heads) if new else multi_query
    norms = get(cfg, "num_ln_in_parallel_attn", 2 if new else 1)
    bias = flag(cfg, "bias")
    return {"family": Family.FALCON, "hidden_size": hidden,
            "intermediate_size": get(cfg, "ffn_hidden_size", 4 * hidden),
            "num_hidden_layers": alias(cfg, "num_hidden_layers", "n_layer"), "num_attention_heads": heads,
            "num_key_value_heads": kv, "vocab_size": get(cfg, "vocab_size"),
            "max_position_embeddings": get(cfg, "max_position_embeddings", 2048),
            "tie_word_embeddings": flag(cfg, "tie_word_embeddings", True), "hidden_act": get(cfg, "activation", "gelu"),
            "mlp_gated": False, "norm": "layernorm", "attention_bias": bias, "mlp_bias": bias,
            "parallel_attn": flag(cfg, "parallel_attn", True), "parallel_norms": 2 if norms == 2 else 1,
            "alibi": flag(cfg, "alibi")}


def _qwen2_moe(cfg: Config) -> Config:
    """Qwen1.5/2-MoE (``Qwen2MoeSparseMoeBlock``): q/k/v biases (``qkv_bias``), routed experts and one
    gated shared expert of ``shared_expert_intermediate_size``."""
    if get(cfg, "decoder_sparse_step", 1) != 1 or cfg.get("mlp_only_layers"):
        raise refuse(cfg, "mixes dense and MoE blocks (decoder_sparse_step / mlp_only_layers)")
    out = _qwen_window(cfg, {**decoder(cfg), "family": Family.QWEN2_MOE})
    out.update(attention_bias=flag(cfg, "qkv_bias", True), num_experts=get(cfg, "num_experts", 60),
               num_experts_per_tok=get(cfg, "num_experts_per_tok", 4),
               moe_intermediate_size=get(cfg, "moe_intermediate_size", 1408), n_shared_experts=1,
               shared_expert_intermediate_size=get(cfg, "shared_expert_intermediate_size", 5632))
    return out


def _deepseek(cfg: Config) -> Config:
    """DeepSeek-V2/V3: MLA attention, ``first_k_dense_replace`` dense blocks, then MoE blocks."""
    if get(cfg, "moe_layer_freq", 1) != 1:
        raise refuse(cfg, "sets moe_layer_freq != 1")
    out = decoder(cfg)
    v3 = cfg.get("model_type") == "deepseek_v3"
    out.update(family=Family.DEEPSEEK, moe_intermediate_size=get(cfg, "moe_intermediate_size"),
               num_experts=get(cfg, "n_routed_experts"), num_experts_per_tok=get(cfg, "num_experts_per_tok"),
               n_shared_experts=get(cfg, "n_shared_experts", 0),
               first_k_dense_replace=get(cfg, "first_k_dense_replace", 0),
               topk_method=get(cfg, "topk_method", "noaux_tc" if v3 else "greedy"),
               q_lora_rank=cfg.get("q_lora_rank"), kv_lora_rank=get(cfg, "kv_lora_rank"),
               qk_nope_head_dim=get(cfg, "qk_nope_head_dim"), qk_rope_head_dim=get(cfg, "qk_rope_head_dim"),
               v_head_dim=get(cfg, "v_head_dim"), num_nextn_predict_layers=get(cfg, "num_nextn_predict_layers", 0),
               head_dim=None)
    return out


_READERS: dict[str, Callable[[Config], Config]] = {
    "llama": _llama, "mistral": _llama, "qwen2": _qwen2, "qwen3": _qwen3, "qwen3_moe": _qwen3_moe,
    "mixtral": _mixtral, "gemma2": _gemma2, "phi3": _phi3, "gpt2": _gpt2, "opt": _opt, "falcon": _falcon,
    "deepseek_v2": _deepseek, "deepseek_v3": _deepseek, "qwen2_moe": _qwen2_moe, **hf_families.READERS,
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
    except ValueError:  # int() refuses more than sys.get_int_max_str_digits() digits
        raise MemplanError(f"{file} holds a number with more digits than Python reads "
                           f"({sys.get_int_max_str_digits():,}); config.json sizes are ordinary integers.") from None
    except RecursionError:
        raise MemplanError(f"{file} nests JSON arrays or objects too deeply to read.") from None
    if not isinstance(cfg, dict):
        raise MemplanError(f"{file} must hold a JSON object of config fields.")
    return cfg


def load_config_file(path: Path, *, name: str | None = None) -> ModelSpec:
    """A ModelSpec from a config.json path or a directory holding one; named after its directory
    (or the file's stem when the file is not called config.json) unless ``name`` is given."""
    file = _config_path(Path(path))
    default = file.parent.resolve().name if file.name == "config.json" else file.stem
    return spec_from_hf_config(read_config_json(file), name=name or default, source=str(file.resolve()))
