"""Parameter tensors built from the catalog: published counts, roles, layer flags, and
exact agreement with transformers' own modules (built on the meta device, no memory)."""

from __future__ import annotations

import re
from typing import Any

import pytest

from memplan.arch.build import build_architecture
from memplan.arch.tensors import PROJECTIONS, Architecture, Role
from memplan.catalog.schema import Family, ModelSpec
from memplan.catalog.store import all_models, catalog_model, model_names
from memplan.errors import MemplanError

REQUIRED = {
    "llama-2-7b", "llama-2-13b", "llama-2-70b", "llama-65b", "llama-3.1-8b", "llama-3.1-70b", "llama-3.1-405b",
    "llama-3.2-1b", "llama-3.2-3b", "mistral-7b", "mixtral-8x7b", "mixtral-8x22b", "qwen2.5-0.5b", "qwen2.5-7b",
    "qwen2.5-14b", "qwen2.5-32b", "qwen2.5-72b", "qwen3-8b", "qwen3-30b-a3b", "gemma-2-2b", "gemma-2-9b",
    "gemma-2-27b", "phi-3-mini", "phi-3-medium", "deepseek-v2-lite", "deepseek-v3", "gpt2", "gpt2-xl", "opt-13b",
    "falcon-7b", "gemma-2b", "gemma-7b", "gemma-3-1b", "pythia-6.9b", "gpt-j-6b", "bloom-7b1", "command-r",
    "zero-7.5b", "t5-3b-params", "gpt2-1.5b-paper",
}
TOLERANCE = 1e-3
MODELS = all_models()
ARCH_MODELS = [m for m in MODELS if m.family is not Family.PARAMS_ONLY]


def test_catalog_holds_the_required_models() -> None:
    names = set(model_names())
    assert names >= REQUIRED, f"missing: {sorted(REQUIRED - names)}"
    assert len(names) >= 30
    assert {m.family for m in MODELS} == set(Family) - NO_CATALOG_ENTRY, "every family needs a catalog entry"


NO_CATALOG_ENTRY = {Family.PHI, Family.QWEN2_MOE, Family.GPT_BIGCODE, Family.STABLELM, Family.OLMO2, Family.GRANITE}
"""Families whose popular checkpoints publish only a rounded count that memplan's exact count misses by more
than TOLERANCE (phi-2 "2.7B" is 2.78B, Qwen1.5-MoE-A2.7B "14.3B" is 14.316B, StarCoder "15.5B" is 15.517B,
StableLM-2-1.6B is 1.645B), or whose published count was not at hand. tests/test_model_types.py checks their
layouts against transformers instead."""


@pytest.mark.parametrize("spec", MODELS, ids=lambda s: s.name)
def test_params_match_published_count(spec: ModelSpec) -> None:
    assert spec.published_params, f"{spec.name} has no published_params"
    arch = build_architecture(spec)
    rel = (arch.params - spec.published_params) / spec.published_params
    message = f"{spec.name}: memplan {arch.params:,} vs published {spec.published_params:,} ({rel:+.4%})"
    assert abs(rel) <= TOLERANCE, message
    assert sum(arch.breakdown().values()) == arch.params


def test_exact_counts_of_well_known_checkpoints() -> None:
    """Counts as the checkpoints report them (nanoGPT / HF model cards), to the parameter."""
    assert build_architecture(catalog_model("llama-2-7b")).params == 6_738_415_616
    assert build_architecture(catalog_model("gpt2")).params == 124_439_808
    assert build_architecture(catalog_model("mixtral-8x7b")).params == 46_702_792_704
    assert build_architecture(catalog_model("llama-3.1-8b")).params == 8_030_261_248


