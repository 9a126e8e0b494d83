"""When nothing fits: which constraint binds and by how much, and the smallest changes that make
it fit, each verified by an actual re-solve (never guessed)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from memplan.catalog.store import all_gpus
from memplan.config import Job, JobConfig, Offload, OptimizerKind, retarget
from memplan.errors import MemplanError
from memplan.estimator import estimate
from memplan.memory.breakdown import Tier
from memplan.planner.request import PlanRequest, PlanResult
from memplan.planner.space import Objective, SearchSpace
from memplan.units import GiB

MAX_SCALE_NODES = 128


Solve = Callable[[PlanRequest], PlanResult]
"""The planner (``plan.plan``), passed in: suggestions re-solve modified requests, and the planner calls them, so
this module takes the function instead of importing it (the planner's modules import one way)."""


def _fits(solve: Solve, req: PlanRequest) -> Any:
    """Re-solve a modified request without suggestions; the best candidate or None."""
    try:
        result = solve(replace(req, suggest=False, top_k=1))
    except MemplanError:
        return None
    return result.best


def _plain(value: Any) -> Any:
    """A JSON value of a request field: an enum's value, a tuple as a list, a model as its fields."""
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json", exclude_defaults=True)
    return getattr(value, "value", value)


def _entry(change: str, flags: str, best: Any, changes: dict[str, Any]) -> dict[str, Any]:
    """One verified suggestion: the change in words, as data (``changes``: the request's fields, ``config.*``,
    ``space.*`` or ``hardware.*``, and their new values; the report and tools read these) and as the command
    line options that make it (``flags``)."""
    return {"change": change, "flags": flags, "verified": True,
            "gpu_total_bytes": best.estimate.peak(Tier.GPU), "tokens_per_s": round(best.tokens_per_s, 3),
            "changes": {k: _plain(v) for k, v in changes.items()}}


UNLIMITED_MIB = 2**39
"""'Unlimited' memory for the binding-tier probe: 2^39 MiB (2^59 bytes, 512 PiB), the largest power of two
whose capacity and big-M terms stay below HiGHS's 1e15 coefficient limit in KiB (``ilp.SOLVER_MAX_COEFF``)."""


def binding(req: PlanRequest, result: PlanResult, solve: Solve) -> None:
    """Name the binding tier and its shortfall: re-solve with unlimited memory for the smallest
    peak the search space can reach (objective min-memory), and compare it with the capacity."""
    big_gpu = req.gpu.model_copy(update={"memory_mib": UNLIMITED_MIB, "cuda_memory_mib": None})
    big_host = req.host.model_copy(update={"cpu_ram_bytes": UNLIMITED_MIB * 2**20, "nvme_bytes": UNLIMITED_MIB * 2**20})
    try:
        lean = solve(replace(req, gpu=big_gpu, host=big_host, objective=Objective.MIN_MEMORY, top_k=1, suggest=False)).best
    except MemplanError as exc:
        result.binding = str(exc)
        return
    if lean is None:
        result.binding = "no configuration in the search space is valid for this model"
        return
    est = estimate(req.model, req.gpu, lean.config, host=req.host)
    tier = est.binding_tier
    over = -est.headroom(tier)
    where = "per GPU" if tier is Tier.GPU else "per node"
    result.binding = (f"{tier.value} memory: even the leanest configuration in the search space needs "
                      f"{est.peak(tier) / GiB:,.2f} GiB {where} against {est.capacity(tier) / GiB:,.2f} GiB "
                      f"(over by {max(over, 0) / GiB:,.2f} GiB)")


def scale_steps(gpn: int, nodes: int) -> list[tuple[int, int]]:
    """Larger clusters to try, smallest first: fill a node up to 8 GPUs, then double the nodes."""
    out = [(g, 1) for g in (2, 4, 8) if g > gpn] if nodes == 1 else []
    per = max(gpn, 8) if nodes == 1 else gpn
    n = 1 if nodes == 1 else nodes
    while n < MAX_SCALE_NODES:
        n *= 2
        out.append((per, n))
    return out


def more_gpus(solve: Solve, req: PlanRequest) -> dict[str, Any] | None:
    """The fewest GPUs of this kind that fit: fill a node, double the nodes, then bisect the node count
    between the last size that failed and the first that fits; the label names the ZeRO stage it needs."""
    base = req.base

    def at(g: int, n: int) -> Any:
        return _fits(solve, replace(req, base=base.model_copy(update={"gpus_per_node": g, "nodes": n})))

    failed_nodes = base.nodes
    for g, n in scale_steps(base.gpus_per_node, base.nodes):
        best = at(g, n)
        if best is None:
            failed_nodes = n if g == max(base.gpus_per_node, g) else failed_nodes
            continue
        lo = failed_nodes if failed_nodes < n else n
        while n - lo > 1:  # fewest nodes that fit: the first fitting count is a doubling of a failing one
            mid = (lo + n) // 2
            found = at(g, mid)
            lo, n, best = (lo, mid, found) if found is not None else (mid, n, best)
        zero = int(best.config.zero)
        how = f" with ZeRO-{zero}" if zero else ""
        return _entry(f"use {g * n} GPUs of this kind ({g} per node × {n} node{'s' if n > 1 else ''}){how}",
                      f"--gpus {g} --nodes {n}", best, {"hardware.gpus_per_node": g, "hardware.nodes": n})
    return None


def smaller_shape(solve: Solve, req: PlanRequest) -> dict[str, Any] | None:
    field = "seq_len" if req.base.job.trains else "context"
    space = SearchSpace.model_validate({**req.space.model_dump(), "micro_batch": (1,), "batch": (1,)})
    best = _fits(solve, replace(req, space=space, objective=Objective.MAX_CONTEXT))
    if best is None:
        return None
    value = best.config.seq_len if req.base.job.trains else best.config.infer.context
    flag = "--seq-len" if field == "seq_len" else "--context"
    return _entry(f"the largest {field.replace('_', ' ')} that fits at micro-batch 1 is {value:,} tokens",
                  f"--batch 1 {flag} {value}", best,
                  {"config.micro_batch": 1, "config." + ("seq_len" if field == "seq_len" else "infer.context"): value})


def with_space(solve: Solve, req: PlanRequest, label: str, flags: str, **space: Any) -> dict[str, Any] | None:
    try:
        new = SearchSpace.model_validate({**req.space.model_dump(), **space})
    except ValueError:
        return None
    best = _fits(solve, replace(req, space=new))
    return _entry(label, flags, best, {f"space.{k}": v for k, v in space.items()}) if best is not None else None


def with_base(solve: Solve, req: PlanRequest, label: str, flags: str, **base: Any) -> dict[str, Any] | None:
    try:
        start = retarget(req.base, base["job"]) if "job" in base else req.base  # fields the new job reads
        new = JobConfig.model_validate({**start.model_dump(exclude_unset=True), **base})
    except ValueError:
        return None
    best = _fits(solve, replace(req, base=new))
    return _entry(label, flags, best, {f"config.{k}": v for k, v in base.items()}) if best is not None else None


def bigger_gpu(solve: Solve, req: PlanRequest) -> dict[str, Any] | None:
    for gpu in sorted(all_gpus(), key=lambda g: (g.capacity_bytes, g.name)):
        if gpu.capacity_bytes <= req.gpu.capacity_bytes:
            continue
        best = _fits(solve, replace(req, gpu=gpu))
        if best is not None:
            return _entry(f"a GPU with more memory: {gpu.name} ({gpu.capacity_bytes / GiB:,.1f} GiB)",
                          f"--gpu {gpu.name}", best, {"hardware.gpu": gpu.name})
    return None


def more_cpu_ram(solve: Solve, req: PlanRequest) -> dict[str, Any] | None:
    """More CPU RAM per node, when the host binds (offloaded states that do not fit in it): the smallest
    power-of-two GiB that the re-solve fits with, up to the probe's unlimited size."""
    roomy = req.host.model_copy(update={"cpu_ram_bytes": UNLIMITED_MIB * 2**20})
    best = _fits(solve, replace(req, host=roomy))
    if best is None:
        return None
    need = best.estimate.total(Tier.CPU)
    size = GiB
    while size < need:
        size *= 2
    if size <= req.host.cpu_ram_bytes:
        return None
    best = _fits(solve, replace(req, host=req.host.model_copy(update={"cpu_ram_bytes": size})))
    if best is None:
        return None
    return _entry(f"more CPU RAM: {size // GiB:,} GiB per node (offloaded states need {need / GiB:,.1f} GiB)",
                  f"--cpu-ram {size // GiB}GiB", best, {"hardware.cpu_ram_bytes": size})


def diagnose(req: PlanRequest, result: PlanResult, solve: Solve) -> None:
    """Fill ``result.binding`` and ``result.suggestions`` (each one re-solved by ``solve`` and fitting)."""
    binding(req, result, solve)
    job = req.base.job
    tries = [more_gpus(solve, req), smaller_shape(solve, req)]
    if job is Job.LORA:
        tries.append(with_base(solve, req, "QLoRA: a 4-bit NF4 base with double quantization", "--job qlora",
                               job=Job.QLORA, quant=None))
    elif job is Job.GALORE and not req.base.galore.eight_bit:
        tries.append(with_base(solve, req, "8-bit GaLore states", "--galore-8bit",
                               galore=req.base.galore.model_copy(update={"eight_bit": True})))
    elif job in (Job.FULL, Job.PRETRAIN):
        tries.append(with_space(solve, req, "8-bit AdamW states (bitsandbytes)", "--optimizer adamw-8bit",
                                optimizer=(OptimizerKind.ADAMW_8BIT,)))
        tries.append(with_base(solve, req, "GaLore low-rank optimizer states", "--job galore", job=Job.GALORE))
        tries.append(with_base(solve, req, "8-bit GaLore low-rank optimizer states", "--job galore --galore-8bit",
                               job=Job.GALORE, galore=req.base.galore.model_copy(update={"eight_bit": True})))
    if job.trains and not req.base.offload_activations and req.space.offload_activations is not True:
        tries.append(with_space(solve, req, "saved activations in pinned CPU memory (the engine's activation offload)",
                                "--offload-activations", offload_activations=True))
    if job.trains and job is not Job.GALORE:
        offl = (Offload.NONE, Offload.CPU)
        tries.append(with_space(solve, req, "ZeRO-Offload: optimizer states (and parameters) in CPU memory",
                                "--zero 3 --offload-optimizer cpu --offload-params cpu",
                                zero=(1, 2, 3), offload_optimizer=offl, offload_params=offl))
    if job is Job.INFER:
        tries.append(with_space(solve, req, "4-bit AWQ weights", "--quant awq-4bit", quant=("awq-4bit",)))
        tries.append(with_space(solve, req, "fp8 KV cache", "--kv-dtype fp8", kv_dtype=("fp8",)))
        tries.append(with_space(solve, req, "some layers' weights in CPU RAM, streamed over PCIe (accelerate device_map)",
                                "--offload-params none,cpu", offload_params=(Offload.NONE, Offload.CPU),
                                per_layer_offload=True))
    tries.append(more_cpu_ram(solve, req))
    tries.append(bigger_gpu(solve, req))
    result.suggestions = [t for t in tries if t is not None]
