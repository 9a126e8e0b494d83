"""When nothing fits: which constraint binds and by how much, and the smallest changes that make
it fit, each verified by an actual re-solve (never guessed).

A suggestion is a request change as data (``changes``: ``config.*``, ``space.*`` and ``hardware.*`` paths and their
new values); ``change.apply`` makes that change, and the re-solve that verifies it solves exactly that request. The
planner writes no command line: the report renders ``changes`` as flags (``memplan.report.flags``). ``KINDS`` lists
every kind of suggestion, so a test can check that each one's change renders to flags the CLI reads back."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from memplan.catalog.store import all_gpus
from memplan.config import Job, Offload, OptimizerKind
from memplan.errors import MemplanError
from memplan.estimator import estimate
from memplan.memory.breakdown import Tier
from memplan.memory.quant import QLORA_DEFAULT
from memplan.planner.change import apply
from memplan.planner.request import PlanRequest, PlanResult
from memplan.planner.space import Objective, SearchSpace
from memplan.units import GiB, counted

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


def json_value(value: Any) -> Any:
    """A JSON value of a request field: an enum's value, a tuple as a list, a model as its fields."""
    if isinstance(value, tuple | list):
        return [json_value(v) for v in value]
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json", exclude_defaults=True)
    return getattr(value, "value", value)


def _entry(change: str, best: Any, changes: dict[str, Any]) -> dict[str, Any]:
    """One verified suggestion: the change in words and as data (``changes``: the request's fields,
    ``config.*``, ``space.*`` or ``hardware.*``, and their new values; the report renders them as flags)."""
    return {"change": change, "verified": True,
            "gpu_total_bytes": best.estimate.peak(Tier.GPU), "tokens_per_s": round(best.tokens_per_s, 3),
            "changes": {k: json_value(v) for k, v in changes.items()}}


def _verified(solve: Solve, req: PlanRequest, changes: dict[str, Any]) -> Any:
    """The best plan of the changed request (re-solved), or None when the change is invalid or nothing fits."""
    try:
        changed = apply(req, changes)
    except (ValueError, MemplanError):
        return None
    return _fits(solve, changed)


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
    where = "per GPU" if tier is Tier.GPU else "per node"
    needs = f"{est.peak(tier) / GiB:,.2f} GiB {where} of {est.capacity(tier) / GiB:,.2f} GiB"
    if est.fits:  # the search missed a plan the exact estimate accepts: say so, not "over by 0.00 GiB"
        result.lean_fits = True
        result.binding = (f"memory is not what fails: the leanest configuration in the search space "
                          f"({lean_text(lean.config)}) fits, {needs}; the planner's linear model under-counted the "
                          "plans it proposed, which the exact re-check then rejected (a planner defect: please report "
                          "it, and run `memplan estimate` with that configuration)")
        return
    result.binding = (f"{tier.value} memory: even the leanest configuration in the search space needs "
                      f"{est.peak(tier) / GiB:,.2f} GiB {where} against {est.capacity(tier) / GiB:,.2f} GiB "
                      f"(over by {-est.headroom(tier) / GiB:,.2f} GiB)")


def lean_text(cfg: Any) -> str:
    """A configuration in a few words: its parallel degrees, ZeRO stage, micro-batch and recompute modes."""
    modes = sorted({m.value for m in cfg.recompute_map} if cfg.recompute_map else {cfg.recompute.value})
    return (f"tp={cfg.tp} pp={cfg.pp} zero={int(cfg.zero)} micro-batch={cfg.micro_batch} "
            f"recompute {'/'.join(modes)}")


def scale_steps(gpn: int, nodes: int) -> list[tuple[int, int]]:
    """Larger clusters to try, smallest first: fill a node up to 8 GPUs, then double the nodes."""
    out = [(g, 1) for g in (2, 4, 8) if g > gpn] if nodes == 1 else []
    per = max(gpn, 8) if nodes == 1 else gpn
    n = 1 if nodes == 1 else nodes
    while n < MAX_SCALE_NODES:
        n *= 2
        out.append((per, n))
    return out


Found = tuple[Any, Any] | None
"""A searched kind's value and the verified best plan at it, or None when none fits."""


@dataclass(frozen=True)
class Kind:
    """One kind of suggestion: whether it is tried for a request (``applies``), its request change for a value
    (``changes``; kinds without ``find`` take value None), and its label given the verified best plan. ``find``
    searches the value (how many GPUs, how long a sequence) and verifies it by re-solving ``changes`` at it."""

    name: str
    applies: Callable[[PlanRequest], bool]
    changes: Callable[[PlanRequest, Any], dict[str, Any]]
    label: Callable[[PlanRequest, Any, Any], str]
    find: Callable[[Solve, PlanRequest], Found] | None = None


