"""Workspace of SDPA's memory-efficient (cutlass) backward kernel, alive while one attention's backward runs.

Source read: PyTorch ``aten/src/ATen/native/transformers/cuda/mem_eff_attention/kernel_backward.h``
(``AttentionBackwardKernel::Params::workspace_elements_gk/gv/gq``, ``workspace_strideBH``, ``workspace_size``;
``GradQTempStorage``; ``kNeedsAccumGradQ/K/V``; ``MatmulGradQ::ThreadblockShape = (kBlockSizeI, kBlockSizeJ)``)
and ``attention_backward.cu`` ``_efficient_attention_backward`` (the split-keys heuristic: ceil(keys / kBlockSizeJ)
splits, 1 where batch·heads ≥ 256 and keys ≤ 2·kBlockSizeJ, at most 200 // (batch·heads) where dK/dV are staged,
1 if that is below 1). Read at PyTorch main (commit 00f993d); the torch 2.2 wheel was not read, so the
kernel-era rules are assumed unchanged. The kernel is chosen when SDPA gets an explicit ``attn_mask`` (flash refuses
one, ``sdp_utils.cpp`` ``check_for_attn_mask``) or fp32 inputs: ``activations_block._standard_attention``'s
``efficient``.

Assumptions: 16-bit inputs (fp32 accumulators differ from the output type, so dQ is staged; dK/dV are staged unless
the kernel keeps them in registers, ``kOutputInRF = kMaxK <= kBlockSizeI``); the 64×64-tile kernel of
``kMaxK`` 128 (``fmha_cutlassB_*_aligned_64x64_k128``), the one whose shared memory fits GPUs below A100's 164 KiB
(RTX 30/40); the 128×128 tile of A100/H100 keeps dK/dV in registers and stages only dQ, 2·splits·64·128 fp32
words per (batch, head) less. Sizes are per attention call (one layer's backward at a time).
"""

from __future__ import annotations

from math import ceil

from memplan.units import round_up

FP32_BYTES = 4
BLOCK_I = 64
BLOCK_J = 64
"""kBlockSizeI (queries) and kBlockSizeJ (keys) of the assumed kernel."""
MAX_K = 128
"""kMaxK of the assumed kernel: the largest head dim it takes."""
GRADQ_HEADER_WORDS = 4
"""GradQTempStorage: int32 lock, counter, pad[2] (128 bits) before the fp32 tile."""
WORKSPACE_ALIGN_WORDS = 4
"""workspace_strideBH aligns each (batch, head) slice on 128 bits."""
SPLIT_KEYS_BUDGET = 200
"""_efficient_attention_backward: num_splits_key ≤ 200 / (batch·heads) when dK/dV are staged."""
K_ALIGN_LSE = 32
"""kernel_forward.h ``kAlignLSE``: the forward's logsumexp (B, H, ceil(Mq / 32) · 32) fp32 is padded to it."""
PARALLEL_ENOUGH = 256
"""_efficient_attention_backward: with ≥ 256 (batch, head) blocks and keys ≤ 2·kBlockSizeJ, one split."""


def num_splits_key(batch: int, heads: int, keys: int, *, staged_kv: bool, block_j: int = BLOCK_J) -> int:
    """Split-keys count of ``_efficient_attention_backward``: ceil(keys / J), 1 if batch·heads ≥ 256 and
    keys ≤ 2J, min(·, 200 // (batch·heads)) when dK/dV are staged, at least 1."""
    splits = ceil(keys / block_j)
    if batch * heads >= PARALLEL_ENOUGH and keys <= 2 * block_j:
        splits = 1
    if staged_kv:
        splits = min(splits, SPLIT_KEYS_BUDGET // (batch * heads))
    return max(splits, 1)


def backward_workspace_bytes(batch: int, heads: int, queries: int, keys: int, head_dim: int, head_dim_v: int, *,
                             block_i: int = BLOCK_I, block_j: int = BLOCK_J, max_k: int = MAX_K) -> int:
    """Bytes of ``Params::workspace_size()`` for 16-bit inputs: B · H · align4(gk + gv + gq) · 4, with
    gk = splits · J · align(D, I) and gv = splits · J · align(Dv, I) when dK/dV are staged (kMaxK > I), and
    gq = ceil(Mq / I) · ceil(D / J) · (4 + I·J) words (one GradQTempStorage per dQ tile)."""
    staged_kv = max_k > block_i
    splits = num_splits_key(batch, heads, keys, staged_kv=staged_kv, block_j=block_j)
    gk = splits * block_j * round_up(head_dim, block_i) if staged_kv else 0
    gv = splits * block_j * round_up(head_dim_v, block_i) if staged_kv else 0
    gq = ceil(queries / block_i) * ceil(head_dim / block_j) * (GRADQ_HEADER_WORDS + block_i * block_j)
    return batch * heads * round_up(gk + gv + gq, WORKSPACE_ALIGN_WORDS) * FP32_BYTES


def delta_bytes(batch: int, heads: int, queries: int) -> int:
    """Bytes of ``delta``, (B, H, Mq) fp32, which ``_efficient_attention_backward`` allocates for the 16-bit
    kernels (``kKernelComputesDelta``) next to the workspace."""
    return batch * heads * queries * FP32_BYTES


def lse_padding_bytes(batch: int, heads: int, queries: int) -> int:
    """Bytes the forward's logsumexp holds beyond (B, H, Mq) fp32: B · H · (align32(Mq) − Mq) · 4
    (``_efficient_attention_forward``: ``ceil_div(max_seqlen_q, kAlignLSE) * kAlignLSE``)."""
    return batch * heads * (round_up(queries, K_ALIGN_LSE) - queries) * FP32_BYTES
