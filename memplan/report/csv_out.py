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
    rec["fits"] = est.fits
    rec["headroom_bytes"] = est.headroom_bytes
    return rec


def records_to_csv(records: list[dict[str, Any]]) -> str:
    import pandas as pd

    return pd.DataFrame.from_records(records).to_csv(index=False)
