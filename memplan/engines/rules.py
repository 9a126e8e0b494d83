"""Which combinations each training engine runs: one sentence naming the engine's rule, or None.

``violation(cfg)`` is the first rule ``cfg`` breaks; ``check(cfg)`` raises it as a MemplanError (``estimate``,
exit 2); the planner keeps only combinations without a violation (``planner.space``).
"""

from __future__ import annotations

from memplan.config import Accounting, Engine, Job, JobConfig, Offload, OptimizerKind, Recompute, ZeroStage
from memplan.dtypes import Dtype
from memplan.engines import megatron_rules, megatron_schedule_rules, pp_schedule_rules
from memplan.errors import MemplanError

CPU_OPTIMIZERS = (OptimizerKind.ADAMW, OptimizerKind.LION)
"""Optimizers DeepSpeed runs on offloaded states: DeepSpeedCPUAdam (deepspeed/ops/adam/cpu_adam.py) and
DeepSpeedCPULion (deepspeed/ops/lion/cpu_lion.py); runtime/engine.py raises ZeRORuntimeException for a client
optimizer with ZeRO-Offload (``zero_force_ds_cpu_optimizer``, default true)."""

MEGATRON_OPTIMIZERS = (OptimizerKind.ADAMW, OptimizerKind.SGD, OptimizerKind.SGD_MOMENTUM)
"""Megatron-LM ``--optimizer {adam, sgd}`` (megatron/training/arguments.py; megatron/core/optimizer/__init__.py)."""

PAGED_OPTIMIZERS = (OptimizerKind.ADAMW, OptimizerKind.ADAMW_8BIT)
"""bitsandbytes/optim/adamw.py: PagedAdamW (32-bit states) and PagedAdamW8bit."""

_TRAINING = (Engine.PYTORCH, Engine.FSDP1, Engine.FSDP2, Engine.DEEPSPEED, Engine.MEGATRON)
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
                Engine.FSDP1: " (fsdp1 shards like ZeRO-3 with FULL_SHARD, ZeRO-2 with SHARD_GRAD_OP: "
                              "engine_config.sharding_strategy)",
                Engine.MEGATRON: " (Megatron's ZeRO-1 is engine_config.use_distributed_optimizer)"}.get(engine, "")
        return f"ZeRO stages are DeepSpeed's; engine {engine.value} has none{hint}: use --engine deepspeed or --zero 0."
    if engine is Engine.FSDP1 and _offloads(cfg):
        if (cfg.offload_optimizer, cfg.offload_params) != (Offload.CPU, Offload.CPU):
            return ("engine fsdp1 offloads with CPUOffload(offload_params=True), which moves the parameter shards, "
                    "the gradients and the optimizer step to the CPU together: use --offload-params cpu "
                    "--offload-optimizer cpu, or neither.")
    elif _offloads(cfg) and engine is not Engine.DEEPSPEED:
        return (f"optimizer/parameter offload is modelled as DeepSpeed's ZeRO-Offload/Infinity; engine {engine.value} "
                "does not offload here: use --engine deepspeed.")
    if cfg.engine_config.paged_optimizer and (engine is not Engine.PYTORCH or cfg.optimizer not in PAGED_OPTIMIZERS
                                              or not cfg.job.full_weights_trainable):
        return ("engine_config.paged_optimizer is bitsandbytes' PagedAdamW/PagedAdamW8bit for a full-weight job on "
                "engine pytorch (LoRA/QLoRA: lora.paged_optimizer); use --optimizer adamw or adamw-8bit there.")
    if engine is Engine.FSDP1 and (cfg.tp > 1 or cfg.pp > 1 or cfg.ep > 1):
        return ("engine fsdp1 is modelled for data parallelism only (FlatParameters over one data-parallel group): "
                "use --tp 1 --pp 1 --ep 1, or --engine fsdp2/megatron for model parallelism.")
    if engine is Engine.PYTORCH and (cfg.tp > 1 or cfg.pp > 1 or cfg.ep > 1):
        return ("engine pytorch (one process or DDP) has no tensor, pipeline or expert parallelism: "
                "use --engine megatron (or fsdp2/deepspeed) or --tp 1 --pp 1 --ep 1.")
    return None


