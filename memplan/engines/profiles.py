"""Training engine profiles as data: what each engine keeps, which buffers and knobs it has, where it comes from.

The bytes themselves are computed in the memory layer (``memory.engine_states``, ``memory.engine_buffers``,
``memory.model_states``) from the same facts; this table is what ``estimate``, ``explain`` and the docs show,
and ``memplan.engines.rules`` says which combinations each engine runs.

The default engine (``default_engine``) is the one a new user gets without choosing; see
``JobConfig.effective_engine`` for the rule and ``default_reason`` for the sentence the output shows.
"""

from __future__ import annotations

from dataclasses import dataclass

from memplan.config import Engine, JobConfig, Offload, Recompute, ZeroStage

TORCH_RECOMPUTE = (Recompute.NONE, Recompute.SELECTIVE, Recompute.OP, Recompute.FULL)
"""Engines that run the model's own torch modules wrap any block or sub-module in ``torch.utils.checkpoint``
(torch/utils/checkpoint.py): whole blocks (HF ``gradient_checkpointing``, torchtitan ``mode=full``), the attention
core alone, or an op-level policy through ``create_selective_checkpoint_contexts`` (torchtitan ``op``)."""
MEGATRON_RECOMPUTE = (Recompute.NONE, Recompute.SELECTIVE, Recompute.FULL)
"""Megatron-LM ``--recompute-granularity {full, selective}`` with ``--recompute-method``/``--recompute-num-layers``
(megatron/training/arguments.py; megatron/core/transformer/transformer_config.py ``recompute_granularity``,
``recompute_modules``, default ``core_attn``): whole layers or chosen sub-modules, no op-level save policy."""


@dataclass(frozen=True)
class Profile:
    """One training engine: its layouts per precision policy, optimizer implementation, buffers and knobs."""

    engine: Engine
    runs: str
    """What programs this engine stands for."""
    layouts: tuple[tuple[str, str], ...]
    """(precision policy, which copies exist in which dtype and how they are sharded over data parallelism)."""
    optimizer: str
    buffers: tuple[str, ...]
    """Row names of the engine's buffers (``memory.engine_buffers``)."""
    knobs: tuple[str, ...]
    """``EngineConfig`` fields the engine reads (the engine's own names)."""
    activations: str
    sources: tuple[str, ...]
    recompute: tuple[Recompute, ...] = TORCH_RECOMPUTE
    """Recompute modes (``JobConfig.recompute``/``recompute_map``) the engine runs."""


