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


class Phase(StrEnum):
    """An interval of one step. A component is alive in some phases; a tier's answer is the largest
    phase total (``peak``), never the sum of rows that are not alive together."""

    FORWARD = "forward"
    """Training: activations being saved, layer by layer."""
    BACKWARD_START = "backward_start"
    """Training: every saved activation plus the logits/loss transients (fp32 log-softmax and its gradient)."""
    BACKWARD = "backward"
    """Training: gradients accumulating while activations are freed; recompute workspace, reduce buffers."""
    OPTIMIZER = "optimizer_step"
    """Training: optimizer states plus the step's temporaries; activations are gone."""
    LOAD = "load"
    """Serving: loading and converting the checkpoint."""
    PREFILL = "prefill"
    """Serving: one scheduler step's forward over the prompt tokens (chunked prefill plus decode)."""
    DECODE = "decode"
    """Serving: steady-state decode with the KV cache full."""


TRAIN_PHASES = (Phase.FORWARD, Phase.BACKWARD_START, Phase.BACKWARD, Phase.OPTIMIZER)
INFER_PHASES = (Phase.LOAD, Phase.PREFILL, Phase.DECODE)


@dataclass(frozen=True, slots=True)
class Row:
    """One component's bytes on one tier, with the source of its formula."""

    component: str
    tier: Tier
    bytes: int
    source: str = ""
    note: str = ""
    phases: frozenset[Phase] | None = None
    """The phases in which these bytes are alive; None: alive through the whole step."""

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


def phase_totals(rows: Iterable[Row], tier: Tier, phases: Iterable[Phase]) -> dict[Phase, int]:
    """Bytes alive on one tier in each phase: every row alive in that phase (or alive throughout)."""
    rows = [r for r in rows if r.tier is tier]
    return {p: sum(r.bytes for r in rows if r.phases is None or p in r.phases) for p in phases}


def peak(rows: Iterable[Row], tier: Tier, phases: Iterable[Phase]) -> tuple[int, Phase]:
    """The largest phase total on one tier and the phase that binds (the first one on ties)."""
    totals = phase_totals(rows, tier, phases)
    binding = max(totals, key=lambda p: totals[p])
    return totals[binding], binding


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
