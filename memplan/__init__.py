"""memplan: will this model fit on this hardware, and what is the fastest configuration that does?

Python API (``memplan.api``; imports are lazy, so ``import memplan`` imports neither pandas nor numpy)::

    import memplan
    est = memplan.estimate("llama-3.1-8b", "h100-sxm-80gb", job="lora")   # Estimate: .rows .peak .fits .to_frame()
    best = memplan.plan("llama-3.1-8b", "h100-sxm-80gb", job="full").best  # Plan: .best .alternatives .status
    frame = memplan.sweep(models="all", gpus="all", jobs=["full", "lora"])  # a pandas DataFrame

See docs/api.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:  # pragma: no cover
    from memplan.api import Estimate, Plan, PlanOption, PlanStatus, Suggestion, estimate, plan, sweep
    from memplan.catalog.resolve import load_model
    from memplan.catalog.store import catalog_gpu as load_gpu
    from memplan.config import JobConfig
    from memplan.errors import MemplanError
    from memplan.memory.breakdown import Tier

_LAZY = {
    "estimate": ("memplan.api", "estimate"),
    "plan": ("memplan.api", "plan"),
    "sweep": ("memplan.api", "sweep"),
    "Estimate": ("memplan.api", "Estimate"),
    "Plan": ("memplan.api", "Plan"),
    "PlanOption": ("memplan.api", "PlanOption"),
    "PlanStatus": ("memplan.api", "PlanStatus"),
    "Suggestion": ("memplan.api", "Suggestion"),
    "JobConfig": ("memplan.config", "JobConfig"),
    "Tier": ("memplan.memory.breakdown", "Tier"),
    "load_model": ("memplan.catalog.resolve", "load_model"),
    "load_gpu": ("memplan.catalog.store", "catalog_gpu"),
    "MemplanError": ("memplan.errors", "MemplanError"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'memplan' has no attribute {name!r}")


__all__ = ["Estimate", "JobConfig", "MemplanError", "Plan", "PlanOption", "PlanStatus", "Suggestion", "Tier",
           "__version__", "estimate", "load_gpu", "load_model", "plan", "sweep"]
