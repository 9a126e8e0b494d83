"""Build the real Hugging Face model that a ModelSpec describes, with random weights.

``hf_config_fields`` maps a ModelSpec back onto a transformers ``model_type`` and its config keys
(the inverse of ``memplan.catalog.hf``); ``hf_config`` makes the config and checks that reading it
back gives the same layout, so the model that runs is the model that is predicted. Nothing is
downloaded: ``AutoModelForCausalLM.from_config`` initializes random weights.

``measured_spec`` is the spec that is actually measured: the first N layers with ``--layers N``,
and without what transformers does not build (DeepSeek-V3's multi-token-prediction layers). It
returns notes saying so; the command prints them. torch, transformers and peft are imported
inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

from memplan.arch.build import build_architecture
from memplan.catalog.hf import spec_from_hf_config
from memplan.catalog.schema import Family, ModelSpec
from memplan.config import JobConfig
from memplan.dtypes import Dtype
from memplan.errors import MemplanError
from memplan.measure import build_families as fam

TOKEN_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
"""Special token ids inside any vocabulary (Phi-3's default pad id 32000 is outside a small one)."""
DROPOUT_P = 0.1
"""Dropout probability used when the job has dropout on (GPT-2's and OPT's published configs)."""
_IGNORED = ("name", "source", "published_params", "largest_layer_params")
TORCH_DTYPES = {Dtype.FP32: "float32", Dtype.BF16: "bfloat16", Dtype.FP16: "float16"}
HF_ATTENTION = {"sdpa": "sdpa", "eager": "eager", "flash": "flash_attention_2"}
_LLAMA_NAMES = {"q": ["q_proj"], "k": ["k_proj"], "v": ["v_proj"], "o": ["o_proj"], "gate": ["gate_proj"],
                "up": ["up_proj"], "down": ["down_proj"]}
LORA_MODULES: dict[Family, dict[str, list[str]]] = {
    Family.LLAMA: _LLAMA_NAMES, Family.GEMMA2: _LLAMA_NAMES, Family.QWEN3_MOE: _LLAMA_NAMES,
    Family.MIXTRAL: {**_LLAMA_NAMES, "gate": ["w1"], "up": ["w3"], "down": ["w2"]},
    Family.PHI3: {"q": ["qkv_proj"], "k": ["qkv_proj"], "v": ["qkv_proj"], "o": ["o_proj"],
                  "gate": ["gate_up_proj"], "up": ["gate_up_proj"], "down": ["down_proj"]},
    Family.GPT2: {"q": ["c_attn"], "k": ["c_attn"], "v": ["c_attn"], "o": ["attn.c_proj"], "up": ["c_fc"],
                  "down": ["mlp.c_proj"]},
    Family.OPT: {"q": ["q_proj"], "k": ["k_proj"], "v": ["v_proj"], "o": ["out_proj"], "up": ["fc1"], "down": ["fc2"]},
    Family.FALCON: {"q": ["query_key_value"], "k": ["query_key_value"], "v": ["query_key_value"],
                    "o": ["self_attention.dense"], "up": ["dense_h_to_4h"], "down": ["dense_4h_to_h"]},
    **fam.LORA_MODULES,
    Family.DEEPSEEK: {"q": ["q_a_proj", "q_b_proj", "q_proj"], "k": ["kv_a_proj_with_mqa", "kv_b_proj"],
                      "v": ["kv_a_proj_with_mqa", "kv_b_proj"], "o": ["o_proj"], "gate": ["gate_proj"],
                      "up": ["up_proj"], "down": ["down_proj"]},
}
"""memplan's abstract projections -> the HF module names peft targets (as in tests/test_measure_peft.py)."""


def _layer_types(spec: ModelSpec) -> list[str]:
    return ["sliding_attention" if layer.sliding else "full_attention" for layer in build_architecture(spec).layers]


def _decoder(spec: ModelSpec) -> dict[str, Any]:
    return {"hidden_size": spec.hidden_size, "intermediate_size": spec.intermediate_size,
            "num_hidden_layers": spec.num_hidden_layers, "num_attention_heads": spec.num_attention_heads,
            "num_key_value_heads": spec.kv_heads, "head_dim": spec.dim_per_head, "vocab_size": spec.vocab_size,
            "max_position_embeddings": spec.max_position_embeddings or 4096,
            "tie_word_embeddings": spec.tie_word_embeddings, "hidden_act": spec.hidden_act, "attention_dropout": 0.0}


def _window(spec: ModelSpec) -> dict[str, Any]:
    types = _layer_types(spec)
    if "sliding_attention" not in types:
        return {"sliding_window": None}
    return {"sliding_window": spec.sliding_window, "layer_types": types}


def _llama_family(spec: ModelSpec) -> tuple[str, dict[str, Any]]:
    """Llama, Mistral, Qwen2/2.5 (q/k/v biases), Qwen3 (q/k norms) share Family.LLAMA."""
    fields = {**_decoder(spec), **_window(spec)}
    if spec.qk_norm:
        return "qwen3", {**fields, "use_sliding_window": fields["sliding_window"] is not None}
    if spec.attention_bias:
        return "qwen2", {**fields, "use_sliding_window": fields["sliding_window"] is not None}
    if fields["sliding_window"] is not None:
        if "full_attention" not in fields["layer_types"]:
            del fields["layer_types"]  # every layer slides: Mistral's own default
        return "mistral", fields
    return "llama", {**fields, "mlp_bias": spec.mlp_bias}


def _deepseek(spec: ModelSpec) -> tuple[str, dict[str, Any]]:
    experts = spec.num_experts or 0
    groups = 8 if experts % 8 == 0 and experts >= 64 else 1  # DeepSeek-V3's 8 groups where they divide
    fields = {**_decoder(spec), "moe_intermediate_size": spec.moe_intermediate_size,
              "n_routed_experts": spec.num_experts, "num_experts_per_tok": spec.num_experts_per_tok,
              "n_shared_experts": spec.n_shared_experts, "first_k_dense_replace": spec.first_k_dense_replace,
              "q_lora_rank": spec.q_lora_rank, "kv_lora_rank": spec.kv_lora_rank,
              "qk_nope_head_dim": spec.qk_nope_head_dim, "qk_rope_head_dim": spec.qk_rope_head_dim,
              "v_head_dim": spec.v_head_dim, "n_group": groups, "topk_group": min(groups, 4),
              "num_nextn_predict_layers": spec.num_nextn_predict_layers}
    fields.pop("head_dim")  # transformers derives it from qk_rope_head_dim
    if spec.topk_method == "noaux_tc":
        return "deepseek_v3", fields
    return "deepseek_v2", {**fields, "topk_method": spec.topk_method or "greedy"}


def _gpt2(spec: ModelSpec, p: float) -> tuple[str, dict[str, Any]]:
    return "gpt2", {"n_embd": spec.hidden_size, "n_layer": spec.num_hidden_layers, "n_head": spec.num_attention_heads,
                    "n_inner": spec.intermediate_size, "vocab_size": spec.vocab_size,
                    "n_positions": spec.max_position_embeddings or 1024, "tie_word_embeddings": spec.tie_word_embeddings,
                    "activation_function": spec.hidden_act, "resid_pdrop": p, "embd_pdrop": p, "attn_pdrop": p}


def _opt(spec: ModelSpec, p: float) -> tuple[str, dict[str, Any]]:
    return "opt", {"hidden_size": spec.hidden_size, "ffn_dim": spec.intermediate_size,
                   "num_hidden_layers": spec.num_hidden_layers, "num_attention_heads": spec.num_attention_heads,
                   "vocab_size": spec.vocab_size, "max_position_embeddings": spec.max_position_embeddings or 2048,
                   "word_embed_proj_dim": spec.hidden_size, "tie_word_embeddings": spec.tie_word_embeddings,
                   "activation_function": spec.hidden_act, "enable_bias": spec.attention_bias, "dropout": p,
                   "attention_dropout": p, "do_layer_norm_before": True}


def hf_config_fields(spec: ModelSpec, *, dropout: bool = False) -> tuple[str, dict[str, Any]]:
    """(model_type, config.json fields) of the transformers model with ``spec``'s layout.

    ``dropout``: GPT-2's and OPT's dropout probabilities are 0.1 when on, 0 when off (memplan's
    ``JobConfig.dropout``); the other families have no dropout in training by default.
    """
    p = DROPOUT_P if dropout else 0.0
    family = spec.family
    if family is Family.LLAMA:
        model_type, fields = _llama_family(spec)
    elif family is Family.GEMMA2:
        model_type, fields = "gemma2", {**_decoder(spec), "hidden_activation": spec.hidden_act,
                                        "attention_bias": spec.attention_bias, **_window(spec)}
    elif family is Family.PHI3:
        model_type, fields = "phi3", {**_decoder(spec), **_window(spec)}
    elif family is Family.MIXTRAL:
        model_type, fields = "mixtral", {**_decoder(spec), **_window(spec), "num_local_experts": spec.num_experts,
                                         "num_experts_per_tok": spec.num_experts_per_tok}
    elif family is Family.QWEN3_MOE:
        model_type, fields = "qwen3_moe", {**_decoder(spec), **_window(spec), "num_experts": spec.num_experts,
                                           "num_experts_per_tok": spec.num_experts_per_tok,
                                           "moe_intermediate_size": spec.moe_intermediate_size,
                                           "attention_bias": spec.attention_bias, "decoder_sparse_step": 1,
                                           "mlp_only_layers": [], "norm_topk_prob": True,
                                           "use_sliding_window": spec.sliding_window is not None}
    elif family is Family.DEEPSEEK:
        model_type, fields = _deepseek(spec)
    elif family is Family.GPT2:
        model_type, fields = _gpt2(spec, p)
    elif family is Family.OPT:
        model_type, fields = _opt(spec, p)
    elif family in fam.FIELDS:
        model_type, fields = fam.FIELDS[family](spec, p)
    else:
        raise MemplanError(f"{spec.name} is known only by its parameter count; measure needs the model's layout.")
    return model_type, {**fields, **TOKEN_IDS}


def _normalized(spec: ModelSpec) -> dict[str, Any]:
    """Spec fields that decide memory, with layer_types spelled out (None means a family default)."""
    data = spec.model_dump()
    for key in _IGNORED:
        data.pop(key)
    types = _layer_types(spec)
    data["layer_types"] = tuple(types)
    if not spec.is_mla:
        data["head_dim"] = spec.dim_per_head
    if "sliding_attention" not in types:
        data["sliding_window"] = None
    return data


def read_back(config: Any, name: str) -> ModelSpec:
    """memplan's spec of a transformers config object (Qwen3-MoE's expert count under its 5.x name)."""
    data = config.to_dict()
    if "num_local_experts" in data:
        data.setdefault("num_experts", data["num_local_experts"])
    return spec_from_hf_config(data, name=name, source="built")


def hf_config(spec: ModelSpec, *, dropout: bool = False) -> Any:
    """The transformers config of ``spec``; a MemplanError when it does not read back as the same layout."""
    import transformers

    model_type, fields = hf_config_fields(spec, dropout=dropout)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = transformers.AutoConfig.for_model(model_type, **fields)
    built, wanted = _normalized(read_back(config, spec.name)), _normalized(spec)
    differ = sorted(k for k in wanted if built.get(k) != wanted[k])
    if differ:
        detail = ", ".join(f"{k}: {wanted[k]!r} -> {built.get(k)!r}" for k in differ)
        raise MemplanError(f"cannot build a transformers {model_type} model with the layout of {spec.name} ({detail}).")
    return config


def measured_spec(spec: ModelSpec, layers: int | None) -> tuple[ModelSpec, list[str]]:
    """The spec that is built and measured, and notes on how it differs from ``spec``.

    ``layers``: keep the first N blocks (their layer types too); None keeps them all.
    DeepSeek-V3's multi-token-prediction layers are dropped: transformers does not build them.
    """
    if spec.family is Family.PARAMS_ONLY:
        raise MemplanError(f"{spec.name} is known only by its parameter count; measure needs the model's layout.")
    total = spec.num_hidden_layers or 0
    update: dict[str, Any] = {}
    notes: list[str] = []
    if layers is not None:
        if not 1 <= layers <= total:
            raise MemplanError(f"--layers must be between 1 and the model's {total} layers, got {layers}.")
        if layers < total:
            types = _layer_types(spec)[:layers]
            update.update(num_hidden_layers=layers, published_params=None, name=f"{spec.name}[:{layers}]",
                          layer_types=tuple(types) if "sliding_attention" in types else None,
                          sliding_window=spec.sliding_window if "sliding_attention" in types else None)
            notes.append(f"truncated: the first {layers} of {total} layers are built, measured and predicted")
    if spec.num_nextn_predict_layers:
        update["num_nextn_predict_layers"] = 0
        notes.append(f"without {spec.num_nextn_predict_layers} multi-token-prediction layer(s): transformers "
                     "does not build them")
    return (spec.model_copy(update=update) if update else spec), notes


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' warnings and info logs silenced (restored after): measure prints its own notes."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.set_verbosity(level)


def build_model(spec: ModelSpec, cfg: JobConfig, *, attention: str, device: str, seed: int = 0) -> Any:
    """``AutoModelForCausalLM.from_config`` of ``spec`` in ``cfg.dtype`` on ``device``, random weights."""
    import torch
    import transformers

    config = hf_config(spec, dropout=cfg.dropout)
    torch.manual_seed(seed)
    dtype = getattr(torch, TORCH_DTYPES[cfg.dtype])
    with warnings.catch_warnings(), torch.device(device):
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=HF_ATTENTION[attention],
                                                              dtype=dtype)
    return model.to(device)


def lora_modules(spec: ModelSpec, targets: tuple[str, ...]) -> str | list[str]:
    """peft ``target_modules`` for memplan's abstract LoRA targets on ``spec``'s family."""
    if targets == ("all-linear",):
        return "all-linear"
    names = LORA_MODULES.get(spec.family, _LLAMA_NAMES)
    return sorted({name for target in targets for name in names.get(target, [])})


def checkpoint_layers(model: Any, count: int | None) -> int:
    """HF activation checkpointing on the first ``count`` decoder layers (None: all); returns how many.

    memplan's ``recompute_layers = k`` checkpoints the first k layers; HF's ``every_n_layers`` would
    pick others, so the flag is cleared on the layers after the k-th.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.gradient_checkpointing_enable()
    blocks = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    keep = len(blocks) if count is None else min(count, len(blocks))
    for block in blocks[keep:]:
        block.gradient_checkpointing = False
    return keep
