"""Settings that only a serving plan's time model reads, refused where only memory is computed."""

from __future__ import annotations

from memplan.config import JobConfig
from memplan.errors import MemplanError

PLAN_ONLY_SERVE = ("prompt_tokens", "hbm_efficiency", "compute_efficiency")
"""``ServeConfig`` fields that only the serving plan's time model reads (``planner.serve_cost``): the prompt
length of the time to first token and the shares of peak bandwidth and FLOP/s; no byte depends on them."""


def refuse_plan_only(cfg: JobConfig, where: str) -> None:
    """A MemplanError naming the ``PLAN_ONLY_SERVE`` settings ``cfg`` sets: ``where`` (estimate, sweep) computes
    memory, which they do not change (``memplan plan`` offers them as --prompt-tokens, --hbm-efficiency and
    --compute-efficiency; ``memplan estimate`` and ``sweep`` do not)."""
    given = [f"serve.{name}" for name in PLAN_ONLY_SERVE if getattr(cfg.serve, name) is not None]
    if given:
        one = len(given) == 1
        raise MemplanError(f"{where}: {', '.join(given)} only {'times' if one else 'time'} a serving plan "
                           f"(memplan.plan, 'memplan plan') and {'changes' if one else 'change'} no byte; drop "
                           f"{'it' if one else 'them'} here.")
