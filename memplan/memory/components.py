"""Assemble every component's rows for one configuration, job by job."""

from __future__ import annotations

from memplan.catalog.schema import Family
from memplan.config import Accounting, Engine, Job, JobConfig, ZeroStage
from memplan.errors import MemplanError
from memplan.memory import model_states as ms
from memplan.memory.breakdown import INFER_PHASES, TRAIN_PHASES, Phase, Row, Tier, peak
from memplan.memory.context import Context
from memplan.memory.memo import gpu_narrowed, size_free
from memplan.memory.zero import StateBuffer


def validate(ctx: Context) -> None:
    """Reject configurations the model's shape does not allow, with one readable sentence."""
    spec, cfg = ctx.arch.spec, ctx.cfg
    if spec.family is not Family.PARAMS_ONLY:
        heads, kv = spec.num_attention_heads or 1, spec.kv_heads
        if heads % cfg.tp:
            raise MemplanError(f"--tp {cfg.tp} must divide the model's {heads} attention heads.")
        if kv % cfg.tp and cfg.tp % kv:
            raise MemplanError(f"--tp {cfg.tp} and the model's {kv} key/value heads must divide one another.")
        if cfg.pp > len(ctx.arch.layers):
            raise MemplanError(f"--pp {cfg.pp} exceeds the model's {len(ctx.arch.layers)} layers.")
    elif cfg.tp > 1 or cfg.pp > 1:
        raise MemplanError("tensor or pipeline parallelism needs the model's dimensions; "
                           "params:N models know only a parameter count.")
    if cfg.optimizer_gpu_layers is not None and not ctx.arch.layers:
        raise MemplanError("optimizer_gpu_layers (partial optimizer offload) needs the model's layers; "
                           f"{spec.name} knows only a parameter count.")
    if cfg.recompute_map is not None and len(cfg.recompute_map) != len(ctx.arch.layers):
        raise MemplanError(f"recompute_map has {len(cfg.recompute_map)} entries but the model has "
                           f"{len(ctx.arch.layers)} layers.")
    from memplan.memory import bnb_workspace, context_parallel, hf_legacy, litgpt, weight_offload, weights

    context_parallel.check_shape(spec, cfg)
    hf_legacy.check(spec, cfg)
    litgpt.check(spec, cfg, has_moe=any(layer.moe for layer in ctx.arch.layers))
    bnb_workspace.check_bnb_version(cfg)
    weights.check_quant_map(cfg, num_layers=len(ctx.arch.layers))
    weight_offload.check_offload_map(cfg, num_layers=len(ctx.arch.layers))
    if cfg.ep > 1:
        experts = spec.num_experts or 0
        if not experts:
            raise MemplanError(f"--ep {cfg.ep} needs a mixture-of-experts model; {spec.name} has no experts.")
        if experts % cfg.ep:
            raise MemplanError(f"--ep {cfg.ep} must divide the model's {experts} experts.")
        if cfg.dp % cfg.ep:
            raise MemplanError(f"--ep {cfg.ep} must divide the data-parallel degree {cfg.dp}.")


def _weight_buffers(ctx: Context) -> list[StateBuffer]:
    from memplan.memory import weights

    return [
        StateBuffer(r.component, r.bytes, ZeroStage.PARAMETERS, ms.OFFLOAD_TIER[ctx.cfg.offload_params], r.source, r.note)
        for r in weights.rows(ctx)
    ]


def _train_rows(ctx: Context) -> list[Row]:
    from memplan.memory import training

    return training.train_rows(ctx)


def _activation_rows(ctx: Context, missing: list[str]) -> list[Row]:
    from memplan.memory import activation_offload, activations, bnb_workspace

    if not activations.modelled(ctx):
        missing.append("activations")
        return activation_offload.apply(ctx, [])
    # the dequantized 16-bit copies of bitsandbytes' matmuls are workspace, never offloaded with the activations
    return activation_offload.apply(ctx, activations.rows(ctx)) + bnb_workspace.rows(ctx)


def _infer_rows(ctx: Context, missing: list[str]) -> list[Row]:
    from memplan.memory import bnb_workspace, hf_buffers, inference, kv_cache, weight_offload, weights

    rows = ms.place_all(ctx, _weight_buffers(ctx)) + weights.host_rows(ctx) + weight_offload.offload_rows(ctx)
    if ctx.arch.spec.family is Family.PARAMS_ONLY:
        missing.extend(["kv_cache", "activations"])
        return rows
    return rows + hf_buffers.rows(ctx) + kv_cache.rows(ctx) + inference.rows(ctx) + bnb_workspace.rows(ctx)


