"""torch.distributed.pipelining's own buffers on a pipeline rank: the stage outputs it keeps for backward and the
receive buffers it allocates for every micro-batch (engine fsdp2 with pp > 1, the engine that pipelines with
torch.distributed.pipelining; Megatron's schedule frees its outputs and receives into per-message buffers).

Source (torch 2.13, torch/distributed/pipelining/):
- stage.py ``_PipelineStageBase.forward_one_chunk``: ``self.fwd_cache[fwd_chunk_id] = (output_tuple,
  flatten_input_tensors)``, popped by ``backward_one_chunk``: each micro-batch's stage output (and its autograd
  graph) lives from its forward to its backward, beside the activations its layers saved;
- stage.py ``PipelineStage._setup_forward_recv_info`` (from ``_prepare_forward_infra``): for chunk_id in
  range(num_microbatches), a non-first stage allocates ``_make_tensor_from_meta`` (``torch.empty_strided``) for
  its input: m buffers, kept in ``args_recv_info`` for the step and every later one (``get_fwd_recv_ops``
  receives into them);
- stage.py ``_setup_backward_recv_info`` / ``PipelineStage._create_grad_recv_info`` (from
  ``_prepare_backward_infra``): for mb_index in range(num_microbatches), a non-last stage allocates a buffer for
  its output's gradient: m more, kept in ``grad_recv_info`` (``get_bwd_recv_ops``);
- _backward.py ``stage_backward``: the input gradients are released (``val.grad = None``) once sent, so they
  hold nothing beyond one backward (not counted);
- stage.py ``_forward_metadata_inference`` / ``_backward_metadata_inference`` (the first step's
  ``_initialize_pp_stages``): one real micro-batch forward with grad per stage, its graph dropped when
  ``_backward_metadata_inference`` returns, before the step's first forward, also on the first stage where
  ``_autograd_grad_for_inputs`` returns without a backward (its inputs need no grad): no row (measured,
  tests/test_measure_pp_metadata.py).
Megatron-LM: megatron/training/arguments.py ``core_transformer_config_from_args`` sets
``deallocate_pipeline_outputs = True``, so megatron/core/pipeline_parallel/schedules.py ``deallocate_output_tensor``
replaces each sent output's storage by a 1-element tensor, and p2p_communication.py ``_communicate`` allocates a
receive buffer per message (the kept one is the next forward's input, a saved activation): no rows for megatron.

DeepSpeed's pipeline engine (deepspeed 0.19.6, deepspeed/runtime/pipe/engine.py, ``deepspeed_rows``) keeps per
in-flight micro-batch, in ``pipe_buffers`` slots (``_reserve_pipe_buffers(TrainSchedule.num_pipe_buffers())``):
``outputs`` (the stage output, from ``_exec_forward_pass`` until ``_exec_backward_pass`` sets it to None) and
``inputs`` (``_exec_recv_activations``: ``pipe_recv_buf.clone().detach()`` with requires_grad, kept until
``_exec_send_grads`` has sent its ``.grad``); the module runs on a second ``clone()`` of it, so the activations'
saved stage input (where ``input_saved``) is that clone, not this one. ``pipe_recv_buf`` and ``grad_layer`` are one
receive buffer each, allocated at the first message and reused every step. runtime/pipe/schedule.py
``TrainSchedule.num_pipe_buffers`` = max(2, min(stages − stage_id, micro_batches)): "the maximum number of
in-flight forward passes" (the max(2, ·) reserves empty slots only), the 1F1B count ``in_flight_micro_batches``.
"""

from __future__ import annotations

from memplan.arch import pp_schedules as ps
from memplan.arch.parallel import in_flight_micro_batches
from memplan.config import Engine, Recompute
from memplan.memory import pp_schedule_flight
from memplan.memory.activations_block import block_input_bytes
from memplan.memory.breakdown import Row, Tier
from memplan.memory.context import Context
from memplan.units import ceil_div

SOURCE = ("torch/distributed/pipelining/stage.py (forward_one_chunk fwd_cache; PipelineStage._setup_forward_recv_info, "
          "_create_grad_recv_info: one buffer per micro-batch)")


def applies(ctx: Context) -> bool:
    """Whether the job pipelines with torch.distributed.pipelining and keeps its outputs: training on engine fsdp2
    with pp > 1 and ``engine_config.deallocate_pipeline_outputs`` off (torch's behaviour)."""
    cfg = ctx.cfg
    return (cfg.job.trains and cfg.pp > 1 and cfg.effective_engine is Engine.FSDP2
            and not cfg.engine_config.deallocate_pipeline_outputs)


