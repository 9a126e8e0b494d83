"""The names a job is described with: the job kinds, engines, optimizers, ZeRO stages, offload tiers, accounting,
recompute modes and context-parallel exchanges, and the bound on the GPUs memplan plans for.

Part of ``memplan.config`` (which re-exports every name); no pydantic here.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum

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
