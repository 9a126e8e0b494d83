"""Plots (the ``plot`` extra, matplotlib): memory breakdown against capacity, memory vs context or
batch, and the sweep's fit matrix as a heat-map. matplotlib is imported only when a plot is drawn,
and only its object API is used (``Figure`` + the Agg canvas): no pyplot state, no display needed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from memplan.errors import MemplanError
from memplan.estimator import Estimate, estimate
from memplan.memory.breakdown import TOP_LEVEL, Tier, components
from memplan.units import GiB

FORMATS = (".png", ".svg", ".pdf")
DPI = 120
GROUP_COLORS = {"weights": "#4C72B0", "gradients": "#DD8452", "optimizer": "#55A868", "activations": "#C44E52",
                "kv_cache": "#8172B3", "runtime": "#937860"}
TIER_TITLE = {Tier.GPU: "GPU (per GPU)", Tier.CPU: "CPU RAM (per node)", Tier.NVME: "NVMe (per node)"}
CURVE_START = {"context": 256, "micro_batch": 1}
CURVE_MAX_POINTS = 16
CURVE_OVERSHOOT = 1.25
"""The curve goes on until memory passes 125% of capacity, so the crossing is visible."""


def check_path(path: str | Path) -> Path:
    """``path`` if its suffix is a format matplotlib writes here (.png, .svg, .pdf); MemplanError otherwise."""
    p = Path(path)
    if p.suffix.lower() not in FORMATS:
        raise MemplanError(f"--plot: {p.name!r} must end in {', '.join(FORMATS)}.")
    return p


def new_figure(width: float, height: float) -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise MemplanError("plots need matplotlib; install it with pip install 'memplan[plot]'.") from None
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save(fig: Any, path: str | Path) -> Path:
    p = check_path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(p, format=p.suffix.lower().lstrip("."))
    except OSError as exc:
        raise MemplanError(f"--plot: cannot write {p}: {exc.strerror or exc}.") from None
    return p


def shade(color: str, i: int, n: int) -> tuple[float, float, float]:
    """The i-th of n shades of ``color`` (darker to lighter), so one group's components stay together."""
    from matplotlib.colors import to_rgb

    r, g, b = to_rgb(color)
    mix = 0.55 * i / max(n - 1, 1)
    return (r + (1 - r) * mix, g + (1 - g) * mix, b + (1 - b) * mix)


def draw_breakdown(ax: Any, est: Estimate, tier: Tier) -> None:
    """One stacked bar of ``tier``'s components (GiB) with the capacity as a dashed line."""
    parts = components(est.rows, tier)
    bottom = 0.0
    for group in TOP_LEVEL:
        names = [n for n in parts if n.split("/", 1)[0] == group]
        for i, name in enumerate(names):
            height = parts[name] / GiB
            ax.bar(0, height, bottom=bottom, width=0.6, color=shade(GROUP_COLORS[group], i, len(names)),
                   edgecolor="white", linewidth=0.5, label=f"{name} ({height:,.2f} GiB)")
            bottom += height
    cap, total = est.capacity(tier) / GiB, est.peak(tier) / GiB
    ax.axhline(cap, color="black", linestyle="--", linewidth=1.2, label=f"capacity {cap:,.2f} GiB")
    pct = 100 * (cap - total) / cap if cap else 0.0
    ax.set_title(f"{TIER_TITLE[tier]}\n{total:,.2f} of {cap:,.2f} GiB ({pct:.1f}% free)", fontsize=9)
    ax.set_xticks([])
    ax.set_xlim(-0.6, 0.6)
    ax.set_ylim(0, max(cap, total) * 1.08 or 1)
    ax.set_ylabel("GiB (2^30 bytes)")
    handles, labels = ax.get_legend_handles_labels()  # top of the stack first, like the bar reads
    ax.legend(handles[::-1], labels[::-1], fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)


def title_of(est: Estimate) -> str:
    cfg = est.config
    return f"{est.model.name} · {cfg.job.value} · {cfg.gpus_per_node}×{cfg.nodes} {est.gpu.name}"


def breakdown_figure(est: Estimate) -> Any:
    """Stacked bars of the breakdown on every tier that holds bytes (the GPU always), against capacity."""
    tiers = [t for t in Tier if t is Tier.GPU or est.total(t)]
    fig = new_figure(4.2 * len(tiers) + 1.0, 5.0)
    axes = fig.subplots(1, len(tiers), squeeze=False)[0]
    for ax, tier in zip(axes, tiers, strict=True):
        draw_breakdown(ax, est, tier)
    fig.suptitle(title_of(est), fontsize=10)
    return fig


Axis = Literal["context", "micro_batch"]
AXES: dict[str, Axis] = {"context": "context", "seq_len": "context", "batch": "micro_batch", "micro_batch": "micro_batch"}
"""What ``--plot-axis`` accepts: context (the sequence length of a training job) or batch."""


def curve_points(est: Estimate, axis: Axis) -> list[tuple[int, Estimate]]:
    """(value, estimate) from a small value doubling past capacity, with the chosen value included."""
    from memplan.search import with_size

    cfg = est.config
    chosen = cfg.micro_batch if axis == "micro_batch" else (cfg.seq_len if cfg.job.trains else cfg.infer.context)
    values = sorted({CURVE_START[axis] * 2**i for i in range(CURVE_MAX_POINTS)} | {chosen})
    out = []
    for v in values:
        point = estimate(est.model, est.gpu, with_size(cfg, axis, v), host=est.host)
        out.append((v, point))
        if v >= chosen and point.peak(Tier.GPU) > CURVE_OVERSHOOT * point.capacity(Tier.GPU):
            break
    return out


