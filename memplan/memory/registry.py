"""The component registry: each memory component declared once, with the phases in which it is alive.

The breakdown, ``explain``, the phase peaks and the ILP all read this table. A component name is
matched by its longest registered prefix (``optimizer/adam_m`` falls back to ``optimizer``), so a
new row inherits its family's phases until it is declared on its own.

The training phases follow the measured shape of a PyTorch step (shared/design/engines-and-phases.md):
peak = P + O + max(A + logits/loss transients, G + optimizer temporaries).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from memplan.memory.breakdown import INFER_PHASES, TRAIN_PHASES, Phase, Row

ALL = frozenset(TRAIN_PHASES) | frozenset(INFER_PHASES)


@dataclass(frozen=True)
class Component:
    """One declared component: its slash name (or family prefix), the phases it is alive in, its source."""

    name: str
    phases: frozenset[Phase]
    source: str = ""


REGISTRY: dict[str, Component] = {}


def register(name: str, phases: frozenset[Phase] | tuple[Phase, ...], source: str = "") -> Component:
    """Declare a component (or a family prefix) once; declaring a name twice is a programming error."""
    if name in REGISTRY:
        raise ValueError(f"component {name!r} is declared twice")
    comp = Component(name, frozenset(phases), source)
    REGISTRY[name] = comp
    _LOOKED_UP.clear()
    return comp


_LOOKED_UP: dict[str, Component] = {}
"""``lookup``'s answers so far (emptied by each ``register``): every estimate looks up the same few names."""


def lookup(name: str) -> Component:
    """The declaration of ``name``: the longest registered slash prefix of it."""
    comp = _LOOKED_UP.get(name)
    if comp is not None:
        return comp
    parts = name.split("/")
    for n in range(len(parts), 0, -1):
        comp = REGISTRY.get("/".join(parts[:n]))
        if comp is not None:
            _LOOKED_UP[name] = comp
            return comp
    raise KeyError(f"component {name!r} is not registered")


_ROW_FIELDS = tuple(f.name for f in fields(Row)) == ("component", "tier", "bytes", "source", "note", "phases")
"""Row has exactly these fields, in this order: ``with_phases`` may build the new Row itself (else ``replace``)."""


def with_phases(row: Row) -> Row:
    """``row`` with its phases from the registry, unless the row already names its own (a new Row, as
    ``dataclasses.replace`` makes it, without its generic field walk while Row's fields are the ones named in
    ``_ROW_FIELDS``)."""
    if row.phases is not None:
        return row
    phases = lookup(row.component).phases
    if _ROW_FIELDS:
        return Row(row.component, row.tier, row.bytes, row.source, row.note, phases)
    return replace(row, phases=phases)


# Families: a row that is not declared on its own is alive wherever its family is.
_F, _BS, _B, _O = TRAIN_PHASES
_SAVED = (_F, _BS, Phase.PREFILL)
register("weights", ALL, "parameters live through the whole step")
register("gradients", (_B, _O), "gradients exist from backward until the optimizer step (zero_grad(set_to_none=True), "
         "PyTorch >= 2.0); with accumulation or a pipeline they persist (components.phases_for)")
register("optimizer", TRAIN_PHASES, "optimizer states persist across steps")
register("activations", _SAVED,
         "saved for backward during forward; all of them alive at the start of backward, freed as backward consumes "
         "them (torch autograd); the prefill forward when serving")
register("kv_cache", (Phase.PREFILL, Phase.DECODE), "allocated at the first forward, held while decoding")
register("runtime", ALL, "process-wide: CUDA context, allocator reserve, margins")
register("runtime/nccl_communicators", TRAIN_PHASES,
         "NCCL communicators' connection and NVLS buffers: made at each process group's first operation, kept "
         "until the group is destroyed, so alive in every phase of every step after the first (memory.nccl)")

# Training engines' components (memory.engine_states, memory.engine_buffers; issue 11 part 1).
_TRAIN_SAVED = (Phase.FORWARD, Phase.BACKWARD_START, Phase.BACKWARD)
register("weights/autocast_copies", (_F, _BS),
         "torch/amp/autocast_mode.py: cast weights cached for the autocast region and saved for backward; the cache "
         "is cleared when the region exits and each saved copy is freed with its layer's backward, like activations")
register("weights/fp8_copies", _TRAIN_SAVED, "TransformerEngine module/linear.py fp8 weight workspace (megatron: cached, "
         "the row's phases say the whole step); accelerate te.Linear's saved weights; torchao float8 per-GEMM cast")
register("weights/fsdp_all_gather", _TRAIN_SAVED, "FSDP2 _fsdp_collectives.py foreach_all_gather: units in flight")
register("weights/fsdp_running_unit", (Phase.FORWARD, Phase.BACKWARD),
         "FSDP2 _fsdp_param_group.py wait_for_unshard: the running block (none gathered yet at the start of backward)")
