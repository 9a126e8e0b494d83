"""The GPU catalog: every entry validates, names resolve case-insensitively, numbers are plausible."""

from __future__ import annotations

import re

import pytest

from memplan.catalog.schema import PCIE_GBPS_X16, GpuSpec
from memplan.catalog.store import GPUS_DIR, all_gpus, catalog_gpu, gpu_names
from memplan.errors import MemplanError
from memplan.units import MiB

MIB_PER_GIB = 1024
MIN_REPORTED_SHARE = 0.9
"""Drivers report a little less than the box says (ECC, reserved pages): T4 15360 of 16384 MiB is the lowest."""
MAX_REPORTED_SHARE = 1.0
"""Marketed GB on these parts is physical GiB (A100 80GB reports exactly 81920 MiB); never more is reported."""

REQUIRED = {
    "h100-sxm-80gb", "h100-pcie-80gb", "h200-sxm-141gb", "b200-sxm-180gb", "a100-sxm-40gb", "a100-sxm-80gb",
    "a10g", "l4", "l40s", "rtx-3090", "rtx-4090", "rtx-5090", "rtx-4060-ti-16gb", "rtx-a6000",
    "v100-sxm2-16gb", "v100-sxm2-32gb", "t4", "mi250x", "mi300x",
}

DRIVER_REPORTED_MIB = {
    "h100-sxm-80gb": 81559,
    "a100-sxm-80gb": 81920,
    "a100-sxm-40gb": 40960,
    "rtx-4090": 24564,
    "rtx-3090": 24576,
    "v100-sxm2-32gb": 32768,
    "t4": 15360,
    "a10g": 23028,
    "l4": 23034,
    "rtx-a6000": 49140,
    "h200-sxm-141gb": 143771,
    "mi300x": 205822885888 // MiB,  # rocm-smi "VRAM Total Memory (B)"
}
"""nvidia-smi "Memory-Usage" totals (rocm-smi for AMD) quoted in the project brief and public logs."""


@pytest.fixture(scope="module")
def gpus() -> list[GpuSpec]:
    return all_gpus()


def test_catalog_has_the_required_gpus(gpus: list[GpuSpec]) -> None:
    names = {g.name for g in gpus}
    assert len(gpus) >= 22
    assert names >= REQUIRED, f"missing: {sorted(REQUIRED - names)}"


def test_names_are_canonical_stems(gpus: list[GpuSpec]) -> None:
    for g in gpus:
        assert (GPUS_DIR / f"{g.name}.yaml").is_file(), f"{g.name}: name differs from its file's stem"
        assert re.fullmatch(r"[a-z0-9][a-z0-9.-]*", g.name), f"{g.name!r} is not a lower-case stem"
    assert len({g.name for g in gpus}) == len(gpus)


def test_aliases_are_unique_lower_case_and_never_a_stem(gpus: list[GpuSpec]) -> None:
    stems = set(gpu_names())
    seen: dict[str, str] = {}
    for g in gpus:
        for alias in g.aliases:
            assert alias == alias.lower().strip(), f"{g.name}: alias {alias!r} must be lower-case"
            assert alias not in stems, f"{g.name}: alias {alias!r} collides with a file stem"
            assert alias not in seen, f"alias {alias!r} on both {seen.get(alias)} and {g.name}"
            seen[alias] = g.name


@pytest.mark.parametrize("name", sorted(DRIVER_REPORTED_MIB))
def test_memory_is_the_driver_reported_total(name: str) -> None:
    assert catalog_gpu(name).memory_mib == DRIVER_REPORTED_MIB[name]


def test_memory_is_close_to_the_marketed_capacity(gpus: list[GpuSpec]) -> None:
    for g in gpus:
        marketed_mib = g.marketed_memory_gb * MIB_PER_GIB
        share = g.memory_mib / marketed_mib
        assert MIN_REPORTED_SHARE <= share <= MAX_REPORTED_SHARE, (
            f"{g.name}: {g.memory_mib} MiB is {share:.3f} of the marketed {g.marketed_memory_gb} GB "
            f"({marketed_mib} MiB); is memory_mib in MiB?"
        )
        assert g.memory_bytes == g.memory_mib * MiB


def test_rates_are_positive_and_consistent(gpus: list[GpuSpec]) -> None:
    for g in gpus:
        assert g.bf16_dense_tflops > 0 and g.hbm_bandwidth_gbps > 0 and g.interconnect_gbps > 0
        # GPU-to-GPU traffic never outruns the GPU's own memory.
        assert g.interconnect_gbps < g.hbm_bandwidth_gbps, g.name
        # The slowest link a catalog card uses is PCIe x8 of its generation (RTX 4060 Ti).
        assert g.interconnect_gbps >= PCIE_GBPS_X16[g.pcie_gen] / 2, g.name
        assert g.supports_fp8 == (g.fp8_dense_tflops is not None), g.name
        if g.fp8_dense_tflops is not None:
            assert g.fp8_dense_tflops >= g.bf16_dense_tflops, g.name
        assert g.source.strip(), g.name


def test_bf16_support_matches_the_architecture(gpus: list[GpuSpec]) -> None:
    without_bf16 = {g.name for g in gpus if not g.supports_bf16}
    assert without_bf16 == {"v100-sxm2-16gb", "v100-sxm2-32gb", "t4"}


def test_dense_flops_are_not_the_sparsity_figures() -> None:
    # Datasheets headline the 2:4-sparsity number; the catalog keeps the dense one.
    assert catalog_gpu("h100").bf16_dense_tflops == pytest.approx(989.4)
    assert catalog_gpu("a100").bf16_dense_tflops == pytest.approx(312)
    assert catalog_gpu("l4").bf16_dense_tflops == pytest.approx(121)


def test_vendors() -> None:
    assert catalog_gpu("mi300x").vendor == "amd"
    assert catalog_gpu("mi250x").vendor == "amd"
    assert catalog_gpu("rtx-4090").vendor == "nvidia"


@pytest.mark.parametrize(
    ("query", "stem"),
    [
        ("H100", "h100-sxm-80gb"),
        ("h100-80gb", "h100-sxm-80gb"),
        ("  H100-SXM-80GB ", "h100-sxm-80gb"),
        ("A100-40GB", "a100-sxm-40gb"),
        ("a100", "a100-sxm-80gb"),
        ("H200", "h200-sxm-141gb"),
        ("B200", "b200-sxm-180gb"),
        ("RTX4090", "rtx-4090"),
        ("4090", "rtx-4090"),
        ("Tesla-T4", "t4"),
        ("V100-32GB", "v100-sxm2-32gb"),
        ("MI300X", "mi300x"),
    ],
)
def test_lookup_is_case_insensitive_and_follows_aliases(query: str, stem: str) -> None:
    assert catalog_gpu(query).name == stem


def test_every_alias_resolves_to_its_own_entry(gpus: list[GpuSpec]) -> None:
    for g in gpus:
        for alias in g.aliases:
            assert catalog_gpu(alias.upper()).name == g.name


def test_unknown_gpu_suggests_a_close_name() -> None:
    with pytest.raises(MemplanError, match=r"(?i)did you mean") as err:
        catalog_gpu("h100-sxm-80")
    assert "h100" in str(err.value)
    assert "unknown GPU" in str(err.value)


def test_unrelated_name_still_raises_memplan_error() -> None:
    with pytest.raises(MemplanError, match="unknown GPU"):
        catalog_gpu("zzzz-no-such-accelerator")