def _model_buffer_rows(ctx: Context) -> list[Row]:
    """The Hugging Face model's non-persistent buffers (``memory.hf_buffers``); none in the paper's accounting
    (Megatron-Core's layout, or a paper reproduced)."""
    from memplan.memory import hf_buffers

    return [] if ctx.cfg.effective_activation_accounting == "paper" else hf_buffers.rows(ctx)


def job_rows(ctx: Context, missing: list[str]) -> list[Row]:
    """The job's rows on the reported stage, before the runtime rows, each with its phases."""
    if ctx.cfg.job is Job.INFER:
        return with_phases(ctx, _infer_rows(ctx, missing))
    rows = phased_state_rows(ctx) + with_phases(ctx, _activation_rows(ctx, missing))
    if ctx.cfg.pp > 1 and ctx.cfg.effective_engine is Engine.FSDP2:
        from memplan.memory import activations, engine_buffers

        # the cool-down exists only under interleaving (v > 1) and weighs what the activations free
        if ctx.cfg.perf.virtual_stages > 1 and activations.modelled(ctx):
            # one micro-batch's saved bytes of each chunk's blocks (uneven chunks differ)
            units = activations.chunk_saved_bytes(ctx, activations.layer_modes(ctx),
                                                  activations.counting_for(ctx.cfg))["activations/layers"]
            rows += with_phases(ctx, engine_buffers.fsdp2_cooldown_rows(ctx, rows, unit_activations=units))
    elif ctx.cfg.effective_engine is Engine.FSDP2:  # size-dependent, so not among the memoized state rows
        from memplan.memory import engine_fsdp2_backward

        kept = sum(r.bytes for r in rows if r.component == "weights/fsdp_kept_all_gather")
        rows += with_phases(ctx, engine_fsdp2_backward.kept_at_loss_rows(ctx, kept=kept))
        rows += with_phases(ctx, engine_fsdp2_backward.first_reduce_scatter_rows(ctx, rows))
    if ctx.cfg.pp > 1:  # torch pipelining's (fsdp2), DeepSpeed's pipe_buffers, Megatron's queues at g > p
        from memplan.memory import megatron_pp_buffers, pp_outputs, pp_stage_buffers

        rows += with_phases(ctx, pp_stage_buffers.rows(ctx) + pp_outputs.rows(ctx) + megatron_pp_buffers.rows(ctx))
    return rows


@size_free
def phased_state_rows(ctx: Context) -> list[Row]:
    """A training job's model-state rows plus the optimizer step's temporaries and the model's buffers, each with
    its phases; they do not depend on the micro-batch or the sequence length, and are memoized
    (``memory.memo.size_free``)."""
    from memplan.memory import optimizer_step

    states = state_rows(ctx)
    return with_phases(ctx, states + optimizer_step.rows(ctx, states) + _model_buffer_rows(ctx))


def job_phases(cfg: JobConfig) -> tuple[Phase, ...]:
    """The phases of one step of the job: training's four, or serving's load, prefill and decode."""
    return TRAIN_PHASES if cfg.job.trains else INFER_PHASES


gpu_narrowed_job_rows = gpu_narrowed(job_rows)
"""``job_rows`` memoized by ``memory.memo.gpu_narrowed``: the GPUs of a sweep that read alike but for the runtime
rows (vendor, calibration: ``runtime.settings``) share it."""


def gradients_persist(cfg: JobConfig) -> bool:
    """Whether gradients are alive through forward too: with gradient accumulation (micro-batch k ≥ 2 runs its
    forward with the gradients of 1..k−1) or a pipeline (1F1B: a stage's later forwards run while earlier
    micro-batches' gradients exist)."""
    return cfg.job.trains and (cfg.grad_accum > 1 or cfg.pp > 1)


NOT_PERSISTING = ("gradients/fp32_partition", "gradients/fsdp_pp_accumulated", "gradients/fsdp_pp_accumulated_at_peak",
                  "gradients/fsdp_pp_cooldown")
"""Gradient rows whose phases ``gradients_persist`` leaves as registered: the fp32 gradients made just before the
optimizer step, and FSDP2's pipelined accumulation, whose rows already say when they exist."""


def persists(cfg: JobConfig, component: str) -> bool:
    """Whether a gradient row is alive in every training phase when gradients persist across micro-batches.
    FSDP2 under a pipeline reduce-scatters only after the step's last backward
    (``memory.engine_buffers.fsdp2_pipeline_rows``): its sharded gradients (``gradients``) exist from then on."""
    if not component.startswith("gradients") or component in NOT_PERSISTING:
        return False
    return not (component == "gradients" and cfg.pp > 1 and cfg.effective_engine is Engine.FSDP2)