register("weights/fsdp_kept_all_gather", (Phase.FORWARD,),
         "FSDP2 _fsdp_param_group.py wait_for_unshard comm_ctx.all_gather_state, freed in _fsdp_state.py _post_forward")
register("weights/fsdp_kept_all_gather_at_loss", (Phase.BACKWARD_START,),
         "FSDP2: the kept all-gather output beside the loss's forward transients, not its logits' gradients "
         "(memory.engine_fsdp2_backward.kept_at_loss_rows)")
register("gradients/fsdp_reduce_scatter", (Phase.BACKWARD,), "FSDP2 _fsdp_collectives.py foreach_reduce: one unit")
register("gradients/fsdp_first_reduce_scatter", (Phase.BACKWARD_START,),
         "FSDP2 _fsdp_param_group.py post_backward of the last block: its gradient buffers beside the other blocks' "
         "activations, beyond the start of backward (memory.engine_fsdp2_backward.first_reduce_scatter_rows)")
register("gradients/fsdp_backward_held", (Phase.BACKWARD,),
         "FSDP2 _fsdp_param_group.py post_backward: the shards reduced so far and the root's early unsharded "
         "gradients while a unit is in flight (memory.engine_fsdp2_backward); the root's shard comes last")
register("gradients/fsdp_pp_accumulated", (Phase.BACKWARD,),
         "FSDP2 under torch.distributed.pipelining: unsharded gradients accumulated until the last backward "
         "(pipelining/stage.py backward_maybe_with_nosync; memory.engine_buffers.fsdp2_pipeline_rows)")
register("weights/fsdp_pp_kept_after_backward", _TRAIN_SAVED,
         "FSDP2 under torch.distributed.pipelining, reshard_after_forward=True: units a backward gathered stay "
         "gathered (set_reshard_after_backward(False)) until the next forward's post_forward")
register("gradients/fsdp_pp_cooldown", (Phase.BACKWARD_START,),
         "FSDP2 under an interleaved pipeline: chunks' first gradients in the cool-down beyond the activations freed")
register("gradients/fsdp_pp_accumulated_at_peak", (Phase.FORWARD, Phase.BACKWARD_START),
         "the part of gradients/fsdp_pp_accumulated that exists while the stage holds its in-flight peak")
register("activations/pp_stage_outputs", (_F, _BS),
         "torch.distributed.pipelining stage.py forward_one_chunk: fwd_cache keeps each micro-batch's stage output "
         "until its backward_one_chunk; DeepSpeed pipe/engine.py pipe_buffers['outputs'] until _exec_backward_pass "
         "(memory.pp_stage_buffers)")
register("activations/pp_recv_buffers", TRAIN_PHASES,
         "torch.distributed.pipelining stage.py PipelineStage._setup_forward_recv_info: one input receive buffer per "
         "micro-batch, allocated at the first step and kept; DeepSpeed pipe/engine.py: one pipe_recv_buf "
         "(memory.pp_stage_buffers)")
register("activations/megatron_pp_recv_queue", (_F, _BS),
         "Megatron interleaved 1F1B with microbatch_group_size_per_vp_stage g > pp: the first stage's forward inputs "
         "received g - pp iterations ahead of their forward (memory.megatron_pp_buffers)")
register("activations/megatron_pp_grad_recv_queue", (_F, _BS),
         "Megatron interleaved 1F1B with microbatch_group_size_per_vp_stage g > pp: the last stage's output gradients "
         "received g - pp iterations ahead of their backward (memory.megatron_pp_buffers)")
register("activations/pp_stage_inputs", (_F, _BS),
         "DeepSpeed runtime/pipe/engine.py _exec_recv_activations: pipe_buffers['inputs'] keeps each in-flight "
         "micro-batch's received input until _exec_send_grads (memory.pp_stage_buffers.deepspeed_rows)")
register("activations/pp_grad_recv_buffers", TRAIN_PHASES,
         "torch.distributed.pipelining stage.py _create_grad_recv_info: one output-gradient receive buffer per "
         "micro-batch, allocated at the first step and kept; DeepSpeed pipe/engine.py: one grad_layer "
         "(memory.pp_stage_buffers)")
register("activations/pp_input_grads_kept", (_B, _O),
         "torch.distributed.pipelining _backward.py stage_backward_input: inp.grad = dinput on each receive buffer, "
         "cleared only by the next step()'s clear_runtime_states (memory.pp_stage_buffers.input_grad_counts)")
register("activations/pp_last_stage_output", (_BS, _B),
         "torch.distributed.pipelining stage.py backward_one_chunk: the last stage's running output (fwd_cache, then "
         "stage_output) alive beside its loss's backward (memory.pp_outputs)")
