"""Inference workspace formulas: one decoder layer's transient tensors during a prefill step (residual stream,
attention scores or fused-kernel workspace, MLA, the key/value concat, the MLP and MoE stages) and the sampled logits.
Pure functions of the shapes, in bytes. Split out of ``memory.inference``, which re-exports every name.
"""

from __future__ import annotations

from memplan.units import bits_to_bytes

RESIDUAL_TENSORS = 2
"""Live across a decoder layer: the residual and the hidden states (transformers ``LlamaDecoderLayer.forward``)."""
GATED_MLP_TENSORS = 3
"""Gated MLP peak: act(gate), up and their product, each B·T·F (transformers ``LlamaMLP.forward``;
vLLM ``MergedColumnParallelLinear`` gate_up (2F) + ``SiluAndMul`` output (F))."""
FUSED_GATED_MLP_TENSORS = 4
"""Fused gate_up projection kept alive while act(gate) and the product exist (transformers ``Phi3MLP``)."""
PLAIN_MLP_TENSORS = 2
"""Ungated MLP (GPT-2, OPT): fc1 output and its activation."""
SOFTMAX_BITS = 32
"""Eager attention runs softmax in fp32 (transformers ``eager_attention_forward``)."""
LOGITS_FP32_BITS = 32
"""Sampling upcasts logits to fp32 (transformers ``generate``: ``.to(dtype=torch.float32)``;
vLLM ``Sampler``: ``logits.to(torch.float32)``), next to the lm_head output in the compute dtype."""
ROUTER_LOGITS_BITS = 32
"""MoE routing probabilities are fp32 (transformers Mixtral router: ``softmax(router_logits, dtype=torch.float)``)."""
EAGER_SCORE_COPIES = 2
"""Eager attention holds two score tensors in the compute dtype at its peak (pre-softmax and cast back)."""


def hidden_states_bytes(*, batch: int, tokens: int, hidden: int, bits: int) -> int:
    """Bytes of the residual stream during one forward: 2·B·T·D × bits/8 (residual + hidden states).

    Source: transformers ``LlamaDecoderLayer.forward`` (``residual = hidden_states`` around each block);
    vLLM's fused add-RMSNorm keeps the same two tensors. Assumption: no sequence parallelism (D whole per rank).
    """
    return bits_to_bytes(RESIDUAL_TENSORS * batch * tokens * hidden, bits)


def scores_bytes(*, batch: int, heads: int, tokens: int, kv_tokens: int, bits: int) -> int:
    """Bytes of eager attention scores: B·N·T·S_kv × (2·bits + 32)/8 (two compute-dtype copies + fp32 softmax).

    Source: transformers ``eager_attention_forward`` (matmul, softmax(dtype=float32), ``.to(query.dtype)``).
    Flash attention and SDPA's memory-efficient kernels never hold these (Dao et al. 2022, Sec. 3).
    """
    return bits_to_bytes(batch * heads * tokens * kv_tokens, EAGER_SCORE_COPIES * bits + SOFTMAX_BITS)


def attention_workspace_bytes(*, batch: int, tokens: int, kv_tokens: int, heads: int, kv_heads: int,
                              head_dim: int, hidden: int, bits: int, flash: bool, new_kv: bool = True) -> int:
    """Peak bytes of one GQA/MQA attention block in a forward of T tokens attending to S_kv keys.

    Formula: B·T·(D + 2·N·H + 2·K·H) × bits/8 (normed input, q, new k and v, output); without flash
    add repeat_kv's 2·B·N·S_kv·H (when N ≠ K) and the eager scores. ``new_kv`` False leaves out the new k and v
    where they already are the cache's tensors (transformers 5.x ``DynamicLayer.update`` returns the concatenated
    cache and the layer rebinds ``key_states, value_states`` to it; measured at the CPU SDPA kernel: only the cache's
    ``cat`` outputs).
    Source: transformers ``LlamaAttention.forward`` / ``repeat_kv``; vLLM ``Attention`` (flash kernels).
    """
    elems = batch * tokens * (hidden + 2 * heads * head_dim + (2 * kv_heads * head_dim if new_kv else 0))
    out = bits_to_bytes(elems, bits)
    if not flash:
        if heads != kv_heads:
            out += bits_to_bytes(2 * batch * heads * kv_tokens * head_dim, bits)
        out += scores_bytes(batch=batch, heads=heads, tokens=tokens, kv_tokens=kv_tokens, bits=bits)
    return out