def chunk_stages(pp: int, stage: int, virtual_stages: int) -> tuple[int, ...]:
    """The global pipeline stages a rank runs: chunk c of rank s is stage s + c·p (the looped placement of
    torch's ``ScheduleInterleaved1F1B`` and Megatron's interleaved schedule; 1F1B is v = 1)."""
    return tuple(stage + c * pp for c in range(max(1, virtual_stages)))


INPUT_GRADS = "activations/pp_input_grads_kept"


def recv_buffer_counts(pp: int, stage: int, virtual_stages: int, micro_batches: int,
                       schedule: str | None = None) -> tuple[int, int]:
    """(forward input receive buffers, backward output-gradient receive buffers) a rank allocates.

    Formula: m per chunk whose stage is not the first global stage (inputs), m per chunk whose stage is not the
    last global stage p·v − 1 (gradients). Source: ``PipelineStage._setup_forward_recv_info`` and
    ``_setup_backward_recv_info`` loop over ``range(num_microbatches)``, also where the neighbouring stage sits on
    the same rank (a V schedule's turn: no check of ``_is_same_rank`` there). ``schedule``: a named torch schedule
    (``arch.pp_schedules``), whose chunk placement (the V) is used.
    """
    stages = ps.chunk_stages(schedule, pp, stage, virtual_stages) if schedule else chunk_stages(pp, stage, virtual_stages)
    last = pp * len(stages) - 1
    return (micro_batches * sum(1 for g in stages if g != 0), micro_batches * sum(1 for g in stages if g != last))


def output_counts(pp: int, stage: int, virtual_stages: int, micro_batches: int) -> int:
    """Stage outputs a rank keeps in ``fwd_cache`` at most, not counting those of the last global stage (the
    logits, ``activations/logits``).

    Formula: min(F·v, m·c), F = ``arch.parallel.in_flight_micro_batches`` (F·v bounds the chunk micro-batches the
    rank has in flight, the count the activations use), c the rank's chunks other than the last global stage, each
    holding at most the step's m. The in-flight micro-batches are not spread evenly over the chunks: torch's
    ``ScheduleInterleaved1F1B`` runs forwards in rounds of p micro-batches per chunk (schedules.py
    ``forward_stage_index``), so on the last rank one chunk can hold all of them (two CPU processes, p = 2, v = 2,
    m = 4: stage 1 keeps 3 outputs while the rank has 3 in flight).
    """
    v = max(1, virtual_stages)
    flight = in_flight_micro_batches(pp, stage, v, micro_batches)
    last = pp * v - 1
    chunks = sum(1 for g in chunk_stages(pp, stage, v) if g != last)
    return min(flight * v, micro_batches * chunks)


def named_output_counts(schedule: str, pp: int, stage: int, virtual_stages: int, micro_batches: int) -> int:
    """``output_counts`` under a named torch schedule: the most stage outputs the rank's replay holds at once
    (``arch.pp_schedules.flight_states``), chunks of the last global stage left out. An output lives from its
    forward to the end of the micro-batch's backward: a full backward (B) drops it with ``fwd_cache``'s entry; an
    input backward (I) moves it into ``backward_state`` (stage.py ``backward_one_chunk``: ``self.backward_state
    [bwd_chunk_id] = (input_values, param_groups, stage_output, output_grads)``; ``stage_backward_input``'s
    ``detach_`` drops the graph, not the storage), popped only by the weight backward (W,
    ``backward_weight_one_chunk``), so a micro-batch awaiting its W still holds its output."""
    stages = ps.chunk_stages(schedule, pp, stage, virtual_stages)
    last = pp * len(stages) - 1
    return max(sum(h for h, g in zip(held, stages, strict=True) if g != last)
               for held, _ in ps.flight_states(schedule, pp, stage, virtual_stages, micro_batches))


