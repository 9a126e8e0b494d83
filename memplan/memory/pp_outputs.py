"""The last pipeline stage's outputs (the logits) under torch.distributed.pipelining (engine fsdp2 with pp > 1):
the running micro-batch's, held through its loss's backward, and those ``step()`` keeps to return them
(``engine_config.pp_return_outputs``, torch's ``return_outputs``, default True).

Source (torch 2.13, torch/distributed/pipelining/):
- schedules.py ``PipelineScheduleSingle.step`` / ``PipelineScheduleMulti.step(*args, target=None, losses=None,
  return_outputs=True, ...)``: ``self._stage.clear_runtime_states()`` first, then ``_step_microbatches(...,
  return_outputs)``, then ``if self._stage.is_last and return_outputs: return self._merge_outputs(
  self._stage.output_chunks)``; every schedule passes ``save_forward_output=return_outputs`` to
  ``forward_one_chunk`` (Schedule1F1B, GPipe, Interleaved1F1B, ZB and ``_PipelineScheduleRuntime`` alike), loss_fn
  or not: the loss is computed beside (``_maybe_compute_loss``), the output is kept all the same;
- stage.py ``_PipelineStageBase.forward_one_chunk``: ``if self.is_last and save_forward_output:
  self.output_chunks.append(output)`` — the same tensor as the ``fwd_cache`` entry, so while the micro-batch is in
  flight (forward to its backward) it costs nothing more; ``backward_one_chunk`` pops ``fwd_cache`` into the local
  ``stage_output``, so the running output is alive while its loss's backward runs (the ``IN_FLIGHT`` row, with or
  without return_outputs), and, on a last
  stage that is not also the first, ``t.detach_()`` each output ("only needed to return to the user in
  merge_output_chunks ... detached to release autograd graph context"), except a view (``if not t._is_view()``;
  ``nn.Linear`` on a 3-D input returns one, so an output layer's logits stay attached, but the backward has freed
  the graph's saved tensors): from its backward on, each output's bytes are held by ``output_chunks`` alone;
- stage.py ``clear_runtime_states``: ``self.output_chunks.clear()`` — only at the start of the next ``step()``, so
  the m outputs outlive ``step()``: they are alive through the optimizer step whatever the caller does;
- schedules.py ``Schedule1F1B._step_microbatches``: the loop variable ``output`` holds the last forwarded output
  until the next forward returns, whatever return_outputs says (one logits tensor beyond ``activations/logits``
  during the last stage's forwards, with or without this knob: not counted here);
- microbatch.py ``merge_chunks`` (``_merge_outputs`` with the default ``output_merge_spec=None``: dimension 0):
  ``torch.cat(values_to_cat, dim=...)`` — a new tensor of all m outputs, beside ``output_chunks``.

Who runs which: torchtitan passes ``return_outputs=False`` since pytorch/torchtitan PR #1922 (Oct 2025,
torchtitan/train.py, now trainer.py ``pp_schedule.step(..., return_outputs=False)``: "we do not return any output
from PP step(). This allows us to release the memory earlier"); torchtitan before it, torch's pipelining tutorial
and a hand-written loop that calls ``schedule.step(...)`` keep torch's default, True. Megatron-LM returns no output
(its schedule computes the loss in the last stage and frees every stage output: ``deallocate_pipeline_outputs``),
so under that knob this module counts nothing.

Measured (tests/test_measure_pp_outputs.py: two gloo ranks, torch 2.13, Schedule1F1B and ScheduleGPipe, m = 4 fp32
logits of 128 KiB): return_outputs True minus False is exactly k outputs in backward k, 2m in the optimizer step, and
nothing on the first rank.
"""

from __future__ import annotations

from memplan.config import Engine
from memplan.memory.breakdown import Row, Tier
from memplan.memory.context import Context
from memplan.units import bits_to_bytes, ceil_div

SOURCE = ("torch/distributed/pipelining/stage.py forward_one_chunk (fwd_cache; output_chunks.append when "
          "save_forward_output), backward_one_chunk (stage_output, detach_), clear_runtime_states; schedules.py step "
          "(return_outputs=True: _merge_outputs); microbatch.py merge_chunks (torch.cat)")

IN_FLIGHT = "activations/pp_last_stage_output"
CHUNKS = "activations/pp_output_chunks"
CHUNKS_AFTER = "activations/pp_output_chunks_after_step"
MERGED = "activations/pp_merged_output"


