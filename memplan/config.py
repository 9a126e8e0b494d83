"""The execution plan: what job runs, how it is parallelized, where states live.

A JobConfig is validated once at the boundary (CLI flags, recipe, Python API) and then
read by the pure memory functions. Invalid combinations raise MemplanError with the field named.
"""

from __future__ import annotations

import functools
from enum import IntEnum, StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from memplan.dtypes import Dtype

MAX_GPUS = 2**20
"""The most GPUs per node, nodes, and GPUs in all that memplan plans for: 2^20 = 1,048,576, 64 times the 16,384
H100s of Llama 3 405B's pre-training (Dubey et al. 2024, Table 4). A bound on input, so that the planner's
enumeration of layouts over the world size stays interactive; not a property of any engine."""


class Job(StrEnum):
    PRETRAIN = "pretrain"
    FULL = "full"
    LORA = "lora"
    QLORA = "qlora"
    GALORE = "galore"
    INFER = "infer"

    @property
    def trains(self) -> bool:
        return self is not Job.INFER

    @property
    def full_weights_trainable(self) -> bool:
        return self in (Job.PRETRAIN, Job.FULL, Job.GALORE)


class OptimizerKind(StrEnum):
    ADAMW = "adamw"            # two fp32 states (m, v)
    ADAMW_BF16 = "adamw-bf16"  # two states in the weights' 16-bit dtype, no master copy (pure bf16)
    ADAMW_8BIT = "adamw-8bit"  # bitsandbytes block-wise 8-bit states
    ADAFACTOR = "adafactor"    # factored second moment, no first moment by default
    SGD = "sgd"                # no state
    SGD_MOMENTUM = "sgd-momentum"  # one fp32 momentum buffer
    LION = "lion"              # one fp32 momentum buffer


class OptimizerImpl(StrEnum):
    """How torch.optim.AdamW runs its step (torch/optim/adamw.py, adam.py): ``foreach`` (``_multi_tensor_adam``,
    PyTorch's default on CUDA), ``for-loop`` (``_single_tensor_adam``, the default on CPU), ``fused``
    (``_fused_adam``: one kernel). They differ only in the step's temporaries (``memory.optimizer_step``)."""

    FOREACH = "foreach"
    FOR_LOOP = "for-loop"
    FUSED = "fused"


class Engine(StrEnum):
    """The program that runs the job. Training: ``pytorch`` (one process or DDP: HF Trainer, accelerate,
    plain loops), ``fsdp1`` (``torch.distributed.fsdp.FullyShardedDataParallel``, flat parameters), ``fsdp2``
    (``torch.distributed.fsdp.fully_shard``), ``deepspeed``, ``megatron`` (Megatron-LM / Megatron-Core). Serving:
    ``vllm``, ``sglang``, ``llamacpp``, ``transformers`` (HF ``generate``).
    Each engine's profile (``memplan.engines``) says which components exist, how they are sharded,
    which buffers it adds and which combinations it runs."""

    PYTORCH = "pytorch"
    FSDP1 = "fsdp1"
    FSDP2 = "fsdp2"
    DEEPSPEED = "deepspeed"
    MEGATRON = "megatron"
    VLLM = "vllm"
    SGLANG = "sglang"
    LLAMACPP = "llamacpp"
    TRANSFORMERS = "transformers"

    @property
    def trains(self) -> bool:
        return self in (Engine.PYTORCH, Engine.FSDP1, Engine.FSDP2, Engine.DEEPSPEED, Engine.MEGATRON)

    @property
    def serves(self) -> bool:
        return not self.trains


class ZeroStage(IntEnum):
    """ZeRO stages (Rajbhandari et al. 2020, Sec. 5); ordered, so ``zero >= ZeroStage.GRADIENTS`` reads like the paper."""

    NONE = 0
    """Plain data parallelism: every rank holds all model states."""
    OPTIMIZER = 1
    """P_os: optimizer states (and the fp32 master copy) partitioned over data-parallel ranks."""
    GRADIENTS = 2
    """P_os+g: gradients partitioned as well."""
    PARAMETERS = 3
    """P_os+g+p: parameters partitioned as well, gathered layer by layer when needed."""


class Offload(StrEnum):
    NONE = "none"
    CPU = "cpu"
    NVME = "nvme"


class Accounting(StrEnum):
    """Which bytes count as model states.

    ``paper``: ZeRO's accounting (Rajbhandari et al. 2020, Sec. 3.1 and Fig. 1): 16-bit
    parameters and gradients plus K bytes/param of optimizer state; nothing else.
    ``deepspeed``: what DeepSpeed allocates, following its memory estimator
    (``estimate_zero2/zero3_model_states_mem_needs``): the fp32 gradient partition used by
    the optimizer step, ZeRO-3's live-parameter buffers, the per-process fp32 copy made at
    model load, and the CPU buffer factor of 1.5, each as a visible row.
    """

    PAPER = "paper"
    DEEPSPEED = "deepspeed"


class Recompute(StrEnum):
    NONE = "none"
    SELECTIVE = "selective"
    """Megatron-LM's selective recompute: drop the attention core (S×S scores) and recompute it."""
    OP = "op"
    """Op-level selective checkpointing (torchtitan's ``op`` policy): keep every other matmul output and the
    attention output, recompute the cheap ops (``memory.activations_op``)."""
    FULL = "full"