PROFILES: dict[Engine, Profile] = {
    Engine.PYTORCH: Profile(
        Engine.PYTORCH, "one process or DDP: HF Trainer, accelerate, plain PyTorch loops",
        (("AMP (bf16/fp16 over fp32, the default)",
          "fp32 params 4 + fp32 grads 4 + fp32 Adam m,v 8 = 16 B/param, all replicated; 16-bit autocast copies of the "
          "matmul weights during forward/backward"),
         ("pure 16-bit (torch_dtype=bfloat16; master_weights=False or adamw-bf16)",
          "bf16 params 2 + bf16 grads 2 + Adam m,v in bf16 (torch.zeros_like(p)) 4 = 8 B/param"),
         ("fp32", "fp32 params, grads and states: 16 B/param"),
         ("fp8 (torchao float8)", "the AMP layout plus the one weight torchao casts per GEMM (the largest, with its "
          "scale); saved activations unchanged (torchao saves the high-precision Linear input)")),
        "torch.optim.AdamW (foreach on CUDA by default; for-loop or fused: JobConfig.optimizer_impl); "
        "bitsandbytes AdamW8bit (block-wise 8-bit states) and paged variants (CUDA managed memory, counted on the CPU "
        "when EngineConfig.paged_optimizer / LoraConfig.paged_optimizer)",
        ("gradients/ddp_buckets",),
        ("bucket_cap_mb", "gradient_as_bucket_view", "paged_optimizer"),
        "Hugging Face module layout (autograd-saved tensors)",
        ("torch/amp/autocast_mode.py", "torch/nn/parallel/distributed.py", "torch/optim/adamw.py",
         "bitsandbytes/optim/optimizer.py")),
    Engine.FSDP1: Profile(
        Engine.FSDP1, "torch.distributed.fsdp.FullyShardedDataParallel, flat parameters (Lightning Fabric FSDPStrategy/"
        "litgpt, accelerate FSDP1, AnswerDotAI fsdp_qlora)",
        (("pure 16-bit (bf16-true; fsdp_qlora precision=bf16), the form the published runs use",
          "one FlatParameter per unit in bf16, 1/Nd each (NO_SHARD: whole); sharded bf16 grads of every unit that "
          "requires grad (use_orig_params=True with LoRA: the whole block's flat grad); states 1/Nd"),
         ("MixedPrecision(param_dtype=bf16) over an fp32 model",
          "fp32 FlatParameters 4/Nd + fp32 sharded grads 4/Nd + fp32 states 8/Nd; bf16 unsharded units in flight"),
         ("CPUOffload(offload_params=True)",
          "FlatParameter shards, sharded grads and optimizer states on the CPU; the units in flight on the GPU")),
        "torch.optim.AdamW on the FlatParameters (use_orig_params=False) or the original parameters' sharded views; "
        "on the CPU with CPUOffload",
        ("weights/fsdp1_unsharded", "gradients/fsdp1_reduce_scatter", "gradients/fsdp1_no_sync"),
        ("sharding_strategy", "use_orig_params", "no_sync", "limit_all_gathers"),
        "Hugging Face module layout (autograd-saved tensors)",
        ("torch/distributed/fsdp/_flat_param.py", "torch/distributed/fsdp/_runtime_utils.py",
         "torch/distributed/fsdp/_limiter_utils.py", "torch/distributed/fsdp/_wrap_utils.py",
         "lightning/fabric/strategies/fsdp.py", "AnswerDotAI/fsdp_qlora train.py")),
    Engine.FSDP2: Profile(
        Engine.FSDP2, "torch.distributed.fsdp.fully_shard (accelerate FSDP2, torchtune, torchtitan)",
        (("MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32), the default",
          "sharded fp32 params 4/Nd + sharded fp32 grads 4/Nd + sharded fp32 states 8/Nd; bf16 all-gathered params "
          "of the root unit and the units in flight"),
         ("pure bf16 (master_weights=False)", "sharded bf16 params, grads and states"),
         ("HSDP (hsdp_shard_size=S: fully_shard on a 2-D (replicate, shard) DeviceMesh)",
          "the layouts above sharded over S ranks instead of Nd, replicated Nd/S times"),
         ("fp8 (torchao float8)", "the mixed layout plus the one weight torchao casts per GEMM (float8 all-gather "
          "not modelled); saved activations unchanged (torchao saves the high-precision Linear input)")),
        "torch.optim.AdamW on the sharded DTensor parameters (foreach/for-loop/fused)",
        ("weights/fsdp_all_gather", "weights/fsdp_running_unit", "weights/fsdp_kept_all_gather",
         "weights/fsdp_kept_all_gather_at_loss", "gradients/fsdp_reduce_scatter", "gradients/fsdp_backward_held",
         "activations/pp_stage_outputs", "activations/pp_recv_buffers", "activations/pp_grad_recv_buffers",
         "activations/pp_last_stage_output", "activations/pp_output_chunks", "activations/pp_output_chunks_after_step",
         "activations/pp_merged_output", "activations/pp_weight_grad_pending", "activations/pp_input_grads_kept"),
        ("reshard_after_forward", "fsdp_prefetch", "hsdp_shard_size", "deallocate_pipeline_outputs",
         "pp_return_outputs", "pp_schedule"),
        "Hugging Face module layout (autograd-saved tensors)",
        ("torch/distributed/fsdp/_fully_shard/_fsdp_param.py", "torch/distributed/fsdp/_fully_shard/_fsdp_collectives.py",
         "torch/distributed/fsdp/_fully_shard/_fsdp_api.py", "torch/distributed/fsdp/_fully_shard/_fully_shard.py",
         "torch/autograd/graph.py (save_on_cpu)", "torch/distributed/pipelining/stage.py",
         "torch/distributed/pipelining/schedules.py", "torch/distributed/pipelining/_backward.py")),
    Engine.DEEPSPEED: Profile(
        Engine.DEEPSPEED, "DeepSpeed ZeRO 0-3, ZeRO-Offload, ZeRO-Infinity (HF Trainer/accelerate with a DeepSpeed config)",
        (("bf16/fp16 optimizer (the default)",
          "16-bit params 2 (ZeRO-3: /Nd) + 16-bit grads 2 (ZeRO-2/3: /Nd) + fp32 master 4 + fp32 grad partition 4 + "
          "fp32 Adam m,v 8 (ZeRO-1+: /Nd): DeepSpeed's estimator, 2 + 18/Nd at ZeRO-2"),
         ("fp8 (TransformerEngine through accelerate)", "the bf16 layout plus te.Linear's fp8 weights (row- and "
          "column-wise) saved for backward; MoE blocks add te.Linear's quantized input copies (memory.accelerate_fp8), "
          "dense blocks keep their 16-bit count (above TE's)"),
         ("MiCS (mics_shard_size=S, ZeRO-3)", "ZeRO-3's partitions over S ranks instead of Nd, replicated Nd/S times"),
         ("ZeRO++ hpZ (zero_hpz_partition_size=H, ZeRO-3)",
          "ZeRO-3's partitions over Nd plus a secondary 16-bit parameter partition over H ranks: 2/H")),
        "FusedAdam (deepspeed/ops/adam/fused_adam.py, multi-tensor apply) on the GPU; DeepSpeedCPUAdam "
        "(deepspeed/ops/adam/cpu_adam.py) for offloaded optimizer states",
        ("gradients/reduce_bucket", "gradients/zero3_reduce_bucket", "weights/zero3_live_params",
         "gradients/zero3_live_grads", "weights/zero3_prefetch", "weights/zero3_persistent",
         "activations/pp_stage_outputs", "activations/pp_stage_inputs", "activations/pp_recv_buffers",
         "activations/pp_grad_recv_buffers"),
        ("reduce_bucket_size", "allgather_bucket_size", "overlap_comm", "contiguous_gradients",
         "stage3_max_live_parameters", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold",
         "mics_shard_size", "zero_hpz_partition_size"),
        "Hugging Face module layout (autograd-saved tensors)",
        ("deepspeed/runtime/zero/stage_1_and_2.py", "deepspeed/runtime/zero/stage3.py", "deepspeed/runtime/zero/config.py",
         "deepspeed/runtime/utils.py", "deepspeed/runtime/zero/mics.py", "deepspeed/runtime/zero/partition_parameters.py",
         "deepspeed/runtime/activation_checkpointing/checkpointing.py", "deepspeed/runtime/pipe/engine.py")),
    Engine.MEGATRON: Profile(
        Engine.MEGATRON, "Megatron-LM / Megatron-Core (TransformerEngine layers)",
        (("bf16 with fp32 main grads (the default)",
          "bf16 params 2 + fp32 main-grad buffer 4 + fp32 main params 4 + Adam m,v 8 = 18 B/param; with "
          "use_distributed_optimizer 6 + 12/Nd"),
         ("fp16", "fp16 params 2 + fp16 grads 2 + fp32 main grads 4 + fp32 main params 4 + m,v 8 = 20; distributed 4 + 16/Nd"),
         ("fp8 (TransformerEngine)", "the bf16 layout plus TE's cached fp8 weights (row- and column-wise, per "
          "fp8_recipe; memory.fp8_weights); Linear inputs saved as fp8 copies (fp8_recipe; memory.te_fp8)"),
         ("precision-aware optimizer (use_precision_aware_optimizer, exp_avg_dtype/exp_avg_sq_dtype bf16)",
          "bf16 params 2 + fp32 main grads 4 + main params as 16-bit remainders 2 + bf16 m,v 4 = 12 B/param; the "
          "distributed optimizer shards the last three over dp (routed experts over dp/ep)")),
        "Apex/TransformerEngine FusedAdam on the fp32 main params",
        ("gradients/main_grad_buffer",),
        ("use_distributed_optimizer", "cpu_offloading_num_layers", "recompute_modules", "use_precision_aware_optimizer",
         "exp_avg_dtype", "exp_avg_sq_dtype", "store_param_remainders", "fp8_recipe",
         "activation_func_fp8_input_store", "microbatch_group_size_per_vp_stage", "overlap_moe_expert_parallel_comm"),
        "Megatron-Core/TransformerEngine fused layout: Korthikanti et al. 2022 (with their selective recompute; "
        "--recompute-modules core_attn, layernorm, mla_up_proj, moe_act)",
        ("Megatron-LM docs/source/api-guide/dist_optimizer.md", "megatron/core/distributed/param_and_grad_buffer.py",
         "megatron/core/optimizer/distrib_optimizer.py", "transformer_engine/pytorch/cpu_offload.py",
         "megatron/core/optimizer/optimizer_config.py", "megatron/core/transformer/transformer_layer.py",
         "megatron/core/transformer/multi_latent_attention.py", "megatron/core/transformer/moe/experts.py"),
        recompute=MEGATRON_RECOMPUTE),
}


