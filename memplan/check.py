"""``memplan check``: does every recipe still fit, with its required headroom?

A recipe without a search space is estimated as written. A recipe with one is planned on
capacities reduced by the required headroom, so the planner itself keeps that memory free; the
plan it picks is then re-estimated on the real capacities and checked with exact int bytes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from memplan.catalog.schema import GpuSpec, HostSpec
from memplan.errors import MemplanError
from memplan.estimator import Estimate, estimate
from memplan.memory.breakdown import Tier
from memplan.recipe_load import LoadedRecipe, load_recipe
from memplan.units import GiB, MiB

Status = Literal["fits", "does_not_fit", "error"]
TIER_NAME = {Tier.GPU: "GPU memory", Tier.CPU: "CPU RAM", Tier.NVME: "NVMe"}
TIER_UNIT = {Tier.GPU: "per GPU", Tier.CPU: "per node", Tier.NVME: "per node"}


@dataclass(frozen=True)
class TierCheck:
    """One tier of one configuration: bytes used, capacity, and the headroom that must stay free."""

    tier: Tier
    total: int
    capacity: int
    required: int

    @property
    def headroom(self) -> int:
        return self.capacity - self.total

    @property
    def ok(self) -> bool:
        return self.headroom >= self.required

    @property
    def headroom_pct(self) -> float:
        return 100.0 * self.headroom / self.capacity if self.capacity else 0.0


@dataclass
class Outcome:
    """The verdict on one recipe file."""

    path: Path
    name: str
    status: Status
    reason: str
    mode: Literal["estimate", "plan"] | None = None
    loaded: LoadedRecipe | None = None
    estimate: Estimate | None = None
    plan: Any = None
    """The PlanResult of a planned recipe (None for an estimated one)."""
    tiers: list[TierCheck] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "fits"

    def tier(self, tier: Tier) -> TierCheck | None:
        return next((t for t in self.tiers if t.tier is tier), None)


def gib(n: int) -> str:
    return f"{n / GiB:,.2f} GiB"


def tier_checks(loaded: LoadedRecipe, est: Estimate) -> list[TierCheck]:
    """Every tier that holds bytes (the GPU always), with the recipe's required headroom."""
    out = []
    for tier in Tier:
        total, cap = est.peak(tier), est.capacity(tier)
        required = loaded.recipe.required_bytes(tier, cap)
        if tier is Tier.GPU or total or required:
            out.append(TierCheck(tier, total, cap, required))
    return out


def headroom_text(loaded: LoadedRecipe, tier: Tier) -> str:
    return loaded.recipe.headroom_for(tier) or "0B"


def verdict(loaded: LoadedRecipe, tiers: list[TierCheck]) -> tuple[Status, str]:
    """"fits: 71.32 GiB of 79.65 GiB (10.4% headroom)", or the first tier that fails and why."""
    for t in tiers:
        if t.headroom < 0:
            where = "" if t.tier is Tier.GPU else f"{TIER_NAME[t.tier]} "
            return "does_not_fit", (f"does not fit: {where}{gib(t.total)} of {gib(t.capacity)} {TIER_UNIT[t.tier]} "
                                    f"(over by {gib(-t.headroom)})")
        if not t.ok:
            return "does_not_fit", (f"headroom too small: {TIER_NAME[t.tier]} {gib(t.total)} of {gib(t.capacity)} "
                                    f"({t.headroom_pct:.1f}% headroom; required {headroom_text(loaded, t.tier)} "
                                    f"= {gib(t.required)})")
    gpu = tiers[0]
    return "fits", f"fits: {gib(gpu.total)} of {gib(gpu.capacity)} ({gpu.headroom_pct:.1f}% headroom)"


def judged(loaded: LoadedRecipe, est: Estimate, outcome: Outcome) -> None:
    """Fill ``outcome`` from ``est``: tiers, status and reason (naming what the estimate leaves out)."""
    outcome.estimate = est
    outcome.tiers = tier_checks(loaded, est)
    outcome.status, outcome.reason = verdict(loaded, outcome.tiers)
    if est.not_modelled:
        outcome.reason += f" [not modelled: {', '.join(est.not_modelled)}]"