class CpComm(StrEnum):
    """How context-parallel ranks exchange keys and values (``JobConfig.cp_comm``). Megatron-LM's
    ``--cp-comm-type`` names are accepted as aliases (megatron/training/arguments.py: p2p, a2a, allgather):

    - ``ring`` (Megatron ``p2p``; torch ``context_parallel``; Liu et al. 2023, Ring Attention, arXiv:2310.01889):
      each rank keeps its query chunk and passes key/value chunks around the ring, cp steps per attention;
    - ``ulysses`` (Megatron ``a2a``; DeepSpeed-Ulysses ``DistributedAttention``, Jacobs et al. 2023,
      arXiv:2309.14509): all-to-alls turn [s/cp, heads] into [s, heads/cp] around the attention;
    - ``allgather`` (Megatron ``allgather``, TransformerEngine ``AttnFuncWithCPAndKVAllGather``): every rank
      gathers the whole sequence's keys and values once per attention.
    """

    RING = "ring"
    ULYSSES = "ulysses"
    ALLGATHER = "allgather"

    @classmethod
    def _missing_(cls, value: object) -> CpComm | None:
        return {"p2p": cls.RING, "a2a": cls.ULYSSES, "all_gather": cls.ALLGATHER}.get(str(value).lower())


def _mentions_bool(annotation: Any) -> bool:
    """Whether a field's annotation admits a bool (``bool``, ``bool | None``, ``tuple[bool, ...]``)."""
    return "bool" in str(annotation)


@functools.cache
def _numeric_fields(model: type[BaseModel]) -> frozenset[str]:
    """The fields of ``model`` that do not admit a bool (computed once per class: ``reject_bools`` runs on every
    validation, thousands of times in one plan)."""
    return frozenset(name for name, f in model.model_fields.items() if not _mentions_bool(f.annotation))


def reject_bools(model: type[BaseModel], data: Any) -> Any:
    """``data`` unchanged, or a ValueError naming the first field that is not a bool but was given
    ``True``/``False`` (or a list holding one): Python treats a bool as the integer 1 or 0, so without this
    ``seq_len=True`` would silently mean 1 and ``zero: [true]`` ZeRO stage 1."""
    if not isinstance(data, dict):
        return data
    numeric = _numeric_fields(model)
    for name, value in data.items():
        if isinstance(value, bool):
            boolean = True
        elif isinstance(value, list | tuple):
            boolean = any(isinstance(v, bool) for v in value)
        else:
            continue  # the common case, a scalar: no generator per field
        if boolean and name in numeric:
            items = value if isinstance(value, list | tuple) else (value,)
            raise ValueError(f"{name}: expected {'a number' if items is not value else 'numbers'} or names, "
                             f"got the boolean {str(value).lower()}")
    return data


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_bools_as_numbers(cls, data: Any) -> Any:
        return reject_bools(cls, data)


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


class InferConfig(Strict):
    context: int = Field(default=4096, gt=0)
    kv_dtype: Dtype | None = None
    """None: the weights' compute dtype."""
    paged: bool = False
    block_size: int = Field(default=16, gt=0)
    prefill_chunk: int | None = Field(default=None, gt=0)
    all_logits: bool = False
    mla_cache: Literal["latent", "decompressed"] = "latent"
    """MLA models (DeepSeek-V2/V3): ``latent`` caches kv_lora_rank + qk_rope_head_dim per token and layer
    (vLLM, SGLang, transformers 5.x); ``decompressed`` caches full per-head K and V (transformers 4.x)."""
    kv_group_size: int | None = Field(default=None, gt=0)
    """int8/int4 KV cache: elements per quantization group along the head dim; None: one group per token per head."""
    offload_map: tuple[bool, ...] | None = None
    """Per-layer weight placement, one entry per layer (the planner's per-layer choice): True keeps that
    layer's weights in CPU RAM and streams them to the GPU for each forward pass (accelerate ``device_map``
    with "cpu" entries, ``AlignDevicesHook(offload=True)``); None: every layer on the GPU."""

    @model_validator(mode="after")
    def _block_size_needs_paged(self) -> InferConfig:
        """``block_size`` sizes the blocks of a paged cache only (``memory.kv_cache``): set without ``paged`` it
        would be silently ignored."""
        if not self.paged and self.block_size != type(self).model_fields["block_size"].default:
            raise ValueError("infer.block_size sizes a paged KV cache's blocks: add --paged (infer.paged) or drop it.")
        return self


