"""The execution plan: what job runs, how it is parallelized, where states live.

A JobConfig is validated once at the boundary (CLI flags, recipe, Python API) and then
read by the pure memory functions. Invalid combinations raise MemplanError with the field named.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from memplan.dtypes import Dtype


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


class Engine(StrEnum):
    """The program that runs the job. Training: ``pytorch`` (one process or DDP: HF Trainer, accelerate,
    plain loops), ``fsdp2`` (``torch.distributed.fsdp.fully_shard``), ``deepspeed``, ``megatron``
    (Megatron-LM / Megatron-Core). Serving: ``vllm``, ``llamacpp``, ``transformers`` (HF ``generate``).
    Each engine's profile (``memplan.engines``) says which components exist, how they are sharded,
    which buffers it adds and which combinations it runs."""

    PYTORCH = "pytorch"
    FSDP2 = "fsdp2"
    DEEPSPEED = "deepspeed"
    MEGATRON = "megatron"
    VLLM = "vllm"
    LLAMACPP = "llamacpp"
    TRANSFORMERS = "transformers"

    @property
    def trains(self) -> bool:
        return self in (Engine.PYTORCH, Engine.FSDP2, Engine.DEEPSPEED, Engine.MEGATRON)

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
    FULL = "full"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False, allow_inf_nan=False)


class LoraConfig(Strict):
    rank: int = Field(default=16, gt=0)
    alpha: float = Field(default=32.0, gt=0)
    targets: tuple[str, ...] = ("q", "k", "v", "o")
    """Abstract projections (q,k,v,o,gate,up,down), or ("all-linear",)."""
    dora: bool = False
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


class JobConfig(Strict):
    """One fixed configuration of a job on a cluster."""

    job: Job = Job.FULL
    engine: Engine | None = None
    """The engine that runs the job; None: the job's default engine (``memplan.engines.default_engine``)."""
    dtype: Dtype = Dtype.BF16
    quant: str | None = None
    optimizer: OptimizerKind = OptimizerKind.ADAMW
    master_weights: bool | None = None
    """fp32 master copy of 16-bit weights; None: on for 16-bit training with a non-pure optimizer."""
    grad_dtype: Dtype | None = None
    zero: ZeroStage = ZeroStage.NONE
    offload_optimizer: Offload = Offload.NONE
    offload_params: Offload = Offload.NONE
    zero_init: bool = True
    accounting: Accounting = Accounting.DEEPSPEED
    gpus_per_node: int = Field(default=1, gt=0)
    nodes: int = Field(default=1, gt=0)
    tp: int = Field(default=1, gt=0)
    pp: int = Field(default=1, gt=0)
    ep: int = Field(default=1, gt=0)
    micro_batch: int = Field(default=1, gt=0)
    seq_len: int = Field(default=2048, gt=0)
    grad_accum: int = Field(default=1, gt=0)
    recompute: Recompute = Recompute.NONE
    recompute_map: tuple[Recompute, ...] | None = None
    """Per-layer recompute modes, one per layer (the planner's per-layer choice); overrides
    ``recompute``/``recompute_layers`` when set."""
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
    attention: Literal["flash", "sdpa", "eager"] | None = None
    """Attention kernel (HF ``attn_implementation``): flash (flash_attention_2), sdpa, eager; None: from flash_attention."""
    dropout: bool = False
    """Dropout active (p > 0) wherever the HF module has dropout layers (GPT-2, OPT); masks are saved for backward."""
    loss_fp32: bool = True
    """The loss upcasts 16-bit logits to fp32 first (HF ``ForCausalLMLoss``: ``logits.float()``)."""
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
    perf: PerfConfig = PerfConfig()
    """Step-time model overrides (efficiency, fabric, overlap, fp8 GEMMs, interleaved pipeline)."""

    @property
    def world_size(self) -> int:
        return self.gpus_per_node * self.nodes

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp)

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

    @model_validator(mode="after")
    def _check(self) -> JobConfig:
        if self.world_size % (self.tp * self.pp):
            raise ValueError(
                f"tp × pp = {self.tp * self.pp} must divide the {self.world_size} GPUs "
                f"({self.gpus_per_node} per node × {self.nodes} nodes)"
            )
        if self.offload_params is not Offload.NONE and self.zero < ZeroStage.PARAMETERS and self.job.trains:
            raise ValueError("offload_params needs ZeRO stage 3 (parameter offload is ZeRO-3's, as in ZeRO-Infinity)")
        if self.offload_optimizer is not Offload.NONE and self.zero < ZeroStage.OPTIMIZER and self.job.trains:
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