def test_deepseek_v3_main_model_and_mtp_module() -> None:
    """README: 685B on the Hub = 671B main model + 14B multi-token-prediction module."""
    arch = build_architecture(catalog_model("deepseek-v3"))
    mtp = sum(t.numel for t in arch.extra)
    main = arch.params - mtp
    assert abs(main - 671e9) / 671e9 < TOLERANCE, f"main model {main:,}"
    spec, d = arch.spec, arch.spec.hidden_size or 0
    v = spec.vocab_size or 0
    # own embedding and head, enorm + hnorm + shared_head.norm, eh_proj (D x 2D), one MoE block
    assert mtp == 2 * v * d + 3 * d + 2 * d * d + arch.layers[-1].params
    assert all(t.name.startswith("model.layers.61.") for t in arch.extra)
    assert arch.active_params < 40e9  # 37B activated per token (paper abstract)


def test_tied_embeddings_are_counted_once() -> None:
    tied = catalog_model("llama-3.2-1b")
    untied = tied.model_copy(update={"tie_word_embeddings": False})
    a, b = build_architecture(tied), build_architecture(untied)
    assert not any(t.role is Role.LM_HEAD for t in a.all_tensors())
    assert b.params - a.params == (tied.vocab_size or 0) * (tied.hidden_size or 0)


def test_architecture_is_cached() -> None:
    spec = catalog_model("llama-2-7b")
    assert build_architecture(spec) is build_architecture(catalog_model("llama-2-7b"))


def test_params_only_is_one_pseudo_tensor() -> None:
    arch = build_architecture(catalog_model("t5-3b-params"))
    assert [(t.name, t.numel, t.role) for t in arch.all_tensors()] == [("params", 2_851_000_000, Role.LINEAR)]
    assert arch.layers == ()
    assert arch.largest_layer_params == 32_000_000


def test_missing_dimension_is_a_user_error() -> None:
    spec = catalog_model("qwen3-30b-a3b").model_copy(update={"moe_intermediate_size": None})
    with pytest.raises(MemplanError, match="moe_intermediate_size"):
        build_architecture(spec)


def _projections(arch: Architecture) -> dict[str, frozenset[str]]:
    return {t.name: t.projections for t in arch.all_tensors() if t.role is Role.LINEAR}


@pytest.mark.parametrize("name, tensor, expected", [
    ("gpt2", "attn.c_attn.weight", {"q", "k", "v"}),
    ("gpt2", "mlp.c_fc.weight", {"up"}),
    ("phi-3-mini", "mlp.gate_up_proj.weight", {"gate", "up"}),
    ("phi-3-mini", "self_attn.qkv_proj.weight", {"q", "k", "v"}),
    ("falcon-7b", "self_attention.query_key_value.weight", {"q", "k", "v"}),
    ("falcon-7b", "self_attention.dense.weight", {"o"}),
    ("deepseek-v3", "self_attn.q_a_proj.weight", {"q"}),
    ("deepseek-v3", "self_attn.q_b_proj.weight", {"q"}),
    ("deepseek-v3", "self_attn.kv_a_proj_with_mqa.weight", {"k", "v"}),
    ("deepseek-v3", "self_attn.kv_b_proj.weight", {"k", "v"}),
    ("deepseek-v2-lite", "self_attn.q_proj.weight", {"q"}),
    ("mixtral-8x7b", "block_sparse_moe.experts.*.w1.weight", {"gate"}),
    ("mixtral-8x7b", "block_sparse_moe.experts.*.w3.weight", {"up"}),
    ("mixtral-8x7b", "block_sparse_moe.experts.*.w2.weight", {"down"}),
    ("opt-13b", "self_attn.out_proj.weight", {"o"}),
])
def test_fused_modules_name_their_projections(name: str, tensor: str, expected: set[str]) -> None:
    assert _projections(build_architecture(catalog_model(name)))[tensor] == expected