class ServeConfig(Strict):
    """Knobs of the serving engines, each under the engine's own name (``JobConfig.engine`` picks the engine).

    vLLM (``vllm serve`` flags, vllm/engine/arg_utils.py ``EngineArgs``): ``gpu_memory_utilization``,
    ``max_num_batched_tokens``, ``max_num_seqs``, ``block_size``, ``enforce_eager``,
    ``cudagraph_capture_sizes``, ``max_model_len``. SGLang (``sglang.launch_server`` flags,
    python/sglang/srt/server_args.py): ``mem_fraction_static``, ``chunked_prefill_size``, ``max_running_requests``,
    ``page_size``, ``cuda_graph_max_bs``. llama.cpp (``llama-server``/``llama-cli`` flags,
    common/arg.cpp): ``n_gpu_layers`` (-ngl), ``n_ctx`` (-c), ``n_batch`` (-b), ``n_ubatch`` (-ub),
    ``cache_type_k``/``cache_type_v`` (-ctk/-ctv), ``flash_attn`` (-fa), ``tensor_split`` (-ts; ``pp`` > 1 is
    ``-sm layer`` over pp GPUs). transformers ``generate``:
    ``cache_implementation``.
    """

    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    """vLLM: share of the GPU's memory the instance may use (weights, activations, KV pool)."""
    max_num_batched_tokens: int | None = Field(default=None, gt=0)
    """vLLM: tokens of one scheduler step (chunked prefill); None: vLLM's default for ``vllm serve``
    (8192 on GPUs of at least 70 GiB other than A100, else 2048; ``EngineArgs.get_batch_defaults``)."""
    max_num_seqs: int | None = Field(default=None, gt=0)
    """vLLM: sequences one step may hold; None: vLLM's default (1024 on GPUs of at least 70 GiB other than A100, else 256)."""
    block_size: int = Field(default=16, gt=0)
    """vLLM: tokens per KV-cache block."""
    enforce_eager: bool = False
    """vLLM: no CUDA graphs (no graph memory)."""
    cudagraph_capture_sizes: tuple[int, ...] | None = None
    """vLLM: batch sizes captured as CUDA graphs; None: vLLM's default list up to min(2·max_num_seqs, 512)."""
    max_model_len: int | None = Field(default=None, gt=0)
    """vLLM: longest sequence (prompt + output) served; None: the model's max_position_embeddings."""
    non_torch_bytes: int | None = Field(default=None, ge=0)
    """vLLM: memory outside PyTorch's allocator (CUDA context, cuBLAS, NCCL, custom all-reduce); None: the
    default of ``memplan.engines.vllm.non_torch_bytes``."""
    allreduce_keeps_inputs: bool = False
    """vLLM <= 0.2.5 only (before PR #2151): every all-reduce input stayed alive through the profile forward."""
    vllm_release: str | None = Field(default=None, pattern=r"^\d+\.\d+(\.\d+)?$")
    """vLLM: the release whose memory profiler to reproduce ("0.8.4"); None: the current profiler. Releases whose
    arithmetic differs are named in ``memplan.engines.vllm`` (``counts_context``, ``subtracts_cudagraphs``)."""
    mem_fraction_static: float | None = Field(default=None, gt=0, lt=1)
    """SGLang --mem-fraction-static: share of free memory for weights and the KV pool; None: SGLang's default for
    the GPU (``memplan.engines.sglang.mem_fraction_static``)."""
    chunked_prefill_size: int | None = Field(default=None, gt=0)
    """SGLang --chunked-prefill-size: tokens of one prefill chunk; None: SGLang's default for the GPU's memory."""
    max_running_requests: int | None = Field(default=None, gt=0)
    """SGLang --max-running-requests; None: SGLang's cap from the pool (``_resolve_max_num_reqs``)."""
    page_size: int = Field(default=1, gt=0)
    """SGLang --page-size: tokens per KV page (1 by default)."""
    cuda_graph_max_bs: int | None = Field(default=None, gt=0)
    """SGLang --cuda-graph-max-bs: largest batch captured as a CUDA graph; None: SGLang's default for the GPU and tp."""
    n_gpu_layers: int | None = Field(default=None, ge=0)
    """llama.cpp -ngl: repeating layers offloaded to the GPU; None: all (llama.cpp's default since b5xxx is 999)."""
    n_ctx: int | None = Field(default=None, gt=0)
    """llama.cpp -c: context size of the KV cache; None: ``infer.context``."""
    n_batch: int = Field(default=2048, gt=0)
    """llama.cpp -b: logical batch size (tokens submitted per llama_decode)."""
    n_ubatch: int = Field(default=512, gt=0)
    """llama.cpp -ub: physical batch size (tokens per graph evaluation); sizes the compute buffers."""
    cache_type_k: Literal["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1"] = "f16"
    """llama.cpp -ctk: K cache type."""
    cache_type_v: Literal["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1"] = "f16"
    """llama.cpp -ctv: V cache type; a quantized V cache needs flash attention."""
    tensor_split: tuple[float, ...] | None = None
    """llama.cpp -ts: proportions of the layers per GPU of the layer split (``--pp`` GPUs, ``-sm layer``); None:
    equal shares (llama.cpp splits by free memory, equal on identical GPUs)."""
    flash_attn: bool = True
    """llama.cpp -fa: on by default (llama.cpp's ``-fa auto``, the default since 2025, enables it on CUDA)."""
    prompt_tokens: int | None = Field(default=None, gt=0)
    """Prompt length for the time to first token; None: ``infer.context`` (the whole context is prompt, the upper bound)."""
    hbm_efficiency: float | None = Field(default=None, gt=0, le=1)
    """Share of peak memory bandwidth decode reaches; None: the GPU generation's default (planner.serve_cost)."""
    compute_efficiency: float | None = Field(default=None, gt=0, le=1)
    """Share of peak dense FLOP/s prefill reaches; None: the GPU generation's default (planner.serve_cost)."""
    cache_implementation: Literal["dynamic", "static", "legacy"] = "dynamic"
    """transformers ``generate(cache_implementation=...)``: ``dynamic`` (DynamicCache, grows by torch.cat) or ``static``;
    ``legacy``: the tuple ``past_key_values`` of transformers < 4.36 (before ``DynamicCache``), where a decode step
    keeps the whole previous cache alive next to the new one (``memory.kv_cache.legacy_previous_bytes``)."""


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
    ``dtype``. A ``dtype: fp8`` job computes in fp8 as well."""
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
    # NCCL's environment (issue 11: runtime/nccl_communicators, memory.nccl), under NCCL's own names.
    nccl_buffsize: int | None = Field(default=None, gt=0)
    """``NCCL_BUFFSIZE`` in bytes: the Simple protocol's buffer per connection and channel; None: NCCL's 4 MiB."""
    nccl_max_nchannels: int | None = Field(default=None, gt=0, le=64)
    """``NCCL_MAX_NCHANNELS``: channels per communicator; None: 32, as NCCL's log shows on 8 x H100 (memory.nccl)."""
    nccl_nvls_enable: Literal[0, 1, 2] = 2
    """``NCCL_NVLS_ENABLE``: 0 off, 1 on, 2 (NCCL's default) on where the GPUs sit on an NVSwitch with multicast."""
    nccl_nvls_chunksize: int | None = Field(default=None, gt=0)
    """``NCCL_NVLS_CHUNKSIZE`` in bytes; None: NCCL's 128 KiB (NCCL < 2.21 used NCCL_BUFFSIZE: pass 524288 there)."""