def pipelined_last_stage(ctx: Context) -> bool:
    """Whether the reported rank runs the last global stage (``Context.holds_output``: rank p − 1, or rank 0 under a
    V-shaped schedule, ``engine_config.pp_schedule`` ZBVZeroBubble or DualPipeV) of a job pipelined by
    torch.distributed.pipelining: training on engine fsdp2 with pp > 1, ``deallocate_pipeline_outputs`` off, a model
    with layers and a vocabulary."""
    cfg, spec = ctx.cfg, ctx.arch.spec
    return (cfg.job.trains and cfg.pp > 1 and cfg.effective_engine is Engine.FSDP2
            and not cfg.engine_config.deallocate_pipeline_outputs and bool(ctx.arch.layers) and bool(spec.vocab_size)
            and ctx.holds_output)


def applies(ctx: Context) -> bool:
    """Whether the reported rank keeps the returned outputs: ``pipelined_last_stage`` with
    ``engine_config.pp_return_outputs`` on."""
    return ctx.cfg.engine_config.pp_return_outputs and pipelined_last_stage(ctx)


def output_bytes(*, tokens: int, vocab: int, bits: int) -> int:
    """Bytes of one micro-batch's last-stage output, the logits of a causal LM: ceil(tokens·vocab·bits/8), tokens =
    B·S of the micro-batch (S/cp with context parallelism), vocab = ⌈V/tp⌉ (the vocabulary-parallel output layer,
    as ``activations/logits`` counts it), bits the compute dtype's (the output layer's matmul output; a model that
    upcasts its output to fp32 inside the stage holds twice that in bf16, not modelled)."""
    return bits_to_bytes(tokens * vocab, bits)


def kept_counts(micro_batches: int, *, return_outputs: bool = True) -> dict[str, int]:
    """Outputs the last stage holds, by row, at the worst moment of the rows' phases.

    Formula, m = micro-batches of the step:
    - ``IN_FLIGHT`` = 1 (start of backward, backward), whatever ``return_outputs``: the running micro-batch's output,
      held by ``fwd_cache`` and, once popped, by ``backward_one_chunk``'s ``stage_output`` (and the schedule's loop
      variable ``output``) while the loss's backward makes the logits' gradients beside it; ``activations/logits``
      counts those gradients for a loop that drops the model output before backward (HF Trainer), not this tensor.
      In the forwards the loop variable holds the previous output instead, below the start of backward's total;
    with ``return_outputs``:
    - ``CHUNKS`` = m − 1 (forward, start of backward, backward): the outputs of the micro-batches whose backward has
      run, in ``output_chunks``; the step's last forward and last backward run with the m − 1 others done (exactly
      so under 1F1B, where the last stage runs F0 B0 F1 B1 ...; GPipe holds fewer during its forwards);
    - ``CHUNKS_AFTER`` = m (optimizer step): all m, kept by the stage until the next ``step()`` clears them;
    - ``MERGED`` = m (optimizer step): ``torch.cat`` of the m outputs, the value ``step()`` returns.
    Assumption: the caller holds the returned value through the optimizer step (``out = schedule.step(...)`` then
    ``optimizer.step()``) and lets it go before the next ``step()``; a loop that keeps it into the next step holds m
    more outputs through that step's forward and backward (not counted). The moment of the merge itself (2m outputs,
    all gradients, no optimizer temporaries) is at most the optimizer step's total.
    """
    out = {IN_FLIGHT: 1}
    if return_outputs:
        out.update({CHUNKS: max(0, micro_batches - 1), CHUNKS_AFTER: micro_batches, MERGED: micro_batches})
    return out


WHAT = {IN_FLIGHT: "running micro-batch's output held through its backward (fwd_cache, stage_output)",
        CHUNKS: "earlier micro-batches' outputs kept in output_chunks (return_outputs)",
        CHUNKS_AFTER: "outputs kept in output_chunks until the next step() (return_outputs)",
        MERGED: "outputs concatenated into step()'s return value (return_outputs)"}


def rows(ctx: Context) -> list[Row]:
    """The last stage's outputs on the reported rank, bytes per GPU: count (``kept_counts``) × ``output_bytes``;
    none where ``pipelined_last_stage`` is False."""
    if not pipelined_last_stage(ctx):
        return []
    from memplan.memory.activations_block import activation_bits, dims

    cfg = ctx.cfg
    one = output_bytes(tokens=dims(ctx.arch.spec, cfg).tokens, vocab=ceil_div(ctx.arch.spec.vocab_size or 0, cfg.tp),
                       bits=activation_bits(cfg))
    counts = kept_counts(cfg.grad_accum, return_outputs=cfg.engine_config.pp_return_outputs)
    return [Row(name, Tier.GPU, count * one, SOURCE, f"torch pipelining: {count} {WHAT[name]}, {one:,} bytes each")
            for name, count in counts.items() if count > 0]