def _context_parallel(cfg: JobConfig, engine: Engine) -> str | None:
    """Context parallelism only where the engine runs it, with the exchange it implements
    (``memory.context_parallel.ENGINE_COMMS``), and with a flash/SDPA kernel (TransformerEngine's CP runs its
    flash or fused attention; torch ``context_parallel`` dispatches the SDPA flash/efficient/cuDNN ops)."""
    if cfg.cp == 1:
        return None
    from memplan.memory.context_parallel import ENGINE_COMMS

    comms = ENGINE_COMMS.get(engine, ())
    if cfg.cp_comm not in comms:
        runs = ", ".join(f"{e.value} ({'/'.join(c.value for c in cs)})" for e, cs in ENGINE_COMMS.items()
                         if cfg.cp_comm in cs)
        what = f"has context parallelism with {'/'.join(c.value for c in comms)} only" if comms else "has none"
        return (f"--cp-comm {cfg.cp_comm.value}: engine {engine.value} {what}; {cfg.cp_comm.value} runs on {runs}.")
    if cfg.attention_impl == "eager":
        return ("context parallelism splits a flash/SDPA attention kernel over the sequence (TransformerEngine, "
                "torch context_parallel); eager attention has none: use --attention flash or sdpa.")
    return None


def _recompute_rule(cfg: JobConfig, engine: Engine) -> str | None:
    """A recompute mode (``recompute`` or any layer's in ``recompute_map``) the engine does not run
    (``Profile.recompute``): Megatron's selective recompute is its sub-module recompute (core attention), not
    torchtitan's op-level policy."""
    from memplan.engines.profiles import PROFILES

    runs = PROFILES[engine].recompute
    modes = dict.fromkeys((cfg.recompute, *(cfg.recompute_map or ())))
    for mode in modes:
        if mode not in runs:
            owners = ", ".join(e.value for e, p in PROFILES.items() if mode in p.recompute)
            return (f"--recompute {mode.value}: engine {engine.value} runs {', '.join(m.value for m in runs)} "
                    f"only; {mode.value} runs on {owners}.")
    return None


def _deepspeed(cfg: JobConfig) -> str | None:
    if cfg.pp > 1 and cfg.zero >= ZeroStage.GRADIENTS:
        return ("DeepSpeed's pipeline engine asserts 'ZeRO-2 and ZeRO-3 are incompatible with pipeline parallelism' "
                "(deepspeed/runtime/pipe/engine.py): use --zero 0 or 1 with --pp, or --pp 1.")
    if cfg.pp > 1 and cfg.perf.virtual_stages > 1:
        return ("DeepSpeed's pipeline engine runs one model chunk per stage (deepspeed/runtime/pipe/schedule.py "
                "TrainSchedule, 1F1B): --virtual-stages needs an interleaving engine, --engine megatron or fsdp2.")
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
    return megatron_rules.precision_aware_rule(cfg) or megatron_rules.fp8_rule(cfg)


def _knob_rule(cfg: JobConfig, engine: Engine) -> str | None:
    """A knob changed from its default that the engine does not have is an error, not silently ignored."""
    from memplan.config import EngineConfig
    from memplan.engines.profiles import PROFILES

    default = EngineConfig()
    knobs = PROFILES[engine].knobs
    for name in type(default).model_fields:
        if name in NCCL_KNOBS:
            continue
        if getattr(cfg.engine_config, name) != getattr(default, name) and name not in knobs:
            owners = [e.value for e, p in PROFILES.items() if name in p.knobs]
            return (f"engine_config.{name} is a knob of {', '.join(owners)}; engine {engine.value} has no such "
                    f"setting (it reads {', '.join(knobs)}).")
    return None


NCCL_KNOBS = ("nccl_buffsize", "nccl_max_nchannels", "nccl_nvls_enable", "nccl_nvls_chunksize")
"""NCCL's environment (memory.nccl): every training engine runs NCCL, so each reads these."""


def _nccl_rule(cfg: JobConfig) -> str | None:
    """An NCCL knob set where no NCCL communicator exists (one GPU) moves no byte: an error, not ignored."""
    from memplan.config import EngineConfig

    default = EngineConfig()
    changed = [n for n in NCCL_KNOBS if getattr(cfg.engine_config, n) != getattr(default, n)]
    if changed and cfg.world_size <= 1:
        return (f"engine_config.{changed[0]} sets NCCL's environment; a job on one GPU creates no NCCL communicator: "
                "drop it or use --gpus 2 or more.")
    return None


