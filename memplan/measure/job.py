"""``memplan measure`` without the command line: check the job, build, run, predict, compare.

``measure_job`` returns a ``Report``: what was built (and how it differs from the model asked for),
one ``compare.Line`` per component, the predicted and measured phases of the step, the check that
memplan's prediction scales linearly with the layers (``--layers``), and versions.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from typing import Any

from memplan.arch.build import build_architecture
from memplan.catalog.schema import GpuSpec, HostSpec, ModelSpec
from memplan.config import Engine, Job, JobConfig, Offload, OptimizerKind, Recompute, ZeroStage
from memplan.dtypes import Dtype
from memplan.errors import MemplanError
from memplan.measure import compare as cmp
from memplan.measure.scaling import scaling_check
from memplan.memory import activations as act
from memplan.memory import activations_block as blk
from memplan.memory.context import Context

MEASURED_JOBS = (Job.PRETRAIN, Job.FULL, Job.LORA, Job.INFER)
MEASURED_OPTIMIZERS = (OptimizerKind.ADAMW, OptimizerKind.ADAMW_BF16, OptimizerKind.SGD, OptimizerKind.SGD_MOMENTUM)
MEASURED_DTYPES = (Dtype.FP32, Dtype.BF16, Dtype.FP16)


@dataclass
class Report:
    """One measurement next to memplan's prediction of the same (possibly truncated) model."""

    model: str
    spec: ModelSpec
    cfg: JobConfig
    device: str
    notes: list[str]
    lines: list[cmp.Line]
    phases_predicted: dict[str, int] = field(default_factory=dict)
    phases_measured: dict[str, int] = field(default_factory=dict)
    scaling: dict[str, Any] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def failures(self) -> list[cmp.Line]:
        return [line for line in self.lines if line.ok is False]

    @property
    def ok(self) -> bool:
        return not self.failures

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "measured_model": self.spec.name, "device": self.device,
                "job": self.cfg.job.value, "dtype": self.cfg.dtype.value, "attention": self.cfg.attention,
                "micro_batch": self.cfg.micro_batch, "seq_len": self.cfg.seq_len, "notes": self.notes,
                "lines": [line.as_dict() for line in self.lines], "phases_predicted": self.phases_predicted,
                "phases_measured": self.phases_measured, "scaling": self.scaling, "info": self.info, "ok": self.ok}


def _refuse(what: str) -> MemplanError:
    return MemplanError(f"measure runs one job on one device; {what}.")


def check_measurable(cfg: JobConfig, device: str) -> None:
    """Refuse, with the reason, what one real run on one device cannot reproduce."""
    if cfg.job not in MEASURED_JOBS:
        raise _refuse(f"--job {cfg.job.value} is not measured (measured: {', '.join(j.value for j in MEASURED_JOBS)})")
    if cfg.world_size > 1 or cfg.tp > 1 or cfg.pp > 1 or cfg.ep > 1:
        raise _refuse("--gpus, --nodes, --tp, --pp and --ep above 1 describe several")
    if cfg.zero is not ZeroStage.NONE or cfg.offload_optimizer is not Offload.NONE or cfg.offload_params is not Offload.NONE:
        raise _refuse("ZeRO and offload need DeepSpeed, which measure does not run")
    if cfg.quant is not None or cfg.dtype not in MEASURED_DTYPES:
        raise _refuse("weights are measured in fp32, bf16 or fp16, unquantized")
    if cfg.job.trains and cfg.optimizer not in MEASURED_OPTIMIZERS:
        raise _refuse(f"--optimizer {cfg.optimizer.value} is not a torch.optim optimizer "
                      f"(measured: {', '.join(o.value for o in MEASURED_OPTIMIZERS)})")
    if cfg.recompute is Recompute.SELECTIVE or cfg.recompute_map is not None or cfg.sequence_parallel:
        raise _refuse("Hugging Face checkpoints whole layers: use --recompute full (with --recompute-layers) or none")
    if cfg.attention_impl == "flash" and device == "cpu":
        raise _refuse("flash attention needs CUDA; use --attention sdpa or eager on CPU")
    inf = cfg.infer
    if cfg.job is Job.INFER and (inf.paged or inf.prefill_chunk or inf.kv_group_size
                                 or inf.kv_dtype not in (None, cfg.dtype) or inf.mla_cache != "latent"):
        raise _refuse("the transformers cache is contiguous, unquantized, unchunked, and latent for MLA")


