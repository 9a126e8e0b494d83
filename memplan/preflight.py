"""Checks of a configuration against the model and GPU it runs on, before any bytes are counted: what the
GPU cannot run is an error, what the run still answers but the user should know is a warning, and what
memplan assumed (host RAM and NVMe not given) is recorded so the answer can show it.

The job-level rules (which fields a job reads) live with the fields, in ``memplan.config``; these are the
rules that need the model or the GPU.
"""

from __future__ import annotations

from typing import Any

from memplan.arch.tensors import Architecture
from memplan.catalog.schema import GpuSpec, HostSpec, ModelSpec
from memplan.config import QUANTIZED_BASE_JOBS, Job, JobConfig
from memplan.dtypes import Dtype
from memplan.engines.megatron_rules import fp8_input_store_model_rule, recompute_modules_model_rule, selective_rule
from memplan.errors import MemplanError
from memplan.memory import te_fp8

ADAPTER_JOBS = (Job.LORA, Job.QLORA)


def configured_dtypes(cfg: JobConfig) -> dict[str, Dtype]:
    """Every compute/storage dtype the configuration asks the GPU to run, by field name."""
    out = {"dtype": cfg.dtype}
    if cfg.job.trains and cfg.grad_dtype is not None:
        out["grad_dtype"] = cfg.grad_dtype
    if cfg.job in ADAPTER_JOBS:
        out["lora.dtype"] = cfg.lora.dtype
    if cfg.job is Job.INFER and cfg.infer.kv_dtype is not None:
        out["infer.kv_dtype"] = cfg.infer.kv_dtype
    return out


def check_gpu_dtypes(cfg: JobConfig, gpu: GpuSpec) -> None:
    """A MemplanError when the GPU cannot run a configured dtype: bf16 needs Ampere or later (the catalog's
    ``supports_bf16``, false for T4 and V100 from their datasheets); fp8 compute needs ``supports_fp8``
    (Hopper, Ada, Blackwell, MI300). fp8 as a KV-cache *storage* dtype is allowed anywhere: vLLM stores
    fp8_e5m2 KV on any GPU and upcasts it for attention."""
    for name, dt in configured_dtypes(cfg).items():
        if dt is Dtype.BF16 and not gpu.supports_bf16:
            fix = "--dtype fp16" if name == "dtype" else f"{name}=fp16"
            raise MemplanError(f"{name}=bf16: the {gpu.name} has no bf16 support; use fp16 ({fix}, the same bytes).")
        if dt is Dtype.FP8 and name != "infer.kv_dtype" and not gpu.supports_fp8:
            raise MemplanError(f"{name}=fp8: the {gpu.name} has no fp8 compute; use bf16 or fp16, or a GPU with fp8 "
                               "support (see 'memplan gpus').")


def gpu_default_dtype(cfg: JobConfig, gpu: GpuSpec) -> tuple[JobConfig, dict[str, Any]]:
    """``cfg`` with the default compute dtype fitted to the GPU: when no dtype was given (``dtype`` not in the
    fields set) and the GPU has no bf16, fp16 instead (the same bytes per element), QLoRA's bf16 adapters
    with it; returned with the assumption made ({"dtype": "fp16"}), or unchanged with {}."""
    if "dtype" in cfg.model_fields_set or cfg.dtype is not Dtype.BF16 or gpu.supports_bf16:
        return cfg, {}
    update: dict[str, Any] = {"dtype": Dtype.FP16}
    if cfg.job is Job.QLORA and cfg.lora.dtype is Dtype.BF16:
        update["lora"] = cfg.lora.model_copy(update={"dtype": Dtype.FP16})
    return cfg.model_copy(update=update), {"dtype": Dtype.FP16.value}


def check_trainable_weights(job: Job, formats: tuple[str | None, ...]) -> None:
    """A MemplanError when a job that trains every weight (pretrain, full, galore) is given quantized base
    weights: 4-bit/8-bit storage formats (bitsandbytes, GPTQ, AWQ, GGUF) are frozen, so peft/QLoRA train
    adapters on them instead. Unknown format names are reported first, with a suggestion."""
    named = [f for f in formats if f is not None]
    if job in QUANTIZED_BASE_JOBS or not named:
        return
    from memplan.memory.quant import get_format

    for name in named:
        get_format(name)
    raise MemplanError(f"quant={named[0]}: quantized base weights cannot be fully trained by a {job.value} job; "
                       "use job qlora (adapters on a 4-bit base) or lora.")


def check_bnb_integration(cfg: JobConfig) -> None:
    """A MemplanError when ``bnb_integration`` is set for a job whose weights are not in a bitsandbytes format
    (the integration only changes how bitsandbytes layers are built: ``memplan.memory.bnb_workspace``)."""
    if cfg.bnb_integration == "transformers":
        return
    from memplan.memory.quant import Library
    from memplan.memory.weights import job_library

    if job_library(cfg) is not Library.BITSANDBYTES:
        raise MemplanError(f"bnb_integration={cfg.bnb_integration} applies to bitsandbytes formats only (nf4, nf4-dq, "
                           "fp4, fp4-dq, int8); set --quant to one of them, or drop --bnb-integration.")


_PROJECTIONS: dict[int, tuple[Architecture, frozenset[str]]] = {}
"""id of an architecture -> (that architecture, its projections): ``model_projections``' memo, the architecture kept
and compared by identity (a recycled ``id`` cannot hit)."""


