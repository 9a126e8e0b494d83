"""Parameter tensors of the families added after the first nine: Gemma, Gemma-3, Phi, Qwen2-MoE,
GPT-NeoX, GPT-J, GPT-BigCode, BLOOM, StableLM, OLMo-2, Granite and Cohere.

Names and shapes follow each family's transformers 5.x ``modeling_<family>.py`` (the module
tree of ``*ForCausalLM``); see ``memplan.arch.build`` for the conventions. Which biases a family's
``attention_bias`` switches on is data (``O_BIAS``), not a branch per family.
"""

from __future__ import annotations

from collections.abc import Callable

from memplan.arch.parts import (
    Tensors,
    _attention,
    _dims,
    _gated_mlp,
    _need,
    _norm,
    _pre_post_norms,
    _qk_norms,
    _router,
    _weight,
)
from memplan.arch.tensors import Role, Tensor
from memplan.catalog.schema import Family, ModelSpec

O_BIAS = frozenset({Family.GEMMA, Family.GEMMA3, Family.OLMO2, Family.GRANITE, Family.COHERE})
"""Families whose ``attention_bias`` biases o_proj as well as q, k and v (``nn.Linear(..., bias=
config.attention_bias)`` on all four); StableLM's ``use_qkv_bias`` and Qwen2-MoE's ``qkv_bias`` do not."""


def _llama_like(spec: ModelSpec, _: int) -> Tensors:
    """Gemma (``GemmaDecoderLayer``) and Granite (``GraniteDecoderLayer``): the Llama block."""
    d, _, _, f = _dims(spec)
    bias = spec.attention_bias
    return [*_attention(spec, qkv_bias=bias, o_bias=bias), *_gated_mlp("mlp", d, f, bias=spec.mlp_bias),
            *_pre_post_norms(d)]


def _gemma3_layer(spec: ModelSpec, _: int) -> Tensors:
    """``Gemma3DecoderLayer``: Gemma-2's four norms plus q_norm/k_norm over head_dim."""
    d, _, _, f = _dims(spec)
    bias = spec.attention_bias
    return [*_attention(spec, qkv_bias=bias, o_bias=bias), *_qk_norms(spec), *_gated_mlp("mlp", d, f),
            *_pre_post_norms(d), *_norm("pre_feedforward_layernorm", d), *_norm("post_feedforward_layernorm", d)]


def _olmo2_layer(spec: ModelSpec, _: int) -> Tensors:
    """``Olmo2DecoderLayer``: norms after attention and MLP only; q/k RMSNorms over all heads at once."""
    d, q, kv, f = _dims(spec)
    bias = spec.attention_bias
    return [*_attention(spec, qkv_bias=bias, o_bias=bias), *_norm("self_attn.q_norm", q),
            *_norm("self_attn.k_norm", kv), *_gated_mlp("mlp", d, f), *_norm("post_attention_layernorm", d),
            *_norm("post_feedforward_layernorm", d)]


def _cohere_layer(spec: ModelSpec, _: int) -> Tensors:
    """``CohereDecoderLayer``: one bias-free LayerNorm feeding attention and MLP in parallel;
    ``use_qk_norm`` adds (heads, head_dim) LayerNorm weights for q and k."""
    d, _, _, f = _dims(spec)
    bias, h = spec.attention_bias, spec.dim_per_head
    qk = [Tensor("self_attn.q_norm.weight", (_need(spec, "num_attention_heads"), h), Role.NORM),
          Tensor("self_attn.k_norm.weight", (spec.kv_heads, h), Role.NORM)] if spec.qk_norm else []
    return [*_norm("input_layernorm", d), *_attention(spec, qkv_bias=bias, o_bias=bias), *qk,
            *_gated_mlp("mlp", d, f)]


