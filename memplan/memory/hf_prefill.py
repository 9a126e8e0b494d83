"""Transient tensors of one transformers (HF ``generate``) prefill forward that a serving engine does not hold.

Read in transformers 5.x ``modeling_<family>.py`` (the installed 5.20 was read). A Hugging Face model's
forward keeps more alive than the two residual tensors a fused engine keeps:

- the model's forward keeps ``inputs_embeds`` referenced through the whole layer loop (``LlamaModel.forward``:
  ``hidden_states = inputs_embeds``), and GPT-2/GPTBigCode keep the absolute position embeddings too;
- some blocks keep the attention output as a local while the MLP runs (``GPT2Block``: ``attn_output``);
- Python activations (``NewGELUActivation``, ``BloomGelu``) hold several F-wide temporaries;
- the experts run as ``grouped_mm`` over permuted copies of the tokens (``integrations/moe.py``);
- eager blocks keep their attention probabilities while the MLP runs, and GPT-J, BLOOM and Falcon's model loops keep
  the previous block's;
- the masks the model builds live through the whole loop (``hf_masks``).

Widths are bits of the compute dtype; B batch, T new tokens, S attended keys, D hidden, F ffn, N/K heads.
Assumption: the MLP stage of the last layer of a stage binds for the residual stream (every layer's input is the
previous layer's output, and ``inputs_embeds`` is a different tensor from the second layer on).
"""

from __future__ import annotations

from memplan.catalog.schema import Family, ModelSpec
from memplan.units import bits_to_bytes

FP32_BITS = 32
BOOL_BITS = 8
INDEX_BITS = 64
STREAM_TENSORS = 1
"""The layer's input, held by the model's loop (``LlamaModel.forward``); it is the attention stage's residual."""
ABSOLUTE_POSITIONS = frozenset({Family.GPT2, Family.GPT_BIGCODE})
"""``wpe(position_ids)`` is kept next to ``inputs_embeds`` (``GPT2Model.forward``: ``position_embeds``), 1·T·D."""
KEEPS_ATTN_OUTPUT = frozenset({Family.GPT2, Family.GPT_BIGCODE, Family.PHI, Family.FALCON, Family.STABLELM,
                               Family.GPTJ, Family.GPT_NEOX, Family.COHERE})
"""Blocks whose attention output is a local still referenced while the MLP runs (``GPT2Block``: ``attn_output``;
parallel blocks ``PhiDecoderLayer``/``FalconDecoderLayer``/``GPTJBlock``/``GPTNeoXLayer``/``CohereDecoderLayer``
add it after the MLP; ``StableLmDecoderLayer``: ``self_attn_output``)."""
KEEPS_PREVIOUS_PROBS = frozenset({Family.GPTJ, Family.BLOOM, Family.FALCON})
"""Models whose loop keeps a block's whole output tuple, attention probabilities included, until the next block
returns (``GPTJModel`` / ``BloomModel`` / ``FalconModel``: ``outputs = block(...)``; ``hidden_states = outputs[0]``).
Every eager block also keeps its own probabilities while its MLP runs (``hidden_states, _ = self.self_attn(...)``
binds them to ``_``)."""
SOFTMAX_IN_DTYPE = frozenset({Family.GPT2, Family.FALCON})
"""Eager softmax in the compute dtype (``GPT2Attention``/``FalconAttention``: ``softmax(scores, dim=-1)``); the other
families pass ``dtype=torch.float32`` (``eager_attention_forward``)."""
ACT_EXTRA_TEMPORARIES = {"gelu_new": 2, "gelu_fast": 2, "bloom_gelu": 3}
"""F-wide temporaries of a Python activation beyond its input and output, at its peak:
``NewGELUActivation`` 0.5·x, x³, 0.044715·x³ alive together (transformers ``activations.py``);
``bloom_gelu_forward`` x·0.5, 0.79788456·x, x·x products (``modeling_bloom.py``). ATen activations (silu, gelu,
gelu with tanh) write one output."""
SCORES_KEPT = frozenset({Family.BLOOM})
"""``BloomAttention.forward``: ``attention_scores = alibi.baddbmm(...)`` stays referenced while the masked copy and
the softmax exist (one more (B, N, T, S) tensor), and q, k, v are views of ``query_key_value``'s output (3·N·H
per token, where the generic count has N·H)."""
FUSED_QKV_KEPT = frozenset({Family.GPT_NEOX})
"""q, k and v are views of ``query_key_value``'s output, which stays alive whole (``GPTNeoXAttention.forward``)."""
FUSED_QKV_BESIDE_Q = frozenset({Family.FALCON})
"""``FalconAttention.forward``: ``fused_qkv`` stays a local through the attention while ``query_layer`` is a
reshaped (then rotated) copy of its q part; ``FalconDecoderLayer.forward`` computes ``ln_attn`` and ``ln_mlp``
before the attention when ``num_ln_in_parallel_attn == 2``."""
UPCAST_QK = frozenset({Family.GPTJ})
"""``GPTJAttention._attn``: ``query.to(torch.float32)``, ``key.to(torch.float32)`` before ``q @ k.T``."""
ROPE_FP32 = frozenset({Family.COHERE})
"""``modeling_cohere.apply_rotary_pos_emb``: ``q.float()``, ``k.float()`` and the interleaved ``rotate_half``
(``torch.stack([-x2, x1])``), all fp32."""