def model_projections(arch: Architecture) -> set[str]:
    """The abstract projections (q, k, v, o, gate, up, down) the model's linear layers implement (a new set each
    call, the walk over the tensors made once per architecture: every LoRA estimate asks)."""
    hit = _PROJECTIONS.get(id(arch))
    if hit is None or hit[0] is not arch:
        if len(_PROJECTIONS) >= 256:
            _PROJECTIONS.clear()
        hit = _PROJECTIONS[id(arch)] = (arch, frozenset(p for t in arch.all_tensors() for p in t.projections))
    return set(hit[1])


def check_lora_targets(cfg: JobConfig, arch: Architecture) -> None:
    """A MemplanError when a LoRA target names a projection the model does not have (peft would raise
    "Target modules ... not found in the base model"; memplan would count 0-byte adapters)."""
    if cfg.job not in ADAPTER_JOBS or "all-linear" in cfg.lora.targets or not arch.layers:
        return
    have = model_projections(arch)
    if not have:
        return
    missing = [t for t in cfg.lora.targets if t not in have]
    if missing:
        order = ("q", "k", "v", "o", "gate", "up", "down")
        names = ", ".join(p for p in order if p in have) + "".join(f", {p}" for p in sorted(have - set(order)))
        raise MemplanError(f"lora.targets: {arch.spec.name} has no {', '.join(missing)} projection; "
                           f"its projections are {names} (or all-linear).")


def context_warnings(cfg: JobConfig, spec: ModelSpec) -> list[str]:
    """A warning when the tokens per sequence exceed the model's ``max_position_embeddings``: the memory
    is still counted, but the model was not built for that length (learned positions run out; RoPE
    models degrade without scaling)."""
    limit = spec.max_position_embeddings
    tokens, what = (cfg.infer.context, "context") if cfg.job is Job.INFER else (cfg.seq_len, "seq_len")
    if limit is None or tokens <= limit:
        return []
    return [f"{what} {tokens:,} exceeds {spec.name}'s max_position_embeddings of {limit:,} tokens; "
            "the memory is counted, but the model was not trained for that length"]


def host_assumptions(host: HostSpec) -> dict[str, Any]:
    """The host sizes memplan assumed because none was given (``HostSpec`` defaults), by field name:
    CPU RAM per node (1 TiB) and NVMe per node (0)."""
    return {name: getattr(host, name) for name in ("cpu_ram_bytes", "nvme_bytes") if name not in host.model_fields_set}


def preflight(spec: ModelSpec, arch: Architecture, gpu: GpuSpec, cfg: JobConfig) -> list[str]:
    """Raise MemplanError for what cannot run; return the warnings for what runs but deserves a note."""
    check_trainable_weights(cfg.job, (cfg.quant, *(cfg.quant_map or ())))
    check_bnb_integration(cfg)
    check_gpu_dtypes(cfg, gpu)
    check_lora_targets(cfg, arch)
    check_recompute_modules(cfg, spec)
    return context_warnings(cfg, spec) + pipeline_warnings(cfg)


def pipeline_warnings(cfg: JobConfig) -> list[str]:
    """A warning when a pipeline's step has fewer micro-batches than stages (``grad_accum`` < pp): the first stage
    then holds only m micro-batches' activations, where the runs pipelines are built for (m ≥ p, to keep the bubble
    (p − 1)/m small) hold p under 1F1B (Narayanan et al. 2021, Sec. 2.2) and more when interleaved; the answer is
    the peak of the step as given, so the user is told how to give the step they run."""
    if not cfg.job.trains or cfg.pp <= 1 or cfg.grad_accum >= cfg.pp:
        return []
    return [f"a pipeline of {cfg.pp} stages with {cfg.grad_accum} micro-batch(es) per step holds that many in flight; "
            f"runs with more (at least {cfg.pp}, to keep the bubble small) hold up to {cfg.pp} on the first stage: "
            "give the step's micro-batches with --grad-accum (recipe: job.grad_accum)"]


def check_recompute_modules(cfg: JobConfig, spec: ModelSpec) -> None:
    """Megatron's recompute modules that the model lacks (``engines.megatron_rules``) are bad input."""
    modes = (cfg.recompute, *(cfg.recompute_map or ()))
    rule = (selective_rule(cfg, modes) or recompute_modules_model_rule(cfg, mla=spec.is_mla, moe=bool(spec.num_experts))
            or fp8_input_store_model_rule(cfg, swiglu=te_fp8.swiglu(spec)))
    if rule:
        raise MemplanError(rule)


def layer_ranges(text: str, num_layers: int, field: str) -> list[int]:
    """Layer indices from ``'0-39,70,72-79'``, each range written low-high within the model's layers; a
    MemplanError names the part that is not (an open range such as ``1-``, a backwards one such as ``5-3``)."""
    out: list[int] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        lo, dash, hi = (x.strip() for x in part.partition("-"))
        if dash and not (lo and hi):
            raise MemplanError(f"{field}: {part!r} is an open range; write both ends, e.g. "
                               f"{lo or 0}-{hi or num_layers - 1}.")
        try:
            a, b = int(lo), int(hi or lo)
        except ValueError:
            raise MemplanError(f"{field}: expected layer ranges such as 0-39,70, got {part!r}.") from None
        if a > b:
            raise MemplanError(f"{field}: {part!r} runs backwards; write the lower layer first ({b}-{a}).")
        if not 0 <= a <= b < num_layers:
            raise MemplanError(f"{field}: layers {part} are outside the model's {num_layers} layers (0-{num_layers - 1}).")
        out.extend(range(a, b + 1))
    return out
