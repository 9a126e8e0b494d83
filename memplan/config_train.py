"""The training job's sub-configurations: LoRA adapters, GaLore, the step-time model's overrides and the training
engines' own knobs (``JobConfig.lora``, ``galore``, ``perf``, ``engine_config``).

Part of ``memplan.config`` (which re-exports every name).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from memplan.config_base import Strict
from memplan.dtypes import Dtype
from memplan.errors import MemplanError

PP_SCHEDULES = ("1F1B", "Interleaved1F1B", "GPipe", "LoopedBFS", "InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV")
"""torch.distributed.pipelining's training schedules by ``get_schedule_class``'s names (torch 2.13
torch/distributed/pipelining/schedules.py; its ``PipelineScheduleSingle``/``Multi`` are base classes)."""


def pp_schedule_name(name: str) -> str:
    """torch's spelling of a schedule name given in any case (``get_schedule_class`` lowers both sides)."""
    for known in PP_SCHEDULES:
        if known.lower() == name.strip().lower():
            return known
    raise MemplanError(f"Unknown pipeline schedule '{name}': torch.distributed.pipelining trains with "
                       f"{', '.join(PP_SCHEDULES)}.")


MegatronRecomputeModule = Literal["core_attn", "moe_act", "layernorm", "mla_up_proj", "mlp", "moe", "shared_experts"]
"""Megatron-Core's ``--recompute-modules`` choices (megatron/core/transformer/transformer_config.py
``recompute_modules``); ``memory.megatron_recompute.MODELLED`` are those memplan models."""


class LoraConfig(Strict):
    rank: int = Field(default=16, gt=0)
    alpha: float = Field(default=32.0, gt=0)
    targets: tuple[str, ...] = ("q", "k", "v", "o")
    """Abstract projections (q,k,v,o,gate,up,down), or ("all-linear",)."""
    dora: bool = False
    dropout: float = Field(default=0.0, ge=0, lt=1)
    """peft ``lora_dropout``: with p > 0 each adapted module runs its own ``nn.Dropout`` on its input before lora_A,
    which saves the dropout output (and the dropout its mask); 0 (peft's default) is an ``nn.Identity``."""
    dtype: Dtype = Dtype.FP32
    """Adapter dtype. peft keeps adapters of a 16-bit model in fp32 by default
    (``autocast_adapter_dtype=True``); QLoRA's reference script casts them to bf16, so a ``qlora``
    job that does not name a dtype gets bf16 (see ``JobConfig._adapter_dtype``)."""
    paged_optimizer: bool = False
    """bitsandbytes paged optimizer (QLoRA, Dettmers et al. 2023, Sec. 3): states live in CUDA unified
    memory and are evicted to CPU RAM only under memory pressure. False: count them on the GPU (no
    pressure); True: count them in CPU RAM (fully paged out, the GPU keeps none)."""


class GaloreConfig(Strict):
    rank: int = Field(default=128, gt=0)
    eight_bit: bool = False
    per_layer_updates: bool = True
    variant: str = "galore"
    """``galore``, ``apollo`` or ``apollo-mini``."""


class PerfConfig(Strict):
    """Overrides of the step-time model (``memplan.planner.perf_data`` holds the defaults and their sources)."""

    mfu: float | None = Field(default=None, gt=0, le=1)
    """Fraction of the dense peak the layers' GEMMs reach; None: from the GPU generation and the GEMM shape
    (hidden/tp, tokens per micro-batch)."""
    cluster: Literal["dgx-v100", "dgx-a100", "dgx-h100", "h800", "dgx-b200", "pcie-ethernet"] | None = None
    """Fabric preset (``dgx-v100``, ``dgx-a100``, ``dgx-h100``, ``h800``, ``dgx-b200``, ``pcie-ethernet``);
    None: from the GPU."""
    intra_node_gbps: float | None = Field(default=None, gt=0)
    """GPU-to-GPU bus bandwidth inside a node, GB/s per GPU, as NCCL achieves it; None: the preset's."""
    inter_node_gbps: float | None = Field(default=None, gt=0)
    """Bus bandwidth across nodes, GB/s per GPU; None: the preset's."""
    intra_node_latency_us: float | None = Field(default=None, ge=0)
    inter_node_latency_us: float | None = Field(default=None, ge=0)
    comm_overlap: float | None = Field(default=None, ge=0, le=1)
    """Share of data-parallel/ZeRO (and expert all-to-all) communication hidden behind compute; None: the
    engine's default (``perf_data.ENGINE_OVERLAP``)."""
    fp8: bool = False
    """GEMMs in fp8 (TransformerEngine / torchao float8): compute at the GPU's fp8 peak; weights and states keep
    ``dtype``; on megatron the Linear inputs saved for backward are TransformerEngine's fp8 copies
    (``memory.te_fp8``). A ``dtype: fp8`` job computes in fp8 as well."""
    comm_sm_fraction: float = Field(default=0.0, ge=0, lt=1)
    """Share of the GPU's SMs that overlapped communication kernels take from compute (DeepSeek-V3 gives 20 of
    132 SMs to its all-to-all kernels, DeepSeek-AI 2024, Sec. 3.2.2): compute runs at (1 − share) of its rate."""
    virtual_stages: int = Field(default=1, gt=0)
    """Interleaved 1F1B: model chunks per pipeline stage (Megatron ``--num-layers-per-virtual-pipeline-stage``);
    bubble (p − 1)/(v·m) (Narayanan et al. 2021, Sec. 2.2.2)."""