def stream_bytes(*, batch: int, tokens: int, hidden: int, bits: int, first_stage: bool, layers: int,
                 family: Family) -> int:
    """Bytes of hidden-wide tensors alive across a whole layer: (1 + e)·B·T·D + p·T·D, × bits/8.

    The layer's input (the attention's residual), e = 1 when ``inputs_embeds`` is a separate tensor (first stage,
    two or more layers), p = 1 for GPT-2's absolute position embeddings (batch 1, broadcast).
    Source: ``LlamaModel.forward`` / ``GPT2Model.forward``. The MLP stage's residual is ``mlp_residual_bytes``.
    """
    embeds = 1 if first_stage and layers > 1 else 0
    positions = tokens * hidden if first_stage and family in ABSOLUTE_POSITIONS else 0
    return bits_to_bytes((STREAM_TENSORS + embeds) * batch * tokens * hidden + positions, bits)


NO_ROTARY = frozenset({Family.GPT2, Family.GPT_BIGCODE, Family.BLOOM, Family.GPTJ})
"""Models whose forward computes no rotary table for all layers (absolute positions, ALiBi; GPT-J gathers its sin/cos
per layer from a buffer, ``GPTJAttention._get_embed_positions``)."""


def rotary_tables_bytes(*, batch: int, tokens: int, rotary_dims: int, tables: int, bits: int) -> int:
    """Bytes of the rotary cos and sin the model's forward keeps for all layers: 2·t·B·T·R × bits/8.

    ``LlamaModel.forward``: ``position_embeddings = self.rotary_emb(hidden_states, position_ids)`` (cos and sin
    in the compute dtype, R = the rotated dims per head); t = 2 in Gemma-3 with sliding and full layers (one
    table per layer type, ``Gemma3TextModel.forward``). Assumption: position ids of shape (B, T), as ``generate``
    derives them from the attention mask (a bare forward broadcasts (1, T)).
    """
    return bits_to_bytes(2 * tables * batch * tokens * rotary_dims, bits)


def mlp_residual_bytes(*, batch: int, tokens: int, hidden: int, bits: int, parallel: bool) -> int:
    """Bytes of the residual the MLP stage adds to: B·T·D × bits/8, a new tensor (``LlamaDecoderLayer.forward``:
    ``hidden_states = residual + hidden_states``; ``residual = hidden_states``) next to the layer's input.
    0 in a parallel block, whose MLP reads the layer's own input (``PhiDecoderLayer``, ``GPTNeoXLayer``)."""
    return 0 if parallel else bits_to_bytes(batch * tokens * hidden, bits)


