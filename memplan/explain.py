"""``memplan explain COMPONENT``: how a memory component is computed, from the code's own docstrings.

Each component name (the names of the breakdown rows) maps to the pure functions that compute its
bytes; explain prints their signatures and docstrings (formula, source, assumptions) and the module
docstring that frames them, so the documentation and the code cannot drift apart.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from dataclasses import dataclass
from functools import cache
from itertools import pairwise
from typing import Any

from memplan.errors import MemplanError, did_you_mean

_T = "activations_terms"
COMPONENTS: dict[str, tuple[str, ...]] = {
    "weights/params": ("weights.weight_bytes", "weights.sharded_bytes"),
    "weights/quantized": ("quant.storage", "quant.bnb4_bytes", "quant.int8_bytes", "quant.gptq_bytes",
                          "quant.awq_bytes", "quant.ggml_bytes", "weights.sharded_bytes"),
    "weights/unquantized": ("quant.is_quantized", "quant.storage", "weights.weight_bytes"),
    "weights/lora_adapters": ("peft.lora_module_params", "peft.adapter_bytes"),
    "weights/zero3_live_params": ("model_states.deepspeed_gpu_buffers", "zero.largest_layer_numel"),
    "weights/zero3_prefetch": ("engine_buffers.deepspeed_rows",),
    "weights/zero3_persistent": ("engine_buffers.deepspeed_rows",),
    "weights/autocast_copies": ("engine_states.autocast_rows",),
    "weights/fp8_copies": ("engine_states.fp8_rows", "fp8_weights.rows", "fp8_weights.te_copy_bytes",
                           "fp8_weights.torchao_bytes"),
    "weights/fsdp1_flat_params": ("engine_fsdp1.rows", "engine_fsdp1.units"),
    "weights/quant_state": ("engine_fsdp1.units",),
    "weights/fsdp1_unsharded": ("engine_fsdp1.gathered_bytes", "engine_fsdp1.in_flight_shard_bytes"),
    "gradients/fsdp1_sharded": ("engine_fsdp1._grad_rows",),
    "gradients/fsdp1_no_sync": ("engine_fsdp1._grad_rows",),
    "gradients/fsdp1_reduce_scatter": ("engine_fsdp1._grad_rows",),
    "runtime/fsdp1_stream_pools": ("engine_fsdp1.pool_rows", "engine_fsdp1.init_high_water"),
    "runtime/fsdp1_grad_stream_pool": ("engine_fsdp1._grad_pool_rows", "allocator_segments.stream_pool_bytes"),
    "weights/fsdp2_params": ("engine_fsdp2_lora.rows", "engine_fsdp2_lora.unit_bytes"),
    "weights/fsdp_running_unit": ("engine_buffers.fsdp2_rows",),
    "weights/fsdp_kept_all_gather": ("engine_buffers.fsdp2_rows",),
    "weights/fsdp_kept_all_gather_at_loss": ("engine_fsdp2_backward.kept_at_loss_rows",),
    "gradients/fsdp_first_reduce_scatter": ("engine_fsdp2_backward.first_reduce_scatter_rows",),
    "gradients/fsdp_backward_held": ("engine_fsdp2_backward.held_rows", "fsdp2_shard.padded_shard_numel"),
    "weights/fsdp_all_gather": ("engine_buffers.fsdp2_rows", "engine_fsdp2_lora.gathered_bytes"),
    "gradients/fsdp_reduce_scatter": ("engine_buffers.fsdp2_rows",),
    "gradients/fsdp_pp_accumulated": ("engine_buffers.fsdp2_pipeline_rows",),
    "gradients/fsdp_pp_accumulated_at_peak": ("engine_buffers.fsdp2_pipeline_rows",),
    "weights/fsdp_pp_kept_after_backward": ("engine_buffers.fsdp2_kept_after_backward",),
    "gradients/fsdp_pp_cooldown": ("engine_buffers.fsdp2_cooldown_rows",),
    "activations/pp_stage_outputs": ("pp_stage_buffers.rows", "pp_stage_buffers.output_counts"),
    "activations/pp_recv_buffers": ("pp_stage_buffers.rows", "pp_stage_buffers.recv_buffer_counts",
                                    "pp_stage_buffers.input_saved"),
    "activations/pp_grad_recv_buffers": ("pp_stage_buffers.rows", "pp_stage_buffers.recv_buffer_counts"),
    "activations/pp_stage_inputs": ("pp_stage_buffers.deepspeed_rows", "pp_stage_buffers.deepspeed_counts"),
    "activations/pp_last_stage_output": ("pp_outputs.rows", "pp_outputs.kept_counts", "pp_outputs.output_bytes"),
    "activations/pp_output_chunks": ("pp_outputs.rows", "pp_outputs.kept_counts", "pp_outputs.output_bytes"),
    "activations/pp_output_chunks_after_step": ("pp_outputs.rows", "pp_outputs.kept_counts", "pp_outputs.output_bytes"),
    "activations/pp_merged_output": ("pp_outputs.rows", "pp_outputs.kept_counts", "pp_outputs.output_bytes"),
    "activations/pp_weight_grad_pending": ("pp_schedule_flight.weight_grad_bytes", "pp_schedule_flight.peak"),
    "activations/pp_input_grads_kept": ("pp_stage_buffers.rows", "pp_stage_buffers.input_grad_counts"),
    "gradients/ddp_buckets": ("engine_buffers.ddp_rows",),
    "gradients/reduce_bucket": ("engine_buffers.deepspeed_rows",),
    "gradients/zero3_reduce_bucket": ("engine_buffers.deepspeed_rows",),
    "gradients/main_grad_buffer": ("engine_states.state_buffers",),
    "gradients/fp32_main_grads": ("engine_states.state_buffers",),
    "weights/nvme_swap_buffers": ("model_states.nvme_swap_rows",),
    "weights/offload_buffer": ("weight_offload.staging_bytes", "weight_offload.offload_rows",
                               "weight_offload.offloaded_format"),
    "weights/cpu_offloaded": ("weight_offload.cpu_layer_bytes", "weight_offload.offload_rows",
                              "weight_offload.replicas_per_node"),
    "gradients": ("zero.partitioned_bytes", "zero.paper_model_states_per_gpu", "lowrank.gradient_bytes"),
    "gradients/fp32_partition": ("model_states.state_buffers", "zero.partitioned_bytes"),
    "gradients/lora_adapters": ("peft.adapter_bytes",),
    "gradients/zero3_live_grads": ("model_states.deepspeed_gpu_buffers",),
    "optimizer/adam_m": ("optimizer.adam_state_bytes", "optimizer.state_dtype", "zero.partitioned_bytes"),
    "optimizer/adam_v": ("optimizer.adam_state_bytes", "optimizer.state_dtype", "zero.partitioned_bytes"),
    "optimizer/adam8bit_states": ("optimizer.adam8bit_state_bytes",),
    "optimizer/adafactor_factored_v": ("optimizer.adafactor_state_bytes",),
    "optimizer/momentum": ("optimizer.one_state_bytes", "optimizer.state_dtype"),
    "optimizer/lion_momentum": ("optimizer.one_state_bytes", "optimizer.state_dtype"),
    "optimizer/master_fp32": ("zero.paper_model_states_per_gpu", "zero.partitioned_bytes"),
    "optimizer/lora_master_fp32": ("peft.adapter_master_weights", "peft.adapter_state_dtype"),
    "optimizer/lowrank_states": ("lowrank.lowrank_state_bytes", "lowrank.lowrank_state_numel"),
    "optimizer/lowrank_projection": ("lowrank.projection_bytes", "lowrank.projection_numel"),
    "optimizer/lowrank_workspace": ("lowrank.workspace_bytes", "lowrank.svd_workspace_bytes",
                                    "lowrank.update_workspace_bytes"),
    "optimizer/nvme_swap_buffers": ("model_states.nvme_swap_rows",),
    "optimizer/step_temporaries": ("optimizer_step.temp_bytes", "optimizer_step.for_loop_temp_bytes",
                                   "optimizer_step.foreach_temp_bytes", "optimizer_step.fused_temp_bytes"),
    "activations/layers": ("activations.layer_micro_bytes", "activations.micro_batches_in_flight",
                           "activations.checkpointed", f"{_T}.rms_norm_bytes", f"{_T}.flash_attention_bytes",
                           f"{_T}.eager_scores_bytes", f"{_T}.mlp_bytes", f"{_T}.moe_experts_bytes",
                           "te_fp8.block_terms", "te_fp8.fp8_tensor_bytes", "accelerate_fp8.block_terms"),
    "activations/recompute_workspace": ("activations.workspace_bytes",),
    "activations/rotary": ("activations.rotary_table_bytes", f"{_T}.rotary_bytes"),
    "activations/layer_kwargs": ("activations.layer_kwargs_bytes",),
    "activations/embeddings": ("activations.embedding_bytes", f"{_T}.token_ids_bytes"),
    "activations/final_norm": ("activations.final_norm_bytes",),
    "activations/loss": ("activations.loss_bytes", f"{_T}.log_softmax_bytes"),
    "activations/logits": ("activations.logits_peak_bytes", f"{_T}.logits_transient_bytes", "inference.logits_bytes"),
    "activations/kept_output": ("activations.kept_output_bytes", f"{_T}.kept_logits_bytes"),
    "activations/cp_exchange": ("context_parallel.exchange_bytes", "context_parallel._ring_bytes", "context_parallel.chunk"),
    "activations/hf_causal_mask": ("hf_legacy.model_mask_bytes", "hf_legacy.explicit_mask"),
    "weights/hf_buffers": ("hf_legacy.rope_cache_bytes", "hf_legacy.mask_buffer_bytes"),
    "activations/sdpa_backward_workspace": ("sdpa_workspace.backward_workspace_bytes", "sdpa_workspace.num_splits_key",
                                            "sdpa_workspace.delta_bytes"),
    "activations/flash_backward_workspace": ("flash_workspace.backward_workspace_bytes",
                                             "flash_workspace.dq_accum_bytes", "flash_workspace.softmax_d_bytes",
                                             "flash_workspace.gqa_expanded_bytes"),
    "weights/model_buffers": ("hf_buffers.causal_bias_bytes", "hf_buffers.sinusoidal_positions_bytes"),
    "activations/hidden_states": ("inference.hidden_states_bytes", "hf_prefill.stream_bytes",
                                  "hf_prefill.rotary_tables_bytes"),
    "activations/dequant_workspace": ("bnb_workspace.dequant_workspace_bytes", "bnb_workspace.dequant_copies"),
    "activations/bnb_retained_inputs": ("bnb_workspace.retained_input_bytes", "bnb_workspace.retains_inputs",
                                        "bnb_workspace.retained_phases"),
    "activations/bnb_retained_previous": ("bnb_workspace.retained_input_bytes", "litgpt.previous_tokens"),
    "activations/kept_output_previous": ("activations.kept_output_bytes", "litgpt.previous_tokens"),
    "runtime/quantize_workspace": ("bnb_workspace.quantize_workspace_bytes",),
    "runtime/exllama_temp_dq": ("bnb_workspace.exllama_temp_dq_bytes",),
    "activations/prefill_workspace": ("inference.attention_workspace_bytes", "inference.mla_workspace_bytes",
                                      "inference.mlp_workspace_bytes", "inference.moe_workspace_bytes",
                                      "inference.kv_concat_bytes", "hf_prefill.eager_attention_bytes",
                                      "hf_prefill.grouped_moe_bytes", "hf_prefill.mlp_residual_bytes",
                                      "hf_prefill.activation_extra", "hf_prefill.kept_attn_output_bytes",
                                      "hf_prefill.kept_probs_bytes", "hf_prefill.kept_normed_input_bytes",
                                      "hf_prefill.upcast_qk_bytes", "hf_prefill.partial_rotary_bytes",
                                      "hf_prefill.cpu_math_mla_bytes", "hf_masks.loop_mask_bytes",
                                      "hf_masks.additive_mask_bytes"),
    "kv_cache": ("kv_cache.kv_cache_bytes", "kv_cache.cached_shapes", "kv_cache.kv_heads_per_rank",
                 "kv_cache.paged_slots"),
    "kv_cache/full_attention": ("kv_cache.kv_cache_bytes", "kv_cache.cached_shapes", "kv_cache.paged_slots"),
    "kv_cache/sliding_attention": ("kv_cache.cached_tokens", "kv_cache.paged_slots", "kv_cache.layer_window"),
    "kv_cache/scales": ("kv_cache.scale_bits_per_token", "kv_cache.tensor_scale_bytes_per_layer"),
    "kv_cache/dynamic_growth": ("kv_cache.dynamic_growth_bytes",),
    "kv_cache/legacy_previous": ("kv_cache.legacy_previous_bytes",),
    "activations/vllm_profile_peak": ("engines.vllm_peak.activation_peak_bytes", "engines.vllm_peak.sampler_bytes",
                                      "engines.vllm_peak.legacy_allreduce_bytes", "inference.forward_peak_bytes",
                                      "engines.vllm_profile_v1.peak_bytes", "engines.vllm_profile_v1.sampler_bytes",
                                      "engines.vllm_profile_v1.runner_buffer_bytes",
                                      "engines.vllm_profile_now.peak_bytes", "engines.vllm_profile_now.sampler_bytes",
                                      "engines.vllm_profile_now.kept_bytes",
                                      "engines.vllm_profile_now.penalty_state_bytes"),
    "runtime/vllm_non_torch": ("engines.vllm_budget.non_torch_bytes",),
    "runtime/vllm_cudagraphs": ("engines.vllm_peak.cudagraph_bytes", "engines.vllm_peak.capture_sizes"),
    "runtime/vllm_unbudgeted": ("engines.vllm_budget.budget_bytes",),
    "runtime/sglang_before_load": ("engines.sglang.before_load_bytes",),
    "runtime/sglang_reserved": ("engines.sglang.mem_fraction_static", "engines.sglang.reserved_mib",
                                "engines.sglang.step_bytes"),
    "weights/llamacpp_gpu": ("engines.llamacpp.model_buffers", "engines.llamacpp.file_buffers",
                             "engines.llamacpp.cuda_padding_bytes", "engines.llamacpp_sched.gpu_layers"),
    "weights/llamacpp_host": ("engines.llamacpp.model_buffers", "engines.llamacpp.file_buffers"),
    "kv_cache/host": ("engines.llamacpp.kv_bytes_per_layer", "engines.llamacpp.kv_row_bytes",
                      "engines.llamacpp_inputs.layer_cells"),
    "activations/llamacpp_compute": ("engines.llamacpp_compute.compute_terms",
                                     "engines.llamacpp_compute.gpu_compute_bytes", "engines.llamacpp_compute.mask_bytes",
                                     "engines.llamacpp_inputs.kv_index_bytes", "engines.llamacpp_inputs.swa_cells",
                                     "engines.llamacpp_sched.n_copies", "engines.llamacpp_sched.pp_compute_bytes",
                                     "engines.llamacpp_offload.offload_bytes"),
    "activations/llamacpp_host_compute": ("engines.llamacpp_sched.host_compute_bytes",
                                          "engines.llamacpp_inputs.kv_index_bytes",
                                          "engines.llamacpp_compute.host_working_set"),
    "activations/llamacpp_output": ("engines.llamacpp.rows",),
    "runtime/llamacpp_cuda_context": ("engines.llamacpp.rows",),
    "runtime/cuda_context": ("runtime.cuda_context_bytes",),
    "runtime/nccl_communicators": ("nccl_groups.nccl_bytes", "nccl.collective_bytes", "nccl.p2p_bytes",
                                   "nccl.nvls_bytes"),
    "runtime/allocator_reserve": ("runtime.allocator_reserve_bytes", "allocator_segments.backward_start_stranded",
                                  "allocator_segments.reserved_floor"),
    "runtime/model_load_fp32": ("model_states.deepspeed_cpu_rows",),
    "runtime/cpu_buffer": ("model_states.deepspeed_cpu_rows",),
    "runtime/dora_workspace": ("peft.dora_workspace_bytes",),
}
"""Component name -> the functions (``module.function`` under ``memplan.memory``) that compute it."""

TOPICS: dict[str, tuple[str, ...]] = {
    "weights": ("weights", "quant"),
    "gradients": ("model_states", "zero"),
    "optimizer": ("optimizer", "model_states"),
    "activations": ("activations", "activations_block"),
    "runtime": ("runtime",),
    "inference": ("inference",),
    "vllm": ("engines.vllm", "engines.vllm_budget", "engines.vllm_peak", "engines.vllm_pool"),
    "sglang": ("engines.sglang",),
    "llamacpp": ("engines.llamacpp", "engines.llamacpp_compute", "engines.llamacpp_sched", "engines.llamacpp_inputs",
                 "engines.llamacpp_offload"),
    "zero": ("zero", "model_states"),
    "peft": ("peft",),
    "lowrank": ("lowrank",),
}
"""Broader names (a top-level component, or a technique) -> the modules whose docstrings describe them."""


@dataclass(frozen=True)
class Explanation:
    """What ``explain`` prints: the name, each function's signature and docstring, the modules' docstrings."""

    name: str
    functions: tuple[tuple[str, str, str], ...]
    """(qualified name, signature, docstring) per function."""
    constants: tuple[tuple[str, str], ...]
    """(assignment as written, docstring) of the named constants the functions use."""
    modules: tuple[tuple[str, str], ...]
    """(module name, docstring) per module involved."""
    subcomponents: tuple[str, ...] = ()
    alive: str = ""
    """The phases in which the component is alive and why (``memory.registry``)."""


def _import(module: str) -> Any:
    """``memplan.memory.<module>``, or ``memplan.<module>`` for the serving engines (``engines.vllm``)."""
    return importlib.import_module(f"memplan.{module}" if module.startswith("engines.") else f"memplan.memory.{module}")


def names() -> list[str]:
    """Every name ``explain`` accepts."""
    return sorted(set(COMPONENTS) | set(TOPICS))


def resolve(dotted: str) -> Any:
    """The function ``module.function`` under ``memplan.memory``."""
    module, _, func = dotted.rpartition(".")
    return getattr(_import(module), func)


@cache
def module_constants(module: str) -> dict[str, tuple[str, str]]:
    """Module-level UPPER_CASE constants of ``memplan.memory.<module>`` with a docstring: name -> (assignment, doc)."""
    mod = _import(module)
    tree = ast.parse(inspect.getsource(mod))
    out: dict[str, tuple[str, str]] = {}
    for node, nxt in pairwise(tree.body):
        if not (isinstance(node, ast.Assign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            continue
        for target in node.targets:
            for name in (target.elts if isinstance(target, ast.Tuple) else [target]):
                if isinstance(name, ast.Name) and name.id.isupper():
                    out[name.id] = (ast.unparse(node), inspect.cleandoc(nxt.value.value))
    return out


def constants_used(dotted: str) -> list[tuple[str, str]]:
    """The documented constants a function's source or docstring names, in order of appearance: those of the module
    it is listed under, and of the ``memplan.memory`` module that defines it (a function re-exported from a smaller module)."""
    module, defined = dotted.rpartition(".")[0], resolve(dotted).__module__.removeprefix("memplan.memory.")
    known = module_constants(module) | (module_constants(defined) if "." not in defined else {})
    seen = dict.fromkeys(re.findall(r"\b[A-Z][A-Z0-9_]{2,}\b", inspect.getsource(resolve(dotted))))
    return list(dict.fromkeys(known[name] for name in seen if name in known))


def _module_doc(module: str) -> tuple[str, str]:
    mod = _import(module)
    return mod.__name__, inspect.cleandoc(mod.__doc__ or "")


def explain(name: str) -> Explanation:
    """The explanation of a component (``optimizer/adam_m``) or topic (``optimizer``); MemplanError if unknown."""
    key = name.strip().lower()
    if key in COMPONENTS:
        funcs = []
        for dotted in COMPONENTS[key]:
            fn = resolve(dotted)
            doc = inspect.cleandoc(fn.__doc__ or "(no docstring)")
            funcs.append((f"{fn.__module__}.{fn.__name__}", str(inspect.signature(fn)), doc))
        constants = tuple(dict.fromkeys(c for d in COMPONENTS[key] for c in constants_used(d)))
        modules = tuple(dict.fromkeys(_module_doc(d.rpartition(".")[0]) for d in COMPONENTS[key]))
        return Explanation(key, tuple(funcs), constants, modules, alive=_alive(key))
    if key in TOPICS:
        subs = tuple(c for c in COMPONENTS if c == key or c.startswith(f"{key}/"))
        return Explanation(key, (), (), tuple(_module_doc(m) for m in TOPICS[key]), subs)
    raise MemplanError(f"unknown component {name!r}.{did_you_mean(name, names())} "
                       "Run 'memplan explain --list' for every name.")


def _alive(name: str) -> str:
    """"Alive in: forward, ... (why)" from the component registry; the step's answer is the largest phase total."""
    from memplan.memory import registry
    from memplan.memory.breakdown import INFER_PHASES, TRAIN_PHASES

    comp = registry.lookup(name)
    order = [p for p in (*TRAIN_PHASES, *INFER_PHASES) if p in comp.phases]
    return f"Alive in: {', '.join(p.value for p in order)} ({comp.source})"


def render(ex: Explanation, *, with_modules: bool = True) -> str:
    """Plain text: each function with its signature and docstring, then the modules' notes."""
    lines = [f"{ex.name}", "=" * len(ex.name), ""]
    if ex.alive:
        lines += [ex.alive, ""]
    if ex.subcomponents:
        lines += ["Components:", *(f"  {c}" for c in ex.subcomponents), ""]
    for qualname, signature, doc in ex.functions:
        lines += [f"{qualname}{signature}", "", *(f"    {line}" if line else "" for line in doc.splitlines()), ""]
    for statement, doc in ex.constants:
        lines += [statement, "", *(f"    {line}" if line else "" for line in doc.splitlines()), ""]
    if with_modules or not ex.functions:
        for module, doc in ex.modules:
            lines += [f"About {module}:", "", *(f"    {line}" if line else "" for line in doc.splitlines()), ""]
    return "\n".join(lines).rstrip() + "\n"
