"""PyTorch's CPU flash-attention kernel buffers (``memory.cpu_flash``) against the kernel's own allocations.

The measured side runs ``F.scaled_dot_product_attention`` on CPU under the profiler and takes the largest running sum
of the allocations made inside ``_scaled_dot_product_flash_attention_for_cpu``, less its output (which memplan counts
as the attention output). The arithmetic side is written out here from ``cpu_flash_attention``'s allocations.
"""

from __future__ import annotations

import pytest

from memplan.memory.cpu_flash import CpuKernels, cpu_flash_bytes, needs_pack, q_split


def _bytes(**kw: object) -> int:
    base = {"batch": 1, "tokens": 252, "kv_tokens": 252, "heads": 8, "kv_heads": 8, "head_dim": 16, "bits": 16,
            "dtype": "bf16", "causal": False}
    return cpu_flash_bytes(**{**base, **kw})  # type: ignore[arg-type]


def test_query_split_follows_the_dispatch() -> None:
    assert [q_split(t) for t in (1, 191, 192, 767, 768, 4096)] == [32, 32, 64, 64, 256, 256]


def test_falcon_prefill_by_hand() -> None:
    """B=1, T=S=252, N=K=8, H=16, bf16, 2 threads: q split 64, kv split min(512, 252) = 252."""
    lse = 252 * 8 * 4
    buf = 2 * (64 * 252 + 2 * 64 + 64 * 16) * 4
    reduced = 2 * 64 * 252 * 2
    assert _bytes(kernels=CpuKernels(threads=2, pack=False)) == lse + buf + reduced == 210_816
    packed_k = packed_v = 8 * 16 * 252 * 2
    transpose = 2 * 252 * 16 * 2
    assert _bytes(kernels=CpuKernels(threads=2, pack=True)) == lse + buf + reduced + packed_k + packed_v + transpose


def test_fp32_has_no_reduced_buffer_and_never_packs() -> None:
    one = CpuKernels(threads=1, pack=True)
    assert _bytes(bits=32, dtype="fp32", kernels=one) == 252 * 8 * 4 + (64 * 252 + 2 * 64 + 64 * 16) * 4
    assert not needs_pack(batch=1, tokens=252, kv_tokens=252, heads=8, kv_heads=8, head_dim=16, dtype="fp32",
                          kernels=one, causal=True)


def test_each_thread_adds_its_own_blocks() -> None:
    """One more thread adds one fp32 block, one bf16 scores block and (packed) one transpose buffer."""
    step = (64 * 252 + 2 * 64 + 64 * 16) * 4 + 64 * 252 * 2
    assert _bytes(kernels=CpuKernels(3, False)) - _bytes(kernels=CpuKernels(2, False)) == step
    assert _bytes(kernels=CpuKernels(3, True)) - _bytes(kernels=CpuKernels(2, True)) == step + 252 * 16 * 2


def test_packing_thresholds() -> None:
    """bf16 packs from 64 queries and keys, and only when the GEMM work per thread is ≥ 4× the packed keys."""
    kw = {"batch": 1, "heads": 8, "kv_heads": 8, "head_dim": 16, "dtype": "bf16", "causal": True}
    assert not needs_pack(tokens=63, kv_tokens=63, kernels=CpuKernels(1, True), **kw)  # type: ignore[arg-type]
    assert needs_pack(tokens=64, kv_tokens=64, kernels=CpuKernels(1, True), **kw)  # type: ignore[arg-type]
    assert not needs_pack(tokens=64, kv_tokens=64, kernels=CpuKernels(1, False), **kw)  # type: ignore[arg-type]
    # per thread ⌈B·N·⌈T/q⌉ / P⌉·q·S against B·K·S packed: 16 sequences of 64 tokens (q = 32, 2 blocks each) over
    # 64 threads give ⌈32/64⌉ = 1 block of 32 rows per thread, 32 < 4·16
    kw.update(batch=16, heads=1, kv_heads=1)
    assert not needs_pack(tokens=64, kv_tokens=64, kernels=CpuKernels(64, True), **kw)  # type: ignore[arg-type]
    assert needs_pack(tokens=64, kv_tokens=64, kernels=CpuKernels(8, True), **kw)  # type: ignore[arg-type]


torch = pytest.importorskip("torch", reason="measuring the CPU kernel needs torch (pip install memplan[measure])")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FLASH_OP = "aten::_scaled_dot_product_flash_attention_for_cpu"


def _host(dtype: str, threads: int) -> CpuKernels:
    from memplan.estimator import make_config
    from memplan.measure.compare import host_cpu_kernels

    kernels = host_cpu_kernels(make_config(None, job="infer", dtype=dtype))
    assert kernels.threads == threads
    return kernels


def _kernel_peak(q, k, v, mask, causal: bool) -> int:  # type: ignore[no-untyped-def]
    """Largest running sum of the CPU allocations inside the flash op (its output included), in bytes."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                                         enable_gqa=k.shape[1] != q.shape[1])
    events: list[tuple[int, int]] = []
    found = []

    def walk(nodes, inside: bool) -> None:  # type: ignore[no-untyped-def]
        for node in nodes:
            if node.tag == _EventType.Allocation:
                if inside:
                    events.append((node.start_time_ns, node.extra_fields.alloc_size))
                continue
            found.append(node.name == FLASH_OP)
            walk(node.children, inside or node.name == FLASH_OP)

    walk(prof.profiler.kineto_results.experimental_event_tree(), False)
    assert any(found), "SDPA did not run the CPU flash kernel"
    running = peak = 0
    for _, size in sorted(events):
        running += size
        peak = max(peak, running)
    return peak


@pytest.fixture
def threads():  # type: ignore[no-untyped-def]
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


SHAPES = [  # B, T, S, N, K, H
    (1, 252, 252, 8, 8, 16), (1, 252, 257, 8, 2, 16), (2, 92, 92, 4, 1, 32), (1, 40, 45, 4, 4, 64),
    (1, 600, 605, 4, 2, 15), (2, 191, 196, 4, 4, 33), (1, 800, 800, 2, 1, 16), (1, 70, 75, 4, 4, 7)]


CASES = ([(shape, 2, "bf16") for shape in SHAPES] + [(shape, 1, "bf16") for shape in SHAPES[:3]]
         + [(shape, 2, dtype) for shape in SHAPES[1:4] for dtype in ("fp32", "fp16")])


@pytest.mark.parametrize(("shape", "nthreads", "dtype"), CASES,
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_formula_matches_the_kernels_allocations(shape: tuple[int, ...], nthreads: int, dtype: str,
                                                 threads) -> None:  # type: ignore[no-untyped-def]
    threads(nthreads)
    b, t, s, n, k, h = shape
    torch_dtype = DTYPES[dtype]
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(b, n, t, h, generator=gen).to(torch_dtype)
    key = torch.randn(b, k, s, h, generator=gen).to(torch_dtype)
    value = torch.randn(b, k, s, h, generator=gen).to(torch_dtype)
    causal = s == t
    mask = None if causal else torch.zeros(b, 1, t, s, dtype=torch_dtype)  # additive: SDPA passes it as is
    measured = _kernel_peak(q, key, value, mask, causal) - q.numel() * q.element_size()
    predicted = cpu_flash_bytes(batch=b, tokens=t, kv_tokens=s, heads=n, kv_heads=k, head_dim=h,
                                bits=torch_dtype.itemsize * 8, dtype=dtype, kernels=_host(dtype, nthreads),
                                causal=causal)
    assert predicted == measured
