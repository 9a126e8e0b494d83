"""Training activations in flight under a named torch.distributed.pipelining schedule (``engine_config.pp_schedule``,
engine fsdp2 with pp > 1): per chunk, the micro-batches the schedule's replay holds (``arch.pp_schedules``), and for
the zero-bubble schedules what a micro-batch keeps from its input backward (I) to its weight backward (W).

Without a named schedule ``memory.activations_flight`` keeps memplan's 1F1B / interleaved counts unchanged.
"""

from __future__ import annotations

from dataclasses import replace

from memplan.arch import pp_schedules as ps
from memplan.arch.interleaved import chunk_layer_counts
from memplan.arch.parallel import v_chunk_ranges
from memplan.arch.tensors import Role, Tensor
from memplan.config import Engine, JobConfig
from memplan.memory import activations_block as blk
from memplan.memory.context import Context
from memplan.units import ceil_div

SOURCE = ("torch/distributed/pipelining/schedules.py (each schedule's rank order); _backward.py "
          "stage_backward_input / stage_backward_weight (graph and output gradients kept from I to W)")
COLUMN = frozenset({"q", "k", "v", "gate", "up"})
"""Column-parallel projections (Megatron-LM, Shoeybi et al. 2019 Sec. 3): their outputs are split over tp."""


def named(cfg: JobConfig) -> str | None:
    """The schedule named by ``engine_config.pp_schedule`` where it applies (a training job on engine fsdp2 with
    pp > 1), else None (memplan's 1F1B / interleaved model)."""
    name = cfg.engine_config.pp_schedule
    applies = cfg.job.trains and cfg.pp > 1 and cfg.effective_engine is Engine.FSDP2
    return name if applies else None


def chunks(cfg: JobConfig) -> int:
    """Model chunks per rank: 2 under a V schedule, else ``perf.virtual_stages``."""
    return 2 if cfg.engine_config.pp_schedule in ps.V_SHAPE else max(1, cfg.perf.virtual_stages)


def chunk_sizes(ctx: Context) -> tuple[int, ...]:
    """Layers of each of the reported rank's chunks, in ``ctx.layers`` order: the V layout's two stages
    (``arch.parallel.v_chunk_ranges``), else the looped split of ``arch.interleaved.chunk_layer_counts``."""
    if ctx.v_shape:
        return tuple(len(rng) for rng in v_chunk_ranges(ctx.arch, ctx.cfg.pp)[ctx.stage])
    return chunk_layer_counts(len(ctx.layers), chunks(ctx.cfg), first_stage=ctx.stage == 0)


def output_chunk(ctx: Context) -> int:
    """Local chunk holding the final norm, the output layer and the loss (global stage p·v − 1): chunk 1 of rank 0
    under a V schedule, the last chunk of rank p − 1 otherwise."""
    return 1 if ctx.v_shape else chunks(ctx.cfg) - 1


def _output_elements(tensor: Tensor, tokens: int, tp: int, ep: int, experts_per_token: int) -> int:
    """Elements of one weight op's output for ``tokens`` rows on one rank: a linear's out_features (split over tp
    for column-parallel projections and the vocabulary-parallel output layer), a norm weight's width (its
    ``x_normed * weight``); routed experts see tokens·k/ep."""
    out = tensor.shape[0]
    if tensor.role is Role.LM_HEAD or tensor.projections & COLUMN:
        out = ceil_div(out, tp)
    rows = ceil_div(tokens * experts_per_token, ep) if tensor.routed else tokens
    return rows * out


def weight_grad_bytes(ctx: Context) -> tuple[int, ...]:
    """Per chunk of the reported rank, bytes one micro-batch keeps from its I to its W beyond its saved activations.

    Formula: Σ over the chunk's linear and norm weights (and the output layer on its chunk) of tokens ×
    out_features (per rank; a norm's width) × activation bytes: the gradient of each weight op's output. Source: torch 2.13
    torch/distributed/pipelining/_backward.py ``stage_backward_input`` registers a prehook on every
    ``param_groups`` intermediate (the op joining a weight to the input path, e.g. a linear's ``MmBackward``) that
    stores its incoming gradient in ``param_group["grads"]``, and keeps the graph (``retain_graph=True``, saved
    tensors included) until ``stage_backward_weight`` deletes ``intermediates`` and ``grads``.
    Checked on torch 2.13 (two RMSNorm-Linear blocks, CPU): ``param_groups``' intermediates are the linears'
    ``MmBackward0`` and the norms' weight ``MulBackward0``, holding Σ(out_features) + Σ(norm widths) elements per
    token. Assumptions: biases add no intermediate (their add joins a linear's output); under recompute the kept
    graph is taken as the saved activations already counted; the embedding (no input path) holds none.
    """
    cfg, spec = ctx.cfg, ctx.arch.spec
    if named(cfg) not in ps.SPLIT_BACKWARD:
        return (0,) * chunks(cfg)
    tokens, bits = blk.dims(spec, cfg).tokens, blk.activation_bits(cfg)

    def layer_bytes(tensors: tuple[Tensor, ...], k: int) -> int:
        count = sum(_output_elements(t, tokens, cfg.tp, cfg.ep, k) * (1 if t.routed else t.copies)
                    for t in tensors if (t.role in (Role.LINEAR, Role.LM_HEAD) and len(t.shape) == 2)
                    or (t.role is Role.NORM and len(t.shape) == 1))
        return ceil_div(count * bits, 8)

    out, start = [], 0
    for size in chunk_sizes(ctx):
        out.append(sum(layer_bytes(layer.tensors, layer.experts_per_token) for _, layer in ctx.layers[start:start + size]))
        start += size
    if ctx.holds_output:  # the output layer's logits gradient; a tied one is the embedding's matrix
        post = tuple(ctx.arch.post)
        if not any(t.role is Role.LM_HEAD for t in post):
            post += tuple(replace(t, role=Role.LM_HEAD) for t in ctx.arch.pre if t.role is Role.EMBEDDING)
        out[output_chunk(ctx)] += layer_bytes(post, 1)
    return tuple(out)


def peak(ctx: Context, chunk_bytes: tuple[int, ...]) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
    """(bytes, held, awaiting W) at the reported rank's largest Σ held_c · ``chunk_bytes[c]`` + awaiting_c ·
    ``weight_grad_bytes[c]`` over its schedule (``arch.pp_schedules.peak_chunk_bytes``)."""
    cfg = ctx.cfg
    name = named(cfg)
    assert name is not None
    return ps.peak_chunk_bytes(name, cfg.pp, ctx.stage, cfg.grad_accum, chunk_bytes, weight_grad_bytes(ctx))


def whole_stage_flight(ctx: Context) -> int:
    """The rank's micro-batches in flight in whole-stage units, for the rows counted once per forward of the whole
    stage (rotary tables, checkpointed blocks' keyword arguments): ⌈most chunk micro-batches held at once / chunks⌉,
    as ``arch.parallel.in_flight_micro_batches`` rounds the interleaved count."""
    cfg = ctx.cfg
    name = named(cfg)
    assert name is not None
    return ps.whole_stage_flight(name, cfg.pp, ctx.stage, chunks(cfg), cfg.grad_accum)
