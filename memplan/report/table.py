"""Rich tables: one row per component and tier, in GiB with the unit written out."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from memplan.estimator import Estimate
from memplan.memory.breakdown import Tier
from memplan.units import GiB

TIER_LABEL = {Tier.GPU: "GPU (per GPU)", Tier.CPU: "CPU RAM (per node)", Tier.NVME: "NVMe (per node)"}


def fmt_gib(n_bytes: int) -> str:
    return f"{n_bytes / GiB:,.2f} GiB"


def estimate_table(est: Estimate) -> Table:
    cfg = est.config
    title = (f"{est.model.name} · {cfg.job.value} · {cfg.gpus_per_node}×{cfg.nodes} {est.gpu.name} · "
             f"{est.arch.params / 1e9:,.2f} B params")
    table = Table(title=title, title_justify="left")
    table.add_column("tier")
    table.add_column("component")
    table.add_column("memory", justify="right")
    table.add_column("bytes", justify="right")
    for tier in Tier:
        rows = [r for r in est.rows if r.tier is tier]
        if not rows and tier is not Tier.GPU:
            continue
        for r in rows:
            table.add_row(TIER_LABEL[tier], r.component, fmt_gib(r.bytes), f"{r.bytes:,}")
        total, cap = est.total(tier), est.capacity(tier)
        verdict = "[green]FITS[/green]" if total <= cap else "[red]DOES NOT FIT[/red]"
        table.add_row(TIER_LABEL[tier], f"[bold]total[/bold] of {fmt_gib(cap)} capacity",
                      f"[bold]{fmt_gib(total)}[/bold]", verdict, end_section=True)
    for name in est.not_modelled:
        table.add_row("GPU (per GPU)", f"{name}", "[yellow]not modelled[/yellow]",
                      "needs the model's dimensions", end_section=False)
    return table


def render_estimate(est: Estimate, console: Console) -> None:
    console.print(estimate_table(est))
    head = est.headroom_bytes
    if est.fits:
        console.print(f"[green]FITS[/green]: headroom {fmt_gib(head)} on the {est.binding_tier.value} tier.")
    else:
        console.print(f"[red]DOES NOT FIT[/red]: {fmt_gib(-head)} over capacity on the {est.binding_tier.value} tier.")
    if est.not_modelled:
        console.print(f"[yellow]Not modelled[/yellow]: {', '.join(est.not_modelled)} "
                      "(a params-only model has no dimensions); the verdict excludes them.")
