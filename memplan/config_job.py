"""JobConfig: one fixed configuration of a job on a cluster, validated once at the boundary.

Part of ``memplan.config`` (which re-exports every name).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from memplan.config_base import Strict, release
from memplan.config_enums import (
    MAX_GPUS,
    Accounting,
    CpComm,
    Engine,
    Job,
    Offload,
    OptimizerImpl,
    OptimizerKind,
    Recompute,
    ZeroStage,
)
from memplan.config_rules import SIXTEEN_BIT_WORDS, not_read_error, perf_not_read
from memplan.config_serve import InferConfig, ServeConfig
from memplan.config_train import EngineConfig, GaloreConfig, LoraConfig, PerfConfig
from memplan.dtypes import Dtype
from memplan.units import counted

BNB_RELEASE = r"^0\.\d+(\.\d+)?$"
TRANSFORMERS_RELEASE = r"^4\.(3[7-9]|40)(\.\d+)?$"
"""The transformers releases whose sources ``memory.hf_legacy`` was written from."""


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
    bnb_version: str | None = Field(default=None, pattern=BNB_RELEASE)
    """The bitsandbytes release, for what its matmuls keep for backward (``memory.litgpt.bnb_keeps_input``): up to
    0.43.1 the 4-bit and 8-bit matmuls hold their input on ``ctx`` (alive while the autograd graph is referenced, past
    its backward: ``activations/bnb_retained_inputs``); from 0.43.2 the 4-bit matmul holds none. None: the input is
    saved and freed by its backward (memplan's rule for an unknown release)."""
    transformers_version: str | None = Field(default=None, pattern=TRANSFORMERS_RELEASE)
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

    @field_validator("bnb_version", mode="before")
    @classmethod
    def _bnb_release(cls, value: Any) -> Any:
        return release(value, pattern=BNB_RELEASE, form="a bitsandbytes release like 0.43.1")

    @field_validator("transformers_version", mode="before")
    @classmethod
    def _transformers_release(cls, value: Any) -> Any:
        return release(value, pattern=TRANSFORMERS_RELEASE,
                       form="a transformers release from 4.37 to 4.40 like 4.38.2",
                       hint=" (memplan models those and current transformers, which is what leaving it out means)")

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
            raise ValueError(f"{counted(self.world_size, 'GPU', grouped=True)} ({self.gpus_per_node} per node × "
                             f"{counted(self.nodes, 'node')}) is more "
                             f"than the {MAX_GPUS:,} memplan plans for")
        if self.world_size % (self.tp * self.pp * self.cp):
            what = "tp × pp × cp" if self.cp > 1 else "tp × pp"
            raise ValueError(
                f"{what} = {self.tp * self.pp * self.cp} must divide the {counted(self.world_size, 'GPU')} "
                f"({self.gpus_per_node} per node × {counted(self.nodes, 'node')})"
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