@pytest.mark.parametrize("spec", ARCH_MODELS, ids=lambda s: s.name)
def test_roles_and_projections(spec: ModelSpec) -> None:
    arch = build_architecture(spec)
    covered: set[str] = set()
    for t in arch.all_tensors():
        assert t.projections <= set(PROJECTIONS), t.name
        if t.role is Role.LINEAR:
            assert len(t.shape) == 2, t.name
            covered |= t.projections
        else:
            assert not t.projections, t.name
        if t.name.endswith(".bias") and t.role is not Role.NORM:
            assert t.role in (Role.BIAS, Role.OTHER), t.name
    wanted = {"q", "k", "v", "o", "down"} | ({"up"} if spec.mlp_gated is False else {"gate", "up"})
    assert covered == wanted
    assert sum(t.role is Role.EMBEDDING for t in arch.pre) == 1
    assert sum(t.role is Role.LM_HEAD for t in arch.post) == (0 if spec.tie_word_embeddings else 1)


def test_moe_layers_routers_and_experts() -> None:
    v3 = build_architecture(catalog_model("deepseek-v3"))
    assert [layer.moe for layer in v3.layers[:4]] == [False, False, False, True]
    moe = v3.layers[3]
    assert moe.experts_per_token == 8
    roles = {t.name: t for t in moe.tensors}
    assert roles["mlp.gate.weight"].role is Role.ROUTER
    assert roles["mlp.gate.e_score_correction_bias"].role is Role.OTHER
    assert roles["mlp.experts.*.gate_proj.weight"].copies == 256
    assert roles["mlp.experts.*.gate_proj.weight"].routed
    assert not roles["mlp.shared_experts.gate_proj.weight"].routed
    lite = build_architecture(catalog_model("deepseek-v2-lite"))
    assert not any("e_score_correction_bias" in t.name for t in lite.all_tensors())
    mixtral = build_architecture(catalog_model("mixtral-8x7b"))
    assert all(layer.moe and layer.experts_per_token == 2 for layer in mixtral.layers)
    assert not any(layer.moe for layer in build_architecture(catalog_model("llama-3.1-8b")).layers)


def test_sliding_window_layers() -> None:
    def flags(name: str) -> list[bool]:
        return [layer.sliding for layer in build_architecture(catalog_model(name)).layers]

    assert all(flags("mistral-7b"))
    assert not any(flags("llama-3.1-8b"))
    assert not any(flags("qwen2.5-7b"))
    assert flags("gemma-2-9b")[:4] == [True, False, True, False]
    typed = catalog_model("llama-2-7b").model_copy(update={
        "sliding_window": 1024, "layer_types": ("full_attention", "sliding_attention") * 16})
    assert [layer.sliding for layer in build_architecture(typed).layers][:3] == [False, True, False]


# --- transformers on the meta device --------------------------------------------------------

def _common(spec: ModelSpec) -> dict:
    return {"hidden_size": spec.hidden_size, "intermediate_size": spec.intermediate_size,
            "num_hidden_layers": spec.num_hidden_layers, "num_attention_heads": spec.num_attention_heads,
            "num_key_value_heads": spec.kv_heads, "vocab_size": spec.vocab_size,
            "max_position_embeddings": spec.max_position_embeddings, "tie_word_embeddings": spec.tie_word_embeddings}


def _llama_like(spec: ModelSpec) -> tuple[str, dict]:
    cfg = {**_common(spec), "head_dim": spec.dim_per_head}
    if spec.attention_bias:
        return "qwen2", {**cfg, "use_sliding_window": False}
    if spec.qk_norm:
        return "qwen3", cfg
    if spec.sliding_window:
        return "mistral", {**cfg, "sliding_window": spec.sliding_window}
    return "llama", {**cfg, "mlp_bias": spec.mlp_bias}