KEEPS_NORMED_INPUT = frozenset({Family.STABLELM})
"""Sequential blocks whose ``input_layernorm`` output stays a local through the MLP: ``StableLmDecoderLayer.forward``
binds it to ``hidden_states`` and the attention's output to ``self_attn_output``, and does not rebind
``hidden_states`` before the MLP (``use_parallel_residual`` False; a parallel block's MLP reads it anyway)."""


def kept_normed_input_bytes(*, batch: int, tokens: int, hidden: int, bits: int, family: Family,
                            parallel: bool) -> int:
    """Bytes of the attention's normed input a ``KEEPS_NORMED_INPUT`` block keeps while its MLP runs: B·T·D × bits/8
    (0 in a parallel block, whose MLP input the generic count already holds). Source: transformers 5.20
    ``StableLmDecoderLayer.forward``; measured: a second ``native_layer_norm`` output alive at the MLP's peak."""
    return 0 if parallel or family not in KEEPS_NORMED_INPUT else bits_to_bytes(batch * tokens * hidden, bits)


def activation_extra(hidden_act: str) -> int:
    """F-wide temporaries an activation holds beyond input and output (``ACT_EXTRA_TEMPORARIES``), 0 for ATen ones."""
    return ACT_EXTRA_TEMPORARIES.get(hidden_act, 0)


def kept_attn_output_bytes(*, batch: int, tokens: int, hidden: int, bits: int, family: Family,
                           parallel_norms: int = 1) -> int:
    """Bytes a block keeps from its attention while its MLP runs: (o + n − 1)·B·T·D × bits/8, o = 1 for the attention
    output (``KEEPS_ATTN_OUTPUT``), n the parallel block's norms (``FalconDecoderLayer``: ``attention_layernorm_out``
    and ``mlp_layernorm_out`` are both locals)."""
    count = int(family in KEEPS_ATTN_OUTPUT) + max(0, parallel_norms - 1)
    return bits_to_bytes(count * batch * tokens * hidden, bits)


def fused_qkv_beside_q_bytes(*, batch: int, tokens: int, heads: int, kv_heads: int, head_dim: int, hidden: int,
                             bits: int, family: Family, parallel_norms: int) -> int:
    """Bytes ``FUSED_QKV_BESIDE_Q`` adds at the attention's kernel: B·T·(F + (n − 1)·D) × bits/8.

    The fused projection, (N + 2K)·H per token, stays alive beside its reshaped (then rotated) q; the rotated k and
    the reshaped v are freed once the cache has concatenated them. Neither generic count holds the new k and v (eager's,
    nor SDPA's without ``new_kv``), so F = (N + 2K)·H. The second norm's output (n = 2, ``mlp_layernorm_out``) exists
    before the attention runs.
    Source: transformers ``FalconAttention.forward`` (``fused_qkv``, ``_split_heads``), ``FalconDecoderLayer.forward``.
    """
    if family not in FUSED_QKV_BESIDE_Q:
        return 0
    fused = (heads + 2 * kv_heads) * head_dim
    return bits_to_bytes(batch * tokens * (fused + (parallel_norms - 1) * hidden), bits)


def kept_probs_bytes(*, batch: int, heads: int, tokens: int, kv_tokens: int, bits: int, family: Family,
                     own: bool) -> int:
    """Bytes of eager attention probabilities kept alive: c·B·N·T·S × bits/8, c = 1 for the previous block's in the
    models of ``KEEPS_PREVIOUS_PROBS``, + 1 in the MLP stage (``own``) for the running block's.
    Source: ``LlamaDecoderLayer.forward`` (``hidden_states, _ = self.self_attn(...)``), ``FalconModel.forward``."""
    count = int(family in KEEPS_PREVIOUS_PROBS) + int(own)
    return bits_to_bytes(count * batch * heads * tokens * kv_tokens, bits)