def input_grad_counts(schedule: str, pp: int, stage: int, virtual_stages: int, micro_batches: int) -> int:
    """Input gradients rank ``stage`` keeps on its receive buffers by the end of the step under a named schedule: its
    input backwards (I) on chunks that are not global stage 0.

    Source: torch 2.13 torch/distributed/pipelining/_backward.py ``stage_backward_input`` sets ``inp.grad = dinput``
    on each stage input, the receive buffer itself (stage.py ``_retrieve_recv_activations`` returns
    ``info.buffer.requires_grad_(...)``), and, unlike the full backward's ``stage_backward`` (``val.grad = None``
    once read), never clears it: ``clear_runtime_states`` does, at the next ``step()``. The first stage skips its
    I (``backward_one_chunk``: ``if not self.is_first``); a full backward (B) keeps nothing."""
    stages = ps.chunk_stages(schedule, pp, stage, virtual_stages)
    return sum(1 for chunk, kind, _ in ps.rank_actions(schedule, pp, stage, virtual_stages, micro_batches)
               if kind == ps.IN and stages[chunk] != 0)


def input_saved(ctx: Context) -> bool:
    """Whether the activations already count the stage input of an in-flight micro-batch (its receive buffer):
    under the paper's accounting the first norm saves it (Korthikanti et al. 2022, Sec. 4.1: "each layer norm
    stores its input"); under full recompute of every layer ``torch.utils.checkpoint`` saves it
    (``activations_block.block_input_bytes``). Transformers' RMSNorm saves its fp32 upcast, not the 16-bit input."""
    cfg = ctx.cfg
    whole = cfg.recompute is Recompute.FULL and not cfg.recompute_map and not cfg.recompute_layers
    return cfg.effective_activation_accounting == "paper" or whole


def saved_inputs(ctx: Context) -> int:
    """Receive buffers the activations already count as saved stage inputs at their peak (where ``input_saved``).

    Formula: Σ over the rank's chunks whose global stage is not 0 and that hold a layer, of the micro-batches the
    activations count on that chunk: F = ``activations.micro_batches_in_flight`` under 1F1B; under the interleaved
    schedule each chunk's count at the activations' peak (``activations.peak_chunk_counts``), not F per chunk, which
    rounds up and would take off more buffers than the activations hold (p 4, v 2, m 8, rank 1: 9 in flight, 2·5 = 10
    taken off: an under-count of one buffer).
    """
    from memplan.arch.interleaved import chunk_layer_counts
    from memplan.memory import activations

    cfg, p, s = ctx.cfg, ctx.cfg.pp, ctx.stage
    v, name = max(1, cfg.perf.virtual_stages), pp_schedule_flight.named(cfg)
    held = chunk_layer_counts(len(ctx.layers), v, first_stage=s == 0)
    stages = chunk_stages(p, s, v)
    if name:
        held, stages = pp_schedule_flight.chunk_sizes(ctx), ps.chunk_stages(name, p, s, v)
    if v == 1 and not name:
        counts: tuple[int, ...] = (activations.micro_batches_in_flight(ctx),)
    else:
        counts = activations.peak_chunk_counts(ctx, activations.layer_modes(ctx), activations.counting_for(cfg))[1]
    return sum(n for c, (g, n) in enumerate(zip(stages, counts, strict=True)) if g != 0 and held[c])


def rows(ctx: Context) -> list[Row]:
    """torch.distributed.pipelining's stage outputs and receive buffers on the reported rank, bytes per GPU.

    Formula, with X = ``activations_block.block_input_bytes`` (the stage boundary tensor [micro_batch, seq, hidden]
    in the activation dtype; seq/tp with sequence parallelism, seq/cp with context parallelism), m = grad_accum:
    - ``activations/pp_stage_outputs`` = ``output_counts`` · X (forward, start of backward, like the activations);
      under a named schedule (``engine_config.pp_schedule``) ``named_output_counts`` from its replay, and both
      receive rows with that schedule's chunk placement (the V of ZBVZeroBubble and DualPipeV);
    - ``activations/pp_recv_buffers`` = (R − F·(receiving chunks)) · X where ``input_saved`` (the in-flight
      buffers are saved activations already, ``saved_inputs``), R · X otherwise, R = ``recv_buffer_counts``[0];
    - ``activations/pp_grad_recv_buffers`` = ``recv_buffer_counts``[1] · X;
    - ``activations/pp_input_grads_kept`` = ``input_grad_counts`` · X under a named schedule with input backwards
      (backward and optimizer step: all of the step's, an upper bound at the backward's peak, exact after it).
    Both receive rows are alive in every training phase (allocated at the first step, never freed).
    Assumptions: one tensor crosses each stage boundary (the hidden states); the last stage's outputs (the logits in
    ``fwd_cache`` and ``output_chunks``) are ``memory.pp_outputs``' rows.
    """
    cfg = ctx.cfg
    if deepspeed_applies(ctx) and ctx.arch.layers:
        return deepspeed_rows(ctx)
    if not applies(ctx) or not ctx.arch.layers:
        return []
    x = block_input_bytes(ctx.arch.spec, cfg)
    p, s, v, m = cfg.pp, ctx.stage, max(1, cfg.perf.virtual_stages), cfg.grad_accum
    name = pp_schedule_flight.named(cfg)
    recv, grad_recv = recv_buffer_counts(p, s, v, m, name)
    if input_saved(ctx):
        recv -= saved_inputs(ctx)
    kept = named_output_counts(name, p, s, v, m) if name else output_counts(p, s, v, m)
    grads = input_grad_counts(name, p, s, v, m) if name else 0
    out = []
    for name, count, what in (("activations/pp_stage_outputs", kept, "stage outputs kept until their backward"),
                              ("activations/pp_recv_buffers", recv, "forward receive buffers"),
                              ("activations/pp_grad_recv_buffers", grad_recv, "gradient receive buffers"),
                              (INPUT_GRADS, grads, "input gradients left on the receive buffers by input backwards")):
        if count > 0:
            out.append(Row(name, Tier.GPU, count * x, SOURCE, f"torch pipelining: {count} {what} of {x:,} bytes"))
    return out