def _deepseek(spec: ModelSpec) -> tuple[str, dict]:
    v3 = spec.topk_method == "noaux_tc"
    cfg = {**_common(spec), "moe_intermediate_size": spec.moe_intermediate_size, "n_routed_experts": spec.num_experts,
           "num_experts_per_tok": spec.num_experts_per_tok, "n_shared_experts": spec.n_shared_experts,
           "first_k_dense_replace": spec.first_k_dense_replace, "q_lora_rank": spec.q_lora_rank,
           "kv_lora_rank": spec.kv_lora_rank, "qk_nope_head_dim": spec.qk_nope_head_dim,
           "qk_rope_head_dim": spec.qk_rope_head_dim, "v_head_dim": spec.v_head_dim,
           "n_group": 8 if v3 else 1, "topk_group": 4 if v3 else 1}
    return ("deepseek_v3" if v3 else "deepseek_v2"), cfg


def _hf_config(spec: ModelSpec) -> tuple[str, dict]:
    """An independent inverse of memplan.catalog.hf: the transformers config for a catalog spec."""
    f = spec.family
    if f is Family.LLAMA:
        return _llama_like(spec)
    if f is Family.DEEPSEEK:
        return _deepseek(spec)
    if f is Family.GEMMA2:
        return "gemma2", {**_common(spec), "head_dim": spec.head_dim}
    if f is Family.PHI3:
        return "phi3", _common(spec)
    if f is Family.MIXTRAL:
        return "mixtral", {**_common(spec), "num_local_experts": spec.num_experts,
                           "num_experts_per_tok": spec.num_experts_per_tok}
    if f is Family.QWEN3_MOE:
        return "qwen3_moe", {**_common(spec), "head_dim": spec.head_dim, "num_experts": spec.num_experts,
                             "num_experts_per_tok": spec.num_experts_per_tok,
                             "moe_intermediate_size": spec.moe_intermediate_size}
    if f is Family.GPT2:
        return "gpt2", {"n_embd": spec.hidden_size, "n_layer": spec.num_hidden_layers,
                        "n_head": spec.num_attention_heads, "n_inner": spec.intermediate_size,
                        "n_positions": spec.max_position_embeddings, "vocab_size": spec.vocab_size}
    if f is Family.OPT:
        cfg = {k: v for k, v in _common(spec).items() if k not in ("intermediate_size", "num_key_value_heads")}
        return "opt", {**cfg, "ffn_dim": spec.intermediate_size, "word_embed_proj_dim": spec.hidden_size}
    if f in _NEW_FAMILIES:
        return _NEW_FAMILIES[f](spec)
    assert f is Family.FALCON
    return "falcon", {"hidden_size": spec.hidden_size, "num_hidden_layers": spec.num_hidden_layers,
                      "num_attention_heads": spec.num_attention_heads, "vocab_size": spec.vocab_size,
                      "multi_query": spec.kv_heads == 1, "parallel_attn": True, "new_decoder_architecture": False,
                      "bias": spec.attention_bias, "ffn_hidden_size": spec.intermediate_size}


_NEW_FAMILIES = {
    Family.GEMMA: lambda spec: ("gemma", {**_common(spec), "head_dim": spec.head_dim}),
    Family.GEMMA3: lambda spec: ("gemma3_text", {**_common(spec), "head_dim": spec.head_dim,
                                                 "sliding_window": spec.sliding_window,
                                                 "layer_types": list(spec.layer_types or [])}),
    Family.COHERE: lambda spec: ("cohere", _common(spec)),
    Family.GPT_NEOX: lambda spec: ("gpt_neox", {**_common(spec), "use_parallel_residual": spec.parallel_attn,
                                                "attention_bias": spec.attention_bias}),
    Family.GPTJ: lambda spec: ("gptj", {"n_embd": spec.hidden_size, "n_layer": spec.num_hidden_layers,
                                        "n_head": spec.num_attention_heads, "n_inner": spec.intermediate_size,
                                        "n_positions": spec.max_position_embeddings, "vocab_size": spec.vocab_size}),
    Family.BLOOM: lambda spec: ("bloom", {"hidden_size": spec.hidden_size, "n_layer": spec.num_hidden_layers,
                                          "n_head": spec.num_attention_heads, "vocab_size": spec.vocab_size}),
}
"""Catalog families added in issue 14, as transformers configs (independently of memplan.catalog.hf)."""
_BLOCK_PREFIX = {Family.GPT2: "transformer.h.", Family.FALCON: "transformer.h.", Family.OPT: "model.decoder.layers.",
                 Family.GPTJ: "transformer.h.", Family.BLOOM: "transformer.h.", Family.GPT_NEOX: "gpt_neox.layers."}


