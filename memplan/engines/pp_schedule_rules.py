"""Which pipeline schedules (``engine_config.pp_schedule``, ``arch.pp_schedules``) run where: one sentence naming the
rule, or None (``engines.rules.violation``).

Sources: torch 2.13 torch/distributed/pipelining/schedules.py (each class's ``__init__`` checks); Megatron-LM runs
1F1B or, with ``--num-layers-per-virtual-pipeline-stage``, interleaved 1F1B (megatron/core/pipeline_parallel/
schedules.py ``get_forward_backward_func``); DeepSpeed's pipeline engine runs its ``TrainSchedule``
(deepspeed/runtime/pipe/schedule.py).
"""

from __future__ import annotations

from memplan.arch.pp_schedules import SINGLE, V_SHAPE
from memplan.config import Engine, JobConfig

_OTHER_ENGINES = {
    Engine.MEGATRON: "Megatron-LM runs 1F1B, or interleaved 1F1B with --virtual-stages (megatron/core/"
                     "pipeline_parallel/schedules.py get_forward_backward_func)",
    Engine.DEEPSPEED: "DeepSpeed's pipeline engine runs its own TrainSchedule (deepspeed/runtime/pipe/schedule.py)",
}


def _stages_rule(name: str, v: int) -> str | None:
    """Stages per rank each schedule class takes: one (``PipelineScheduleSingle``), exactly two (V schedules: "ZBV
    requires exactly 2 stages per rank"), at least two for the looped multi-stage ones (torchtitan's
    ``pipeline_module_split`` gives a multi-stage schedule 2 stages per rank by default)."""
    if name in SINGLE and v != 1:
        return (f"pipeline schedule {name} runs one stage per rank (a PipelineScheduleSingle): drop --virtual-stages "
                "(perf.virtual_stages) or use Interleaved1F1B.")
    if name in V_SHAPE and v != 2:
        return (f"pipeline schedule {name} runs exactly 2 stages per rank in a V (torch raises otherwise): "
                "set perf.virtual_stages: 2 (plan: --virtual-stages 2).")
    if name not in SINGLE and name not in V_SHAPE and v < 2:
        return (f"pipeline schedule {name} runs several stages per rank: set perf.virtual_stages to 2 or more "
                "(plan: --virtual-stages).")
    return None


def _micro_batch_rule(name: str, pp: int, v: int, m: int) -> str | None:
    """torch's checks on the micro-batch count: DualPipeV needs m ≥ the 2p stages; the interleaved schedules need m
    a multiple of their rounds max(1, m // p)."""
    if name == "DualPipeV" and m < pp * v:
        return (f"ScheduleDualPipeV requires at least as many micro-batches as stages: {m} < {pp * v}; "
                "raise the global batch (a recipe's job.global_batch) to that many micro-batches per step.")
    rounds = max(1, m // pp)
    if name in ("Interleaved1F1B", "InterleavedZeroBubble") and m % rounds:
        return (f"torch's {name} requires the micro-batches ({m}) to be a multiple of its rounds max(1, m // pp) "
                f"= {rounds}: use {rounds * (m // rounds)} or {rounds * (m // rounds + 1)} micro-batches per step.")
    return None


def rule(cfg: JobConfig, engine: Engine, *, partial: bool = False) -> str | None:
    """The pipeline-schedule rule ``cfg`` breaks, or None: a schedule named on another engine than fsdp2, without
    a pipeline, or with stages per rank or micro-batches its torch class refuses."""
    name = cfg.engine_config.pp_schedule
    if name is None:
        return None
    if engine is not Engine.FSDP2:
        why = _OTHER_ENGINES.get(engine, f"engine {engine.value} has no pipeline")
        return (f"engine_config.pp_schedule chooses a torch.distributed.pipelining schedule (engine fsdp2); {why}: "
                "drop --pp-schedule or use --engine fsdp2.")
    if cfg.pp <= 1:
        if partial:
            return None
        return f"pipeline schedule {name} needs a pipeline: use --pp 2 or more, or drop --pp-schedule."
    if name in V_SHAPE and not cfg.job.full_weights_trainable:
        return (f"pipeline schedule {name} is modelled for pretrain and full jobs (its V puts the output layer on "
                "rank 0; memplan's adapters follow the looped placement): use 1F1B or Interleaved1F1B for "
                f"{cfg.job.value}.")
    v = max(1, cfg.perf.virtual_stages)
    return _stages_rule(name, v) or (None if partial else _micro_batch_rule(name, cfg.pp, v, cfg.grad_accum))
