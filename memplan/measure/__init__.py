"""Measurements on real torch models, used to check the analytic memory model.

Everything here imports torch lazily, inside functions: ``import memplan.measure`` stays
cheap and works without the ``measure`` extra installed.
"""

from __future__ import annotations

from memplan.measure.saved import saved_bytes

__all__ = ["saved_bytes"]
