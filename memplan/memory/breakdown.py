"""The one result shape: rows of (component, tier, bytes), slash-named and summed by prefix."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

TOP_LEVEL = ("weights", "gradients", "optimizer", "activations", "kv_cache", "runtime")
"""Every component name starts with one of these; summing rows by prefix gives the top-level figure."""


class Tier(StrEnum):
    """Where bytes live. GPU rows are per GPU (the most loaded one); CPU and NVMe rows are per node."""

    GPU = "gpu"
    CPU = "cpu"
    NVME = "nvme"


@dataclass(frozen=True, slots=True)
class Row:
    """One component's bytes on one tier, with the source of its formula."""

    component: str
    tier: Tier
    bytes: int
    source: str = ""
    note: str = ""

    def __post_init__(self) -> None:
        top = self.component.split("/", 1)[0]
        if top not in TOP_LEVEL:
            raise ValueError(f"component {self.component!r} must start with one of {TOP_LEVEL}")
        if not isinstance(self.bytes, int) or isinstance(self.bytes, bool):
            raise TypeError(f"{self.component}: bytes must be an int, got {type(self.bytes).__name__}")
        if self.bytes < 0:
            raise ValueError(f"{self.component}: negative bytes {self.bytes}")


def tier_total(rows: Iterable[Row], tier: Tier) -> int:
    return sum(r.bytes for r in rows if r.tier is tier)


def by_prefix(rows: Iterable[Row], tier: Tier) -> dict[str, int]:
    """Top-level totals (weights, gradients, ...) on one tier."""
    out: dict[str, int] = {}
    for r in rows:
        if r.tier is tier:
            top = r.component.split("/", 1)[0]
            out[top] = out.get(top, 0) + r.bytes
    return out


def components(rows: Iterable[Row], tier: Tier) -> dict[str, int]:
    """Component name -> bytes on one tier, rows of the same name summed, in first-seen order."""
    out: dict[str, int] = {}
    for r in rows:
        if r.tier is tier:
            out[r.component] = out.get(r.component, 0) + r.bytes
    return out
