"""Model states of a full-weight training job as each training engine lays them out (``JobConfig.effective_engine``).

Which copies exist, in which dtype, and how each is sharded over the data-parallel group (Nd = ``cfg.dp``),
per precision policy. P below is the trainable elements of one GPU after tp/pp/ep division.

- ``pytorch`` (one process or DDP: HF Trainer, accelerate, plain loops):
  - AMP (16-bit ``dtype`` with master weights, the default): the model stays fp32 (4P), fp32 gradients (4P), fp32
    Adam m, v (8P): 16 B/param, plus autocast's 16-bit copies of the matmul weights, alive from forward until
    backward has used them (torch/amp/autocast_mode.py: the cast weights are cached for the autocast region and
    saved by the matmuls for backward). Nothing is sharded.
  - pure 16-bit (``master_weights=False`` or ``adamw-bf16``, HF ``torch_dtype=bfloat16``): 16-bit params and
    gradients; states ``torch.zeros_like(p)`` in the weights' dtype (``memory.optimizer.state_dtype``).
- ``fsdp2`` (``torch.distributed.fsdp.fully_shard`` with ``MixedPrecisionPolicy(param_dtype=bf16,
  reduce_dtype=fp32)``): the sharded parameters stay fp32 and are what the optimizer updates (4P/Nd), sharded fp32
  gradients (4P/Nd), fp32 states (8P/Nd); each unit's parameters are all-gathered in bf16 just before use
  (``memory.engine_buffers``). Source: torch/distributed/fsdp/_fully_shard/_fsdp_param.py (``init_dtype_attrs``,
  sharded ``_sharded_param_data`` in the original dtype), _fsdp_collectives.py (``foreach_all_gather``,
  ``foreach_reduce``). Pure bf16 (``master_weights=False``): everything above in bf16.
- ``megatron`` (Megatron-Core ``DistributedDataParallel`` + ``DistributedOptimizer``): 16-bit params, a contiguous
  fp32 main-gradient buffer (``accumulate_allreduce_grads_in_fp32``, on for bf16), fp32 main params and Adam
  states. Without the distributed optimizer 2 + 4 + 4 + 8 = 18 B/param (bf16); with it the main params and
  states are sharded: 6 + 12/Nd. fp16 keeps 16-bit grads in the buffer and an fp32 copy for the optimizer:
  2 + 2 + 4 + 4 + 8 = 20, or 4 + 16/Nd. Source: Megatron-LM docs/source/api-guide/dist_optimizer.md (the
  bytes-per-parameter table), megatron/core/distributed/param_and_grad_buffer.py,
  megatron/core/optimizer/distrib_optimizer.py.
- ``deepspeed``: ``memory.model_states.set_buffers`` (DeepSpeed's estimator layout, ZeRO stages 0-3).

fp8 training (TransformerEngine, torchao float8) keeps this 16-bit layout (16/32-bit masters, fp32 states) and
adds fp8 copies of the matmul weights (``weights/fp8_copies``), persistent or transient by engine; see ``fp8_rows``
and ``memory.fp8_weights``.
"""

from __future__ import annotations

from memplan.arch.tensors import Role
from memplan.config import Engine, OptimizerKind, ZeroStage
from memplan.dtypes import Dtype
from memplan.memory import fp8_weights
from memplan.memory import optimizer as opt
from memplan.memory.breakdown import Row, Tier
from memplan.memory.context import Context
from memplan.memory.zero import StateBuffer
from memplan.units import bits_to_bytes

FP32 = Dtype.FP32
TORCH_AMP = "torch/amp/autocast_mode.py (autocast weight-cast cache; HF Trainer bf16=True over an fp32 model)"
FSDP2 = ("torch/distributed/fsdp/_fully_shard/_fsdp_param.py (sharded params in their original dtype), "
         "_fsdp_api.py MixedPrecisionPolicy")
MEGATRON = ("Megatron-LM docs/source/api-guide/dist_optimizer.md (bytes/param table); "
            "megatron/core/distributed/param_and_grad_buffer.py; megatron/core/optimizer/distrib_optimizer.py")
DP_SHARDED = ZeroStage.NONE
"""``shard_from`` of a buffer that the engine shards over data parallelism whatever the ZeRO stage."""

MATMUL_ROLES = (Role.LINEAR, Role.LM_HEAD)


