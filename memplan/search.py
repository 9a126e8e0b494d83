"""Largest context or batch that fits, by exact re-estimation (monotone predicate, binary search)."""

from __future__ import annotations

from typing import Literal

from memplan.config import JobConfig
from memplan.estimator import Estimate, estimate
from memplan.memory.inference import max_batch, max_context

MAX_CONTEXT_TOKENS = 2**24
MAX_BATCH = 2**16


def with_size(config: JobConfig, field: Literal["context", "micro_batch"], value: int) -> JobConfig:
    """``config`` with its context (inference) / sequence length (training) or micro-batch set to ``value``."""
    if field == "micro_batch":
        return config.model_copy(update={"micro_batch": value})
    if config.job.trains:
        return config.model_copy(update={"seq_len": value})
    return config.model_copy(update={"infer": config.infer.model_copy(update={"context": value})})


def largest_fitting(est: Estimate, field: Literal["context", "micro_batch"]) -> int:
    """The largest context (tokens) or micro-batch for which the estimate still fits; 0 if none.

    vLLM and SGLang: read from the KV pool directly (``memplan.engines.vllm.capacity``, ``sglang.capacity``), the same integer the
    binary search over ``estimate`` finds, capped by max_num_seqs (concurrency) and max_model_len (context).
    """
    from memplan.config import Engine

    if est.config.engine in (Engine.VLLM, Engine.SGLANG) and not est.config.job.trains:
        from memplan.engines import sglang, vllm

        engine = vllm if est.config.engine is Engine.VLLM else sglang
        return engine.capacity(est.arch, est.config, est.gpu, est.host, field)

    def fits(value: int) -> bool:
        cfg = with_size(est.config, field, value)
        return estimate(est.model, est.gpu, cfg, host=est.host).fits

    if field == "micro_batch":
        return max_batch(fits, hi=MAX_BATCH)
    return max_context(fits, hi=MAX_CONTEXT_TOKENS)
