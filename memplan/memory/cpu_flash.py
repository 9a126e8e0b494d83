"""Buffers of PyTorch's CPU flash-attention kernel, the kernel CPU SDPA picks when q, k and v share a head size.

Source: PyTorch ``aten/src/ATen/native/cpu/FlashAttentionKernel.cpp`` (``flash_attention_kernel_impl`` picks the
split sizes; ``cpu_flash_attention`` allocates the buffers) and ``aten/src/ATen/native/CPUBlas.cpp``
(``Pack::could_pack``). Read at a 2025 PyTorch main commit (the cyyever/pytorch mirror, 2fb31a9: GQA through
``kv_num_head``, the packing buffers as ``at::empty`` tensors); the torch wheel ships no C++ source, so the formula was
checked allocation by allocation against torch 2.13.0+cpu's profiler events on an AMX CPU, bf16/fp16/fp32, 1 and 2
threads, odd head sizes, masks and GQA (``tests/test_cpu_flash.py``). The fp16 packing rule is read, not measured
(the measuring CPU has no AMX-FP16).

What ``cpu_flash_attention`` holds at once, besides the output, for B sequences of T queries over S keys, N query
heads and K key/value heads as passed to SDPA, head size H, P threads (``at::get_num_threads``):

- ``logsumexp``: B·T·N fp32 (``_scaled_dot_product_flash_attention_cpu`` returns it with the output);
- ``buf``: P·(q·k + 2·q + q·H) fp32 (per thread: the q×k scores block, the row max and sum, the output accumulator),
  q = min(q split, T), k = min(512, S); the q split is 256 from T ≥ 768 queries, 64 from 192, else 32;
- ``buf_reduced``: P·q·k' in the input dtype for bf16/fp16 (the scores converted back for the second GEMM);
- with oneDNN packing (``need_pack``, bf16 on an AMX CPU, fp16 on AMX-FP16, when T and S reach 64 for bf16 or 16
  for fp16 and the GEMM work per thread is at least 4× (bf16) or 1× (fp16) the packed bytes): the packed keys
  B·K·H'·S and values B·K·S'·H, a transpose buffer P·k·H and, for an odd H, a padded query P·q·H', all in the
  input dtype (H', k', S' round odd sizes up to even).

Assumption: the kernel's own thread count equals the caller's ``threads`` (one parallel region, no nested pools).
"""

from __future__ import annotations

from dataclasses import dataclass

from memplan.units import bits_to_bytes, ceil_div, round_up

ACCUM_BITS = 32
"""``at::opmath_type`` of bf16, fp16 and fp32: the kernel accumulates in fp32."""
KV_SPLIT = 512
Q_SPLITS = ((768, 256), (192, 64), (0, 32))
"""(smallest T, q split) in ``flash_attention_kernel_impl``'s order: 256 from 768 queries, 64 from 192, else 32."""
PACK_RULES = {"bf16": (64, 4.0), "fp16": (16, 1.0)}
"""dtype -> (``thresh_size``: smallest T and S, smallest GEMM work per thread over the packed size) in ``need_pack``."""


@dataclass(frozen=True)
class CpuKernels:
    """The host facts the CPU kernels depend on: ``threads`` (``torch.get_num_threads()``) and ``pack``, whether
    ``cpublas::could_pack`` holds for the compute dtype (oneDNN enabled and an AMX CPU for bf16, AMX-FP16 for fp16)."""

    threads: int
    pack: bool = False


def q_split(tokens: int) -> int:
    """The kernel's query block: 256 from 768 queries, 64 from 192, else 32 (``flash_attention_kernel_impl``)."""
    return next(split for least, split in Q_SPLITS if tokens >= least)


def needs_pack(*, batch: int, tokens: int, kv_tokens: int, heads: int, kv_heads: int, head_dim: int, dtype: str,
               kernels: CpuKernels, causal: bool) -> bool:
    """``need_pack`` of ``cpu_flash_attention``: packing possible (``kernels.pack``, bf16/fp16), T and S at least the
    dtype's threshold, and ⌈B·N·⌈T/q⌉ / P⌉·q·(min(T, S) if causal else S)·H ≥ r·B·K·S·H (r = 4 bf16, 1 fp16)."""
    if not kernels.pack or dtype not in PACK_RULES:
        return False
    least, ratio = PACK_RULES[dtype]
    if kv_tokens < least or tokens < least:
        return False
    q = min(q_split(tokens), tokens)
    per_thread = ceil_div(batch * heads * ceil_div(tokens, q), kernels.threads)
    gemm = per_thread * q * (min(tokens, kv_tokens) if causal else kv_tokens) * head_dim
    return gemm >= ratio * batch * kv_heads * kv_tokens * head_dim


def cpu_flash_bytes(*, batch: int, tokens: int, kv_tokens: int, heads: int, kv_heads: int, head_dim: int, bits: int,
                    dtype: str, kernels: CpuKernels, causal: bool) -> int:
    """Bytes ``cpu_flash_attention`` allocates beside its output, all alive together (see the module docstring).

    Formula: B·T·N·4 + P·(q·k + 2q + q·H)·4 + [16-bit] P·q·k'·bits/8 + [packed] (B·K·H'·S + B·K·S'·H + P·k·H
    + [odd H] P·q·H')·bits/8, with q = min(q split, T), k = min(512, S).
    """
    q, k = min(q_split(tokens), tokens), min(KV_SPLIT, kv_tokens)
    pack = needs_pack(batch=batch, tokens=tokens, kv_tokens=kv_tokens, heads=heads, kv_heads=kv_heads,
                      head_dim=head_dim, dtype=dtype, kernels=kernels, causal=causal)
    threads = kernels.threads
    fp32 = batch * tokens * heads + threads * (q * k + 2 * q + q * head_dim)
    reduced = threads * q * (round_up(k, 2) if pack else k) if bits < ACCUM_BITS else 0
    if pack:
        tail = (kv_tokens - 1) % k + 1
        kv_padded = (kv_tokens - 1) // k * round_up(k, 2) + round_up(tail, 2)
        padded_head = round_up(head_dim, 2)
        reduced += batch * kv_heads * (padded_head * kv_tokens + kv_padded * head_dim) + threads * k * head_dim
        reduced += threads * q * padded_head if head_dim % 2 else 0
    return bits_to_bytes(fp32, ACCUM_BITS) + bits_to_bytes(reduced, bits)