def default_engine(cfg: JobConfig) -> Engine:
    """The engine a job runs on when the user names none (``JobConfig.effective_engine``)."""
    return cfg.effective_engine


def default_reason(cfg: JobConfig) -> str:
    """One sentence saying which engine the job runs on and, when memplan chose it, why."""
    engine = cfg.effective_engine
    if cfg.engine is not None:
        return f"engine {engine.value} (given)"
    if not cfg.job.trains:
        return f"engine {engine.value} (default for inference)"
    if cfg.zero > ZeroStage.NONE or (cfg.offload_optimizer, cfg.offload_params) != (Offload.NONE, Offload.NONE):
        why = "ZeRO and offload are DeepSpeed's"
    elif cfg.cp > 1:
        why = f"context parallelism ({cfg.cp_comm.value}) runs on it"
    elif cfg.tp > 1 or cfg.pp > 1:
        why = "tensor/pipeline parallelism without a named engine keeps DeepSpeed's layout; choose megatron for Megatron-Core"
    else:
        why = "no ZeRO, offload or model parallelism: one process or DDP"
    return f"engine {engine.value} (default: {why})"


def profile(cfg: JobConfig) -> Profile | None:
    """The profile of the engine that runs ``cfg`` (None for serving engines, described elsewhere)."""
    return PROFILES.get(cfg.effective_engine)
