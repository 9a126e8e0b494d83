"""Which combinations each training engine runs: one sentence naming the engine's rule, or None.

``violation(cfg)`` is the first rule ``cfg`` breaks; ``check(cfg)`` raises it as a MemplanError (``estimate``,
exit 2); the planner keeps only combinations without a violation (``planner.space``).
"""

from __future__ import annotations

from memplan.config import Engine, Job, JobConfig, Offload, OptimizerKind, ZeroStage
from memplan.dtypes import Dtype
from memplan.errors import MemplanError

CPU_OPTIMIZERS = (OptimizerKind.ADAMW, OptimizerKind.LION)
"""Optimizers DeepSpeed runs on offloaded states: DeepSpeedCPUAdam (deepspeed/ops/adam/cpu_adam.py) and
DeepSpeedCPULion (deepspeed/ops/lion/cpu_lion.py); runtime/engine.py raises ZeRORuntimeException for a client
optimizer with ZeRO-Offload (``zero_force_ds_cpu_optimizer``, default true)."""

MEGATRON_OPTIMIZERS = (OptimizerKind.ADAMW, OptimizerKind.SGD, OptimizerKind.SGD_MOMENTUM)
"""Megatron-LM ``--optimizer {adam, sgd}`` (megatron/training/arguments.py; megatron/core/optimizer/__init__.py)."""

PAGED_OPTIMIZERS = (OptimizerKind.ADAMW, OptimizerKind.ADAMW_8BIT)
"""bitsandbytes/optim/adamw.py: PagedAdamW (32-bit states) and PagedAdamW8bit."""

_TRAINING = (Engine.PYTORCH, Engine.FSDP2, Engine.DEEPSPEED, Engine.MEGATRON)
_NAMES = ", ".join(e.value for e in _TRAINING)


def _offloads(cfg: JobConfig) -> bool:
    return (cfg.offload_optimizer, cfg.offload_params) != (Offload.NONE, Offload.NONE)


def _dtype_rule(cfg: JobConfig) -> str | None:
    if not cfg.job.full_weights_trainable:
        return None
    if cfg.dtype in (Dtype.INT8, Dtype.INT4):
        return (f"no training engine updates {cfg.dtype.value} weights ({_NAMES} train in fp32, bf16, fp16 or fp8 "
                "over 16/32-bit masters); use --dtype bf16, or a lora/qlora job with --quant for a quantized base.")
    if cfg.dtype is Dtype.FP8 and cfg.job is Job.GALORE:
        return "fp8 training (TransformerEngine, torchao float8) is modelled for pretrain and full jobs, not galore."
    return None


def _common(cfg: JobConfig, engine: Engine) -> str | None:
    if cfg.zero > ZeroStage.NONE and engine is not Engine.DEEPSPEED:
        hint = {Engine.FSDP2: " (fsdp2 already shards params, grads and states like ZeRO-3: drop --zero)",
                Engine.MEGATRON: " (Megatron's ZeRO-1 is engine_config.use_distributed_optimizer)"}.get(engine, "")
        return f"ZeRO stages are DeepSpeed's; engine {engine.value} has none{hint}: use --engine deepspeed or --zero 0."
    if _offloads(cfg) and engine is not Engine.DEEPSPEED:
        return (f"optimizer/parameter offload is modelled as DeepSpeed's ZeRO-Offload/Infinity; engine {engine.value} "
                "does not offload here: use --engine deepspeed.")
    if cfg.engine_config.paged_optimizer and (engine is not Engine.PYTORCH or cfg.optimizer not in PAGED_OPTIMIZERS
                                              or not cfg.job.full_weights_trainable):
        return ("engine_config.paged_optimizer is bitsandbytes' PagedAdamW/PagedAdamW8bit for a full-weight job on "
                "engine pytorch (LoRA/QLoRA: lora.paged_optimizer); use --optimizer adamw or adamw-8bit there.")
    if engine is Engine.PYTORCH and (cfg.tp > 1 or cfg.pp > 1 or cfg.ep > 1):
        return ("engine pytorch (one process or DDP) has no tensor, pipeline or expert parallelism: "
                "use --engine megatron (or fsdp2/deepspeed) or --tp 1 --pp 1 --ep 1.")
    return None


