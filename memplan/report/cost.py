"""Cost of a configuration from the GPU's hourly price and the step-time model's speed."""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

from memplan.config import Job, JobConfig
from memplan.errors import MemplanError

SECONDS_PER_HOUR = 3600
TOKENS_PER_MILLION = 10**6


@dataclass(frozen=True)
class Cost:
    """Dollars of one configuration. Per-token figures use the planner's tokens per second: trained
    tokens for training jobs, served (generated) tokens for inference; the other one is None."""

    usd_per_hour: float
    """The whole job: price of one GPU per hour × GPUs."""
    usd_per_step: float
    usd_per_m_trained_tokens: float | None
    usd_per_m_served_tokens: float | None


def checked_usd_per_hour(value: float, name: str = "usd_per_hour") -> float:
    """``value`` as a price per GPU-hour; a MemplanError naming ``name`` unless it is a finite number >= 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < float("inf"):
        raise MemplanError(f"{name} must be a finite number of dollars >= 0, got {value!r}.")
    return float(value)


def cluster_usd_per_hour(usd_per_gpu_hour: float, gpus: int) -> float:
    """Dollars per hour of ``gpus`` GPUs rented at ``usd_per_gpu_hour`` each (cloud prices are per GPU-hour)."""
    return usd_per_gpu_hour * gpus


def usd_per_step(usd_per_hour: float, step_time_s: float) -> float:
    """Dollars of one optimizer step (training) or scheduler step (inference): hourly price × step time / 3600 s."""
    return usd_per_hour * step_time_s / SECONDS_PER_HOUR


def usd_per_million_tokens(usd_per_hour: float, tokens_per_s: float) -> float | None:
    """Dollars per 10^6 tokens: hourly price / (tokens per second × 3600 s) × 10^6; None at zero speed."""
    if tokens_per_s <= 0:
        return None
    return usd_per_hour / (tokens_per_s * SECONDS_PER_HOUR) * TOKENS_PER_MILLION


def cost_of(usd_per_gpu_hour: float | None, cfg: JobConfig, step_time_s: float, tokens_per_s: float) -> Cost | None:
    """The Cost of ``cfg`` on ``cfg.world_size`` GPUs at ``usd_per_gpu_hour``; None when the price is unknown."""
    if usd_per_gpu_hour is None:
        return None
    hourly = cluster_usd_per_hour(usd_per_gpu_hour, cfg.world_size)
    per_m = usd_per_million_tokens(hourly, tokens_per_s)
    serving = cfg.job is Job.INFER
    return Cost(hourly, usd_per_step(hourly, step_time_s), None if serving else per_m, per_m if serving else None)


def step_speed(est: Any) -> tuple[float, float] | None:
    """(step seconds, tokens per second) of one fixed configuration, from the planner's step-time model.

    Training: ``train_plan.step_seconds`` at the config's global batch (micro-batch × data-parallel
    ranks × gradient accumulation); tokens per step = global batch × sequence length. Inference: one decode
    step reads every GPU byte of weights and KV cache once from HBM (``cost.decode_seconds_per_token``, the
    memory-bound roofline the inference planner uses, without its tensor-parallel all-reduces); tokens per
    step = the concurrency. None when the model lacks what the time model needs.
    """
    from memplan.errors import MemplanError
    from memplan.memory.breakdown import Tier, components
    from memplan.planner import cost, train
    from memplan.planner.train_plan import step_seconds
    from memplan.units import GB

    cfg = est.config
    try:
        if cfg.job is Job.INFER:
            by_top = components(est.rows, Tier.GPU)
            read = sum(v for k, v in by_top.items() if k.split("/")[0] in ("weights", "kv_cache"))
            seconds = cost.decode_seconds_per_token(bytes_read=read, hbm_bytes_per_s=est.gpu.hbm_bandwidth_gbps * GB)
            return seconds, cfg.micro_batch / seconds if seconds > 0 else 0.0
        global_batch = cfg.micro_batch * cfg.batch_dp * cfg.grad_accum
        setting = train.TrainSetting(arch=est.arch, gpu=est.gpu, host=est.host, base=cfg, global_batch=global_batch)
        modes = [m.value for m in cfg.recompute_map] if cfg.recompute_map else [cfg.recompute.value] * len(est.arch.layers)
        seconds = step_seconds(setting, cfg, modes)
    except (MemplanError, ValueError, ZeroDivisionError):
        return None
    return seconds, global_batch * cfg.seq_len / seconds if seconds > 0 else 0.0


def cost_record(usd_per_gpu_hour: float | None, est: Any, *, speed: bool = False) -> dict[str, float | None]:
    """The sweep's cost columns of one estimate: the price per GPU-hour and the job's price per hour; with
    ``speed`` also the step time and tokens per second (``step_speed``) and the price per step, per 1M trained
    tokens and per 1M served tokens (empty where the price or the speed is unknown)."""
    hourly = cluster_usd_per_hour(usd_per_gpu_hour, est.config.world_size) if usd_per_gpu_hour is not None else None
    out: dict[str, float | None] = {"usd_per_gpu_hour": usd_per_gpu_hour, "usd_per_hour": hourly}
    if not speed:
        return out
    pace = step_speed(est)
    cost = cost_of(usd_per_gpu_hour, est.config, *pace) if pace is not None else None
    out.update({"step_time_s": pace[0] if pace else None, "tokens_per_s": pace[1] if pace else None,
                "usd_per_step": cost.usd_per_step if cost else None,
                "usd_per_m_trained_tokens": cost.usd_per_m_trained_tokens if cost else None,
                "usd_per_m_served_tokens": cost.usd_per_m_served_tokens if cost else None})
    return out
