"""Megatron-Core's interleaved 1F1B receive queues when ``microbatch_group_size_per_vp_stage`` g exceeds the pipeline
size p: received boundary tensors waiting for their forward (first stage) or backward (last stage).

Source: megatron/core/pipeline_parallel/schedules.py ``forward_backward_pipelining_with_interleaving`` (Megatron-LM
main, d98e8a6): the first pipeline stage keeps ``fwd_recv_buffer_size`` = g − p + 1 forward receive slots and the
last stage ``bwd_recv_buffer_size`` = g − p + 1 backward ones (1 elsewhere). ``recv_tensor_from_previous_stage``:
the leading stage receives at its iteration k what the ending stage produced at its iteration k − (p − 1), and
appends it to ``input_tensors`` (``output_tensor_grads``) of the next chunk at once; with the schedule table in
groups of g, that chunk's forward (backward) runs at iteration k − (p − 1) + g. Right after iteration k the stage
therefore holds the tensors received at iterations k − (g − p) .. k − 1 not yet used, g − p of them, plus the one
arriving at k, which is the next step's input and, once used, a saved activation (memplan's rule at g = p,
``memory.pp_stage_buffers``: no row). So g − p boundary tensors more than at Megatron's default g = p.
"""

from __future__ import annotations

from memplan.config import Engine
from memplan.memory.activations_block import block_input_bytes
from memplan.memory.breakdown import Row, Tier
from memplan.memory.context import Context

SOURCE = ("megatron/core/pipeline_parallel/schedules.py forward_backward_pipelining_with_interleaving "
          "(fwd_recv_buffer_size, bwd_recv_buffer_size = microbatch_group_size_per_vp_stage - pp + 1)")


def pending(ctx: Context) -> int:
    """Boundary tensors received ahead of use beyond Megatron's default g = p: g − p on the first stage (forward
    inputs) and on the last (output gradients); 0 without the knob, without interleaving, or on another engine."""
    cfg = ctx.cfg
    g = cfg.engine_config.microbatch_group_size_per_vp_stage
    if (g is None or cfg.effective_engine is not Engine.MEGATRON or cfg.pp <= 1 or cfg.perf.virtual_stages <= 1
            or not cfg.job.trains):
        return 0
    return max(0, g - cfg.pp)


def rows(ctx: Context) -> list[Row]:
    """``activations/megatron_pp_recv_queue`` (first stage) and ``activations/megatron_pp_grad_recv_queue`` (last
    stage), each ``pending`` × X bytes, X = ``activations_block.block_input_bytes`` (the stage boundary tensor
    [seq/cp (/tp with sequence parallelism), micro_batch, hidden], Megatron's ``tensor_shape``)."""
    extra = pending(ctx)
    if not extra or not ctx.arch.layers:
        return []
    x = block_input_bytes(ctx.arch.spec, ctx.cfg)
    out = []
    for present, name, what in ((ctx.stage == 0, "activations/megatron_pp_recv_queue", "forward inputs"),
                                (ctx.stage == ctx.cfg.pp - 1, "activations/megatron_pp_grad_recv_queue",
                                 "output gradients")):
        if present:
            out.append(Row(name, Tier.GPU, extra * x, SOURCE,
                           f"Megatron interleaved 1F1B: {extra} received {what} queued ahead of use (g − p) of "
                           f"{x:,} bytes"))
    return out