def _optimizer_impl_rule(cfg: JobConfig, engine: Engine) -> str | None:
    """``optimizer_impl`` chooses among torch.optim's AdamW paths; DeepSpeed and Megatron run their own.
    ``grad_dtype`` is DeepSpeed's ``data_types.grad_accum_dtype`` / Megatron's main-grad dtype; torch (plain
    or FSDP2) keeps ``param.grad`` in the parameters' dtype (torch/csrc/autograd/accumulate_grad.h)."""
    if cfg.optimizer_impl is not None and engine in (Engine.DEEPSPEED, Engine.MEGATRON):
        return (f"optimizer_impl chooses torch.optim's AdamW path (engines pytorch, fsdp2); engine {engine.value} "
                "runs its own FusedAdam (or DeepSpeedCPUAdam when offloaded): drop --optimizer-impl.")
    if cfg.grad_dtype is not None and engine in (Engine.PYTORCH, Engine.FSDP1, Engine.FSDP2) \
            and cfg.job.full_weights_trainable:
        return (f"engine {engine.value} keeps gradients in the parameters' dtype; grad_dtype is a setting of "
                "deepspeed (data_types.grad_accum_dtype) and megatron: drop --grad-dtype or choose --engine deepspeed.")
    return None


_FULL_WEIGHT_BUFFERS = ("gradient_as_bucket_view", "reshard_after_forward", "fsdp_prefetch", "reduce_bucket_size",
                        "overlap_comm", "contiguous_gradients", "stage3_max_live_parameters",
                        "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold", "use_distributed_optimizer")