TRAINING_ONLY = ("optimizer", "master_weights", "grad_dtype", "zero", "offload_optimizer", "optimizer_gpu_layers",
                 "accounting", "seq_len", "grad_accum", "recompute", "recompute_layers", "recompute_map",
                 "sequence_parallel", "cp", "cp_comm", "offload_activations", "dropout", "loss_fp32",
                 "activation_accounting", "lora", "galore", "optimizer_impl", "engine_config", "kept_output",
                 "transformers_version", "module_layout", "bnb_version", "previous_seq_len", "perf")
"""JobConfig fields that describe a training step; an inference estimate reads none of them (``perf`` tunes the
training step-time model; serving plans time themselves without it)."""
NOT_READ: dict[Job, tuple[str, ...]] = {
    Job.INFER: TRAINING_ONLY,
    Job.PRETRAIN: ("lora", "galore", "infer", "serve"),
    Job.FULL: ("lora", "galore", "infer", "serve"),
    Job.LORA: ("grad_dtype", "accounting", "galore", "infer", "serve"),
    Job.QLORA: ("grad_dtype", "accounting", "galore", "infer", "serve", "optimizer_impl"),
    Job.GALORE: ("accounting", "lora", "infer", "serve"),
}
"""The declaration of which JobConfig fields each job ignores (the memory functions never read them): a
value other than the default for one of these is an error, so no flag, recipe key or API argument is
silently ignored (a LoRA job: adapters' gradients take ``lora.dtype``, not ``grad_dtype``; DeepSpeed's
accounting rows cover the full-weight states of pretrain and full jobs only). Kept in step with the memory model by
tests/test_option_coverage.py, which sets every field to another value and checks the result changes."""
QUANTIZED_BASE_JOBS = (Job.LORA, Job.QLORA, Job.INFER)
"""Jobs whose base weights stay frozen, so they may be stored quantized."""
SIXTEEN_BIT_WORDS = ("none", "bf16", "fp16", "16bit")
"""Ways to write "no weight quantization" (16-bit weights), as ``--quant none`` on the command line."""


def changed_fields(cfg: BaseModel, names: tuple[str, ...]) -> list[str]:
    """Of ``names``, those whose value differs from the field's default; a sub-config by its own changed
    fields (``lora.paged_optimizer``)."""
    out = []
    for name in names:
        value, default = getattr(cfg, name), type(cfg).model_fields[name].default
        if isinstance(value, BaseModel) and isinstance(default, BaseModel):
            out += [f"{name}.{sub}" for sub in type(value).model_fields
                    if getattr(value, sub) != getattr(default, sub)]
        elif value != default:
            out.append(name)
    return out


def not_read_error(cfg: JobConfig) -> str | None:
    """One sentence naming the fields set for a job that does not read them, or None."""
    wrong = changed_fields(cfg, NOT_READ[cfg.job])
    if cfg.job is Job.QLORA:  # the QLoRA adapter-dtype default is not the user's choice
        wrong = [w for w in wrong if w != "lora.dtype"]
    if not wrong:
        return None
    users = [j.value for j in Job if all(w.split(".")[0] not in NOT_READ[j] for w in wrong)]
    where = f"; {'it applies' if len(wrong) == 1 else 'they apply'} to {', '.join(users)} jobs" if users else ""
    article = "an" if cfg.job is Job.INFER else "a"
    return f"{', '.join(wrong)} {'does' if len(wrong) == 1 else 'do'} not apply to {article} {cfg.job.value} job{where}"


def perf_not_read(cfg: JobConfig) -> list[str]:
    """The step-time knobs set for traffic the job does not have: links and overlap on one GPU, an interleaved
    pipeline on one GPU, the inter-node fabric on one node (``planner.steptime`` never reads them there)."""
    p = cfg.perf
    single = {"cluster": p.cluster, "intra_node_gbps": p.intra_node_gbps, "intra_node_latency_us": p.intra_node_latency_us,
              "comm_overlap": p.comm_overlap, "virtual_stages": None if p.virtual_stages == 1 else p.virtual_stages}
    node = {"inter_node_gbps": p.inter_node_gbps, "inter_node_latency_us": p.inter_node_latency_us}
    out = [f"perf.{k}" for k, v in single.items() if v is not None] if cfg.world_size == 1 else []
    return out + ([f"perf.{k}" for k, v in node.items() if v is not None] if cfg.nodes == 1 else [])