def grouped_moe_bytes(*, batch: int, tokens: int, experts: int, experts_per_token: int, expert_ffn: int,
                      hidden: int, bits: int) -> int:
    """Peak bytes of transformers' ``grouped_mm`` experts over M = B·T tokens, k experts each.

    Formula: M·(D + k·max(D + 4·F_e, 4·D)) × bits/8 + M·E × (bits + 32)/8 + M·k × 4·64/8.
    The block's normed input (M·D) and the permuted tokens (M·k·D) live throughout; the gate_up stage adds
    gate_up (2F_e), act(gate) and the product (F_e each); the down stage adds its output, the routing-weighted
    copy and the unpermuted copy (D each).
    The router logits and their fp32 softmax are M·E; top-k indices and the sort's values and indices int64.
    Source: transformers ``integrations/moe.py`` ``grouped_mm_experts_forward`` (``selected_hidden_states_g``,
    ``proj_out``, ``weighted_out`` and ``weighted_out[inv_perm]``), ``MixtralSparseMoeBlock``.
    """
    m = batch * tokens
    experts_bytes = bits_to_bytes(m * (hidden + experts_per_token * max(hidden + 4 * expert_ffn, 4 * hidden)), bits)
    router = bits_to_bytes(m * experts, bits + FP32_BITS)
    return experts_bytes + router + bits_to_bytes(4 * m * experts_per_token, INDEX_BITS)


def upcast_qk_bytes(spec: ModelSpec, *, batch: int, tokens: int, kv_tokens: int, heads: int, kv_heads: int,
                    head_dim: int, later_bytes: int) -> int:
    """fp32 copies the family's attention makes of q and k (``UPCAST_QK``, ``ROPE_FP32``), in bytes.

    GPT-J: q and k, B·(T·N + S·N)·H × 4 (it repeats no heads). Cohere's rotary: q, k, q·cos + rotate_half(q)·sin,
    k·cos, rotate_half(k) and its product with sin, B·T·(2N + 4K)·H × 4; they are freed before the cache update
    writes this layer's K and V (``later_bytes``: this layer's cached K and V, eager's scores), so only the excess over it adds.
    """
    if spec.family in UPCAST_QK:
        return bits_to_bytes(batch * (tokens + kv_tokens) * heads * head_dim, FP32_BITS)
    if spec.family in ROPE_FP32:
        rope = bits_to_bytes(batch * tokens * (2 * heads + 4 * kv_heads) * head_dim, FP32_BITS)
        return max(0, rope - later_bytes)
    return 0


def eager_attention_bytes(*, batch: int, tokens: int, kv_tokens: int, heads: int, kv_heads: int, head_dim: int,
                          hidden: int, bits: int, upcast: bool = True) -> int:
    """Peak bytes of transformers' eager attention, at its softmax (the mask is ``hf_masks.loop_mask_bytes``).

    Formula: B·T·(D + N·H) × bits/8 (normed input, q) + 2·B·N·S·H × bits/8 when 1 < K < N (``repeat_kv``'s copies;
    with K = 1 the expand reshapes to a view) + B·N·T·S × (bits + 32 + 32)/8 (the masked scores, softmax's fp32
    copy of its input and its fp32 output; ``eager_softmax_bits``). The new k and v live in the cache by then
    (``DynamicLayer.update`` returns the concatenated tensors), and the output does not exist yet.
    Source: transformers ``LlamaAttention.forward`` / ``eager_attention_forward`` / ``repeat_kv``; ATen
    ``softmax(input, dim, dtype)`` converts its input first (only CUDA Half takes the ``half_to_float`` kernel;
    measured on CPU as ``_to_copy < softmax``).
    """
    out = bits_to_bytes(batch * tokens * (hidden + heads * head_dim), bits)
    if 1 < kv_heads < heads:
        out += bits_to_bytes(2 * batch * heads * kv_tokens * head_dim, bits)
    return out + bits_to_bytes(batch * heads * tokens * kv_tokens, eager_softmax_bits(bits, upcast=upcast))


