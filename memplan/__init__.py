"""memplan: will this model fit on this hardware, and what is the fastest configuration that does?

Python API (imports are lazy, so ``import memplan`` stays cheap)::

    from memplan import estimate, load_model, load_gpu
    est = estimate("llama-3.1-8b", "h100-sxm-80gb", job="lora")
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:  # pragma: no cover
    from memplan.catalog.resolve import load_model
    from memplan.catalog.store import catalog_gpu as load_gpu
    from memplan.config import JobConfig
    from memplan.estimate import Estimate, estimate

_LAZY = {
    "estimate": ("memplan.estimate", "estimate"),
    "Estimate": ("memplan.estimate", "Estimate"),
    "JobConfig": ("memplan.config", "JobConfig"),
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


__all__ = ["Estimate", "JobConfig", "MemplanError", "__version__", "estimate", "load_gpu", "load_model"]