def _deepspeed(cfg: JobConfig) -> str | None:
    if cfg.pp > 1 and cfg.zero >= ZeroStage.GRADIENTS:
        return ("DeepSpeed's pipeline engine asserts 'ZeRO-2 and ZeRO-3 are incompatible with pipeline parallelism' "
                "(deepspeed/runtime/pipe/engine.py): use --zero 0 or 1 with --pp, or --pp 1.")
    if cfg.offload_optimizer is not Offload.NONE and cfg.optimizer not in CPU_OPTIMIZERS:
        return (f"DeepSpeed's optimizer offload runs DeepSpeedCPUAdam or DeepSpeedCPULion, not {cfg.optimizer.value} "
                "(runtime/engine.py, zero_force_ds_cpu_optimizer): use --optimizer adamw or lion, or no offload.")
    return None


def _megatron(cfg: JobConfig) -> str | None:
    if cfg.job not in (Job.PRETRAIN, Job.FULL):
        return f"engine megatron is modelled for pretrain and full jobs, not {cfg.job.value}: use pytorch, fsdp2 or deepspeed."
    if cfg.optimizer not in MEGATRON_OPTIMIZERS:
        return (f"Megatron-LM's optimizers are adam and sgd (--optimizer in megatron/training/arguments.py), "
                f"not {cfg.optimizer.value}.")
    if cfg.quant is not None:
        return "engine megatron trains unquantized weights: drop --quant."
    return None


def _knob_rule(cfg: JobConfig, engine: Engine) -> str | None:
    """A knob changed from its default that the engine does not have is an error, not silently ignored."""
    from memplan.config import EngineConfig
    from memplan.engines.profiles import PROFILES

    default = EngineConfig()
    knobs = PROFILES[engine].knobs
    for name in type(default).model_fields:
        if getattr(cfg.engine_config, name) != getattr(default, name) and name not in knobs:
            owners = [e.value for e, p in PROFILES.items() if name in p.knobs]
            return (f"engine_config.{name} is a knob of {', '.join(owners)}; engine {engine.value} has no such "
                    f"setting (it reads {', '.join(knobs)}).")
    return None


def _optimizer_impl_rule(cfg: JobConfig, engine: Engine) -> str | None:
    """``optimizer_impl`` chooses among torch.optim's AdamW paths; DeepSpeed and Megatron run their own.
    ``grad_dtype`` is DeepSpeed's ``data_types.grad_accum_dtype`` / Megatron's main-grad dtype; torch (plain
    or FSDP2) keeps ``param.grad`` in the parameters' dtype (torch/csrc/autograd/accumulate_grad.h)."""
    if cfg.optimizer_impl is not None and engine in (Engine.DEEPSPEED, Engine.MEGATRON):
        return (f"optimizer_impl chooses torch.optim's AdamW path (engines pytorch, fsdp2); engine {engine.value} "
                "runs its own FusedAdam (or DeepSpeedCPUAdam when offloaded): drop --optimizer-impl.")
    if cfg.grad_dtype is not None and engine in (Engine.PYTORCH, Engine.FSDP2) and cfg.job.full_weights_trainable:
        return (f"engine {engine.value} keeps gradients in the parameters' dtype; grad_dtype is a setting of "
                "deepspeed (data_types.grad_accum_dtype) and megatron: drop --grad-dtype or choose --engine deepspeed.")
    return None


def violation(cfg: JobConfig) -> str | None:
    """The first engine rule ``cfg`` breaks, as one sentence; None when the engine runs it."""
    engine = cfg.effective_engine
    if not cfg.job.trains:
        return None
    if engine not in _TRAINING:
        return f"engine {engine.value} serves models; a {cfg.job.value} job needs a training engine ({_NAMES})."
    if rule := _optimizer_impl_rule(cfg, engine):
        return rule
    for rule in (_dtype_rule(cfg), _common(cfg, engine), _knob_rule(cfg, engine)):
        if rule:
            return rule
    if engine is Engine.FSDP2 and cfg.job not in (Job.PRETRAIN, Job.FULL):
        return (f"engine fsdp2 is modelled for pretrain and full jobs (sharded states and gathered units); a "
                f"{cfg.job.value} job on it is not: use --engine pytorch or deepspeed.")
    if engine is Engine.DEEPSPEED:
        return _deepspeed(cfg)
    if engine is Engine.MEGATRON:
        return _megatron(cfg)
    return None


def runnable(cfg: JobConfig) -> bool:
    return violation(cfg) is None


def check(cfg: JobConfig) -> None:
    """Raise a MemplanError (CLI exit 2) naming the engine's rule when ``cfg`` cannot run."""
    reason = violation(cfg)
    if reason:
        raise MemplanError(reason)