def unread_by_all(cfg: JobConfig, jobs: tuple[Job, ...]) -> list[str]:
    """Fields set in ``cfg`` (other than their defaults) that none of ``jobs`` reads: a grid over several
    jobs reads a field if any of its jobs does (``quant`` only frozen-base jobs)."""
    names = tuple(n for n in JobConfig.model_fields if n != "job")
    wrong = [w for w in changed_fields(cfg, names) if all(w.split(".")[0] in NOT_READ[j] for j in jobs)]
    if cfg.quant is not None and not any(j in QUANTIZED_BASE_JOBS for j in jobs):
        wrong.append("quant")
    return [w for w in wrong if w != "lora.dtype" or Job.QLORA not in jobs]


def retarget(cfg: JobConfig, job: Job) -> JobConfig:
    """``cfg`` for another job: the fields that ``job`` does not read back at their defaults (a sweep over
    jobs, a suggestion to switch job), so the new configuration validates. Fields never set stay unset."""
    data = {k: v for k, v in cfg.model_dump(exclude_unset=True).items() if k not in NOT_READ[job]}
    if job is not cfg.job and isinstance(data.get("lora"), dict) and Job.QLORA in (job, cfg.job):
        data["lora"] = {k: v for k, v in data["lora"].items() if k != "dtype"}  # the new job's adapter default
    if job not in QUANTIZED_BASE_JOBS:
        data.pop("quant", None)
        data.pop("quant_map", None)
    return JobConfig.model_validate({**data, "job": job})