def _gpus_changes(req: PlanRequest, value: tuple[int, int]) -> dict[str, Any]:
    return {"hardware.gpus_per_node": value[0], "hardware.nodes": value[1]}


def _more_gpus(solve: Solve, req: PlanRequest) -> Found:
    """The fewest GPUs of this kind that fit: fill a node, double the nodes, then bisect the node count
    between the last size that failed and the first that fits."""
    base = req.base

    def at(g: int, n: int) -> Any:
        return _verified(solve, req, _gpus_changes(req, (g, n)))

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
        return (g, n), best
    return None


def _gpus_label(req: PlanRequest, value: tuple[int, int], best: Any) -> str:
    """Names the ZeRO stage the verified plan uses."""
    g, n = value
    zero = int(best.config.zero)
    how = f" with ZeRO-{zero}" if zero else ""
    return f"use {counted(g * n, 'GPU')} of this kind ({g} per node × {counted(n, 'node')}){how}"


def _shape_changes(req: PlanRequest, value: int) -> dict[str, Any]:
    """Micro-batch 1 (concurrent sequences, inference) and sequence length (context) ``value``, in the base
    configuration and as the only choice of the search space, as ``--batch 1 --seq-len N`` (``--context N``) set them."""
    if req.base.job.trains:
        return {"config.micro_batch": 1, "space.micro_batch": (1,), "config.seq_len": value}
    return {"config.micro_batch": 1, "space.batch": (1,), "config.infer.context": value, "space.context": (value,)}


def _smaller_shape(solve: Solve, req: PlanRequest) -> Found:
    """The longest sequence (context) that fits at micro-batch 1 (a max-context re-solve), verified by solving
    the request at that length."""
    dim = "micro_batch" if req.base.job.trains else "batch"  # a plan rejects the other job's dimension
    space = SearchSpace.model_validate({**req.space.model_dump(), dim: (1,)})
    longest = _fits(solve, replace(req, space=space, objective=Objective.MAX_CONTEXT))
    if longest is None:
        return None
    value = longest.config.seq_len if req.base.job.trains else longest.config.infer.context
    best = _verified(solve, req, _shape_changes(req, value))
    return (value, best) if best is not None else None


def _shape_label(req: PlanRequest, value: int, best: Any) -> str:
    field = "seq len" if req.base.job.trains else "context"
    return f"the largest {field} that fits at micro-batch 1 is {value:,} tokens"


def _bigger_gpu(solve: Solve, req: PlanRequest) -> Found:
    """The catalog GPU with the least memory above this one's that fits (ties by name)."""
    for gpu in sorted(all_gpus(), key=lambda g: (g.capacity_bytes, g.name)):
        if gpu.capacity_bytes <= req.gpu.capacity_bytes:
            continue
        best = _verified(solve, req, {"hardware.gpu": gpu.name})
        if best is not None:
            return gpu, best
    return None


def _more_cpu_ram(solve: Solve, req: PlanRequest) -> Found:
    """More CPU RAM per node, when the host binds (offloaded states that do not fit in it): the smallest
    power-of-two GiB that the re-solve fits with, up to the probe's unlimited size; the value is (size, need)."""
    roomy = req.host.model_copy(update={"cpu_ram_bytes": UNLIMITED_MIB * 2**20})
    probe = _fits(solve, replace(req, host=roomy))
    if probe is None:
        return None
    need = probe.estimate.total(Tier.CPU)
    size = GiB
    while size < need:
        size *= 2
    if size <= req.host.cpu_ram_bytes:
        return None
    best = _verified(solve, req, {"hardware.cpu_ram_bytes": size})
    return ((size, need), best) if best is not None else None


def _where(offload: Any) -> str:
    return "on the GPU" if offload is Offload.NONE else f"in {offload.value.upper()} memory"


def _zero_offload_label(req: PlanRequest, value: Any, best: Any) -> str:
    """What was verified is a search over ZeRO stages and offload choices: the label names what the re-solve picked
    (the flags give the choices, as the re-solve had them)."""
    cfg = best.config
    return (f"ZeRO-Offload (stage and offload chosen by the plan): ZeRO-{int(cfg.zero)}, optimizer states "
            f"{_where(cfg.offload_optimizer)}, parameters {_where(cfg.offload_params)}")


def _fixed(name: str, applies: Callable[[PlanRequest], bool], label: str | Callable[[PlanRequest, Any, Any], str],
           changes: Callable[[PlanRequest], dict[str, Any]]) -> Kind:
    """A kind whose change needs no search: one re-solve of ``changes`` verifies it."""
    return Kind(name, applies, lambda req, _: changes(req), label if callable(label) else lambda *_: label)