def effective_config(spec: ModelSpec, cfg: JobConfig) -> tuple[JobConfig, list[str]]:
    """The configuration that actually runs: the kernel transformers uses for this family."""
    notes = []
    if cfg.attention is None:
        cfg = cfg.model_copy(update={"attention": "sdpa" if cfg.flash_attention else "eager"})
        notes.append(f"attention: {cfg.attention} (the configuration names no kernel; with flash_attention "
                     "on, SDPA, which picks a flash kernel on CUDA)")
    impl = blk.attention_impl(spec, cfg)
    if impl != cfg.attention_impl:
        notes.append(f"attention: {impl}, not {cfg.attention_impl} (transformers has no {cfg.attention_impl} path "
                     f"for {blk.NO_SDPA.get(spec.family, spec.family.value)})")
    if cfg.engine is None and cfg.job.trains:
        cfg = cfg.model_copy(update={"engine": Engine.DEEPSPEED})
        notes.append("engine: deepspeed (the measured step is the bf16-optimizer layout, 16-bit model and fp32 "
                     "masters, not PyTorch AMP)")
    return cfg.model_copy(update={"attention": impl}), notes


def _cpu_name() -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _versions(device: str) -> dict[str, Any]:
    import torch
    import transformers

    info: dict[str, Any] = {"torch": torch.__version__, "transformers": transformers.__version__,
                            "python": platform.python_version()}
    try:
        import peft

        info["peft"] = peft.__version__
    except ImportError:  # pragma: no cover - peft is optional for full training and inference
        pass
    if device == "cpu":
        info["device_name"] = _cpu_name()
        info["torch_threads"] = torch.get_num_threads()
    else:
        from memplan.measure.calibrate import gpu_identity

        info.update(gpu_identity())
    return info


def _split_buffers(predicted: dict[str, int], components: dict[str, int],
                   unmodelled: dict[str, int]) -> tuple[dict[str, int], dict[str, int]]:
    """(components, unmodelled): the measured non-persistent buffers compared exactly where memplan counts them
    (``memory.hf_buffers``), else shown unbounded (rotary ``inv_freq``: a few hundred bytes memplan leaves out)."""
    from memplan.measure.run import BUFFERS

    if BUFFERS in predicted:
        return components, unmodelled
    rest = {k: v for k, v in components.items() if k != BUFFERS}
    kept = {BUFFERS: components[BUFFERS]} if components.get(BUFFERS) else {}
    return rest, {**unmodelled, **kept}


def _train_lines(ctx: Context, meas: Any, device: str) -> tuple[list[cmp.Line], dict[str, int]]:
    predicted, runtime = cmp.predicted_components(ctx, device)
    components, unmodelled = _split_buffers(predicted, meas.components, meas.unmodelled)
    lines = cmp.state_lines(predicted, components)
    lines += [cmp.Line(k, None, v, "", "not modelled by memplan") for k, v in unmodelled.items()]
    saved = cmp.saved_line(predicted, meas.saved["total_bytes"], device)
    if ctx.cfg.recompute is Recompute.OP or (ctx.cfg.recompute_map and Recompute.OP in ctx.cfg.recompute_map):
        saved = cmp.Line(saved.component, saved.predicted, saved.measured, "",
                         "op-level checkpointing keeps its outputs outside saved_tensors_hooks: checked by the peak")
    lines.append(saved)
    lines += cmp.transient_lines(predicted, cmp.TRANSIENT_ROWS)
    phases = cmp.answer_phases(ctx, device)
    phase = max(phases, key=lambda k: phases[k])
    lines += cmp.peak_lines(phases[phase], phase, meas.peak, meas.peak_phase, device=device,
                            rows_sum=sum(predicted.values()))
    if device != "cpu":
        lines += cmp.cuda_lines(predicted, runtime, phases[phase], meas.reserved, meas.driver_used)
    return lines, phases


