"""The execution plan: what job runs, how it is parallelized, where states live.

A JobConfig is validated once at the boundary (CLI flags, recipe, Python API) and then
read by the pure memory functions. Invalid combinations raise MemplanError with the field named.

The definitions live in smaller modules, and every name is importable from here: ``config_enums`` (Job, Engine,
the other enums and MAX_GPUS), ``config_base`` (Strict, reject_bools), ``config_train`` (LoraConfig,
GaloreConfig, PerfConfig, EngineConfig), ``config_serve`` (InferConfig, ServeConfig), ``config_rules`` (which
fields each job reads), ``config_job`` (JobConfig). This module adds the helpers that build or compare whole
JobConfigs.
"""

from __future__ import annotations

from memplan.config_base import Strict, reject_bools
from memplan.config_enums import (
    MAX_GPUS,
    Accounting,
    CpComm,
    Engine,
    Job,
    Offload,
    OptimizerImpl,
    OptimizerKind,
    Recompute,
    ZeroStage,
)
from memplan.config_job import JobConfig
from memplan.config_rules import (
    NOT_READ,
    QUANTIZED_BASE_JOBS,
    SIXTEEN_BIT_WORDS,
    TRAINING_ONLY,
    changed_fields,
    not_read_error,
    perf_not_read,
)
from memplan.config_serve import InferConfig, ServeConfig
from memplan.config_train import EngineConfig, GaloreConfig, LoraConfig, MegatronRecomputeModule, PerfConfig

__all__ = [
    "MAX_GPUS",
    "NOT_READ",
    "QUANTIZED_BASE_JOBS",
    "SIXTEEN_BIT_WORDS",
    "TRAINING_ONLY",
    "Accounting",
    "CpComm",
    "Engine",
    "EngineConfig",
    "GaloreConfig",
    "InferConfig",
    "Job",
    "JobConfig",
    "LoraConfig",
    "MegatronRecomputeModule",
    "Offload",
    "OptimizerImpl",
    "OptimizerKind",
    "PerfConfig",
    "Recompute",
    "ServeConfig",
    "Strict",
    "ZeroStage",
    "changed_fields",
    "not_read_error",
    "perf_not_read",
    "reject_bools",
    "retarget",
    "unread_by_all",
]


def unread_by_all(cfg: JobConfig, jobs: tuple[Job, ...]) -> list[str]:
    """Fields set in ``cfg`` (other than their defaults) that none of ``jobs`` reads: a grid over several
    jobs reads a field if any of its jobs does (``quant`` only frozen-base jobs)."""
    names = tuple(n for n in JobConfig.model_fields if n != "job")
    wrong = [w for w in changed_fields(cfg, names) if all(w.split(".")[0] in NOT_READ[j] for j in jobs)]
    if not any(j in QUANTIZED_BASE_JOBS for j in jobs):  # what ``retarget`` drops for full-weight jobs
        wrong += [w for w in changed_fields(cfg, ("quant", "bnb_version", "bnb_integration")) if w not in wrong]
    return [w for w in wrong if w != "lora.dtype" or Job.QLORA not in jobs]


def retarget(cfg: JobConfig, job: Job) -> JobConfig:
    """``cfg`` for another job: the fields that ``job`` does not read back at their defaults (a sweep over
    jobs, a suggestion to switch job), so the new configuration validates. Fields never set stay unset."""
    data = {k: v for k, v in cfg.model_dump(exclude_unset=True).items() if k not in NOT_READ[job]}
    if job is not cfg.job and isinstance(data.get("lora"), dict) and Job.QLORA in (job, cfg.job):
        data["lora"] = {k: v for k, v in data["lora"].items() if k != "dtype"}  # the new job's adapter default
    if job not in QUANTIZED_BASE_JOBS:  # full-weight jobs: no quantized layers, so no bitsandbytes settings either
        for name in ("quant", "quant_map", "bnb_version", "bnb_integration"):
            data.pop(name, None)
    return JobConfig.model_validate({**data, "job": job})