def _jobs(*jobs: Job) -> Callable[[PlanRequest], bool]:
    return lambda req: req.base.job in jobs


def _galore_8bit(req: PlanRequest) -> bool:
    return req.base.job is Job.GALORE and not req.base.galore.eight_bit


def _no_activation_offload(req: PlanRequest) -> bool:
    return req.base.job.trains and not req.base.offload_activations and req.space.offload_activations is not True


OFFLOAD_CHOICES = (Offload.NONE, Offload.CPU)
KINDS: tuple[Kind, ...] = (
    Kind("more_gpus", lambda req: True, _gpus_changes, _gpus_label, _more_gpus),
    Kind("smaller_shape", lambda req: True, _shape_changes, _shape_label, _smaller_shape),
    _fixed("qlora", _jobs(Job.LORA), "QLoRA: a 4-bit NF4 base with double quantization",
           lambda req: {"config.job": Job.QLORA, "config.quant": QLORA_DEFAULT, "space.quant": (QLORA_DEFAULT,)}),
    _fixed("galore_8bit", _galore_8bit, "8-bit GaLore states", lambda req: {"config.galore.eight_bit": True}),
    _fixed("adamw_8bit", _jobs(Job.FULL, Job.PRETRAIN), "8-bit AdamW states (bitsandbytes)",
           lambda req: {"config.optimizer": OptimizerKind.ADAMW_8BIT, "space.optimizer": (OptimizerKind.ADAMW_8BIT,)}),
    _fixed("galore", _jobs(Job.FULL, Job.PRETRAIN), "GaLore low-rank optimizer states",
           lambda req: {"config.job": Job.GALORE}),
    _fixed("galore_job_8bit", _jobs(Job.FULL, Job.PRETRAIN), "8-bit GaLore low-rank optimizer states",
           lambda req: {"config.job": Job.GALORE, "config.galore.eight_bit": True}),
    _fixed("activation_offload", _no_activation_offload,
           "saved activations in pinned CPU memory (the engine's activation offload)",
           lambda req: {"config.offload_activations": True, "space.offload_activations": True}),
    _fixed("zero_offload", lambda req: req.base.job.trains and req.base.job is not Job.GALORE, _zero_offload_label,
           lambda req: {"space.zero": (1, 2, 3), "space.offload_optimizer": OFFLOAD_CHOICES,
                        "space.offload_params": OFFLOAD_CHOICES}),
    _fixed("awq", _jobs(Job.INFER), "4-bit AWQ weights", lambda req: {"config.quant": "awq-4bit",
                                                                      "space.quant": ("awq-4bit",)}),
    _fixed("fp8_kv", _jobs(Job.INFER), "fp8 KV cache",
           lambda req: {"config.infer.kv_dtype": "fp8", "space.kv_dtype": ("fp8",)}),
    _fixed("layer_offload", _jobs(Job.INFER),
           "some layers' weights in CPU RAM, streamed over PCIe (accelerate device_map)",
           lambda req: {"space.offload_params": OFFLOAD_CHOICES, "space.per_layer_offload": True}),
    Kind("more_cpu_ram", lambda req: True, lambda req, v: {"hardware.cpu_ram_bytes": v[0]},
         lambda req, v, best: f"more CPU RAM: {v[0] // GiB:,} GiB per node (offloaded states need {v[1] / GiB:,.1f} GiB)",
         _more_cpu_ram),
    Kind("bigger_gpu", lambda req: True, lambda req, gpu: {"hardware.gpu": gpu.name},
         lambda req, gpu, best: f"a GPU with more memory: {gpu.name} ({gpu.capacity_bytes / GiB:,.1f} GiB)", _bigger_gpu),
)
"""Every kind of suggestion, in the order they are tried and listed."""


def suggestion(solve: Solve, req: PlanRequest, kind: Kind) -> dict[str, Any] | None:
    """The verified suggestion of one kind for ``req``, or None when it does not apply or does not fit."""
    if not kind.applies(req):
        return None
    if kind.find is None:
        value, changes = None, kind.changes(req, None)
        best = _verified(solve, req, changes)
    else:
        found = kind.find(solve, req)
        if found is None:
            return None
        (value, best), changes = found, kind.changes(req, found[0])
    return _entry(kind.label(req, value, best), best, changes) if best is not None else None


def diagnose(req: PlanRequest, result: PlanResult, solve: Solve) -> None:
    """Fill ``result.binding`` and ``result.suggestions`` (each one re-solved by ``solve`` and fitting)."""
    binding(req, result, solve)
    found = (suggestion(solve, req, kind) for kind in KINDS)
    result.suggestions = [s for s in found if s is not None]
