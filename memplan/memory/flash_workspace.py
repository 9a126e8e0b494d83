"""Workspace of the flash-attention 2 backward kernel, alive while one attention's backward runs.

Sources read:

- PyTorch's built-in copy (SDPA's flash kernel, torch >= 2.2): ``aten/src/ATen/native/transformers/cuda/flash_attn/
  flash_api.cpp`` ``mha_bwd`` / ``mha_varlen_bwd`` (pytorch/pytorch main, commit 03b7c19).
- Dao-AILab flash-attention's ``csrc/flash_attn/flash_api.cpp`` ``mha_bwd`` (commit 00979f5, a 2.x tree; used by
  transformers' ``attn_implementation="flash_attention_2"`` through ``flash_attn_func``).

Both allocate, per call, besides dQ/dK/dV themselves (the gradients autograd passes on):

- ``softmax_d``: (B, N, round128(Sq)) fp32 (``dsoftmax_sum``, the rowsum of dO·O);
- ``dq_accum`` (``loop`` is hard-coded true): (B, round128(Sq), N, Hr) fp32, or, under
  ``torch.use_deterministic_algorithms`` / ``deterministic=True``, ``nsplits`` copies of it with
  nsplits = ceil(SMs / (B·N)) (zero-filled);
- for MQA/GQA (K < N kv heads): ``dk_expanded`` and ``dv_expanded``, (B, Sk, N, H) in the inputs' 16-bit dtype,
  summed over each group into dK/dV after the kernel.

Head dims: the caller pads H to a multiple of 8; Hr (``head_size_rounded``) is round(H, 32) for H ≤ 128, else
round(H, 64) in PyTorch's copy; round(H, 32) for H ≤ 192, else 256 in Dao-AILab's tree read. The two agree for
every head dim that is a multiple of 32 up to 128, and for 192 and 256 (64, 80→96, 96, 128, 192, 256 alike).
The varlen entry (padded batches) allocates (total_q + 128·B) rows instead of B·round128(Sq): at most 128·B rows
more, not modelled (memplan's batches are unpadded). The deterministic variant is not the default of either
engine and is not modelled in the estimate (``dq_accum_bytes(..., splits=...)`` gives it).
"""

from __future__ import annotations

from memplan.units import ceil_div, round_up

FP32_BYTES = 4
SEQ_BLOCK = 128
"""``seqlen_q_rounded = round_multiple(seqlen_q, 128)``: 128 is the largest kBlockM of the backward kernels."""
MAX_HEAD_DIM = 256
"""``mha_bwd``: "FlashAttention backward only supports head dimension at most 256"."""
HEAD_PAD = 8
"""``head_size`` must be ``head_size_og`` rounded up to a multiple of 8 (the forward pads it)."""
HEAD_ROUND_SMALL = 32
HEAD_ROUND_LARGE = 64
SMALL_HEAD_MAX = 128
"""PyTorch's copy: ``round_multiple(head_size, head_size <= 128 ? 32 : 64)``."""
DAO_SMALL_HEAD_MAX = 192
DAO_LARGE_HEAD = 256
"""Dao-AILab's tree: ``head_size <= 192 ? round_multiple(head_size, 32) : 256``."""


def padded_head_dim(head_dim: int) -> int:
    """The kernel's ``head_size``: H rounded up to a multiple of 8 (``mha_fwd`` pads q, k, v)."""
    return round_up(head_dim, HEAD_PAD)


def rounded_head_dim(head_dim: int, *, dao: bool = False) -> int:
    """``head_size_rounded`` of ``mha_bwd``: PyTorch round(H8, 32) for H8 ≤ 128 else round(H8, 64);
    Dao-AILab (``dao=True``) round(H8, 32) for H8 ≤ 192 else 256; H8 = H rounded to 8."""
    h = padded_head_dim(head_dim)
    if dao:
        return round_up(h, HEAD_ROUND_SMALL) if h <= DAO_SMALL_HEAD_MAX else DAO_LARGE_HEAD
    return round_up(h, HEAD_ROUND_SMALL if h <= SMALL_HEAD_MAX else HEAD_ROUND_LARGE)


def softmax_d_bytes(batch: int, heads: int, queries: int) -> int:
    """Bytes of ``softmax_d``: B · N · round128(Sq) · 4 (``mha_bwd``: ``empty({b, h, seqlen_q_rounded}, kFloat)``)."""
    return batch * heads * round_up(queries, SEQ_BLOCK) * FP32_BYTES


def dq_accum_bytes(batch: int, heads: int, queries: int, head_dim: int, *, dao: bool = False, splits: int = 1) -> int:
    """Bytes of ``dq_accum``: splits · B · round128(Sq) · N · Hr · 4 (``mha_bwd``: ``empty({b, seqlen_q_rounded, h,
    head_size_rounded}, kFloat)``; ``splits`` = ceil(SMs / (B·N)) only when deterministic, else 1)."""
    hr = rounded_head_dim(head_dim, dao=dao)
    return splits * batch * round_up(queries, SEQ_BLOCK) * heads * hr * FP32_BYTES


def deterministic_splits(batch: int, heads: int, sms: int) -> int:
    """``nsplits`` of the deterministic backward: ceil(SMs / (B·N)) (``mha_bwd``)."""
    return ceil_div(sms, batch * heads)


def gqa_expanded_bytes(batch: int, heads: int, kv_heads: int, keys: int, head_dim: int, bits: int) -> int:
    """Bytes of ``dk_expanded`` + ``dv_expanded``: 2 · B · Sk · N · H8 · bits/8 when K < N, else 0 (dK/dV are
    written in place). ``mha_bwd``: ``empty({b, seqlen_k, num_heads, head_size}, opts)`` in the inputs' dtype."""
    if kv_heads >= heads:
        return 0
    return 2 * batch * keys * heads * padded_head_dim(head_dim) * bits // 8


def backward_workspace_bytes(batch: int, heads: int, kv_heads: int, queries: int, keys: int, head_dim: int, *,
                             bits: int = 16, dao: bool = False) -> int:
    """Bytes ``mha_bwd`` allocates beyond dQ/dK/dV for one call (non-deterministic): ``softmax_d`` + ``dq_accum``
    + the GQA expansion of dK/dV (``softmax_d_bytes``, ``dq_accum_bytes``, ``gqa_expanded_bytes``)."""
    return (softmax_d_bytes(batch, heads, queries) + dq_accum_bytes(batch, heads, queries, head_dim, dao=dao)
            + gqa_expanded_bytes(batch, heads, kv_heads, keys, head_dim, bits))