def mixed(ctx: Context) -> bool:
    """Whether the job trains 16-bit (or fp8) compute over fp32 masters: the engines' mixed-precision policy."""
    cfg = ctx.cfg
    if cfg.dtype is Dtype.FP8:  # fp8 recipes keep 16-bit weights: the 16-bit default applies
        cfg = cfg.model_copy(update={"dtype": compute_dtype(ctx)})
    return cfg.uses_master_weights and compute_dtype(ctx) is not FP32


def compute_dtype(ctx: Context) -> Dtype:
    """The 16/32-bit dtype the engine computes and keeps its low-precision params in: fp8 training computes its
    matmuls in fp8 but keeps 16-bit weights (TransformerEngine, torchao), so bf16 stands for fp8 here."""
    return Dtype.BF16 if ctx.cfg.dtype is Dtype.FP8 else ctx.cfg.dtype


def param_dtype(ctx: Context) -> Dtype:
    """The dtype in which the engine stores the parameters of the model (before any all-gather).

    pytorch AMP and fsdp2 keep fp32 parameters (the optimizer's copy); deepspeed and megatron keep 16-bit
    parameters beside fp32 masters; pure 16-bit keeps the 16-bit dtype everywhere.
    """
    engine = ctx.cfg.effective_engine
    if mixed(ctx) and engine in (Engine.PYTORCH, Engine.FSDP2):
        return FP32
    return compute_dtype(ctx)


def matmul_numel(ctx: Context) -> int:
    """Elements of the stage's matmul weights (linear layers and an untied lm_head; the embedding when the
    lm_head is tied to it), per tp rank: what autocast casts and fp8 recipes quantize."""
    from memplan.arch.parallel import sharded_numel

    tensors = list(ctx.tensors)
    roles = MATMUL_ROLES + ((Role.EMBEDDING,) if ctx.arch.spec.tie_word_embeddings else ())
    return sum(sharded_numel(t, ctx.cfg.tp, ctx.cfg.ep) for t in tensors if t.role in roles)


def state_buffers(ctx: Context, *, numel: int, states: list[tuple[str, int]]) -> list[StateBuffer]:
    """Gradients, fp32 masters and optimizer states of ``numel`` trainable elements for pytorch, fsdp2 and
    megatron (the parameters themselves come from ``weights``), before data-parallel sharding.

    Formula: see the module docstring; ``states`` are the optimizer's buffers already scaled to ``numel``.
    """
    cfg = ctx.cfg
    engine = cfg.effective_engine
    pdtype = param_dtype(ctx)
    gdtype = cfg.grad_dtype or pdtype
    out: list[StateBuffer] = []
    if engine is Engine.PYTORCH:
        out.append(StateBuffer("gradients", bits_to_bytes(numel, gdtype.bits), None, Tier.GPU, TORCH_AMP,
                               f"{gdtype.value} gradients (the parameters' dtype), every rank whole"))
        shard = None
    elif engine is Engine.FSDP2:
        out.append(StateBuffer("gradients", bits_to_bytes(numel, gdtype.bits), DP_SHARDED, Tier.GPU, FSDP2,
                               f"sharded {gdtype.value} gradients (reduce-scatter output)"))
        shard = DP_SHARDED
    else:
        return _megatron_buffers(ctx, numel=numel, states=states)
    paged = cfg.engine_config.paged_optimizer
    tier = Tier.CPU if paged else Tier.GPU
    note = "paged (bitsandbytes Paged*: CUDA managed memory, counted paged out to CPU RAM)" if paged else ""
    for name, nbytes in states:
        out.append(StateBuffer(name, nbytes, shard, tier, f"{cfg.optimizer.value} states; {engine.value}", note))
    return out


