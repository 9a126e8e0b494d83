"""Rows describing the catalogs, for ``memplan models`` and ``memplan gpus``."""

from __future__ import annotations

from typing import Any

from memplan.catalog.store import all_gpus, all_models
from memplan.errors import MemplanError


def model_rows(*, family: str | None = None, contains: str | None = None) -> list[dict[str, Any]]:
    from memplan.arch.build import build_architecture

    rows = []
    for spec in all_models():
        if family and spec.family.value != family.lower():
            continue
        if contains and contains.lower() not in spec.name.lower():
            continue
        arch = build_architecture(spec)
        rows.append({
            "name": spec.name,
            "family": spec.family.value,
            "params": arch.params,
            "active_params": arch.active_params,
            "layers": spec.num_hidden_layers or 0,
            "hidden": spec.hidden_size or 0,
            "heads": spec.num_attention_heads or 0,
            "kv_heads": spec.kv_heads if spec.num_attention_heads else 0,
            "experts": spec.num_experts or 0,
        })
    if family and not rows:
        raise MemplanError(f"no catalog model of family {family!r}.")
    return rows


def gpu_rows(*, contains: str | None = None, min_memory: int | None = None,
             vendor: str | None = None) -> list[dict[str, Any]]:
    gpus = all_gpus()
    vendors = sorted({g.vendor for g in gpus})
    if vendor and vendor.lower() not in vendors:  # as models --family: an unknown filter value is an error
        raise MemplanError(f"no catalog GPU of vendor {vendor!r}; the catalog has {', '.join(vendors)} GPUs.")
    rows = []
    for g in gpus:
        if contains and contains.lower() not in (g.name + " " + " ".join(g.aliases)).lower():
            continue
        if min_memory is not None and g.memory_bytes < min_memory:
            continue
        if vendor and g.vendor != vendor.lower():
            continue
        rows.append({
            "name": g.name,
            "vendor": g.vendor,
            "memory_mib": g.memory_mib,
            "memory_gib": round(g.memory_bytes / 2**30, 2),
            "capacity_gib": round(g.capacity_bytes / 2**30, 2),  # the CUDA runtime's total (catalog.capacity)
            "bf16_tflops": g.bf16_dense_tflops,
            "hbm_gbps": g.hbm_bandwidth_gbps,
            "link_gbps": g.interconnect_gbps,
            "usd_per_hour": g.price_per_hour_usd if g.price_per_hour_usd is not None else "",
        })
    return rows
