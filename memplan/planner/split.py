"""The ``opt_split`` dimension of a training plan (DeepSpeed ZeRO-3 partial optimizer offload): its values, which
placements may split the optimizer states by layer, the disjoint parts of the search space it defines, and the
GPU layer count of a per-layer solution. The per-layer block itself is ``train_offload``'s."""

from __future__ import annotations

from memplan.config import Job, Offload, OptimizerKind, ZeroStage

ALL = "all"
LAYERS = "layers"
BLOCK_NAME = "optimizer"
KEY_DIMS = ("tp", "pp", "optimizer", "opt_split")
MODES = ("gpu", "cpu")



def splittable(placement: tuple, optimizer: OptimizerKind = OptimizerKind.ADAMW, job: Job = Job.FULL) -> bool:
    """Partial offload is DeepSpeed ZeRO-3's (``ratio``: "Only valid with ZeRO Stage 3"), to the CPU, with
    AdamW ("Hybrid Optimizer Only Supports DeepSpeedCPUAdam"), for jobs that train every weight."""
    zero, opt_off, _ = placement
    return (zero >= ZeroStage.PARAMETERS and opt_off is Offload.CPU and optimizer is OptimizerKind.ADAMW
            and job in (Job.PRETRAIN, Job.FULL))


def split_values(dims: dict[str, tuple], per_layer: bool, job: Job) -> tuple[str, ...]:
    if per_layer and any(splittable(p, o, job) for p in dims["placement"] for o in dims["optimizer"]):
        return (ALL, LAYERS)
    return (ALL,)


def partition(dims: dict[str, tuple], job: Job) -> list[dict[str, tuple]]:
    """The search space as disjoint parts: without ``opt_split`` the space itself; with it, the plans that
    keep the optimizer states whole (``all``) and those that split them by layer (``layers``: pp = 1 and
    the placements and optimizers DeepSpeed splits with). Their union is the space."""
    if "opt_split" not in dims:
        return [dims]
    whole = {d: v for d, v in dims.items() if d != "opt_split"}
    split = {**dims, "opt_split": (LAYERS,), "pp": tuple(p for p in dims["pp"] if p == 1),
             "placement": tuple(p for p in dims["placement"] if any(splittable(p, o, job) for o in dims["optimizer"])),
             "optimizer": tuple(o for o in dims["optimizer"] if any(splittable(p, o, job) for p in dims["placement"]))}
    return [whole] + ([split] if all(split[d] for d in ("pp", "placement", "optimizer")) else [])


def gpu_layers(modes: list[str]) -> int:
    """``optimizer_gpu_layers`` of a solution: the leading layers kept on the GPU (the rest is a suffix)."""
    return next((i for i, m in enumerate(modes) if m == "cpu"), len(modes))