def _hf_name(name: str) -> str:
    """memplan's checkpoint names -> transformers >= 5 in-memory names (fused routed experts)."""
    name = name.replace("block_sparse_moe.", "mlp.")
    name = re.sub(r"experts\.\*\.(gate_proj|up_proj|w1|w3)\.weight$", "experts.gate_up_proj", name)
    return re.sub(r"experts\.\*\.(down_proj|w2)\.weight$", "experts.down_proj", name)


def _meta_model(spec: ModelSpec) -> tuple[Any, Any]:
    torch = pytest.importorskip("torch", reason="the meta-device cross-check needs torch (measure extra)")
    transformers = pytest.importorskip("transformers", reason="the meta-device cross-check needs transformers")
    model_type, cfg = _hf_config(spec)
    config = transformers.AutoConfig.for_model(model_type, **cfg)
    with torch.device("meta"):
        return config, transformers.AutoModelForCausalLM.from_config(config)


def _hf_numels(model: Any) -> dict[str, tuple[int, tuple[int, ...]]]:
    """name -> (numel, shape) of every parameter, plus DeepSeek-V3's e_score_correction_bias buffers
    (checkpoint tensors that transformers registers as buffers)."""
    out = {n: (p.numel(), tuple(p.shape)) for n, p in model.named_parameters()}
    buffers = model.named_buffers()
    out.update({n: (b.numel(), tuple(b.shape)) for n, b in buffers if n.endswith("e_score_correction_bias")})
    return out


def _check_layer(spec: ModelSpec, arch: Architecture, hf: dict, index: int) -> None:
    prefix = f"{_BLOCK_PREFIX.get(spec.family, 'model.layers.')}{index}."
    theirs = {n[len(prefix):]: v for n, v in hf.items() if n.startswith(prefix)}
    ours: dict[str, int] = {}
    for t in arch.layers[index].tensors:
        key = _hf_name(t.name)
        ours[key] = ours.get(key, 0) + t.numel
        if key == t.name:  # a one-to-one module: the shape must match too (GPT-2 Conv1D stores (in, out))
            shape = t.shape[::-1] if spec.family is Family.GPT2 and t.role is Role.LINEAR else t.shape
            assert theirs[key][1] == shape, f"{spec.name} layer {index} {key}"
    assert ours == {k: v[0] for k, v in theirs.items()}, f"{spec.name} layer {index}"


@pytest.mark.parametrize("spec", ARCH_MODELS, ids=lambda s: s.name)
def test_matches_transformers_on_meta_device(spec: ModelSpec) -> None:
    config, model = _meta_model(spec)
    hf = _hf_numels(model)
    arch = build_architecture(spec)
    mtp = sum(t.numel for t in arch.extra)  # transformers does not build DeepSeek-V3's MTP module
    assert sum(v[0] for v in hf.values()) == arch.params - mtp, spec.name
    for t in (*arch.pre, *arch.post):
        assert hf[t.name][0] == t.numel, t.name
    first_moe = next((i for i, layer in enumerate(arch.layers) if layer.moe), 0)
    for index in sorted({0, first_moe, len(arch.layers) - 1}):
        _check_layer(spec, arch, hf, index)
    if getattr(config, "layer_types", None):
        assert [layer.sliding for layer in arch.layers] == [t == "sliding_attention" for t in config.layer_types]