def with_phases(ctx: Context, rows: list[Row]) -> list[Row]:
    """``rows`` with their phases from the registry (``memory.registry``); gradients alive in every training
    phase when they persist across micro-batches (``gradients_persist``, ``persists``)."""
    from dataclasses import replace

    from memplan.memory import engine_fsdp2_backward, registry

    persist = gradients_persist(ctx.cfg)
    out = []
    for r in rows:
        r = registry.with_phases(r)
        if r.component == "gradients" and r.phases is not None and engine_fsdp2_backward.splits_backward(ctx):
            r = replace(r, phases=r.phases - {Phase.BACKWARD})  # gradients/fsdp_backward_held stands for it
        if persist and r.phases is not None and persists(ctx.cfg, r.component):  # None: alive throughout already
            r = replace(r, phases=r.phases | frozenset(TRAIN_PHASES))
        out.append(r)
    return out


def allocated_peak(rows: list[Row], cfg: JobConfig) -> int:
    """The largest phase total of the GPU rows (the bytes allocated to tensors at the step's peak)."""
    return peak(rows, Tier.GPU, job_phases(cfg))[0] if rows else 0


def state_rows(ctx: Context) -> list[Row]:
    """A training job's model-state rows (weights, gradients, optimizer, engine buffers), no activations."""
    job = ctx.cfg.job
    paper = ctx.cfg.accounting is Accounting.PAPER and job in (Job.PRETRAIN, Job.FULL)  # ZeRO's convention
    if ctx.cfg.effective_engine is Engine.FSDP1 and job is not Job.GALORE and not paper:
        from memplan.memory import engine_fsdp1

        return engine_fsdp1.rows(ctx)
    if ctx.cfg.effective_engine is Engine.FSDP2 and job in (Job.LORA, Job.QLORA):
        from memplan.memory import engine_fsdp2_lora

        return engine_fsdp2_lora.rows(ctx)
    if job in (Job.LORA, Job.QLORA):
        from memplan.memory import peft

        return peft.rows(ctx)
    if job is Job.GALORE:
        from memplan.memory import lowrank

        return lowrank.rows(ctx)
    return _train_rows(ctx)


def stage_rows(ctx: Context) -> tuple[list[Row], list[str]]:
    """Every row of one stage, runtime included, and the components that cannot be modelled."""
    from memplan.memory import runtime

    missing: list[str] = []
    rows = gpu_narrowed_job_rows(ctx, missing)
    allocated = allocated_peak(rows, ctx.cfg)
    rows += with_phases(ctx, runtime.rows(ctx, other_gpu_bytes=allocated, reserve_floor=_reserve_floor(ctx, rows,
                                                                                                     allocated)))
    from memplan.memory import nccl_groups

    rows += with_phases(ctx, nccl_groups.rows(ctx))
    if ctx.cfg.job.trains and ctx.cfg.effective_engine is Engine.FSDP1:
        from memplan.memory import engine_fsdp1

        gathered = sum(r.bytes for r in rows if r.component == "weights/fsdp1_unsharded")
        rows += with_phases(ctx, engine_fsdp1.pool_rows(ctx, allocated_peak=allocated, gathered=gathered))
    return [r for r in rows if r.bytes or r.tier is Tier.GPU], missing


def _reserve_floor(ctx: Context, rows: list[Row], allocated: int) -> int:
    """The allocator reserve the start of backward needs (``allocator_segments``); 0 for serving."""
    if not ctx.cfg.job.trains:
        return 0
    from memplan.memory import allocator_segments as seg
    from memplan.memory.breakdown import phase_totals

    stranded = seg.backward_start_stranded(ctx)
    if not stranded:
        return 0
    at = phase_totals(rows, Tier.GPU, (Phase.BACKWARD_START,))[Phase.BACKWARD_START]
    return seg.reserved_floor(allocated_at_phase=at, allocated_peak=allocated, stranded=stranded)


def all_rows(ctx: Context) -> tuple[list[Row], list[str], int]:
    """Rows of the GPU with the largest phase peak (every pipeline stage is evaluated), the components that cannot
    be modelled, and the stage reported."""
    validate(ctx)
    best: tuple[list[Row], list[str], int] | None = None
    phases = job_phases(ctx.cfg)
    for stage in range(ctx.cfg.pp):
        rows, missing = stage_rows(ctx.at_stage(stage))
        if best is None or peak(rows, Tier.GPU, phases)[0] > peak(best[0], Tier.GPU, phases)[0]:
            best = (rows, missing, stage)
    assert best is not None
    return best