def partial_rotary_bytes(spec: ModelSpec, *, batch: int, tokens: int, heads: int, kv_heads: int, head_dim: int,
                         bits: int) -> int:
    """Bytes partial rotary adds at the attention's kernel: B·T·(N + K + f)·H × bits/8, f = K where the fused
    projection stays alive whole (``FUSED_QKV_KEPT``: its v part too); 0 without partial rotary.

    q is rebuilt as ``torch.cat([q_rot, q_pass])`` (a new tensor next to the projection it slices), and the k
    projection stays referenced through ``k_pass`` while the cache holds the concatenated k; neither generic count
    (eager's ``eager_attention_bytes``, SDPA's ``attention_workspace_bytes`` without ``new_kv``) holds them.
    Source: transformers 5.20 ``StableLmAttention.forward`` / ``GPTNeoXAttention.forward`` / ``PhiAttention.forward``
    (``rotary_ndims``); measured on GPT-NeoX SDPA: ``query_key_value``'s output and the q ``cat`` at the kernel.
    """
    if spec.rotary_dim is None or spec.rotary_dim >= head_dim:
        return 0
    kept = kv_heads if spec.family in FUSED_QKV_KEPT else 0
    return bits_to_bytes(batch * tokens * (heads + kv_heads + kept) * head_dim, bits)


def kept_scores_bytes(spec: ModelSpec, *, batch: int, tokens: int, kv_tokens: int, heads: int, head_dim: int,
                      bits: int) -> int:
    """Bytes ``SCORES_KEPT`` adds at eager softmax: B·N·T·S × bits/8 (the raw scores) + 2·B·T·N·H × bits/8 (the k
    and v parts of the fused projection). Source: transformers ``BloomAttention.forward``."""
    if spec.family not in SCORES_KEPT:
        return 0
    return bits_to_bytes(batch * heads * (tokens * kv_tokens + 2 * tokens * head_dim), bits)


def eager_softmax_bits(bits: int, *, upcast: bool) -> int:
    """Bits per score element alive at eager attention's softmax: the masked scores, the fp32 copy and the fp32
    output (bits + 64; 64 in fp32), or with the softmax in the compute dtype (``SOFTMAX_IN_DTYPE``) the raw scores,
    the masked ones and the output (3·bits)."""
    if not upcast:
        return 3 * bits
    return (bits if bits < FP32_BITS else 0) + 2 * FP32_BITS


def fp32_scores_bytes(*, batch: int, heads: int, tokens: int, kv_tokens: int) -> int:
    """GPT-J's eager scores: two fp32 (B, N, T, S) tensors (``matmul`` then ``/ scale_attn`` and ``+ mask``) and
    the mask cast to fp32, B·T·S × 4 (``GPTJAttention._attn``)."""
    return bits_to_bytes(2 * batch * heads * tokens * kv_tokens + batch * tokens * kv_tokens, FP32_BITS)


def cpu_math_mla_bytes(*, batch: int, tokens: int, kv_tokens: int, heads: int, qk_head: int, v_head: int,
                       bits: int, causal: bool = False) -> int:
    """PyTorch's CPU math SDPA over MLA heads (no CPU fused kernel takes q/k and v head dims that differ).

    Formula: B·N·(2·T·H_qk + S·H_qk + S·H_v) × 4 (q, scaled q, k, v in fp32) + B·N·T·S × (4 + 4 + 1) (scores,
    softmax, ``isneginf``) + the mask: with ``is_causal`` one (T, S) fp32 bias for all sequences (``ones(L, S).tril()``
    converted in the upcast query's dtype), else the caller's additive B·T·S × bits/8.
    Source: ATen ``_scaled_dot_product_attention_math`` (``query_.to(kFloat)``, ``_safe_softmax``); the causal bias
    measured on torch 2.13 CPU as ``where`` of T·S·4 bytes whatever the batch.
    """
    fp32 = batch * heads * (2 * tokens * qk_head + kv_tokens * (qk_head + v_head))
    scores = batch * heads * tokens * kv_tokens
    mask = bits_to_bytes(tokens * kv_tokens, FP32_BITS) if causal else bits_to_bytes(batch * tokens * kv_tokens, bits)
    return bits_to_bytes(fp32 + 2 * scores, FP32_BITS) + bits_to_bytes(scores, BOOL_BITS) + mask
