"""The model types added in issue 14 (Gemma, Gemma-3, Phi, Qwen2-MoE, GPT-NeoX, GPT-J, GPT-BigCode,
BLOOM, Falcon's layouts, StableLM, OLMo-2, Granite, Cohere) against transformers' own modules.

Each case is a tiny ``config.json``-style dict keeping a layout variant of the family (grouped
queries, biases, q/k norms, parallel residuals, multi-query, Falcon's new decoder architecture).
transformers builds the model on the meta device (no memory, no download); memplan reads the same
dict and must produce the same tensors: the same total, and per tensor name the same element count
(routed experts fused by transformers 5 are compared per fused module).
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from memplan.arch.build import build_architecture
from memplan.catalog.hf import spec_from_hf_config
from memplan.catalog.schema import Family

_D = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
      "vocab_size": 128, "max_position_embeddings": 64}
_GQA = {**_D, "num_key_value_heads": 2}
CASES: dict[str, dict[str, Any]] = {
    "gemma": {"model_type": "gemma", **_GQA, "head_dim": 32},
    "gemma-bias-untied": {"model_type": "gemma", **_D, "num_key_value_heads": 4, "attention_bias": True,
                          "tie_word_embeddings": False},
    "gemma-legacy-gelu": {"model_type": "gemma", **_D, "num_key_value_heads": 1, "hidden_act": "gelu"},
    "gemma3_text": {"model_type": "gemma3_text", **_GQA, "num_hidden_layers": 7, "head_dim": 32,
                    "sliding_window": 16},
    "phi": {"model_type": "phi", **_D},
    "phi-qk-gqa": {"model_type": "phi", **_GQA, "qk_layernorm": True, "tie_word_embeddings": True},
    "qwen2_moe": {"model_type": "qwen2_moe", **_GQA, "num_experts": 4, "num_experts_per_tok": 2,
                  "moe_intermediate_size": 32, "shared_expert_intermediate_size": 48},
    "gpt_neox": {"model_type": "gpt_neox", **_D},
    "gpt_neox-sequential": {"model_type": "gpt_neox", **_D, "use_parallel_residual": False,
                            "attention_bias": False, "tie_word_embeddings": True},
    "gptj": {"model_type": "gptj", "n_embd": 64, "n_layer": 2, "n_head": 4, "rotary_dim": 8, "vocab_size": 128,
             "n_positions": 64},
    "gpt_bigcode": {"model_type": "gpt_bigcode", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 128,
                    "n_positions": 64, "n_inner": 96},
    "gpt_bigcode-mha": {"model_type": "gpt_bigcode", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 128,
                        "n_positions": 64, "multi_query": False, "tie_word_embeddings": False},
    "bloom": {"model_type": "bloom", "hidden_size": 64, "n_layer": 2, "n_head": 4, "vocab_size": 128},
    "falcon-new": {"model_type": "falcon", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 8,
                   "num_kv_heads": 2, "new_decoder_architecture": True, "vocab_size": 128, "ffn_hidden_size": 96},
    "falcon-new-one-ln": {"model_type": "falcon", "hidden_size": 64, "num_hidden_layers": 2,
                          "num_attention_heads": 8, "num_kv_heads": 2, "new_decoder_architecture": True,
                          "num_ln_in_parallel_attn": 1, "vocab_size": 128, "bias": True},
    "falcon-rw-mha-alibi": {"model_type": "falcon", "hidden_size": 64, "num_hidden_layers": 2,
                            "num_attention_heads": 4, "multi_query": False, "parallel_attn": False, "alibi": True,
                            "bias": True, "vocab_size": 128, "tie_word_embeddings": False},
    "stablelm": {"model_type": "stablelm", **_D, "num_key_value_heads": 4},
    "stablelm-qk-parallel": {"model_type": "stablelm", **_GQA, "use_qkv_bias": True, "qk_layernorm": True,
                             "use_parallel_residual": True},
    "olmo2": {"model_type": "olmo2", **_D},
    "olmo2-gqa-bias": {"model_type": "olmo2", **_GQA, "attention_bias": True},
    "granite": {"model_type": "granite", **_GQA, "attention_bias": True, "mlp_bias": True,
                "embedding_multiplier": 12.0, "residual_multiplier": 0.22, "logits_scaling": 8.0},
    "cohere": {"model_type": "cohere", **_D},
    "cohere-qk-gqa": {"model_type": "cohere", **_GQA, "use_qk_norm": True, "attention_bias": True},
}
NEW_TYPES = {"gemma", "gemma3_text", "phi", "qwen2_moe", "gpt_neox", "gptj", "gpt_bigcode", "bloom", "falcon",
             "stablelm", "olmo2", "granite", "cohere"}


def _transformers() -> tuple[Any, Any]:
    torch = pytest.importorskip("torch", reason="the meta-device cross-check needs torch (measure extra)")
    transformers = pytest.importorskip("transformers", reason="the meta-device cross-check needs transformers")
    return torch, transformers


def hf_config(case: str) -> Any:
    _, transformers = _transformers()
    fields = dict(CASES[case])
    return transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)


_BLOCK = re.compile(r"^(?:model\.layers|gpt_neox\.layers|transformer\.h)\.\d+\.")


def _theirs(model: Any) -> dict[str, int]:
    """Element counts by name, block index replaced by ``L.`` and per-head module indices by ``*``."""
    out: dict[str, int] = {}
    for name, p in model.named_parameters():
        key = re.sub(r"\.norms\.\d+\.", ".norms.*.", _BLOCK.sub("L.", name))
        out[key] = out.get(key, 0) + p.numel()
    return out


def _ours(arch: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    tensors = [(t.name, t) for t in (*arch.pre, *arch.post)]
    tensors += [(f"L.{t.name}", t) for layer in arch.layers for t in layer.tensors]
    for name, t in tensors:
        name = re.sub(r"experts\.\*\.(gate_proj|up_proj)\.weight$", "experts.gate_up_proj", name)
        name = re.sub(r"experts\.\*\.down_proj\.weight$", "experts.down_proj", name)
        out[name] = out.get(name, 0) + t.numel
    return out


def _layout(spec: Any) -> dict[str, Any]:
    """The spec's fields, ``layer_types`` of only full layers written as None (the same layout)."""
    data = spec.model_dump()
    if data["layer_types"] and "sliding_attention" not in data["layer_types"]:
        data["layer_types"] = None
    return data