class EngineConfig(Strict):
    """The training engines' own knobs, under the engines' names and with their defaults (``memplan.engines``).

    Sizes in elements are DeepSpeed's convention (its config counts parameters, not bytes); DDP's is MB.
    """

    bucket_cap_mb: int = Field(default=25, gt=0)
    """torch DDP ``bucket_cap_mb`` (torch/nn/parallel/distributed.py, default 25): gradient bucket size."""
    gradient_as_bucket_view: bool = False
    """torch DDP ``gradient_as_bucket_view`` (default False): ``param.grad`` are views into the buckets, so the
    buckets are not a second copy of the gradients."""
    reshard_after_forward: bool = True
    """FSDP2 ``fully_shard(reshard_after_forward=True)``: free each unit's unsharded parameters after its forward
    (ZeRO-3-like); False keeps them until backward (ZeRO-2-like)."""
    fsdp_prefetch: int = Field(default=1, ge=0)
    """FSDP2 units whose all-gather runs ahead of the current one (implicit prefetch: 1; ``set_modules_to_forward_prefetch``)."""
    sharding_strategy: Literal["FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD"] = "FULL_SHARD"
    """FSDP1 ``ShardingStrategy`` (torch/distributed/fsdp/api.py, default FULL_SHARD): FULL_SHARD frees each unit's
    unsharded FlatParameter after its forward, SHARD_GRAD_OP keeps it until backward, NO_SHARD replicates
    (DDP-like). HYBRID_SHARD is not modelled here."""
    use_orig_params: bool = True
    """FSDP1 ``use_orig_params`` (Lightning FSDPStrategy and accelerate set True on torch >= 2.0; fsdp_qlora
    train.py passes False). True: LoRA adapters share their block's FlatParameter (mixed ``requires_grad``), so
    the block's whole flat gradient exists; False: FSDP1 refuses mixed ``requires_grad`` in one unit, so the
    adapters are wrapped as their own units (fsdp_qlora's lambda policy) and only they get gradients."""
    no_sync: bool = True
    """FSDP1 ``FullyShardedDataParallel.no_sync()`` on the accumulation micro-batches (accelerate's
    ``accumulate``, Lightning Fabric's ``no_backward_sync``): each unit keeps its unsharded gradient until the
    synchronizing micro-batch. Acts only with grad_accum > 1 and a sharded strategy."""
    limit_all_gathers: bool = True
    """FSDP1 ``limit_all_gathers`` (default True): the rate limiter (_limiter_utils.py) lets two all-gathers be in
    flight; False lets the CPU issue every unit's all-gather ahead (counted as every unit unsharded at once)."""
    reduce_bucket_size: int = Field(default=500_000_000, gt=0)
    """DeepSpeed ``zero_optimization.reduce_bucket_size`` (elements, default 5e8): the gradient reduce (IPG) bucket."""
    allgather_bucket_size: int = Field(default=500_000_000, gt=0)
    """DeepSpeed ``zero_optimization.allgather_bucket_size`` (elements, default 5e8)."""
    overlap_comm: bool | None = None
    """DeepSpeed ``zero_optimization.overlap_comm``; None: DeepSpeed's default (True for stage 3, else False).
    With overlap, stages 1-2 keep two reduce buckets (double buffering)."""
    contiguous_gradients: bool = True
    """DeepSpeed ``zero_optimization.contiguous_gradients`` (default True): gradients are copied into the bucket."""
    stage3_max_live_parameters: int = Field(default=1_000_000_000, gt=0)
    """DeepSpeed ``stage3_max_live_parameters`` (elements, default 1e9): gathered parameters kept at once."""
    stage3_prefetch_bucket_size: int = Field(default=50_000_000, ge=0)
    """DeepSpeed ``stage3_prefetch_bucket_size`` (elements, default 5e7): parameters fetched ahead of use."""
    stage3_param_persistence_threshold: int = Field(default=100_000, ge=0)
    """DeepSpeed ``stage3_param_persistence_threshold`` (elements, default 1e5): smaller parameters stay gathered."""
    use_distributed_optimizer: bool = False
    """Megatron-LM ``--use-distributed-optimizer`` (default off): shard the fp32 main params and Adam states
    over data parallelism (Megatron's ZeRO-1)."""
    deallocate_pipeline_outputs: bool = False
    """The pipeline stage frees each output once sent and receives into per-message buffers (Megatron-Core
    ``ModelParallelConfig.deallocate_pipeline_outputs``, schedules.py ``deallocate_output_tensor``; Llama 3's
    pipeline, Dubey et al. 2024 Sec. 3.3.2). Default False: torch.distributed.pipelining keeps every in-flight
    output in ``fwd_cache`` and one receive buffer per micro-batch (``memory.pp_stage_buffers``). fsdp2 with pp > 1."""
    pp_return_outputs: bool = True
    """torch.distributed.pipelining ``schedule.step(..., return_outputs=True)`` (torch's default): the last stage keeps
    every micro-batch's output (the logits) in ``output_chunks`` and returns their concatenation
    (``memory.pp_outputs``). torchtitan passes False (PR #1922, Oct 2025); its earlier releases, torch's pipelining
    tutorial and hand-written loops run the default. fsdp2 with pp > 1 only."""
    pp_schedule: str | None = None
    """torch.distributed.pipelining's training schedule, as ``get_schedule_class`` names it (any case, torchtitan's
    ``parallelism.pipeline_parallel_schedule``): 1F1B, Interleaved1F1B, GPipe, LoopedBFS, InterleavedZeroBubble,
    ZBVZeroBubble or DualPipeV (``arch.pp_schedules``). None: 1F1B, or Interleaved1F1B with ``perf.virtual_stages``
    > 1 (what memplan models without it). fsdp2 with pp > 1."""
    paged_optimizer: bool = False
    """bitsandbytes paged optimizer (``PagedAdamW8bit``/``PagedAdamW``): states in CUDA managed memory; counted
    on the CPU (paged out under pressure), as ``LoraConfig.paged_optimizer``."""
    hsdp_shard_size: int | None = Field(default=None, gt=0)
    """FSDP2 hybrid sharding (HSDP): ``fully_shard(mesh=init_device_mesh(..., (replicate, shard)))`` with a 2-D mesh
    shards parameters, gradients and states over the mesh's shard dimension of this many data-parallel ranks and
    replicates them over the other (torch/distributed/fsdp/_fully_shard/_fully_shard.py: "a 2D mesh means HSDP";
    torchtitan ``data_parallel_shard_degree``). None: shard over every data-parallel rank (FSDP). FSDP1's
    ``ShardingStrategy.HYBRID_SHARD`` (shard within a node) is the same layout with the node's ranks, so an FSDP1
    profile can list this knob. See ``memory.zero.shard_degree``."""
    mics_shard_size: int | None = Field(default=None, gt=0)
    """DeepSpeed MiCS ``zero_optimization.mics_shard_size`` (ZeRO-3 only; DeepSpeed's default -1: off): ZeRO-3's
    parameters, gradients and optimizer states partitioned over groups of this many ranks and replicated across
    groups (deepspeed/runtime/zero/mics.py ``MiCS_Init``, ``MiCS_Optimizer``; Zhang et al. 2022, MiCS)."""
    zero_hpz_partition_size: int = Field(default=1, gt=0)
    """DeepSpeed ZeRO++ hpZ ``zero_optimization.zero_hpz_partition_size`` (default 1: off; ZeRO-3 only): a secondary
    partition of the 16-bit parameters over groups of this many ranks (a node), kept after the forward all-gather
    so the backward all-gathers stay inside the node; gradients and optimizer states stay partitioned over every
    rank (deepspeed/runtime/zero/config.py, partition_parameters.py ``ds_secondary_tensor``; Wang et al. 2023,
    ZeRO++, arXiv:2306.10209, Sec. 3.2)."""
    cpu_offloading_num_layers: int | None = Field(default=None, ge=0)
    """Megatron-LM ``--cpu-offloading-num-layers`` with ``JobConfig.offload_activations`` (``--cpu-offloading``):
    how many of the stage's transformer layers offload their activations to the CPU (TransformerEngine
    ``get_cpu_offload_context``); None: every layer but the last, the most Megatron allows."""
    # Megatron-Core selective recompute modules and precision-aware optimizer.
    recompute_modules: tuple[MegatronRecomputeModule, ...] | None = None
    """Megatron-Core ``--recompute-modules`` with ``--recompute-granularity selective`` (``recompute: selective``):
    the submodules recomputed in backward (``TransformerConfig.recompute_modules``); None: Megatron's default
    ``["core_attn"]``. What each one drops: ``memory.megatron_recompute``."""
    use_precision_aware_optimizer: bool = False
    """Megatron-Core ``--use-precision-aware-optimizer`` (``OptimizerConfig``, TransformerEngine FusedAdam): lets
    ``exp_avg_dtype``/``exp_avg_sq_dtype`` lower the Adam moments and keeps fp32 main params as 16-bit remainders
    (``store_param_remainders``)."""
    exp_avg_dtype: Literal["fp32", "fp16", "bf16"] = "fp32"
    """Megatron-Core ``--exp-avg-dtype``: the Adam first moment's dtype (precision-aware optimizer only)."""
    exp_avg_sq_dtype: Literal["fp32", "fp16", "bf16"] = "fp32"
    """Megatron-Core ``--exp-avg-sq-dtype``: the Adam second moment's dtype (precision-aware optimizer only)."""
    store_param_remainders: bool = True
    """Megatron-Core ``OptimizerConfig.store_param_remainders`` (default True; ``--no-store-param-remainders``): with
    the precision-aware optimizer over bf16 params, the fp32 main params are kept as the 16 bits the bf16 param
    lacks (an int16 remainder), 2 bytes per param instead of 4."""
    fp8_recipe: Literal["delayed", "tensorwise", "mxfp8", "blockwise"] = "delayed"
    """Megatron-Core ``--fp8-recipe`` (``TransformerConfig.fp8_recipe``, default delayed) for fp8 training
    (``perf.fp8`` or ``dtype: fp8``): the scaling of TransformerEngine's quantized saved inputs (one fp32 scale per
    tensor; mxfp8 one E8M0 byte per 32 elements; blockwise, DeepSeek-V3's 1x128 tiles, one fp32 per 128) and whether
    Megatron lets linear_proj and the shared experts' fc1 save their original input (every recipe but delayed;
    ``memory.te_fp8``)."""
    microbatch_group_size_per_vp_stage: int | None = Field(default=None, gt=0)
    """Megatron-Core ``--microbatch-group-size-per-virtual-pipeline-stage`` (``ModelParallelConfig``; None: Megatron's
    default, the pipeline size p): micro-batches a model chunk runs in a row under interleaved 1F1B, which runs
    (v − 1)·g + 2·(p − s − 1) warm-up forwards on stage s (pipeline_parallel/schedules.py
    ``get_pp_rank_microbatches``; Llama 3's flexible N, Dubey et al. 2024 Sec. 3.3.2). pp > 1, v > 1,
    p ≤ g ≤ m (``arch.interleaved``). The bubble stays (p − 1)/(v·m) for every g Megatron accepts (the step replayed
    with its dependencies takes 2·m·v + 2·(p − 1) chunk slots, tests/test_megatron_schedule_knobs.py): step time
    unchanged."""
    overlap_moe_expert_parallel_comm: bool = False
    """Megatron-Core ``--overlap-moe-expert-parallel-comm`` (``ModelParallelConfig``): the combined 1F1B that hides
    one micro-batch's expert all-to-alls behind another's computation, with one extra warm-up forward under
    interleaving (schedules.py ``get_pp_rank_microbatches``). MoE with ep > 1; interleaved when pp > 1."""
    activation_func_fp8_input_store: bool = False
    """Megatron-Core ``--activation-func-fp8-input-store`` (``TransformerConfig``, SwiGLU only): the fused SwiGLU
    keeps its input for backward cast to float8_e4m3fn, 1 byte per element (fusions/fused_bias_swiglu.py)."""
    # NCCL's environment (issue 11: runtime/nccl_communicators, memory.nccl), under NCCL's own names.
    nccl_buffsize: int | None = Field(default=None, gt=0)
    """``NCCL_BUFFSIZE`` in bytes: the Simple protocol's buffer per connection and channel; None: NCCL's 4 MiB."""
    nccl_max_nchannels: int | None = Field(default=None, gt=0, le=64)
    """``NCCL_MAX_NCHANNELS``: channels per communicator; None: 32, as NCCL's log shows on 8 x H100 (memory.nccl)."""
    nccl_nvls_enable: Literal[0, 1, 2] = 2
    """``NCCL_NVLS_ENABLE``: 0 off, 1 on, 2 (NCCL's default) on where the GPUs sit on an NVSwitch with multicast."""
    nccl_nvls_chunksize: int | None = Field(default=None, gt=0)
    """``NCCL_NVLS_CHUNKSIZE`` in bytes; None: NCCL's 128 KiB (NCCL < 2.21 used NCCL_BUFFSIZE: pass 524288 there)."""

    @field_validator("pp_schedule", mode="before")
    @classmethod
    def _schedule_name(cls, value: object) -> object:
        """torch's spelling of the schedule (``get_schedule_class`` matches names case-insensitively)."""
        return pp_schedule_name(value) if isinstance(value, str) else value
