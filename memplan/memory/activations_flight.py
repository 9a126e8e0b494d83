"""Training activations in flight at the pipeline stage's peak: 1F1B's ``pp - stage`` micro-batches, or the
interleaved schedule's per-chunk counts (``arch.interleaved``). Split out of ``memory.activations``, which
re-exports every name.
"""

from __future__ import annotations

from memplan.arch.interleaved import chunk_layer_counts, peak_chunk_bytes
from memplan.config import Recompute
from memplan.memory import activations_block as blk
from memplan.memory import pp_schedule_flight as psf
from memplan.memory.activations_layers import interleave_knobs, layer_micro_bytes, micro_batches_in_flight, stage_layers_bytes
from memplan.memory.activations_model import embedding_bytes, final_norm_bytes, loss_bytes
from memplan.memory.context import Context


def chunk_saved_bytes(ctx: Context, modes: dict[int, Recompute], counting: blk.Counting) -> dict[str, tuple[int, ...]]:
    """One micro-batch's saved bytes per model chunk of the reported stage (v = ``virtual_stages`` chunks, 1 without
    interleaving), by row: ``activations/layers`` (the stage's blocks split into chunks in order,
    ``arch.interleaved.chunk_layer_counts``), the embedding on chunk 0 of the first stage, the final norm and loss on
    chunk v − 1 of the last."""
    cfg = ctx.cfg
    v = max(1, cfg.perf.virtual_stages) if cfg.pp > 1 else 1
    per_layer = [layer_micro_bytes(ctx, i, modes[i], counting) for i, _ in ctx.layers]
    sizes, last = chunk_layer_counts(len(per_layer), v, first_stage=ctx.stage == 0), v - 1
    if psf.named(cfg):  # a named torch schedule: its chunks (two in a V, the output layer's on rank 0)
        v, sizes, last = psf.chunks(cfg), psf.chunk_sizes(ctx), psf.output_chunk(ctx)
    chunks, start = [], 0
    for size in sizes:
        chunks.append(sum(per_layer[start:start + size]))
        start += size
    out = {"activations/layers": tuple(chunks)}
    ends = {"activations/embeddings": (0, embedding_bytes, ctx.stage == 0),
            "activations/final_norm": (last, final_norm_bytes, ctx.holds_output),
            "activations/loss": (last, loss_bytes, ctx.holds_output)}
    for name, (chunk, fn, present) in ends.items():
        if present:
            out[name] = tuple(fn(ctx, counting) if c == chunk else 0 for c in range(v))
    return out


def peak_chunk_counts(ctx: Context, modes: dict[int, Recompute],
                      counting: blk.Counting) -> tuple[dict[str, tuple[int, ...]], tuple[int, ...]]:
    """(``chunk_saved_bytes``, micro-batches each chunk holds) at the moment the interleaved stage's saved bytes are
    largest (``arch.interleaved.peak_chunk_bytes`` weighted by one micro-batch's bytes of each chunk); v > 1, pp > 1."""
    per = chunk_saved_bytes(ctx, modes, counting)
    weights = tuple(sum(col) for col in zip(*per.values(), strict=True))
    if psf.named(ctx.cfg):
        return per, psf.peak(ctx, weights)[1]
    group, extra = interleave_knobs(ctx.cfg)
    return per, peak_chunk_bytes(ctx.cfg.pp, ctx.stage, ctx.cfg.grad_accum, weights, group=group, extra=extra)[1]


def layer_flights(ctx: Context, modes: dict[int, Recompute], counting: blk.Counting) -> dict[int, int]:
    """Micro-batches each of the stage's blocks holds at the stage's peak: ``micro_batches_in_flight`` for every block
    under 1F1B; under the interleaved schedule its chunk's count at the moment ``in_flight_saved`` takes."""
    cfg, v = ctx.cfg, max(1, ctx.cfg.perf.virtual_stages)
    if (v <= 1 or cfg.pp <= 1) and not psf.named(cfg):
        return dict.fromkeys((i for i, _ in ctx.layers), micro_batches_in_flight(ctx))
    counts = peak_chunk_counts(ctx, modes, counting)[1]
    sizes = psf.chunk_sizes(ctx) if psf.named(cfg) else chunk_layer_counts(len(ctx.layers), v, first_stage=ctx.stage == 0)
    chunk_of = [c for c, size in enumerate(sizes) for _ in range(size)]
    return {i: counts[chunk_of[k]] for k, (i, _) in enumerate(ctx.layers)}


def in_flight_saved(ctx: Context, modes: dict[int, Recompute], counting: blk.Counting, flight: int) -> dict[str, int]:
    """The saved rows that scale with the micro-batches in flight at the stage's peak: the blocks, and the embedding
    (first stage) and final norm and loss (last stage).

    1F1B (v = 1): ``flight`` × one micro-batch's bytes. Interleaved (v > 1, pp > 1): counted per chunk
    (``chunk_saved_bytes``), each chunk's micro-batches in flight taken at the moment the stage's sum is largest
    (``arch.interleaved.peak_chunk_bytes``: the order of Megatron's ``forward_backward_pipelining_with_interleaving``
    and torch's ``ScheduleInterleaved1F1B``), instead of ⌈chunk micro-batches / v⌉ whole stages. The planner's
    linear model writes one row per moment with the same counts (``planner.ilp_moments``)."""
    cfg, v = ctx.cfg, max(1, ctx.cfg.perf.virtual_stages)
    if psf.named(cfg):
        return named_saved(ctx, modes, counting)
    if v <= 1 or cfg.pp <= 1:
        out = {"activations/layers": flight * stage_layers_bytes(ctx, modes, counting)}
        if ctx.stage == 0:
            out["activations/embeddings"] = flight * embedding_bytes(ctx, counting)
        if ctx.stage == cfg.pp - 1:
            out["activations/final_norm"] = flight * final_norm_bytes(ctx, counting)
            out["activations/loss"] = flight * loss_bytes(ctx, counting)
        return out
    per, counts = peak_chunk_counts(ctx, modes, counting)
    return {name: sum(n * b for n, b in zip(counts, each, strict=True)) for name, each in per.items()}


def named_saved(ctx: Context, modes: dict[int, Recompute], counting: blk.Counting) -> dict[str, int]:
    """``in_flight_saved`` under a named torch schedule (``memory.pp_schedule_flight``): each chunk's saved bytes
    times the micro-batches it holds at the rank's peak, and ``activations/pp_weight_grad_pending``: the output
    gradients of the weight ops kept from each input backward (I) to its weight backward (W), zero-bubble
    schedules only (``pp_schedule_flight.weight_grad_bytes``)."""
    per = chunk_saved_bytes(ctx, modes, counting)
    weights = tuple(sum(col) for col in zip(*per.values(), strict=True))
    _, held, waiting = psf.peak(ctx, weights)
    out = {name: sum(n * b for n, b in zip(held, each, strict=True)) for name, each in per.items()}
    pending = sum(n * b for n, b in zip(waiting, psf.weight_grad_bytes(ctx), strict=True))
    if pending:
        out["activations/pp_weight_grad_pending"] = pending
    return out
