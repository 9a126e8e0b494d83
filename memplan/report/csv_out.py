"""CSV: one row per configuration, exact int ``*_bytes`` columns per component and tier, plus GiB columns."""

from __future__ import annotations

from typing import Any

from memplan.estimate import Estimate
from memplan.memory.breakdown import Tier, components
from memplan.units import GiB


def estimate_record(est: Estimate) -> dict[str, Any]:
    """A flat record of one estimate (config fields, totals, components) for CSV."""
    cfg = est.config
    rec: dict[str, Any] = {
        "model": est.model.name,
        "params": est.arch.params,
        "gpu": est.gpu.name,
        "gpus_per_node": cfg.gpus_per_node,
        "nodes": cfg.nodes,
    }
    for key, value in cfg.model_dump(mode="json").items():
        if isinstance(value, dict):
            for sub, v in value.items():
                rec[f"{key}_{sub}"] = ",".join(v) if isinstance(v, list) else v
        elif key not in rec:
            rec[key] = value
    for tier in Tier:
        rec[f"{tier.value}_total_bytes"] = est.total(tier)
        rec[f"{tier.value}_capacity_bytes"] = est.capacity(tier)
        rec[f"{tier.value}_total_gib"] = round(est.total(tier) / GiB, 4)
        for name, nbytes in components(est.rows, tier).items():
            rec[f"{tier.value}:{name}_bytes"] = nbytes
            rec[f"{tier.value}:{name}_gib"] = round(nbytes / GiB, 4)
    rec["fits"] = est.fits
    rec["headroom_bytes"] = est.headroom_bytes
    return rec


def records_to_csv(records: list[dict[str, Any]]) -> str:
    """CSV through pandas, ``*_bytes`` columns as exact ints even where rows differ in their components
    (a component a row lacks holds 0 bytes on that tier; an unset size stays empty), never floats."""
    import pandas as pd

    df = pd.DataFrame.from_records(records)
    for col in [c for c in df.columns if c.endswith(("_bytes", "_gib"))]:
        fill = 0 if ":" in col else None
        if col.endswith("_bytes"):
            df[col] = pd.array([r.get(col, fill) for r in records], dtype="Int64")
        elif fill is not None:
            df[col] = df[col].fillna(0.0)
    return df.to_csv(index=False)