register("activations/pp_output_chunks", _TRAIN_SAVED,
         "torch.distributed.pipelining stage.py forward_one_chunk with save_forward_output (step(return_outputs=True)): "
         "the last stage's earlier micro-batches' outputs, detached by backward_one_chunk, kept in output_chunks "
         "(memory.pp_outputs)")
register("activations/pp_output_chunks_after_step", (_O,),
         "torch.distributed.pipelining: output_chunks is cleared only by the next step()'s clear_runtime_states, so "
         "all m outputs are alive through the optimizer step (memory.pp_outputs)")
register("activations/pp_merged_output", (_O,),
         "torch.distributed.pipelining schedules.py step: _merge_outputs (microbatch.py merge_chunks, torch.cat) at "
         "the end of step(), held by the caller through the optimizer step (memory.pp_outputs)")
register("weights/fsdp1_unsharded", _TRAIN_SAVED,
         "FSDP1 _runtime_utils.py _unshard/_reshard: gathered FlatParameters from forward through backward")
register("gradients/fsdp1_reduce_scatter", (Phase.BACKWARD,), "FSDP1 _runtime_utils.py _reduce_grad: one unit")
register("gradients/fsdp1_no_sync", TRAIN_PHASES,
         "FSDP1 no_sync(): unsharded gradients kept across the accumulation micro-batches (_post_backward_hook)")
register("runtime/fsdp1_grad_stream_pool", (_F, _BS),
         "FSDP1 _post_backward_hook: sharded gradients allocated on the post-backward stream, cached there after "
         "zero_grad(set_to_none=True) (CUDACachingAllocator per-stream pools); allocated gradients in backward and "
         "the step")
register("gradients/ddp_buckets", TRAIN_PHASES, "torch DDP Reducer buckets, allocated at construction")
register("gradients/main_grad_buffer", TRAIN_PHASES, "Megatron-Core param_and_grad_buffer.py: contiguous, persistent")
register("gradients/fp32_main_grads", (Phase.OPTIMIZER,), "Megatron fp16: fp32 copy of the grads for the step")
register("gradients/reduce_bucket", (Phase.BACKWARD_START, Phase.BACKWARD),
         "DeepSpeed stage_1_and_2.py backward(): ipg_buffer allocated per backward, released after the epilogue")
register("gradients/zero3_reduce_bucket", TRAIN_PHASES, "DeepSpeed stage3.py __ipg_bucket_flat_buffer, allocated at init")
register("weights/zero3_prefetch", _TRAIN_SAVED, "DeepSpeed stage3 prefetch_bucket_size: parameters fetched ahead")
register("weights/zero3_persistent", ALL, "DeepSpeed stage3 param_persistence_threshold: small params stay gathered")
# Components alive in only part of their family's phases (measured shape, shared/design/engines-and-phases.md:
# P + O + max(A + logits/loss transients, G + optimizer step temporaries)).
register("gradients/fp32_partition", (_O,),
         "fp32 gradients of the masters: made from the 16-bit gradients just before the optimizer step")
register("gradients/zero3_live_grads", (_B, _O), "DeepSpeed ZeRO-3 gradients of the gathered modules during backward")
register("weights/zero3_live_params", (_F, _BS, _B), "DeepSpeed ZeRO-3 parameters gathered for forward/backward")
register("weights/offload_buffer", (_F, _BS, _B, Phase.PREFILL, Phase.DECODE),
         "the offloaded module being run (forward, backward, serving steps)")
register("activations/logits", (_BS, Phase.PREFILL),
         "logits + fp32 copy in the loss, or their two fp32 gradients at the start of backward "
         "(transformers ForCausalLMLoss; PyTorch nll_loss_backward, _log_softmax_backward_data)")
register("activations/kept_output", (_BS, _B, _O),
         "logits of the model output held by the training loop until after optimizer.step() "
         "(AnswerDotAI fsdp_qlora train.py: output = None after the step)")
register("activations/bnb_retained_inputs", (_B, _O),
         "bitsandbytes <= 0.43.1 MatMul4Bit keeps its input on ctx (not a saved variable): alive until the graph is "
         "dropped, past backward; the row names its phases (memory.bnb_workspace.retained_phases)")
register("activations/bnb_retained_previous", (_F,),
         "litgpt's loop: the previous micro-batch's graph, and so its bitsandbytes <= 0.43.1 quantized-linear inputs, "
         "referenced until the next forward returns (memory.litgpt, memory.bnb_workspace)")
register("activations/kept_output_previous", (_F,),
         "litgpt's loop: logits = model(...) replaces the previous micro-batch's logits only when the forward returns")
register("activations/cp_exchange", (_F, _BS),
         "context parallelism: one attention's key/value exchange buffers, with every saved activation alive "
         "(TransformerEngine context_parallel.py, torch context_parallel; memory.context_parallel)")