def test_every_new_model_type_has_a_case() -> None:
    assert {c["model_type"] for c in CASES.values()} == NEW_TYPES


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # GPT-BigCode's import
@pytest.mark.parametrize("case", list(CASES))
def test_matches_transformers_on_meta_device(case: str) -> None:
    torch, transformers = _transformers()
    config = hf_config(case)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    spec = spec_from_hf_config(CASES[case], name=case, source="test")
    saved = spec_from_hf_config(config.to_dict(), name=case, source="test")  # as save_pretrained writes it
    assert _layout(saved) == _layout(spec)
    arch = build_architecture(spec)
    assert arch.params == sum(p.numel() for p in model.parameters()), case
    assert _ours(arch) == _theirs(model), case
    shapes = {_BLOCK.sub("L.", n): tuple(p.shape) for n, p in model.named_parameters()}
    for t in arch.layers[0].tensors:  # one-to-one tensors: the (out, in) shape too
        if f"L.{t.name}" in shapes and t.copies == 1:
            assert shapes[f"L.{t.name}"] == t.shape, f"{case}: {t.name}"
    if getattr(config, "layer_types", None):
        assert [layer.sliding for layer in arch.layers] == [t == "sliding_attention" for t in config.layer_types]


def test_gemma3_multimodal_config_reads_its_text_part() -> None:
    text = {k: v for k, v in CASES["gemma3_text"].items() if k != "model_type"}
    wrapped = spec_from_hf_config({"model_type": "gemma3", "text_config": text}, name="g", source="test")
    assert wrapped == spec_from_hf_config(CASES["gemma3_text"], name="g", source="test")
    assert wrapped.family is Family.GEMMA3
    assert [layer.sliding for layer in build_architecture(wrapped).layers] == [True] * 5 + [False, True]
