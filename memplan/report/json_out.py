"""The JSON contract of ``estimate`` (schema_version 1): exact int bytes per component and tier.

Extend it; never rename a field without bumping SCHEMA_VERSION.
"""

from __future__ import annotations

import json
from typing import Any

from memplan.estimator import Estimate
from memplan.memory.breakdown import Tier, components

SCHEMA_VERSION = 1


def model_dict(est: Estimate) -> dict[str, Any]:
    spec = est.model
    return {
        "name": spec.name,
        "family": spec.family.value,
        "params": est.arch.params,
        "active_params": est.arch.active_params,
        "published_params": spec.published_params,
        "source": spec.source,
    }


def hardware_dict(est: Estimate) -> dict[str, Any]:
    cfg = est.config
    return {
        "gpu": est.gpu.name,
        "gpu_memory_bytes": est.gpu.memory_bytes,
        "gpu_capacity_bytes": est.gpu.capacity_bytes,
        "gpu_capacity_source": est.gpu.capacity_source,
        "gpus_per_node": cfg.gpus_per_node,
        "nodes": cfg.nodes,
        "cpu_ram_bytes": est.host.cpu_ram_bytes,
        "nvme_bytes": est.host.nvme_bytes,
    }


def tier_dict(est: Estimate, tier: Tier) -> dict[str, Any]:
    return {
        "total_bytes": est.total(tier),
        "capacity_bytes": est.capacity(tier),
        "headroom_bytes": est.headroom(tier),
        "components": components(est.rows, tier),
        "peak_bytes": est.peak(tier),
        "peak_phase": est.peak_phase(tier).value,
        "phases": {p.value: n for p, n in est.phases(tier).items()},
    }


def estimate_dict(est: Estimate) -> dict[str, Any]:
    """The estimate as the documented JSON object (see README, 'JSON output')."""
    return {
        "schema_version": SCHEMA_VERSION,
        "model": model_dict(est),
        "hardware": hardware_dict(est),
        "config": est.config.model_dump(mode="json"),
        "memory": {tier.value: tier_dict(est, tier) for tier in Tier},
        "fits": est.fits,
        "headroom_bytes": est.headroom_bytes,
        "binding_tier": est.binding_tier.value,
        "not_modelled": list(est.not_modelled),
        "warnings": list(est.warnings),
        "assumptions": dict(est.assumptions),
        "serving": dict(est.serving),
        "sources": {r.component: r.source for r in est.rows if r.source},
        "engine": est.engine.value,
        "engine_reason": est.engine_reason,
    }


def dumps(obj: Any) -> str:
    """Deterministic JSON: sorted keys are NOT used (component order is meaningful); fixed indent."""
    return json.dumps(obj, indent=2, ensure_ascii=False)
