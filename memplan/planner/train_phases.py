"""Per-phase GPU bytes of the training ILP's states factor: what each phase of the step holds on a stage, less what
the per-layer blocks hold, and the gradients that persist across accumulated micro-batches (``Entry.persist_gpu``).
"""

from __future__ import annotations

from memplan.config import JobConfig
from memplan.memory import components
from memplan.memory.breakdown import TRAIN_PHASES, Phase, Tier, phase_totals
from memplan.memory.context import Context
from memplan.planner import train_offload
from memplan.planner.classes import layer_classes


def state_phases(per_stage: list[list], ctxs: list[Context], cfg: JobConfig, *, split: bool,
                  layer_weights: bool) -> list[dict[Phase, int]]:
    """GPU bytes per training phase of each stage's state rows (gradients persisting across micro-batches are
    apart: ``persisting``), less what the per-layer blocks hold: an ``opt_split = layers`` row's layer optimizer
    sides (``train_offload.layer_phase_bytes``), and without ``layer_weights`` the layers' weights (all phases)."""
    out = []
    for rows, c in zip(per_stage, ctxs, strict=True):
        per = phase_totals(rows, Tier.GPU, TRAIN_PHASES)
        if split:
            for p, n in layer_optimizer_phases(c).items():
                per[p] -= n
        if not layer_weights:
            weights = layer_weights_gpu(c)
            per = {p: n - weights for p, n in per.items()}
        out.append(per)
    return out


def persisting(rows: list) -> int:
    """GPU bytes of the gradients that persist across micro-batches (all but the fp32 copies made for the step);
    counted in forward and at the start of backward only when the step accumulates (``Entry.persist_gpu``)."""
    return sum(r.bytes for r in rows if r.tier is Tier.GPU and r.component.startswith("gradients")
               and r.component not in components.NOT_PERSISTING)


def phased(ctx: Context) -> list:
    """``components.phased_state_rows`` with the gradients' persistence left to the ILP (``Entry.persist_gpu``):
    evaluated as one micro-batch per step, so gradients count from backward on unless a pipeline keeps them."""
    one = ctx.cfg.model_copy(update={"grad_accum": 1})
    return components.phased_state_rows(Context(ctx.arch, one, ctx.gpu, ctx.host, ctx.stage_override))


def layer_weights_gpu(ctx: Context) -> int:
    """GPU bytes of the stage's layers' weights in the row's format (whole: no ZeRO-3, no offload)."""
    from memplan.memory.weights import layer_format, layer_weight_bytes

    return sum(layer_weight_bytes(ctx, i, layer_format(ctx.cfg, i)) for i, _ in ctx.layers)


def layer_optimizer_phases(ctx: Context) -> dict[Phase, int]:
    """GPU bytes per phase of the stage's layers' optimizer-side states and step temporaries (identical layers
    evaluated once; ``train_offload.layer_phase_bytes``)."""
    classes = layer_classes(ctx.arch)
    per_class: dict[int, dict[Phase, int]] = {}
    total = dict.fromkeys(TRAIN_PHASES, 0)
    for i, _ in ctx.layers:
        if classes[i] not in per_class:
            per_class[classes[i]] = train_offload.layer_phase_bytes(ctx, i)
        for p, n in per_class[classes[i]].items():
            total[p] += n
    return total
