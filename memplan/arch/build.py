"""Build a model's parameter tensors, with Hugging Face names and shapes, from its ModelSpec.

Names are the keys of the published checkpoints (``model.safetensors.index.json``): ``pre``
tensors carry their full name (``model.embed_tokens.weight``), block tensors a name relative
to the block (``self_attn.q_proj.weight``). Routed experts are one Tensor with
``copies = num_experts`` and the wildcard ``experts.*.``; transformers >= 5 fuses them in
memory into ``mlp.experts.gate_up_proj`` / ``down_proj`` with the same element counts.

Shapes are (out_features, in_features) for every linear weight, as ``nn.Linear`` stores it.
GPT-2's ``Conv1D`` stores (in, out); it is recorded here as (out, in) too, which has the
same element count and lets every consumer read linear shapes one way.
Sources: the ``modeling_*.py`` file of each family in transformers 5.x; DeepSeek-V3's
multi-token-prediction module from its checkpoint (``model.layers.61.*``) and README.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

from memplan.arch import build_families as fam
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
from memplan.arch.tensors import Architecture, Layer, Role, Tensor
from memplan.catalog.schema import Family, ModelSpec

OPT_POSITION_OFFSET = 2
"""OPT's learned position table has ``max_position_embeddings + 2`` rows
(transformers ``OPTLearnedPositionalEmbedding``, offset 2, a fairseq legacy)."""

def _llama_layer(spec: ModelSpec, _: int) -> Tensors:
    """Llama / Mistral / Qwen2 / Qwen3. ``attention_bias`` here means biases on q, k, v only
    (Qwen2's layout); Llama's o_proj bias is rejected by the config reader."""
    d, _, _, f = _dims(spec)
    return [*_attention(spec, qkv_bias=spec.attention_bias, o_bias=False), *_qk_norms(spec),
            *_gated_mlp("mlp", d, f, bias=spec.mlp_bias), *_pre_post_norms(d)]


def _gemma2_layer(spec: ModelSpec, _: int) -> Tensors:
    d, _, _, f = _dims(spec)
    bias = spec.attention_bias
    return [*_attention(spec, qkv_bias=bias, o_bias=bias), *_gated_mlp("mlp", d, f), *_pre_post_norms(d),
            *_norm("pre_feedforward_layernorm", d), *_norm("post_feedforward_layernorm", d)]


def _phi3_layer(spec: ModelSpec, _: int) -> Tensors:
    d, q, kv, f = _dims(spec)
    return [*_weight("self_attn.qkv_proj", q + 2 * kv, d, {"q", "k", "v"}),
            *_weight("self_attn.o_proj", d, q, {"o"}),
            *_weight("mlp.gate_up_proj", 2 * f, d, {"gate", "up"}),
            *_weight("mlp.down_proj", d, f, {"down"}), *_pre_post_norms(d)]


def _mixtral_layer(spec: ModelSpec, _: int) -> Tensors:
    d, _, _, f = _dims(spec)
    experts = _gated_mlp("block_sparse_moe.experts.*", d, f, names=("w1", "w3", "w2"),
                         copies=_need(spec, "num_experts"), routed=True)
    return [*_attention(spec, qkv_bias=False, o_bias=False), *_router("block_sparse_moe", spec), *experts,
            *_pre_post_norms(d)]


def _qwen3_moe_layer(spec: ModelSpec, _: int) -> Tensors:
    d = _dims(spec)[0]
    experts = _gated_mlp("mlp.experts.*", d, _need(spec, "moe_intermediate_size"),
                         copies=_need(spec, "num_experts"), routed=True)
    bias = spec.attention_bias
    return [*_attention(spec, qkv_bias=bias, o_bias=bias), *_qk_norms(spec), *_router("mlp", spec), *experts,
            *_pre_post_norms(d)]


def _mla_attention(spec: ModelSpec) -> Tensors:
    """DeepSeek multi-head latent attention (DeepSeek-V2 paper, Sec. 2.1): low-rank q (when
    ``q_lora_rank`` is set) and a shared compressed kv of ``kv_lora_rank`` plus a rope key."""
    d, n = _dims(spec)[0], _need(spec, "num_attention_heads")
    nope, rope, v = (_need(spec, f) for f in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"))
    kv_rank = _need(spec, "kv_lora_rank")
    if spec.q_lora_rank:
        q = [*_weight("self_attn.q_a_proj", spec.q_lora_rank, d, {"q"}),
             *_norm("self_attn.q_a_layernorm", spec.q_lora_rank),
             *_weight("self_attn.q_b_proj", n * (nope + rope), spec.q_lora_rank, {"q"})]
    else:
        q = _weight("self_attn.q_proj", n * (nope + rope), d, {"q"})
    return [*q, *_weight("self_attn.kv_a_proj_with_mqa", kv_rank + rope, d, {"k", "v"}),
            *_norm("self_attn.kv_a_layernorm", kv_rank),
            *_weight("self_attn.kv_b_proj", n * (nope + v), kv_rank, {"k", "v"}),
            *_weight("self_attn.o_proj", d, n * v, {"o"})]


def _deepseek_moe(spec: ModelSpec) -> Tensors:
    """Router (+ V3's aux-loss-free ``e_score_correction_bias`` when ``topk_method`` is
    ``noaux_tc``), routed experts, and ``n_shared_experts`` fused into one shared MLP."""
    d, f = _dims(spec)[0], _need(spec, "moe_intermediate_size")
    experts = _need(spec, "num_experts")
    out = _router("mlp", spec)
    if spec.topk_method == "noaux_tc":
        out.append(Tensor("mlp.gate.e_score_correction_bias", (experts,), Role.OTHER))
    out += _gated_mlp("mlp.experts.*", d, f, copies=experts, routed=True)
    if spec.n_shared_experts:
        out += _gated_mlp("mlp.shared_experts", d, f * spec.n_shared_experts)
    return out


def _deepseek_layer(spec: ModelSpec, index: int) -> Tensors:
    d, _, _, f = _dims(spec)
    mlp = _gated_mlp("mlp", d, f) if index < spec.first_k_dense_replace else _deepseek_moe(spec)
    return [*_mla_attention(spec), *mlp, *_pre_post_norms(d)]


def _gpt2_layer(spec: ModelSpec, _: int) -> Tensors:
    """GPT-2 block; HF's Conv1D weights are stored (in, out) and recorded here as (out, in)."""
    d = _dims(spec)[0]
    f = spec.intermediate_size or 4 * d
    return [*_norm("ln_1", d, bias=True), *_weight("attn.c_attn", 3 * d, d, {"q", "k", "v"}, bias=True),
            *_weight("attn.c_proj", d, d, {"o"}, bias=True), *_norm("ln_2", d, bias=True),
            *_weight("mlp.c_fc", f, d, {"up"}, bias=True), *_weight("mlp.c_proj", d, f, {"down"}, bias=True)]


def _opt_layer(spec: ModelSpec, _: int) -> Tensors:
    d, _, _, f = _dims(spec)
    bias = spec.attention_bias
    return [*_attention(spec, qkv_bias=bias, o_bias=bias, o_name="out_proj"),
            *_norm("self_attn_layer_norm", d, bias=True),
            *_weight("fc1", f, d, {"up"}, bias=spec.mlp_bias), *_weight("fc2", d, f, {"down"}, bias=spec.mlp_bias),
            *_norm("final_layer_norm", d, bias=True)]


def _falcon_norms(spec: ModelSpec, d: int) -> Tensors:
    """``FalconDecoderLayer``: input/post-attention LayerNorms when sequential; ln_attn and ln_mlp when
    parallel with two norms (``num_ln_in_parallel_attn``, 2 by default in the new decoder architecture);
    else one input LayerNorm."""
    if not spec.parallel_attn:
        return [*_norm("input_layernorm", d, bias=True), *_norm("post_attention_layernorm", d, bias=True)]
    if spec.parallel_norms == 2:
        return [*_norm("ln_attn", d, bias=True), *_norm("ln_mlp", d, bias=True)]
    return _norm("input_layernorm", d, bias=True)


def _falcon_layer(spec: ModelSpec, _: int) -> Tensors:
    """Falcon: fused query_key_value of N + 2K heads (K = 1 multi-query, K = N old multi-head,
    ``num_kv_heads`` in the new decoder architecture), FalconLinear dense and MLP."""
    d, q, kv, f = _dims(spec)
    f = f or 4 * d
    return [*_falcon_norms(spec, d),
            *_weight("self_attention.query_key_value", q + 2 * kv, d, {"q", "k", "v"}, bias=spec.attention_bias),
            *_weight("self_attention.dense", d, q, {"o"}, bias=spec.attention_bias),
            *_weight("mlp.dense_h_to_4h", f, d, {"up"}, bias=spec.mlp_bias),
            *_weight("mlp.dense_4h_to_h", d, f, {"down"}, bias=spec.mlp_bias)]


_LAYERS: dict[Family, Callable[[ModelSpec, int], Tensors]] = {
    Family.LLAMA: _llama_layer, Family.GEMMA2: _gemma2_layer, Family.PHI3: _phi3_layer,
    Family.MIXTRAL: _mixtral_layer, Family.QWEN3_MOE: _qwen3_moe_layer, Family.DEEPSEEK: _deepseek_layer,
    Family.GPT2: _gpt2_layer, Family.OPT: _opt_layer, Family.FALCON: _falcon_layer, **fam.LAYERS,
}

_ENDS: dict[Family, tuple[str, str, bool]] = {
    # (token embedding, final norm module, whether that norm is a LayerNorm with a bias)
    Family.GPT2: ("transformer.wte.weight", "transformer.ln_f", True),
    Family.OPT: ("model.decoder.embed_tokens.weight", "model.decoder.final_layer_norm", True),
    Family.FALCON: ("transformer.word_embeddings.weight", "transformer.ln_f", True),
    **fam.ENDS,
}
_LLAMA_ENDS = ("model.embed_tokens.weight", "model.norm", False)


def _pre_post(spec: ModelSpec) -> tuple[Tensors, Tensors]:
    """Embeddings (and learned positions) before the blocks; final norm and untied lm_head after."""
    embed, norm, bias = _ENDS.get(spec.family, _LLAMA_ENDS)
    d, v = _dims(spec)[0], _need(spec, "vocab_size")
    pre = [Tensor(embed, (v, d), Role.EMBEDDING)]
    if spec.family in fam.LEARNED_POSITIONS:
        pre.append(Tensor(fam.LEARNED_POSITIONS[spec.family], (_need(spec, "max_position_embeddings"), d),
                          Role.POSITION))
    if spec.family is Family.OPT:
        rows = _need(spec, "max_position_embeddings") + OPT_POSITION_OFFSET
        pre.append(Tensor("model.decoder.embed_positions.weight", (rows, d), Role.POSITION))
    if spec.family in fam.EMBEDDING_NORMS:
        pre += _norm(fam.EMBEDDING_NORMS[spec.family], d, bias=True)
    post = _norm(norm, d, bias=bias)
    if not spec.tie_word_embeddings:
        post.append(Tensor("lm_head.weight", (v, d), Role.LM_HEAD))
    if spec.family in fam.LM_HEAD_BIAS:
        post.append(Tensor("lm_head.bias", (v,), Role.BIAS))
    return pre, post


def _sliding(spec: ModelSpec) -> list[bool]:
    """Which blocks use a sliding window: ``layer_types`` when given; else Gemma-2 alternates
    (even layers slide, transformers ``Gemma2Config``); else ``sliding_window`` applies to all
    layers (Mistral v0.1, Phi-3)."""
    count = _need(spec, "num_hidden_layers")
    if spec.layer_types is not None:
        return [kind == "sliding_attention" for kind in spec.layer_types]
    if spec.sliding_window is None:
        return [False] * count
    if spec.family is Family.GEMMA2:
        return [i % 2 == 0 for i in range(count)]
    return [True] * count


def _is_moe_layer(spec: ModelSpec, index: int) -> bool:
    if spec.family is Family.DEEPSEEK:
        return spec.is_moe and index >= spec.first_k_dense_replace
    return spec.family in fam.MOE


def _mtp(spec: ModelSpec) -> Tensors:
    """DeepSeek-V3 multi-token prediction (paper Sec. 2.2): per depth, its own embedding and
    head copies (as stored in the checkpoint), two RMSNorms, a (D, 2D) projection and one MoE
    block, named ``model.layers.{L+j}.*`` as in the checkpoint."""
    out: Tensors = []
    d, v = _dims(spec)[0], _need(spec, "vocab_size")
    last = spec.num_hidden_layers or 0
    for depth in range(spec.num_nextn_predict_layers):
        p = f"model.layers.{last + depth}."
        block = _deepseek_layer(spec, last + depth)
        out += [Tensor(f"{p}embed_tokens.weight", (v, d), Role.EMBEDDING), *_norm(f"{p}enorm", d),
                *_norm(f"{p}hnorm", d), *_weight(f"{p}eh_proj", d, 2 * d, set())]
        out += [Tensor(p + t.name, t.shape, t.role, t.projections, t.copies, t.routed) for t in block]
        out += [*_norm(f"{p}shared_head.norm", d), Tensor(f"{p}shared_head.head.weight", (v, d), Role.LM_HEAD)]
    return out


@lru_cache(maxsize=256)
def build_architecture(spec: ModelSpec) -> Architecture:
    """All parameter tensors of ``spec``, with exact HF names and shapes (see module docstring).

    A params-only spec becomes one LINEAR pseudo-tensor ``params`` of ``published_params``
    elements and no blocks.
    """
    if spec.family is Family.PARAMS_ONLY:
        count = _need(spec, "published_params")
        return Architecture(spec=spec, pre=(Tensor("params", (count,), Role.LINEAR),), layers=(), post=())
    block = _LAYERS[spec.family]
    sliding = _sliding(spec)
    layers = []
    for i in range(_need(spec, "num_hidden_layers")):
        moe = _is_moe_layer(spec, i)
        layers.append(Layer(tensors=tuple(block(spec, i)), moe=moe, sliding=sliding[i],
                            experts_per_token=(spec.num_experts_per_tok or 0) if moe else 0))
    pre, post = _pre_post(spec)
    extra = _mtp(spec) if spec.family is Family.DEEPSEEK else []
    return Architecture(spec=spec, pre=tuple(pre), layers=tuple(layers), post=tuple(post), extra=tuple(extra))
