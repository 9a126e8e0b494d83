"""Serving engines: which module computes the rows of an inference job under each engine.

``None`` (the default) and ``transformers`` keep memplan's per-component model of an HF ``generate``
process (memory.kv_cache, memory.inference, memory.runtime); ``vllm`` and ``llamacpp`` have their own
arithmetic (``memplan.engines.vllm``, ``memplan.engines.llamacpp``).
"""

from __future__ import annotations

from memplan.config import Engine, Job, JobConfig
from memplan.memory.breakdown import Row, Tier, tier_total
from memplan.memory.context import Context

OWN_ROWS = (Engine.VLLM, Engine.LLAMACPP)


def has_own_rows(cfg: JobConfig) -> bool:
    """Whether the job is served by an engine with its own memory arithmetic."""
    return cfg.job is Job.INFER and cfg.engine in OWN_ROWS


def stage_rows(ctx: Context) -> list[Row]:
    """The rows of one pipeline stage's GPU (and the host) under the job's serving engine."""
    if ctx.cfg.engine is Engine.VLLM:
        from memplan.engines import vllm

        return vllm.rows(ctx)
    from memplan.engines import llamacpp

    return llamacpp.rows(ctx)


def all_rows(ctx: Context) -> tuple[list[Row], list[str], int]:
    """Rows of the most loaded GPU over the pipeline stages, no missing components, and the stage reported."""
    from memplan.memory import components

    components.validate(ctx)
    best: tuple[list[Row], int] | None = None
    for stage in range(ctx.cfg.pp):
        rows = [r for r in stage_rows(ctx.at_stage(stage)) if r.bytes or r.tier is Tier.GPU]
        if best is None or tier_total(rows, Tier.GPU) > tier_total(best[0], Tier.GPU):
            best = (rows, stage)
    assert best is not None
    return best[0], [], best[1]