"""Knobs that size an engine's buffers over the full-weight states (memory.engine_buffers, engine_states)."""
_DATA_PARALLEL = ("gradient_as_bucket_view", "reshard_after_forward", "fsdp_prefetch", "use_distributed_optimizer")
"""Knobs of buffers that exist only across data-parallel ranks (DDP buckets, FSDP2 all-gathers, Megatron's
distributed optimizer shards)."""
_ZERO3 = ("stage3_max_live_parameters", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold")


def _knob_effect_rule(cfg: JobConfig) -> str | None:
    """A knob of the job's engine, changed from its default, in a configuration where it moves no byte is an
    error naming why (``memory.engine_buffers``: DDP buckets and FSDP2 gathers exist only with dp > 1;
    DeepSpeed's reduce bucket only at ZeRO ≥ 1, its double buffer (overlap_comm) only at ZeRO-1/2, the
    stage3_* knobs only at ZeRO-3)."""
    from memplan.config import EngineConfig

    default = EngineConfig()
    if cfg.engine_config.deallocate_pipeline_outputs and not (cfg.pp > 1 and cfg.job.trains):
        return ("engine_config.deallocate_pipeline_outputs frees pipeline stage outputs (memory.pp_stage_buffers); "
                "a training job with pp = 1 or a serving job has none, so it moves no byte: use --pp 2 or more.")
    if rule := _return_outputs_rule(cfg):
        return rule
    changed = [n for n in ("bucket_cap_mb", "allgather_bucket_size", *_FULL_WEIGHT_BUFFERS)
               if getattr(cfg.engine_config, n) != getattr(default, n)]
    for name in changed:
        knob = f"engine_config.{name}"
        if name == "bucket_cap_mb":
            return (f"{knob} sizes each DDP bucket, not their total: the buckets together hold one copy of the "
                    "gradients (torch/csrc/distributed/c10d/reducer.cpp), so it moves no byte; drop --bucket-cap-mb.")
        if name == "allgather_bucket_size":
            return (f"{knob} (DeepSpeed's all-gather of updated ZeRO-1/2 partitions) is not modelled by memplan: "
                    "drop --allgather-bucket-size.")
        if cfg.accounting is Accounting.PAPER:
            return f"{knob} sizes an engine buffer; the paper's accounting (--accounting paper) counts none: drop it."
        fsdp2_adapters = (cfg.effective_engine is Engine.FSDP2 and cfg.job in (Job.LORA, Job.QLORA)
                          and name in ("reshard_after_forward", "fsdp_prefetch"))  # memory.engine_fsdp2_lora
        if (not cfg.job.full_weights_trainable or cfg.job is Job.GALORE) and not fsdp2_adapters:
            return (f"{knob} sizes the engine's buffers of full-weight states (pretrain, full jobs); a "
                    f"{cfg.job.value} job's are not modelled with it: drop it.")
        if name in _DATA_PARALLEL and cfg.dp <= 1:
            return f"{knob} acts across data-parallel ranks; with one (dp=1) it moves no byte: use --gpus 2 or more."
        if name in _ZERO3 and cfg.zero is not ZeroStage.PARAMETERS:
            return f"{knob} is a ZeRO-3 setting; at ZeRO-{int(cfg.zero)} it moves no byte: use --zero 3."
        if name in ("reduce_bucket_size", "contiguous_gradients") and cfg.zero is ZeroStage.NONE:
            return f"{knob} sizes ZeRO's gradient reduce bucket; ZeRO-0 has none: use --zero 1, 2 or 3."
        if name == "overlap_comm" and cfg.zero in (ZeroStage.NONE, ZeroStage.PARAMETERS):
            return (f"{knob} doubles ZeRO-1/2's reduce bucket (stage_1_and_2.py ipg buffers); at ZeRO-{int(cfg.zero)} "
                    "it moves no byte in memplan's model: use --zero 1 or 2, or drop it.")
        if name == "reduce_bucket_size" and not cfg.engine_config.contiguous_gradients:
            return f"{knob} sizes the contiguous gradient bucket; with contiguous_gradients off there is none."
    return None


def _return_outputs_rule(cfg: JobConfig) -> str | None:
    """``engine_config.pp_return_outputs`` off (torch's ``step(return_outputs=False)``) moves bytes only where the last
    stage would keep them (``memory.pp_outputs``): a training job pipelined by torch (pp > 1) that does not
    deallocate its stage outputs; the engine itself is ``_knob_rule``'s (fsdp2's knob). Under torch pipelining the
    loop's model output is step()'s return value, so ``kept_output`` would count it twice."""
    knobs = cfg.engine_config
    pipelined = cfg.pp > 1 and cfg.job.trains and cfg.effective_engine is Engine.FSDP2
    if pipelined and cfg.kept_output != "none":
        return (f"kept_output={cfg.kept_output} counts a training loop's own model output; under torch pipelining "
                "(fsdp2 with --pp) the loop gets the last stage's outputs from schedule.step(), counted by "
                "engine_config.pp_return_outputs (memory.pp_outputs): drop --kept-output.")
    if knobs.pp_return_outputs:
        return None
    if not (cfg.pp > 1 and cfg.job.trains):
        return ("engine_config.pp_return_outputs is torch pipelining's step(return_outputs=...); a training job with "
                "pp = 1 or a serving job keeps no pipeline output, so it moves no byte: use --pp 2 or more, or drop it.")
    if knobs.deallocate_pipeline_outputs:
        return ("engine_config.pp_return_outputs=false moves no byte with deallocate_pipeline_outputs, whose schedule "
                "already frees every stage output (the last stage's included): drop one of them.")
    return None


def _hybrid_rule(cfg: JobConfig, *, partial: bool) -> str | None:
    """Hybrid sharding knobs (``memory.zero.shard_degree``): a shard group of 2 or more ranks that divides the
    data-parallel degree, for jobs that train every weight; MiCS and hpZ are ZeRO-3's (deepspeed/runtime/zero/
    config.py: ``mics_shard_size`` and ``zero_hpz_partition_size`` act in stage 3's partitioned parameters).
    ``partial``: the ZeRO stage and data-parallel degree are not fixed yet."""
    knobs = cfg.engine_config
    named = [(n, v) for n, v in (("hsdp_shard_size", knobs.hsdp_shard_size), ("mics_shard_size", knobs.mics_shard_size),
                                 ("zero_hpz_partition_size", knobs.zero_hpz_partition_size if
                                  knobs.zero_hpz_partition_size > 1 else None)) if v is not None]
    if not named:
        return None
    if len(named) > 1:
        return "DeepSpeed runs MiCS (mics_shard_size) or ZeRO++ hpZ (zero_hpz_partition_size), not both: drop one."
    name, size = named[0]
    if cfg.job not in (Job.PRETRAIN, Job.FULL):
        return f"engine_config.{name} shards full-weight states (pretrain, full jobs), not a {cfg.job.value} job: drop it."
    if size < 2:
        return (f"engine_config.{name}=1 shards over one rank, i.e. replicates everything: that is plain data "
                "parallelism (--engine pytorch) or ZeRO-0; use a shard group of 2 or more.")
    if name == "zero_hpz_partition_size" and cfg.accounting is Accounting.PAPER:
        return ("engine_config.zero_hpz_partition_size adds DeepSpeed's secondary parameter partition, an engine buffer "
                "the paper's accounting (--accounting paper) does not count: drop it.")
    if partial:
        return None
    if name != "hsdp_shard_size" and cfg.zero is not ZeroStage.PARAMETERS:
        return f"engine_config.{name} partitions ZeRO-3's parameters; at ZeRO-{int(cfg.zero)} it has none: use --zero 3."
    if cfg.dp % size:
        return (f"engine_config.{name}={size} must divide the data-parallel degree {cfg.dp} (the shard groups tile the "
                "data-parallel ranks): use a divisor such as the GPUs per node.")
    return None


def _activation_offload_rule(cfg: JobConfig, engine: Engine, *, partial: bool) -> str | None:
    """Activation offload as each engine runs it (``memory.activation_offload``)."""
    layers = cfg.engine_config.cpu_offloading_num_layers
    if layers is not None and not cfg.offload_activations:
        return "engine_config.cpu_offloading_num_layers counts Megatron's offloaded layers: add --offload-activations."
    if not cfg.offload_activations:
        return None
    if engine is Engine.MEGATRON:
        if cfg.pp > 1:
            return ("Megatron-Core refuses --cpu-offloading with pipeline parallelism ('Currently there is no support "
                    "for Pipeline parallelism with CPU offloading', transformer_config.py): use --pp 1.")
        if not partial and (cfg.recompute is not Recompute.NONE or any(
                m is not Recompute.NONE for m in cfg.recompute_map or ())):
            return ("Megatron-Core refuses --cpu-offloading with recompute ('CPU offloading does not work when "
                    "activation recomputation is enabled', transformer_config.py): use --recompute none.")
    if engine is Engine.DEEPSPEED and not partial and cfg.recompute is not Recompute.FULL and not any(
            m is Recompute.FULL for m in cfg.recompute_map or ()):
        return ("DeepSpeed's activation offload is activation_checkpointing.cpu_checkpointing: it moves the checkpointed "
                "layers' inputs to the CPU, so it needs --recompute full.")
    return None


def _sharded_adapter_rule(cfg: JobConfig, engine: Engine) -> str | None:
    """LoRA/QLoRA on fsdp1/fsdp2 (memory.engine_fsdp1, engine_fsdp2_lora): the adapters are sharded torch
    parameters stepped by torch.optim; a paged bitsandbytes optimizer or an fp32 master copy of 16-bit adapters is
    not what these engines hold."""
    if cfg.job not in (Job.LORA, Job.QLORA):
        return None
    if cfg.lora.paged_optimizer:
        return (f"engine {engine.value} steps the adapters' sharded parameters with torch.optim (fsdp_qlora, "
                "torchtune); lora.paged_optimizer (bitsandbytes' paged states) is modelled on engine pytorch: drop it.")
    if cfg.master_weights and cfg.lora.dtype.is_16bit:
        return (f"engine {engine.value} keeps no fp32 master copy of the adapters (they are trained in their own "
                "dtype): drop --master-weights, or give --lora-dtype fp32.")
    return None


def _fsdp1_rule(cfg: JobConfig) -> str | None:
    """FSDP1's own knobs, changed from their defaults where they move no byte, and its one-dtype FlatParameter."""
    from memplan.config import EngineConfig

    knobs, default = cfg.engine_config, EngineConfig()
    lora = cfg.job in (Job.LORA, Job.QLORA)
    if rule := _sharded_adapter_rule(cfg, Engine.FSDP1):
        return rule
    if lora and knobs.use_orig_params and cfg.job is Job.LORA and cfg.lora.dtype is not cfg.dtype:
        return (f"FSDP1 flattens a unit's parameters into one FlatParameter of one dtype (_flat_param.py "
                f"_validate_tensors_to_flatten); {cfg.lora.dtype.value} adapters inside {cfg.dtype.value} blocks "
                f"(use_orig_params=True) do not run: use --lora-dtype {cfg.dtype.value}, or --no-use-orig-params "
                "(adapters wrapped as their own units).")
    if knobs.sharding_strategy != default.sharding_strategy and cfg.dp <= 1:
        return "engine_config.sharding_strategy acts across data-parallel ranks; with dp=1 it moves no byte."
    if knobs.use_orig_params != default.use_orig_params and not lora:
        return ("engine_config.use_orig_params moves bytes only with frozen parameters (lora, qlora jobs): every "
                f"parameter of a {cfg.job.value} job requires grad; drop it.")
    if knobs.no_sync != default.no_sync and (cfg.grad_accum <= 1 or cfg.dp <= 1
                                             or knobs.sharding_strategy == "NO_SHARD"):
        return ("engine_config.no_sync acts on the accumulation micro-batches of a sharded strategy: use "
                "--grad-accum 2 or more on 2 or more GPUs, or drop it.")
    if knobs.limit_all_gathers != default.limit_all_gathers and (cfg.dp <= 1
                                                                 or knobs.sharding_strategy != "FULL_SHARD"):
        return "engine_config.limit_all_gathers bounds FULL_SHARD's all-gathers over 2+ ranks; here it moves no byte."
    return None


def violation(cfg: JobConfig, *, partial: bool = False) -> str | None:
    """The first engine rule ``cfg`` breaks, as one sentence; None when the engine runs it. ``partial``: ``cfg``
    fixes one planner dimension only (tp, pp or the ZeRO placement), so the rules that weigh a setting against the
    ZeRO stage, tp and data parallelism of the whole combination wait for it (``planner.train``)."""
    engine = cfg.effective_engine
    if not cfg.job.trains:
        return None
    if engine not in _TRAINING:
        return f"engine {engine.value} serves models; a {cfg.job.value} job needs a training engine ({_NAMES})."
    if rule := _optimizer_impl_rule(cfg, engine):
        return rule
    if cfg.sequence_parallel and cfg.tp == 1 and not partial:
        return ("sequence parallelism splits activations over the tensor-parallel group (Korthikanti et al. 2022); "
                "with --tp 1 it moves no byte: use --tp 2 or more, or drop --sequence-parallel.")
    for rule in (_dtype_rule(cfg), _common(cfg, engine), _context_parallel(cfg, engine), _recompute_rule(cfg, engine),
                 pp_schedule_rules.rule(cfg, engine, partial=partial),
                 _knob_rule(cfg, engine), None if partial else _knob_effect_rule(cfg), _hybrid_rule(cfg, partial=partial),
                 _activation_offload_rule(cfg, engine, partial=partial), _nccl_rule(cfg)):
        if rule:
            return rule
    if engine is Engine.FSDP2 and (rule := _sharded_adapter_rule(cfg, engine)):
        return rule
    if engine in (Engine.FSDP1, Engine.FSDP2) and cfg.job is Job.GALORE:
        return (f"engine {engine.value} is modelled for pretrain, full, lora and qlora jobs; a galore job on it is "
                "not: use --engine pytorch or deepspeed.")
    if engine is Engine.FSDP1:
        return _fsdp1_rule(cfg)
    if engine is Engine.DEEPSPEED:
        return _deepspeed(cfg)
    if engine is Engine.MEGATRON:
        return (megatron_rules.recompute_modules_rule(cfg) or megatron_schedule_rules.group_rule(cfg, partial=partial)
                or megatron_schedule_rules.overlap_rule(cfg, partial=partial) or _megatron(cfg))
    return None


def runnable(cfg: JobConfig) -> bool:
    return violation(cfg) is None


def check(cfg: JobConfig) -> None:
    """Raise a MemplanError (CLI exit 2) naming the engine's rule when ``cfg`` cannot run."""
    reason = violation(cfg)
    if reason:
        raise MemplanError(reason)