class JobConfig(Strict):
    """One fixed configuration of a job on a cluster."""

    job: Job = Job.FULL
    engine: Engine | None = None
    """The engine that runs the job; None: the job's default engine (``memplan.engines.default_engine``)."""
    dtype: Dtype = Dtype.BF16
    quant: str | None = None
    optimizer: OptimizerKind = OptimizerKind.ADAMW
    optimizer_impl: OptimizerImpl | None = None
    """torch AdamW implementation, for the engines that run torch.optim (pytorch, fsdp2); sets the optimizer
    step's temporaries. None: the engine's own (``effective_optimizer_impl``)."""
    master_weights: bool | None = None
    """fp32 master copy of 16-bit weights; None: on for 16-bit training with a non-pure optimizer."""
    grad_dtype: Dtype | None = None
    zero: ZeroStage = ZeroStage.NONE
    offload_optimizer: Offload = Offload.NONE
    offload_params: Offload = Offload.NONE
    zero_init: bool = True
    accounting: Accounting = Accounting.DEEPSPEED
    gpus_per_node: int = Field(default=1, gt=0, le=MAX_GPUS)
    nodes: int = Field(default=1, gt=0, le=MAX_GPUS)
    tp: int = Field(default=1, gt=0)
    pp: int = Field(default=1, gt=0)
    ep: int = Field(default=1, gt=0)
    cp: int = Field(default=1, gt=0)
    """Context-parallel degree: each sequence is split over ``cp`` ranks (``memory.context_parallel``)."""
    cp_comm: CpComm = CpComm.RING
    """How the context-parallel ranks exchange keys and values (``CpComm``); read only with cp > 1."""
    micro_batch: int = Field(default=1, gt=0)
    seq_len: int = Field(default=2048, gt=0)
    grad_accum: int = Field(default=1, gt=0)
    recompute: Recompute = Recompute.NONE
    recompute_map: tuple[Recompute, ...] | None = None
    """Per-layer recompute modes, one per layer (the planner's per-layer choice); overrides
    ``recompute``/``recompute_layers`` when set."""
    bnb_integration: Literal["transformers", "lightning"] = "transformers"
    """Which integration builds the bitsandbytes layers (bitsandbytes formats only): ``transformers``
    (``BitsAndBytesConfig``: lm_head and embeddings kept in the compute dtype, weights quantized from the loaded
    dtype) or ``lightning`` (Lightning Fabric's ``BitsandbytesPrecision``, as litgpt runs it: every ``nn.Linear``
    replaced, lm_head included, each weight quantized from an fp16 copy and quantized again from the checkpoint in
    a ``load_state_dict`` pre-hook). See ``memplan.memory.bnb_workspace``."""
    quant_map: tuple[str | None, ...] | None = None
    """Per-layer weight format, one entry per layer (the planner's LQ-LoRA-style per-layer choice): a
    format name, or None to keep that layer in ``dtype``; tensors outside the blocks use ``quant``.
    The formats must come from one library (one runtime loads the checkpoint)."""
    optimizer_gpu_layers: int | None = Field(default=None, ge=0)
    """Partial optimizer offload (DeepSpeed ZeRO-3 ``offload_optimizer.ratio``: sub-groups in parameter
    order, the last ones updated by CPU Adam): the optimizer states of the tensors before the blocks and
    of the first N layers stay on the GPU; those of the later layers and of the tensors after the blocks
    go to ``offload_optimizer``'s tier. None: all offloaded (plain ZeRO-Offload). DeepSpeed runs the split
    only with AdamW (``DeepSpeedCPUAdam``), so the planner proposes it only then; estimate models any optimizer."""
    recompute_layers: int | None = Field(default=None, ge=0)
    """With recompute full/selective: how many layers are checkpointed (None: all)."""
    flash_attention: bool = True
    sequence_parallel: bool = False
    offload_activations: bool = False
    """Activations saved for backward go to pinned CPU memory and come back for backward, as the engine runs it
    (``memory.activation_offload``): pytorch/fsdp2 ``torch.autograd.graph.save_on_cpu(pin_memory=True)`` (torchtune
    ``OffloadActivations``), deepspeed ``activation_checkpointing.cpu_checkpointing`` (the checkpointed layers'
    inputs; needs recompute full), megatron ``--cpu-offloading`` (``engine_config.cpu_offloading_num_layers``)."""
    attention: Literal["flash", "sdpa", "eager"] | None = None
    """Attention kernel (HF ``attn_implementation``): flash (flash_attention_2), sdpa, eager; None: from flash_attention."""
    dropout: bool = False
    """Dropout active (p > 0) wherever the HF module has dropout layers (GPT-2, OPT); masks are saved for backward."""
    loss_fp32: bool = True
    """The loss upcasts 16-bit logits to fp32 first (HF ``ForCausalLMLoss``: ``logits.float()``)."""
    kept_output: Literal["none", "logits", "logits_fp32"] = "none"
    """What the training loop keeps of the model output until after the optimizer step: ``none`` (HF Trainer's
    ``compute_loss`` returns the loss only), ``logits`` (the logits in the activation dtype: a loop holding
    ``output`` with current transformers, whose ``ForCausalLMLoss`` upcasts inside the loss) or ``logits_fp32``
    (early-2024 transformers, e.g. v4.38 ``LlamaForCausalLM.forward``: ``logits = logits.float()`` is returned).
    AnswerDotAI fsdp_qlora train.py holds ``output`` until ``output = None`` after ``optimizer.step()``."""
    module_layout: Literal["hf", "litgpt"] = "hf"
    """Whose modules and training loop the job runs, for the activations: ``hf`` (transformers modules with peft
    adapters, the default) or ``litgpt`` (Lightning-AI litgpt ``model.py``/``lora.py`` and ``finetune/*.py``: the fused
    qkv projection whose whole output SDPA's v keeps alive, q made head-major by RoPE's ``cat`` so the output
    projection reads a copy, one ``LoRAQKVLinear`` adapter for q/k/v whose ``zero_pad`` ``index_copy`` saves its
    source, and a loop that holds ``logits`` until the next forward returns). Llama-layout models only;
    see ``memory.litgpt``. Unless named, it sets ``kept_output="logits"``, ``loss_fp32=False`` and the adapters'
    dtype to the model's (``_litgpt_defaults``)."""
    previous_seq_len: int | None = Field(default=None, ge=0)
    """Tokens per sequence of the micro-batch before the one at the peak, for what a loop that holds its output until
    the next forward returns (litgpt's, ``module_layout="litgpt"``) keeps during that forward: its logits and, with
    bitsandbytes <= 0.43.1, its quantized linears' inputs. None: ``seq_len`` (micro-batches of equal length, the
    worst case); 0: nothing held (the longest micro-batch comes first, as litgpt 8641822's ``get_batch`` forces);
    at most ``seq_len``."""
    bnb_version: str | None = Field(default=None, pattern=r"^0\.\d+(\.\d+)?$")
    """The bitsandbytes release, for what its matmuls keep for backward (``memory.litgpt.bnb_keeps_input``): up to
    0.43.1 the 4-bit and 8-bit matmuls hold their input on ``ctx`` (alive while the autograd graph is referenced, past
    its backward: ``activations/bnb_retained_inputs``); from 0.43.2 the 4-bit matmul holds none. None: the input is
    saved and freed by its backward (memplan's rule for an unknown release)."""
    transformers_version: str | None = Field(default=None, pattern=r"^4\.(3[7-9]|40)(\.\d+)?$")
    """The transformers release the job runs, for the bytes older releases hold that current ones do not
    (``memory.hf_legacy``): 4.37-4.40 keep per-layer rotary cos/sin caches of max_position_embeddings rows; 4.38.x
    registers LlamaModel's max_position_embeddings² causal-mask buffer and builds a (B, 1, M, M) mask per forward,
    4.38-4.39 pass SDPA an explicit mask (memory-efficient kernel). None: current transformers. Only the releases
    whose sources were read are accepted (4.37-4.40)."""
    activation_accounting: Literal["autograd", "paper"] = "autograd"
    """``autograd``: every tensor PyTorch saves for backward in the HF implementation; ``paper``: Korthikanti et
    al. 2022's accounting (16-bit tensors and 1-byte masks only, no norm statistics, fp32 upcasts or int64 indices)."""
    cuda_context_bytes: int | None = Field(default=None, ge=0)
    allocator_reserve_pct: float | None = Field(default=None, ge=0, le=100)
    safety_margin_pct: float = Field(default=0.0, ge=0, lt=100)
    """Share of each GPU's memory to keep free, as the visible row ``runtime/safety_margin``; default 0 (the
    gate compares capacity with the exact sum of the modelled rows). See ``memory.runtime.SAFETY_MARGIN_SOURCE``."""
    lora: LoraConfig = LoraConfig()
    galore: GaloreConfig = GaloreConfig()
    infer: InferConfig = InferConfig()
    engine_config: EngineConfig = EngineConfig()
    """The engine's own knobs (DDP buckets, FSDP2 prefetch, DeepSpeed buckets and ZeRO-3 limits, Megatron)."""

    @property
    def effective_engine(self) -> Engine:
        """``engine``, or the default a new user gets without choosing (``memplan.engines.default_engine``):

        - serving (``job=infer``): ``transformers`` (HF ``generate``, what memplan models for inference);
        - any ZeRO stage or offload: ``deepspeed`` (ZeRO and ZeRO-Offload/Infinity are DeepSpeed's);
        - context parallelism: ``megatron`` (ring or all-gather), ``deepspeed`` (Ulysses), the engines that run them;
        - tensor or pipeline parallelism: ``deepspeed`` (Megatron-DeepSpeed layout; choose ``megatron`` to get
          Megatron-Core's states and fused activations);
        - otherwise (one GPU or plain data parallelism): ``pytorch`` (HF Trainer / accelerate / a plain loop,
          DDP on several GPUs), the program most users start with.
        """
        if self.engine is not None:
            return self.engine
        if not self.job.trains:
            return Engine.TRANSFORMERS
        if self.zero > ZeroStage.NONE or (self.offload_optimizer, self.offload_params) != (Offload.NONE, Offload.NONE):
            return Engine.DEEPSPEED
        if self.cp > 1:
            return Engine.DEEPSPEED if self.cp_comm is CpComm.ULYSSES else Engine.MEGATRON
        if self.tp > 1 or self.pp > 1:
            return Engine.DEEPSPEED
        return Engine.PYTORCH

    @property
    def effective_optimizer_impl(self) -> OptimizerImpl:
        """``optimizer_impl``, or the engine's: torch's CUDA default ``foreach`` for pytorch and fsdp2
        (torch/optim/optimizer.py ``_default_to_fused_or_foreach``); ``fused`` for deepspeed (FusedAdam,
        deepspeed/ops/adam/fused_adam.py; DeepSpeedCPUAdam when offloaded, which updates in place on the CPU)
        and megatron (Apex/TransformerEngine FusedAdam, megatron/core/optimizer/__init__.py)."""
        if self.optimizer_impl is not None:
            return self.optimizer_impl
        if self.effective_engine in (Engine.DEEPSPEED, Engine.MEGATRON):
            return OptimizerImpl.FUSED
        return OptimizerImpl.FOREACH

    @property
    def effective_activation_accounting(self) -> str:
        """``paper`` (Korthikanti et al. 2022, Megatron-Core/TransformerEngine's fused layout) for the megatron
        engine, else ``activation_accounting`` (the Hugging Face module layout by default)."""
        return "paper" if self.job.trains and self.effective_engine is Engine.MEGATRON else self.activation_accounting
    serve: ServeConfig = ServeConfig()
    """Serving-engine knobs (vLLM, llama.cpp, transformers generate), read when ``job`` is infer."""

    perf: PerfConfig = PerfConfig()
    """Step-time model overrides (efficiency, fabric, overlap, fp8 GEMMs, interleaved pipeline)."""

    @property
    def world_size(self) -> int:
        return self.gpus_per_node * self.nodes

    @property
    def dp(self) -> int:
        """Ranks that hold the same model shard: world / (tp · pp). With context parallelism this is the
        data × context group, over which gradients are reduced and ZeRO/FSDP/the distributed optimizer shard
        the states (Megatron ``get_data_parallel_group(with_context_parallel=True)``; torchtitan's
        ``dp_shard_cp`` mesh; DeepSpeed's ``seq_data_parallel_group``); ``batch_dp`` counts the sequences."""
        return self.world_size // (self.tp * self.pp)

    @property
    def batch_dp(self) -> int:
        """Data-parallel replicas that read different sequences: world / (tp · pp · cp)."""
        return self.dp // self.cp

    @property
    def weights_trainable(self) -> bool:
        return self.job.full_weights_trainable

    @property
    def uses_master_weights(self) -> bool:
        if self.master_weights is not None:
            return self.master_weights
        return (
            self.job.trains
            and self.dtype.is_16bit
            and self.optimizer not in (OptimizerKind.ADAMW_BF16,)
            and self.job is not Job.GALORE
        )

    @property
    def gradient_dtype(self) -> Dtype:
        return self.grad_dtype or self.dtype

    @property
    def attention_impl(self) -> str:
        """``attention`` when set, else ``flash`` or ``eager`` from ``flash_attention``."""
        if self.attention is not None:
            return self.attention
        return "flash" if self.flash_attention else "eager"

    @model_validator(mode="before")
    @classmethod
    def _adapter_dtype(cls, data: Any) -> Any:
        """QLoRA's adapters default to bf16 (Dettmers et al. 2023, qlora.py), plain LoRA's to fp32 (peft)."""
        if isinstance(data, dict) and str(data.get("job", "")) in ("qlora", "Job.QLORA"):
            lora = data.get("lora")
            if lora is None or (isinstance(lora, dict) and "dtype" not in lora):
                data = {**data, "lora": {**(lora or {}), "dtype": Dtype.BF16}}
            elif isinstance(lora, LoraConfig) and "dtype" not in lora.model_fields_set:
                data = {**data, "lora": lora.model_copy(update={"dtype": Dtype.BF16})}
        return data

    @model_validator(mode="before")
    @classmethod
    def _litgpt_defaults(cls, data: Any) -> Any:
        """``module_layout="litgpt"`` brings litgpt's own defaults where the job does not name them: its loop holds
        the bf16 ``logits`` (``kept_output="logits"``), ``chunked_cross_entropy`` runs in bf16 (``loss_fp32=False``),
        and ``lora.py`` builds the adapters in the model's dtype (finetune/lora.py, model.py at 43c44323)."""
        if not isinstance(data, dict) or data.get("module_layout") != "litgpt":
            return data
        data = {"kept_output": "logits", "loss_fp32": False, **data}
        if str(data.get("job", "")) not in ("lora", "qlora", "Job.LORA", "Job.QLORA"):
            return data
        lora = data.get("lora")
        dtype = data.get("dtype", Dtype.BF16)
        if lora is None or (isinstance(lora, dict) and "dtype" not in lora):
            data["lora"] = {**(lora or {}), "dtype": dtype}
        elif isinstance(lora, LoraConfig) and "dtype" not in lora.model_fields_set:
            data["lora"] = lora.model_copy(update={"dtype": Dtype(dtype)})
        return data

    @model_validator(mode="before")
    @classmethod
    def _sixteen_bit(cls, data: Any) -> Any:
        """``quant="none"`` (or bf16/fp16/16bit) means 16-bit weights, as ``--quant none`` does in ``plan``;
        QLoRA is LoRA on a quantized base, so there it is an error pointing to ``lora``."""
        quant = data.get("quant") if isinstance(data, dict) else None
        if isinstance(quant, str) and quant.strip().lower() in SIXTEEN_BIT_WORDS:
            if str(data.get("job", "")) in ("qlora", "Job.QLORA"):
                raise ValueError(f"quant={quant!r}: qlora trains adapters on quantized base weights (default "
                                 "nf4-dq); for 16-bit base weights use job lora")
            data = {**data, "quant": None}
        return data

    @model_validator(mode="after")
    def _check(self) -> JobConfig:
        if self.world_size > MAX_GPUS:
            raise ValueError(f"{self.world_size:,} GPUs ({self.gpus_per_node} per node × {self.nodes} nodes) is more "
                             f"than the {MAX_GPUS:,} memplan plans for")
        if self.world_size % (self.tp * self.pp * self.cp):
            what = "tp × pp × cp" if self.cp > 1 else "tp × pp"
            raise ValueError(
                f"{what} = {self.tp * self.pp * self.cp} must divide the {self.world_size} GPUs "
                f"({self.gpus_per_node} per node × {self.nodes} nodes)"
            )
        if self.cp_comm is not CpComm.RING and self.cp == 1:
            raise ValueError(f"cp_comm={self.cp_comm.value} applies with context parallelism (cp > 1); set cp too")
        fsdp1 = self.engine is Engine.FSDP1  # CPUOffload(offload_params=True): engines.rules checks the pair
        if self.offload_params is not Offload.NONE and self.zero < ZeroStage.PARAMETERS and self.job.trains and not fsdp1:
            raise ValueError("offload_params needs ZeRO stage 3 (parameter offload is ZeRO-3's, as in ZeRO-Infinity)")
        if self.offload_optimizer is not Offload.NONE and self.zero < ZeroStage.OPTIMIZER and self.job.trains and not fsdp1:
            raise ValueError("offload_optimizer needs ZeRO stage 1 or higher (ZeRO-Offload builds on ZeRO-2)")
        if self.offload_optimizer is Offload.NVME and self.zero < ZeroStage.PARAMETERS:
            raise ValueError("offload_optimizer=nvme needs ZeRO stage 3 (ZeRO-Infinity)")
        if self.optimizer_gpu_layers is not None and (
                self.offload_optimizer is not Offload.CPU or self.zero < ZeroStage.PARAMETERS
                or self.job not in (Job.PRETRAIN, Job.FULL)):
            raise ValueError("optimizer_gpu_layers (partial optimizer offload, DeepSpeed offload_optimizer.ratio) "
                             "needs a pretrain or full job with ZeRO stage 3 and offload_optimizer=cpu")
        if self.infer.offload_map is not None and self.job is not Job.INFER:
            raise ValueError("infer.offload_map (per-layer weight placement) applies to inference jobs only")
        return self

    @model_validator(mode="after")
    def _applies(self) -> JobConfig:
        """Every field set must be read by this job (``quant`` on a trained base: ``memplan.preflight``, once
        the format name is known to be valid)."""
        wrong = not_read_error(self)
        if wrong:
            raise ValueError(wrong)
        if self.recompute_layers is not None and self.recompute is Recompute.NONE and self.recompute_map is None:
            raise ValueError("recompute_layers applies with recompute full or selective (it counts the layers "
                             "checkpointed); set recompute too")
        unread_perf = perf_not_read(self)
        if unread_perf:
            raise ValueError(f"{', '.join(unread_perf)} {'does' if len(unread_perf) == 1 else 'do'} not apply on "
                             f"{'one GPU' if self.world_size == 1 else 'one node'}: there is no such traffic to time")
        return self
