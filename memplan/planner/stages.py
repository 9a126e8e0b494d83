"""Memory of every pipeline stage of one configuration: which layers each stage holds and its GPU bytes.

``estimate`` reports the most loaded stage; with uneven stages (``arch.parallel.balanced_stage_sizes``) and
1F1B's in-flight micro-batches (more on the first stages) the others differ, so plans show all of them.
"""

from __future__ import annotations

from typing import Any

from memplan.arch.parallel import arch_stage_ranges
from memplan.memory import components
from memplan.memory.breakdown import Tier, peak
from memplan.memory.context import Context


def stage_table(est: Any) -> list[dict[str, Any]]:
    """One entry per pipeline stage: its index, first and last layer (None for a stage without layers),
    layer count and GPU bytes (the stage's phase peak, as ``estimate`` reports for its most loaded stage)."""
    cfg = est.config
    ctx = Context(est.arch, cfg, est.gpu, est.host)
    ranges = arch_stage_ranges(est.arch, cfg.pp, ctx.balanced) if est.arch.layers else (range(0),) * cfg.pp
    phases = components.job_phases(cfg)
    out = []
    for stage, rng in enumerate(ranges):
        rows, _ = components.stage_rows(ctx.at_stage(stage))
        out.append({"stage": stage, "first_layer": rng.start if len(rng) else None,
                    "last_layer": rng.stop - 1 if len(rng) else None, "layers": len(rng),
                    "gpu_bytes": peak(rows, Tier.GPU, phases)[0]})
    return out