def _megatron_buffers(ctx: Context, *, numel: int, states: list[tuple[str, int]]) -> list[StateBuffer]:
    """Megatron-Core: contiguous main-grad buffer (fp32 for bf16, 16-bit for fp16), fp32 main params and
    states, sharded by the distributed optimizer (``EngineConfig.use_distributed_optimizer``): the dense
    parameters' over dp, the routed experts' over the expert data-parallel group dp/ep
    (``megatron_optimizer.sharded_bytes``). The precision-aware optimizer sets the Adam moments' dtypes and
    keeps the main params as 16-bit remainders (``megatron_optimizer``)."""
    from memplan.memory import megatron_optimizer as mopt

    cfg = ctx.cfg
    dist = cfg.engine_config.use_distributed_optimizer
    cdtype = compute_dtype(ctx)
    master = mixed(ctx)
    grad_dtype = cfg.grad_dtype or (FP32 if cdtype is Dtype.BF16 or not master else cdtype)
    if master and cfg.optimizer in (OptimizerKind.ADAMW, OptimizerKind.ADAMW_BF16) \
            and cfg.engine_config.use_precision_aware_optimizer:
        states = mopt.adam_moment_bytes(cfg, numel)
    expert = _expert_numel(ctx) if dist else 0

    def shard(nbytes: int) -> tuple[int, ZeroStage | None]:
        """(bytes, shard_from): pre-sharded per rank when experts shard over their own group."""
        if not dist:
            return nbytes, None
        if not expert:
            return nbytes, DP_SHARDED
        return mopt.sharded_bytes(nbytes, numel=numel, expert_numel=expert, dp=cfg.dp,
                                  edp=mopt.expert_data_parallel(cfg)), None

    out = [StateBuffer("gradients/main_grad_buffer", bits_to_bytes(numel, grad_dtype.bits), None, Tier.GPU,
                       MEGATRON, f"contiguous {grad_dtype.value} gradient buffer (param_and_grad_buffer.py)")]
    if master and grad_dtype is not FP32:
        out.append(StateBuffer("gradients/fp32_main_grads", *shard(bits_to_bytes(numel, FP32.bits)), Tier.GPU,
                               MEGATRON, "fp32 copy of the 16-bit gradients for the optimizer (fp16)"))
    if master:
        bits = mopt.main_param_bits(cfg, cdtype)
        note = "fp32 main params" + (" as 16-bit remainders" if bits != FP32.bits else "")
        out.append(StateBuffer("optimizer/master_fp32", *shard(bits_to_bytes(numel, bits)), Tier.GPU, MEGATRON,
                               note + (" (distributed optimizer shard)" if dist else "")))
    for name, nbytes in states:
        out.append(StateBuffer(name, *shard(nbytes), Tier.GPU, f"{cfg.optimizer.value} states; " + MEGATRON))
    return out


def _expert_numel(ctx: Context) -> int:
    """Trainable routed-expert elements on one rank of the reported stage (after tp/ep division)."""
    from memplan.arch.parallel import sharded_numel
    from memplan.memory.model_states import trainable_tensors

    cfg = ctx.cfg
    return sum(sharded_numel(t, cfg.tp, cfg.ep) for t in trainable_tensors(ctx) if t.routed)


def autocast_rows(ctx: Context) -> list[Row]:
    """pytorch AMP: autocast's 16-bit copies of the matmul weights.

    Formula: bits(compute dtype)/8 · (elements of the stage's matmul weights), alive in forward and backward.
    Source: torch/amp/autocast_mode.py (``cache_enabled=True``: each weight is cast once per autocast region and
    the cast copy is saved by its matmul for backward). Only when pytorch runs AMP over fp32 parameters.
    """
    if ctx.cfg.effective_engine is not Engine.PYTORCH or param_dtype(ctx) is not FP32 or not mixed(ctx):
        return []
    nbytes = bits_to_bytes(matmul_numel(ctx), compute_dtype(ctx).bits)
    return [Row("weights/autocast_copies", Tier.GPU, nbytes, TORCH_AMP,
                f"{compute_dtype(ctx).value} copies of the matmul weights during forward/backward")]


def fp8_rows(ctx: Context) -> list[Row]:
    """fp8 training (``perf.fp8`` or ``dtype: fp8``): the engine's fp8 copies of the matmul weights beside the
    16-bit weights, with their lifetime (``memory.fp8_weights``: TE's cached workspace under megatron, TE's saved
    weights under deepspeed/accelerate, torchao's per-GEMM cast under fsdp2/pytorch).

    Under DeepSpeed's pipeline each in-flight micro-batch saved its own copies (``arch.parallel.
    in_flight_micro_batches``: min(p − s, m) under its 1F1B ``TrainSchedule``).
    Assumptions: the saved activations' fp8 copies are ``memory.te_fp8`` (megatron; torchao saves 16-bit inputs).
    """
    from memplan.arch.parallel import in_flight_micro_batches

    cfg = ctx.cfg
    flight = in_flight_micro_batches(cfg.pp, ctx.stage, cfg.perf.virtual_stages, cfg.grad_accum) if cfg.pp > 1 else 1
    return fp8_weights.rows(list(ctx.tensors), cfg, in_flight=flight)


def state_dtype(ctx: Context) -> Dtype:
    """The optimizer states' dtype under the engine's precision policy (fp32 with masters or fp32 params)."""
    cfg = ctx.cfg
    return opt.state_dtype(optimizer=cfg.optimizer, weight_dtype=compute_dtype(ctx), master_weights=mixed(ctx))