def _stablelm_layer(spec: ModelSpec, _: int) -> Tensors:
    """``StableLmDecoderLayer``: LayerNorms with biases, no post-attention norm with a parallel residual;
    ``qk_layernorm`` adds one bias-free LayerNorm per head (``StableLmLayerNormPerHead``)."""
    d, _, _, f = _dims(spec)
    h = spec.dim_per_head
    out = [*_norm("input_layernorm", d, bias=True), *_attention(spec, qkv_bias=spec.attention_bias, o_bias=False)]
    if spec.qk_norm:
        out += [Tensor("self_attn.q_layernorm.norms.*.weight", (h,), Role.NORM,
                       copies=_need(spec, "num_attention_heads")),
                Tensor("self_attn.k_layernorm.norms.*.weight", (h,), Role.NORM, copies=spec.kv_heads)]
    out += _gated_mlp("mlp", d, f)
    return out if spec.parallel_attn else [*out, *_norm("post_attention_layernorm", d, bias=True)]


def _phi_layer(spec: ModelSpec, _: int) -> Tensors:
    """``PhiDecoderLayer``: biased q/k/v/dense, one LayerNorm, parallel fc1/fc2 MLP; ``qk_layernorm``
    adds LayerNorms of width hidden/heads."""
    d, _, _, f = _dims(spec)
    per_head = d // _need(spec, "num_attention_heads")
    qk = [*_norm("self_attn.q_layernorm", per_head, bias=True),
          *_norm("self_attn.k_layernorm", per_head, bias=True)] if spec.qk_norm else []
    return [*_attention(spec, qkv_bias=True, o_bias=True, o_name="dense"), *qk,
            *_weight("mlp.fc1", f, d, {"up"}, bias=True), *_weight("mlp.fc2", d, f, {"down"}, bias=True),
            *_norm("input_layernorm", d, bias=True)]


def _qwen2_moe_layer(spec: ModelSpec, _: int) -> Tensors:
    """``Qwen2MoeDecoderLayer``: q/k/v biases, routed experts, a gated shared expert and its sigmoid gate."""
    d = _dims(spec)[0]
    experts = _gated_mlp("mlp.experts.*", d, _need(spec, "moe_intermediate_size"),
                         copies=_need(spec, "num_experts"), routed=True)
    shared = _gated_mlp("mlp.shared_expert", d, _need(spec, "shared_expert_intermediate_size"))
    return [*_attention(spec, qkv_bias=spec.attention_bias, o_bias=False), *_router("mlp", spec), *experts,
            *shared, Tensor("mlp.shared_expert_gate.weight", (1, d), Role.ROUTER), *_pre_post_norms(d)]


def _fused_qkv(spec: ModelSpec, prefix: str, *, bias: bool) -> Tensors:
    """A fused query_key_value (N + 2K heads) and its output projection ``dense``."""
    d, q, kv, _ = _dims(spec)
    return [*_weight(f"{prefix}.query_key_value", q + 2 * kv, d, {"q", "k", "v"}, bias=bias),
            *_weight(f"{prefix}.dense", d, q, {"o"}, bias=bias)]


def _mlp_4h(spec: ModelSpec, prefix: str, up: str, down: str, *, bias: bool = True) -> Tensors:
    d, _, _, f = _dims(spec)
    f = f or 4 * d
    return [*_weight(f"{prefix}.{up}", f, d, {"up"}, bias=bias), *_weight(f"{prefix}.{down}", d, f, {"down"}, bias=bias)]


def _gpt_neox_layer(spec: ModelSpec, _: int) -> Tensors:
    """``GPTNeoXLayer``: two LayerNorms whatever ``use_parallel_residual`` says."""
    d = _dims(spec)[0]
    return [*_norm("input_layernorm", d, bias=True), *_norm("post_attention_layernorm", d, bias=True),
            *_fused_qkv(spec, "attention", bias=spec.attention_bias),
            *_mlp_4h(spec, "mlp", "dense_h_to_4h", "dense_4h_to_h")]