def draw_curve(ax: Any, est: Estimate, axis: Axis) -> None:
    """GPU memory vs context (or batch), stacked by top-level component, with the capacity line."""
    points = curve_points(est, axis)
    xs = [v for v, _ in points]
    stacks = [[sum(b for n, b in components(p.rows, Tier.GPU).items() if n.split("/", 1)[0] == g) / GiB
               for _, p in points] for g in TOP_LEVEL]
    used = [(g, ys) for g, ys in zip(TOP_LEVEL, stacks, strict=True) if any(ys)]
    ax.stackplot(xs, *[ys for _, ys in used], labels=[g for g, _ in used],
                 colors=[GROUP_COLORS[g] for g, _ in used], alpha=0.85)
    cap = est.capacity(Tier.GPU) / GiB
    ax.axhline(cap, color="black", linestyle="--", linewidth=1.2, label=f"capacity {cap:,.2f} GiB")
    cfg = est.config
    chosen = cfg.micro_batch if axis == "micro_batch" else (cfg.seq_len if cfg.job.trains else cfg.infer.context)
    ax.axvline(chosen, color="grey", linestyle=":", linewidth=1.2, label=f"chosen {chosen:,}")
    ax.set_xscale("log", base=2)
    label = "micro-batch" if axis == "micro_batch" else ("sequence length" if cfg.job.trains else "context")
    ax.set_xlabel(f"{label} ({'sequences' if axis == 'micro_batch' else 'tokens'})")
    ax.set_ylabel("GPU memory, GiB (2^30 bytes)")
    ax.set_ylim(0, max(cap * CURVE_OVERSHOOT, max(sum(s) for s in zip(*stacks, strict=True))) * 1.05)
    ax.set_title(f"GPU memory vs {label}", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", frameon=False)


def plan_figure(result: Any, axis: Axis = "context") -> Any:
    """The best plan: its GPU breakdown against capacity, and GPU memory vs context (or batch)."""
    best = result.best
    if best is None:
        raise MemplanError("--plot: no plan fits, so there is nothing to draw.")
    est = best.estimate
    fig = new_figure(11.0, 5.0)
    bar_ax, curve_ax = fig.subplots(1, 2, width_ratios=[1, 1.6])
    draw_breakdown(bar_ax, est, Tier.GPU)
    draw_curve(curve_ax, est, axis)
    fig.suptitle(f"{title_of(est)} · best plan ({result.objective.value})", fontsize=10)
    return fig


def heatmap_figure(mats: list[Any]) -> Any:
    """The sweep's fit matrices as heat-maps: colour by log2 of the value, ✗ (0) grey, n/a blank."""
    from matplotlib.colors import ListedColormap

    if not mats:
        raise MemplanError("--plot: the sweep has no cells to draw.")
    cols = max(len(m.gpus) for m in mats)
    fig = new_figure(max(6.0, 0.9 * cols + 3.0), sum(0.38 * len(m.models) + 1.4 for m in mats))
    axes = fig.subplots(len(mats), 1, squeeze=False)[:, 0]
    cmap = ListedColormap(["#f7fbff", "#c6dbef", "#6baed6", "#2171b5", "#08306b"]).with_extremes(bad="#d9d9d9")
    top = max((v for m in mats for v in m.values.values() if v), default=1)
    for ax, m in zip(axes, mats, strict=True):
        grid = [[_heat(m.values.get((model, gpu))) for gpu in m.gpus] for model in m.models]
        ax.imshow(grid, cmap=cmap, vmin=0, vmax=math.log2(top + 1), aspect="auto")
        for i, model in enumerate(m.models):
            for j, gpu in enumerate(m.gpus):
                ax.text(j, i, m.cell_text(model, gpu), ha="center", va="center", fontsize=7,
                        color="white" if (grid[i][j] or 0) > 0.6 * math.log2(top + 1) else "black")
        ax.set_xticks(range(len(m.gpus)), m.gpus, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(m.models)), m.models, fontsize=7)
        ax.set_title(m.title, fontsize=9)
    return fig


def _heat(value: int | None) -> float:
    """Colour value of a cell: log2(1 + v); NaN (grey) for 0 and for invalid cells."""
    return math.log2(1 + value) if value else float("nan")


def maybe_plot(obj: Any, path: str | Path | None, *, axis: str = "context") -> Path | None:
    """Draw ``obj`` (an Estimate, a PlanResult, or a SweepResult) to ``path``; nothing when path is None.

    The format follows the suffix (.png, .svg, .pdf). An estimate gives its breakdown per tier; a
    plan gives the best plan's breakdown and GPU memory vs ``axis`` (``context`` or ``batch``); a
    sweep gives its fit matrices as heat-maps.
    """
    if path is None:
        return None
    check_path(path)
    if axis not in AXES:
        raise MemplanError(f"--plot-axis must be context or batch, got {axis!r}.")
    if isinstance(obj, Estimate):
        fig = breakdown_figure(obj)
    elif hasattr(obj, "candidates"):
        fig = plan_figure(obj, AXES[axis])
    elif hasattr(obj, "cells"):
        from memplan.report.sweep_out import matrices

        fig = heatmap_figure(matrices(obj))
    else:
        raise TypeError(f"cannot plot a {type(obj).__name__}")
    return save(fig, path)