DEEPSPEED_SOURCE = ("deepspeed/runtime/pipe/engine.py (pipe_buffers inputs/outputs per in-flight micro-batch, "
                    "pipe_recv_buf, grad_layer); runtime/pipe/schedule.py TrainSchedule.num_pipe_buffers")


def deepspeed_applies(ctx: Context) -> bool:
    """Whether the job trains on DeepSpeed's pipeline engine (engine deepspeed with pp > 1)."""
    cfg = ctx.cfg
    return cfg.job.trains and cfg.pp > 1 and cfg.effective_engine is Engine.DEEPSPEED


def deepspeed_counts(pp: int, stage: int, micro_batches: int) -> dict[str, int]:
    """Boundary tensors DeepSpeed's pipeline engine holds on ``stage`` at its peak, by row.

    Formula, F = min(p − s, m) (``TrainSchedule.num_pipe_buffers`` without its max(2, ·) of empty slots):
    stage outputs F on every stage but the last (whose output is the loss); kept received inputs F on every stage
    but the first (which loads token ids); one ``pipe_recv_buf`` off the first stage; one ``grad_layer`` off the last.
    """
    first, last = stage == 0, stage == pp - 1
    flight = in_flight_micro_batches(pp, stage, 1, micro_batches)
    return {"activations/pp_stage_outputs": 0 if last else flight,
            "activations/pp_stage_inputs": 0 if first else flight,
            "activations/pp_recv_buffers": 0 if first else 1,
            "activations/pp_grad_recv_buffers": 0 if last else 1}


def deepspeed_rows(ctx: Context) -> list[Row]:
    """DeepSpeed's pipeline buffers on the reported stage, bytes per GPU.

    Formula: count (``deepspeed_counts``) × X, X = ``activations_block.block_input_bytes``. With tp > 1 the engine
    partitions what crosses stages over the tensor-parallel group (engine.py ``is_pipe_partitioned`` and
    ``is_grad_partitioned``, config ``pipe_partitioned``/``grad_partitioned`` default True): the kept outputs and
    both receive buffers hold ceil(X / tp) each, the output's full data zeroed (``first_output.data =
    torch.zeros(1)``); the kept inputs are the gathered full X (``part_input.full()``), which then is the module's
    input itself, so where ``input_saved`` the activations count them already and they are left out.
    Assumptions: one tensor crosses each stage boundary (the hidden states; an attention mask sent beside it is not
    counted); the schedule is 1F1B (DeepSpeed has no interleaved one).
    """
    cfg = ctx.cfg
    x = block_input_bytes(ctx.arch.spec, cfg)
    part = ceil_div(x, cfg.tp)
    counts = deepspeed_counts(cfg.pp, ctx.stage, cfg.grad_accum)
    if cfg.tp > 1 and input_saved(ctx):
        counts["activations/pp_stage_inputs"] = 0
    out = []
    for name, count in counts.items():
        size = x if name == "activations/pp_stage_inputs" else part
        if count > 0:
            out.append(Row(name, Tier.GPU, count * size, DEEPSPEED_SOURCE,
                           f"DeepSpeed pipeline engine: {count} x {size:,} bytes"))
    return out
