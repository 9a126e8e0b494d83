"""Megatron-Core's interleaved-schedule knobs: ``microbatch_group_size_per_vp_stage`` and
``overlap_moe_expert_parallel_comm`` (``EngineConfig``), refused where Megatron-Core refuses them. One sentence per
broken rule, or None (``engines.rules``). Their bytes: ``arch.interleaved``.

Sources (Megatron-LM main, d98e8a6): megatron/core/pipeline_parallel/schedules.py
``forward_backward_pipelining_with_interleaving`` (the group size must lie in [PP, M]; "The remainder of M ... divided
by N ... should be 0, or larger than or equal to the pipeline-parallel size"); megatron/core/transformer/
transformer_config.py ``__post_init__`` (the EP all-to-all overlap's asserts).
"""

from __future__ import annotations

from memplan.config import JobConfig, Recompute
from memplan.dtypes import Dtype

_GROUP = "engine_config.microbatch_group_size_per_vp_stage"
_NAME = "overlap_moe_expert_parallel_comm"
_OVERLAP = f"engine_config.{_NAME}"


def _interleaved(cfg: JobConfig) -> bool:
    return cfg.pp > 1 and cfg.perf.virtual_stages > 1


def group_rule(cfg: JobConfig, *, partial: bool = False) -> str | None:
    """g acts in Megatron's interleaved schedule only (``forward_backward_pipelining_without_interleaving`` never
    reads it), with pp ≤ g ≤ m and m mod g either 0 or at least pp. ``partial``: the plan has not fixed pp or m."""
    g = cfg.engine_config.microbatch_group_size_per_vp_stage
    if g is None:
        return None
    if not _interleaved(cfg):
        if partial and cfg.perf.virtual_stages > 1:
            return None
        return (f"{_GROUP} groups the micro-batches of Megatron's interleaved 1F1B, which runs with pp > 1 and "
                "virtual_stages > 1 only: add --pp 2 or more and --virtual-stages 2 or more, or drop it.")
    if g < cfg.pp:
        return (f"Megatron-Core requires {_GROUP} in [pp, micro-batches] (schedules.py): {g} < pp = {cfg.pp}; use "
                f"{cfg.pp} or more.")
    if partial:
        return None
    m = cfg.grad_accum
    if g > m:
        return (f"Megatron-Core requires {_GROUP} in [pp, micro-batches] (schedules.py): {g} > the {m} micro-batches "
                "per step; lower it or raise the micro-batches (--grad-accum, job.global_batch).")
    if 0 < m % g < cfg.pp:
        return (f"Megatron-Core requires the micro-batches ({m}) modulo {_GROUP} ({g}) to be 0 or at least pp = "
                f"{cfg.pp} (schedules.py, 'dependency bubbles'): use a group size that divides {m}.")
    return None


def _recompute_modes(cfg: JobConfig) -> set[Recompute]:
    return {cfg.recompute, *(cfg.recompute_map or ())}


def overlap_rule(cfg: JobConfig, *, partial: bool = False) -> str | None:
    """Megatron-Core's asserts for the EP all-to-all overlap (transformer_config.py): expert parallelism > 1, a
    virtual pipeline when pp > 1, no full recompute, bf16 or fp16 (fp8 training runs on bf16), and no "moe" in
    ``recompute_modules`` (memplan does not model that module). Without a pipeline Megatron runs
    ``combined_1f1b_schedule_for_no_pipelining``, which pairs one micro-batch's forward with another's backward
    layer by layer: memplan does not model that pairing yet, so it refuses pp = 1."""
    if not cfg.engine_config.overlap_moe_expert_parallel_comm:
        return None
    if cfg.ep <= 1 and not partial:
        return (f"Megatron-Core asserts that {_OVERLAP} 'is only supported with expert model parallelism': use "
                "--ep 2 or more on a MoE model, or drop it.")
    if Recompute.FULL in _recompute_modes(cfg):
        return f"Megatron-Core asserts 'disable full recomputation when enabling {_NAME}': drop --recompute full."
    if cfg.dtype not in (Dtype.BF16, Dtype.FP16, Dtype.FP8):
        return f"Megatron-Core runs {_NAME} on bf16 or fp16 models only: use --dtype bf16."
    if cfg.pp > 1 and cfg.perf.virtual_stages <= 1:
        return (f"Megatron-Core asserts that {_NAME} with pp > 1 needs a virtual pipeline "
                "(virtual_pipeline_model_parallel_size): add --virtual-stages 2 or more.")
    if cfg.pp <= 1 and not partial:
        return (f"{_OVERLAP} without a pipeline (combined_1f1b_schedule_for_no_pipelining, one micro-batch's forward "
                "paired with another's backward) is not modelled by memplan: use --pp 2 or more with "
                "--virtual-stages, or drop it.")
    return None