def mla_workspace_bytes(*, batch: int, tokens: int, kv_tokens: int, heads: int, qk_nope: int, qk_rope: int,
                        v_head: int, hidden: int, bits: int, flash: bool) -> int:
    """Peak bytes of one MLA block: the latent is expanded to per-head K and V for every attended token.

    Formula: B·T·(D + N·(d_nope + d_rope) + N·d_v) + B·S_kv·N·(2·d_nope + d_rope + d_v), × bits/8
    (kv_b_proj output and the assembled keys coexist), plus eager scores without flash.
    Source: transformers 5.x ``DeepseekV3Attention.expand_kv``; DeepSeek-V2 paper Sec. 2.1.2.
    """
    elems = batch * tokens * (hidden + heads * (qk_nope + qk_rope) + heads * v_head)
    elems += batch * kv_tokens * heads * (2 * qk_nope + qk_rope + v_head)
    out = bits_to_bytes(elems, bits)
    if not flash:
        out += scores_bytes(batch=batch, heads=heads, tokens=tokens, kv_tokens=kv_tokens, bits=bits)
    return out


def kv_concat_bytes(*, batch: int, old_tokens: int, elements: int, bits: int) -> int:
    """Bytes of one layer's previous cache, alive while ``torch.cat`` builds the longer one: B·(S − T)·e × bits/8.

    Source: transformers ``DynamicLayer.update`` (``torch.cat([self.keys, key_states])``). Paged caches
    (vLLM) write new tokens in place, so this is 0 for them.
    """
    return bits_to_bytes(batch * old_tokens * elements, bits)


def mlp_workspace_bytes(*, batch: int, tokens: int, ffn: int, hidden: int, bits: int, gated: bool,
                        fused_gate_up: bool = False) -> int:
    """Peak bytes of one dense MLP: B·T·(D + c·F) × bits/8, c = 3 gated, 4 fused gate_up, 2 ungated.

    Source: transformers ``LlamaMLP`` / ``Phi3MLP`` / ``GPT2MLP`` forward; vLLM ``LlamaMLP``.
    """
    copies = FUSED_GATED_MLP_TENSORS if fused_gate_up else GATED_MLP_TENSORS if gated else PLAIN_MLP_TENSORS
    return bits_to_bytes(batch * tokens * (hidden + copies * ffn), bits)


def moe_workspace_bytes(*, batch: int, tokens: int, experts: int, experts_per_token: int, expert_ffn: int,
                        hidden: int, bits: int) -> int:
    """Peak bytes of one routed-expert block (vLLM fused MoE).

    Formula: B·T·(2·D + k·(max(2·F_e, D) + F_e)) × bits/8 + B·T·E × 4 (fp32 router logits).
    Source: vLLM ``fused_moe.TritonExperts.apply``: ``intermediate_cache1`` (M·k·2F_e) and
    ``intermediate_cache3`` (M·k·D) share workspace2, ``intermediate_cache2`` (M·k·F_e) is workspace13.
    Assumption: every token's k experts are computed on this rank (no expert-parallel split).
    """
    m = batch * tokens
    elems = m * (2 * hidden + experts_per_token * (max(2 * expert_ffn, hidden) + expert_ffn))
    return bits_to_bytes(elems, bits) + bits_to_bytes(m * experts, ROUTER_LOGITS_BITS)


def logits_bytes(*, rows: int, vocab: int, bits: int) -> int:
    """Bytes of logits for ``rows`` positions: rows·V × (bits + 32)/8 (lm_head output + fp32 copy).

    rows = B (last token: transformers ``logits_to_keep=1`` in ``generate``) or B·S (``all_logits``).
    Source: transformers ``GenerationMixin._sample`` (fp32 copy of the last position's logits);
    vLLM ``LogitsProcessor`` + ``Sampler``. Assumption: the whole vocabulary on the sampling rank.
    """
    return bits_to_bytes(rows * vocab, bits + LOGITS_FP32_BITS)