def _gptj_layer(spec: ModelSpec, _: int) -> Tensors:
    """``GPTJBlock``: ln_1 feeds attention (bias-free q/k/v/out_proj) and the MLP in parallel."""
    d = _dims(spec)[0]
    return [*_norm("ln_1", d, bias=True), *_attention(spec, qkv_bias=False, o_bias=False, prefix="attn",
                                                      o_name="out_proj"),
            *_mlp_4h(spec, "mlp", "fc_in", "fc_out")]


def _gpt_bigcode_layer(spec: ModelSpec, _: int) -> Tensors:
    """``GPTBigCodeBlock``: GPT-2's block with nn.Linear; c_attn is D + 2·K·H wide (multi-query: K = 1)."""
    d, q, kv, _ = _dims(spec)
    return [*_norm("ln_1", d, bias=True), *_weight("attn.c_attn", q + 2 * kv, d, {"q", "k", "v"}, bias=True),
            *_weight("attn.c_proj", d, q, {"o"}, bias=True), *_norm("ln_2", d, bias=True),
            *_mlp_4h(spec, "mlp", "c_fc", "c_proj")]


def _bloom_layer(spec: ModelSpec, _: int) -> Tensors:
    """``BloomBlock``: sequential, biased fused query_key_value, a 4·D MLP."""
    d = _dims(spec)[0]
    return [*_norm("input_layernorm", d, bias=True), *_fused_qkv(spec, "self_attention", bias=True),
            *_norm("post_attention_layernorm", d, bias=True), *_mlp_4h(spec, "mlp", "dense_h_to_4h", "dense_4h_to_h")]


LAYERS: dict[Family, Callable[[ModelSpec, int], Tensors]] = {
    Family.GEMMA: _llama_like, Family.GRANITE: _llama_like, Family.GEMMA3: _gemma3_layer,
    Family.OLMO2: _olmo2_layer, Family.COHERE: _cohere_layer, Family.STABLELM: _stablelm_layer,
    Family.PHI: _phi_layer, Family.QWEN2_MOE: _qwen2_moe_layer, Family.GPT_NEOX: _gpt_neox_layer,
    Family.GPTJ: _gptj_layer, Family.GPT_BIGCODE: _gpt_bigcode_layer, Family.BLOOM: _bloom_layer,
}

ENDS: dict[Family, tuple[str, str, bool]] = {
    # (token embedding, final norm module, whether that norm is a LayerNorm with a bias)
    Family.PHI: ("model.embed_tokens.weight", "model.final_layernorm", True),
    Family.STABLELM: ("model.embed_tokens.weight", "model.norm", True),
    Family.GPT_NEOX: ("gpt_neox.embed_in.weight", "gpt_neox.final_layer_norm", True),
    Family.GPTJ: ("transformer.wte.weight", "transformer.ln_f", True),
    Family.GPT_BIGCODE: ("transformer.wte.weight", "transformer.ln_f", True),
    Family.BLOOM: ("transformer.word_embeddings.weight", "transformer.ln_f", True),
}
LEARNED_POSITIONS = {Family.GPT2: "transformer.wpe.weight", Family.GPT_BIGCODE: "transformer.wpe.weight"}
"""Learned position tables of ``max_position_embeddings`` rows (OPT's, with its offset, is separate)."""
EMBEDDING_NORMS = {Family.BLOOM: "transformer.word_embeddings_layernorm"}
"""A LayerNorm right after the token embedding (``BloomModel.word_embeddings_layernorm``)."""
LM_HEAD_BIAS = frozenset({Family.PHI, Family.GPTJ})
"""``lm_head = nn.Linear(D, V)`` with its default bias (``PhiForCausalLM``, ``GPTJForCausalLM``)."""
MOE = frozenset({Family.MIXTRAL, Family.QWEN3_MOE, Family.QWEN2_MOE})
"""Families whose every block routes to experts (DeepSeek's first blocks are dense)."""