register("weights/hf_buffers", ALL, "transformers 4.37-4.40 non-persistent buffers: per-layer rotary cos/sin caches, "
         "4.38 LlamaModel.causal_mask (memory.hf_legacy)")
register("weights/model_buffers", ALL, "transformers non-persistent buffers: GPTBigCodeModel.bias, GPTJAttention."
         "embed_positions (memory.hf_buffers)")
register("activations/hf_causal_mask", _TRAIN_SAVED,
         "transformers 4.38-4.39 LlamaModel._update_causal_mask: the model's 4-D mask, kept by checkpointed layers "
         "until their backward (memory.hf_legacy)")
register("activations/sdpa_backward_workspace", (_B,),
         "SDPA memory-efficient kernel: fp32 dQ (and dK/dV) staging and delta of one attention's backward "
         "(torch mem_eff_attention kernel_backward.h workspace_size; memory.sdpa_workspace)")
register("activations/flash_backward_workspace", (_B,),
         "flash-attention 2 backward: fp32 dq_accum and softmax_d, and GQA's 16-bit dK/dV over every query head, of "
         "one attention's backward (flash_api.cpp mha_bwd, PyTorch's copy and Dao-AILab's; memory.flash_workspace)")
register("activations/recompute_workspace", (_B,),
         "one checkpointed block recomputed during backward (torch.utils.checkpoint)")
register("activations/offload_buffer", _TRAIN_SAVED,
         "offloaded layers' saved tensors in transit: copied out in forward, prefetched back in backward "
         "(memory.activation_offload)")
register("activations/cpu_offloaded", (_F, _BS, _B), "pinned CPU copies of the offloaded layers' saved activations")
register("weights/zero_hpz_secondary", TRAIN_PHASES,
         "DeepSpeed ZeRO++ hpZ secondary partition: ds_secondary_tensor, kept across steps (partition_parameters.py)")
register("activations/hidden_states", (Phase.PREFILL,), "serving: hidden states of the step's tokens")
register("activations/prefill_workspace", (Phase.PREFILL,), "serving: the largest attention/MLP temporaries of a step")
register("runtime/dora_workspace", (_BS,), "peft tuners/lora/dora.py: weight norm of the largest DoRA module per forward")
register("optimizer/lowrank_workspace", (_O,), "GaLore/APOLLO projection of the largest matrix during the step")
register("optimizer/step_temporaries", (_O,),
         "torch.optim.AdamW step temporaries (torch/optim/adam.py _single_tensor_adam, _multi_tensor_adam, "
         "_fused_adam): memory.optimizer_step")
register("runtime/vllm_non_torch", ALL, "vLLM: CUDA context, cuBLAS, NCCL and custom all-reduce buffers")
register("activations/vllm_profile_peak", (Phase.PREFILL, Phase.DECODE),
         "vLLM: the profile run's torch peak, reserved out of the budget for every scheduler step")
register("runtime/vllm_cudagraphs", (Phase.PREFILL, Phase.DECODE), "vLLM: CUDA graph memory pool after capture")
register("runtime/vllm_unbudgeted", ALL, "vLLM: memory outside gpu_memory_utilization × total")
register("runtime/sglang_before_load", ALL, "SGLang: CUDA context and communicators before the weights load")
register("runtime/sglang_reserved", ALL, "SGLang: (1 - mem_fraction_static) share for activations and CUDA graphs")
register("activations/llamacpp_compute", (Phase.PREFILL, Phase.DECODE),
         "llama.cpp: compute buffer reserved at context creation for the worst-case ubatch graph")
register("activations/llamacpp_output", (Phase.PREFILL, Phase.DECODE), "llama.cpp: host logits buffer")
register("activations/llamacpp_host_compute", (Phase.PREFILL, Phase.DECODE),
         "llama.cpp: host compute buffer (graph inputs, their pipeline-parallel copies)")
register("activations/dequant_workspace", (_F, Phase.PREFILL, Phase.DECODE),
         "bitsandbytes MatMul4Bit.forward/backward dequantize the whole weight to 16 bits (memory.bnb_workspace); "
         "each row names its phases")
register("runtime/exllama_temp_dq", ALL, "AutoGPTQ exllama temp_dq: fp16 buffer of the largest GPTQ linear "
         "(memory.bnb_workspace)")
register("runtime/quantize_workspace", (Phase.LOAD,),
         "bitsandbytes: the layer being quantized at load as a 16-bit GPU copy (memory.bnb_workspace)")
register("kv_cache/legacy_previous", (Phase.DECODE,),
         "transformers < 4.36: the previous step's tuple past_key_values, held through the decode forward")
register("kv_cache/dynamic_growth", (Phase.DECODE,), "transformers DynamicCache: one layer's old K/V during torch.cat")
