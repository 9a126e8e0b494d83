"""The GPU capacity every engine budgets from is the CUDA runtime's total (memplan.catalog.capacity).

Expectations come from the published lines themselves (each catalog entry's cuda_memory_quote), parsed here
with arithmetic written in the test, not from the code under test."""

from __future__ import annotations

import math
import re
from fractions import Fraction

import pytest

from memplan.catalog.capacity import GIVEN, PUBLISHED, RULE, gpu_capacity
from memplan.catalog.store import all_gpus, catalog_gpu
from memplan.estimator import estimate
from memplan.memory.breakdown import Tier

MiB = 2**20

PUBLISHED_GPUS = [g for g in all_gpus() if g.cuda_memory_mib is not None]


def _bounds_mib(quote: str) -> tuple[Fraction, Fraction]:
    """[low, high) MiB interval the published line allows for the CUDA total, by its precision:
    bytes (exact), torch 'total_memory=NMB' (whole MiB, truncated), a decimal GiB/GB figure (± half its last digit),
    whole MB printed by a tool (± 1 MiB, rounding unknown)."""
    if m := re.search(r"\((\d+) bytes\)|'totalGlobalMem': (\d+)", quote):
        b = int(m.group(1) or m.group(2))
        return Fraction(b, MiB), Fraction(b, MiB)
    if m := re.search(r"total_memory=(\d+)MB", quote):
        return Fraction(int(m.group(1))), Fraction(int(m.group(1)) + 1)
    if m := re.search(r"total capaci?ty of (\d+\.\d+) GiB|(\d+\.\d+) GiB total capacity|"
                      r"Total Global Memory: (\d+\.\d+) GB", quote):
        text = m.group(1) or m.group(2) or m.group(3)
        half = Fraction(1, 2 * 10 ** len(text.split(".")[1]))
        value = Fraction(text)
        return (value - half) * 1024, (value + half) * 1024
    if m := re.search(r"Total global mem:\s+(\d+) MB", quote):
        return Fraction(int(m.group(1)) - 1), Fraction(int(m.group(1)) + 1)
    raise AssertionError(f"no figure the test can read in {quote!r}")


def test_every_published_gpu_has_a_quote_and_a_note() -> None:
    assert len(PUBLISHED_GPUS) >= 10
    for gpu in PUBLISHED_GPUS:
        assert gpu.cuda_memory_quote and gpu.cuda_memory_note, gpu.name
        assert gpu.cuda_memory_mib < gpu.memory_mib, gpu.name


@pytest.mark.parametrize("gpu", PUBLISHED_GPUS, ids=lambda g: g.name)
def test_published_total_is_the_conservative_end_of_its_quote(gpu) -> None:
    low, _high = _bounds_mib(gpu.cuda_memory_quote)
    # The catalog keeps whole MiB at or below the lowest value the quote allows, and not more than one MiB of
    # rounding (two where the tool's rounding is unknown) below it.
    assert gpu.cuda_memory_mib <= low
    assert low - gpu.cuda_memory_mib < 2


@pytest.mark.parametrize("name,quote_bytes", [
    ("a100-sxm-40gb", 42_298_834_944),   # deviceQuery, bottlerocket-os/bottlerocket PR #3873
    ("l4", 23_583_784_960),              # deviceQuery, bottlerocket-os/bottlerocket-kernel-kit PR #139
    ("h100-sxm-80gb", 85_017_755_648),   # deviceQuery, driver 13.0
    ("rtx-5090", 33_677_180_928),        # deviceQuery, aikitoria/open-gpu-kernel-modules issue #1
    ("v100-sxm2-16gb", 16_911_433_728),  # deviceQuery, Marconi-100 (kosl/ihipp-examples)
    ("gh200-96gb", 102_005_473_280),     # deviceQuery, slitvinov/grace
])
def test_byte_exact_totals(name: str, quote_bytes: int) -> None:
    gpu = catalog_gpu(name)
    assert f"{quote_bytes}" in gpu.cuda_memory_quote
    assert gpu.capacity_bytes == quote_bytes // MiB * MiB
    assert gpu_capacity(gpu).kind == PUBLISHED


def test_unpublished_gpu_takes_the_largest_reservation_of_its_class() -> None:
    h800 = catalog_gpu("h800-sxm-80gb")
    assert h800.cuda_memory_mib is None
    same_class = [g for g in PUBLISHED_GPUS if g.vendor == h800.vendor and g.marketed_memory_gb == 80]
    assert same_class  # the 80 GB NVIDIA GPUs with a published total
    worst = max(g.memory_mib - g.cuda_memory_mib for g in same_class)
    assert h800.capacity_bytes == (h800.memory_mib - worst) * MiB
    assert gpu_capacity(h800).kind == RULE
    for gpu in all_gpus():  # every catalog GPU budgets below nvidia-smi's total
        assert gpu.capacity_bytes < gpu.memory_bytes, gpu.name


def test_custom_gpu_keeps_its_memory() -> None:
    custom = catalog_gpu("h100-sxm-80gb").model_copy(update={"memory_mib": 70_000, "cuda_memory_mib": None})
    assert custom.capacity_bytes == 70_000 * MiB
    assert gpu_capacity(custom).kind == GIVEN


def test_estimate_between_cuda_total_and_nvidia_smi_does_not_fit() -> None:
    # A peak just above the CUDA runtime's total but below nvidia-smi's: the job OOMs, so DOES NOT FIT.
    gpu = catalog_gpu("h100-sxm-80gb")
    cuda_total, smi_total = gpu.cuda_memory_mib * MiB, gpu.memory_mib * MiB
    base = estimate("llama-3.1-8b", gpu, job="lora", micro_batch=1, seq_len=2048)
    peak = base.peak(Tier.GPU)
    target = (cuda_total + smi_total) // 2
    # the CUDA context row is an input: choose it so the peak lands between the two totals
    ctx_now = next(r.bytes for r in base.rows if r.component == "runtime/cuda_context")
    est = estimate("llama-3.1-8b", gpu, job="lora", micro_batch=1, seq_len=2048,
                   cuda_context_bytes=ctx_now + target - peak)
    assert cuda_total < est.peak(Tier.GPU) < smi_total
    assert est.capacity(Tier.GPU) == cuda_total
    assert not est.fits
    assert est.headroom(Tier.GPU) < 0


def test_json_names_the_capacity_and_its_source() -> None:
    from memplan.report.json_out import hardware_dict

    est = estimate("llama-3.1-8b", "h100-pcie-80gb", job="lora", micro_batch=1, seq_len=512)
    hw = hardware_dict(est)
    assert hw["gpu_memory_bytes"] == 81559 * MiB  # nvidia-smi 'NVIDIA H100 PCIe' total
    assert hw["gpu_capacity_bytes"] == est.capacity(Tier.GPU) < hw["gpu_memory_bytes"]
    assert hw["gpu_capacity_source"].startswith(RULE)


def test_published_decimal_figure_rounds_down() -> None:
    # b200: 'Total Global Memory: 178.35 GB' (2^30 bytes) -> at least 178.345 GiB = 182625.28 MiB -> 182625 MiB kept.
    gpu = catalog_gpu("b200-sxm-180gb")
    assert "178.35 GB" in gpu.cuda_memory_quote
    assert gpu.cuda_memory_mib == math.floor(Fraction("178.345") * 1024)