def _infer_lines(ctx: Context, meas: Any, device: str, decode_steps: int) -> tuple[list[cmp.Line], dict[str, int]]:
    from memplan.memory import kv_cache as kv
    from memplan.memory.breakdown import Tier, tier_total

    cfg = ctx.cfg
    predicted, runtime = cmp.predicted_components(ctx, device)
    context = cfg.infer.context

    def kv_at(tokens: int, chunk: int | None) -> int:
        infer = cfg.infer.model_copy(update={"context": tokens, "prefill_chunk": chunk})
        return tier_total(kv.rows(Context(ctx.arch, cfg.model_copy(update={"infer": infer}), ctx.gpu, ctx.host)),
                          Tier.GPU)

    lines = [cmp.Line("weights/params", predicted.get("weights/params"), meas.components["weights/params"], cmp.EXACT),
             cmp.Line("kv_cache/after_prefill", kv_at(context - decode_steps, None),
                      meas.components["kv_cache/after_prefill"], cmp.EXACT, f"{context - decode_steps} prompt tokens"),
             cmp.Line("kv_cache", kv_at(context, 1 if decode_steps else None), meas.components["kv_cache"], cmp.EXACT,
                      f"after {decode_steps} decode step(s): {context} tokens")]
    # the run as estimate expresses it: a context of C tokens whose prompt (C − decode steps) is one forward
    # (``--prefill-chunk``, as for the published generate runs, ``published_gpu._infer_fields``)
    prompt = cfg.infer.model_copy(update={"prefill_chunk": context - decode_steps}) if decode_steps else cfg.infer
    run_ctx = Context(ctx.arch, cfg.model_copy(update={"infer": prompt}), ctx.gpu, ctx.host, ctx.stage_override)
    predicted, _ = cmp.predicted_components(run_ctx, device)
    names = tuple(k for k in predicted if k.startswith("activations"))
    lines += cmp.transient_lines(predicted, names)
    phases = cmp.answer_phases(run_ctx, device)
    total = max(phases.values())
    lines.append(cmp.inference_peak_line(total, meas.peak, meas.peak_phase, device=device))
    if device != "cpu":
        lines += cmp.cuda_lines(predicted, runtime, total, meas.reserved, meas.driver_used)
    return lines, phases


def measure_job(spec: ModelSpec, cfg: JobConfig, gpu: GpuSpec, host: HostSpec | None = None, *, device: str = "cpu",
                layers: int | None = None, decode_steps: int = 4) -> Report:
    """Build ``spec`` (its first ``layers`` layers), run ``cfg`` on ``device``, compare with memplan."""
    from memplan.measure import build, run

    if cfg.attention is None and device == "cpu":
        cfg = cfg.model_copy(update={"attention": "sdpa" if cfg.flash_attention else "eager"})
    check_measurable(cfg, device)
    device = run.check_device(device)
    if cfg.job is Job.INFER and not 0 <= decode_steps < cfg.infer.context:
        raise MemplanError(f"--decode-steps must be between 0 and --context − 1 ({cfg.infer.context - 1}).")
    with build.quiet_transformers():
        return _measure(spec, cfg, gpu, host or HostSpec(), device=device, layers=layers, decode_steps=decode_steps)


def _measure(spec: ModelSpec, cfg: JobConfig, gpu: GpuSpec, host: HostSpec, *, device: str, layers: int | None,
             decode_steps: int) -> Report:
    from memplan.measure import build, run

    measured, notes = build.measured_spec(spec, layers)
    cfg, more = effective_config(measured, cfg)
    notes += more
    ctx = Context(build_architecture(measured), cfg, gpu, host)
    model = build.build_model(measured, cfg, attention=cfg.attention_impl, device=device)
    vocab = measured.vocab_size or 0
    if cfg.job is Job.INFER:
        meas = run.measure_inference(model, cfg, device=device, vocab=vocab, decode_steps=decode_steps)
        lines, phases = _infer_lines(ctx, meas, device, decode_steps)
    else:
        checkpointed = len(act.checkpointed(ctx))
        model = run.prepare_training(model, measured, cfg, checkpointed)
        if checkpointed:
            notes.append(f"activation checkpointing: the first {checkpointed} of {len(ctx.arch.layers)} layers")
        meas = run.measure_training(model, cfg, device=device, vocab=vocab)
        lines, phases = _train_lines(ctx, meas, device)
    del model
    info = {**_versions(device), "parameters": ctx.arch.params, "baseline_bytes": meas.baseline}
    scaling = scaling_check(spec, measured, cfg, gpu, host) if layers else None
    return Report(spec.name, measured, cfg, device, notes, lines, phases, meas.phases, scaling, info)