def reduced(loaded: LoadedRecipe) -> tuple[GpuSpec, HostSpec]:
    """The GPU and host with the required headroom taken off their capacities (GPU in whole MiB, rounded down, from
    the CUDA runtime's total, ``GpuSpec.capacity_bytes``)."""
    gpu, host, recipe = loaded.gpu, loaded.host, loaded.recipe
    need_gpu = recipe.required_bytes(Tier.GPU, gpu.capacity_bytes)
    mib = (gpu.capacity_bytes - need_gpu) // MiB
    ram = host.cpu_ram_bytes - recipe.required_bytes(Tier.CPU, host.cpu_ram_bytes)
    nvme = host.nvme_bytes - recipe.required_bytes(Tier.NVME, host.nvme_bytes)
    if mib <= 0 or ram <= 0 or nvme < 0:
        raise MemplanError("min_headroom is at least the whole capacity; nothing is left to plan with.")
    return (gpu.model_copy(update={"memory_mib": mib, "cuda_memory_mib": None}),  # capacity as given: mib
            host.model_copy(update={"cpu_ram_bytes": ram, "nvme_bytes": nvme}))


def plan_request(loaded: LoadedRecipe, gpu: GpuSpec, host: HostSpec, *, time_limit_s: float) -> Any:
    from memplan.planner.plan import PlanRequest

    space = loaded.space
    assert space is not None, "plan_request is only called for a recipe with a search space"
    return PlanRequest(model=loaded.model, gpu=gpu, host=host, base=loaded.config, space=space,
                       objective=loaded.objective, top_k=1, time_limit_s=time_limit_s, suggest=False)


def infeasible_reason(loaded: LoadedRecipe, *, time_limit_s: float) -> tuple[Any, str]:
    """Why no plan keeps the headroom free: a plan that fits only without it, or the binding constraint."""
    from dataclasses import replace

    from memplan.planner.plan import plan
    from memplan.planner.suggest import binding

    req = plan_request(loaded, loaded.gpu, loaded.host, time_limit_s=time_limit_s)
    bare = plan(req)
    if bare.best is not None:
        est = estimate(loaded.model, loaded.gpu, bare.best.config, host=loaded.host)
        checks = tier_checks(loaded, est)
        t = next((c for c in checks if not c.ok), checks[0])
        return bare, (f"headroom too small: no plan in the search space keeps {headroom_text(loaded, t.tier)} of "
                      f"{TIER_NAME[t.tier]} free; the best plan without it uses {gib(t.total)} of {gib(t.capacity)} "
                      f"({t.headroom_pct:.1f}% headroom)")
    binding(replace(req, suggest=False), bare, plan)
    if bare.lean_fits:
        return bare, f"the planner found no plan: {bare.binding}"
    return bare, f"no plan in the search space fits: {bare.binding or 'every candidate is over capacity'}"


def run_plan(loaded: LoadedRecipe, outcome: Outcome, *, time_limit_s: float) -> None:
    from memplan.planner.plan import plan

    gpu, host = reduced(loaded)
    result = plan(plan_request(loaded, gpu, host, time_limit_s=time_limit_s))
    outcome.plan = result
    if result.best is None:
        outcome.plan, outcome.reason = infeasible_reason(loaded, time_limit_s=time_limit_s)
        outcome.status = "does_not_fit"
        return
    judged(loaded, estimate(loaded.model, loaded.gpu, result.best.config, host=loaded.host), outcome)


def check_recipe(path: str | Path, *, overrides: dict[str, Any] | None = None, time_limit_s: float = 30.0) -> Outcome:
    """Load, evaluate and judge one recipe; bad input gives status "error" with the message."""
    p = Path(path)
    start = time.perf_counter()
    outcome = Outcome(path=p, name=p.stem, status="error", reason="")
    try:
        loaded = load_recipe(p, overrides=overrides)
        outcome.loaded, outcome.name = loaded, loaded.name
        outcome.mode = "plan" if loaded.recipe.planned else "estimate"
        if loaded.recipe.planned:
            run_plan(loaded, outcome, time_limit_s=time_limit_s)
        else:
            judged(loaded, estimate(loaded.model, loaded.gpu, loaded.config, host=loaded.host), outcome)
    except MemplanError as exc:
        message = str(exc)
        outcome.status = "error"
        outcome.reason = message if message.startswith(str(p)) else f"{p}: {message}"
    outcome.seconds = time.perf_counter() - start
    return outcome


def exit_code(outcomes: list[Outcome]) -> int:
    """2 when any recipe is invalid, else 1 when any does not fit, else 0."""
    if any(o.status == "error" for o in outcomes):
        return 2
    return 1 if any(o.status == "does_not_fit" for o in outcomes) else 0
