"""fp8 copies of the matmul weights during fp8 training (``perf.fp8`` or ``dtype: fp8``), as each engine holds them.

Every fp8 engine keeps the 16/32-bit weights, masters and states of ``memory.engine_states`` and adds quantized
copies of the GEMM weights; which copies, and for how long, depends on the engine:

- megatron (TransformerEngine through Megatron-Core's TE layers): **persistent**. ``TELinear``,
  ``TELayerNormColumnParallelLinear`` and ``TEGroupedLinear`` pass ``is_first_microbatch`` (None only with
  ``--disable-parameter-transpose-cache``, default off: megatron/core/extensions/transformer_engine.py), so TE caches
  the quantized weight in the module's ``_fp8_workspaces["weight"]`` (transformer_engine/pytorch/module/linear.py
  ``Linear.forward``: ``cache_name = None if is_first_microbatch is None ... else "weight"``) and re-quantizes into it
  in place on the first micro-batch of each step: alive through the whole step. Training quantizes with row- and
  column-wise usage (``_linear_forward``: ``weight_quantizer.set_usage(rowwise=True, columnwise=is_grad_enabled
  ...)``). The routed experts (TEGroupedLinear, module/grouped_linear.py: the same caching) keep one quantized weight
  per local expert; the output layer (Megatron's own ColumnParallelLinear) and the router are not TE modules and keep
  none.
- deepspeed (TransformerEngine through accelerate: ``accelerate/utils/transformer_engine.py`` ``convert_model`` swaps
  every ``nn.Linear`` whose dims are multiples of 16 for ``te.Linear``; the Hugging Face experts are grouped
  parameters, not ``nn.Linear``, and stay 16-bit): **saved for backward**. accelerate calls ``forward`` without
  ``is_first_microbatch``, so nothing is cached, but ``_Linear`` saves the quantized weight (row- and column-wise) for
  its dgrad GEMM (``prepare_for_saving(saved_inputmat, weightmat, ...)``): each copy lives from its layer's forward to
  its backward, like the saved activations, so the whole stage's copies are alive when backward starts.
- fsdp2 / pytorch (torchao float8, ``torchao/float8/float8_linear.py`` ``matmul_with_hp_or_float8_args``): **transient,
  one GEMM at a time**. The weight is cast for each GEMM and the cast is dropped after it; ``save_for_backward`` keeps
  the high-precision ``weight_hp_t`` and backward casts again. At most one cast weight is alive: the largest.

Bytes of one quantized copy of an r × c weight (n = r·c elements), TransformerEngine's storage per recipe:
delayed / tensorwise (``Float8Tensor``, tensor/float8_tensor.py): ``_data`` n + ``_transpose`` n for column-wise
usage on TN-only GPUs (Hopper, Ada; ``is_non_tn_fp8_gemm_supported`` is true on Blackwell, which keeps no transpose:
counted anyway, an over-count of n there) + one fp32 ``scale_inv``: 2n + 4. mxfp8 (``MXFP8Tensor``): row- and
column-wise data, each with one E8M0 byte per 32 elements: 2·(n + ⌈n/32⌉). blockwise (``Float8BlockwiseQTensor``,
weights with ``w_block_scaling_dim = 2``: 128 × 128 blocks, common/recipe/__init__.py): 2n + 2·4·⌈r/128⌉·⌈c/128⌉.
torchao: one row-wise tensorwise cast, n + 4. The scale tensors' padding (to multiples of 4) is not counted.

Assumptions: the parameters stay 16-bit (Megatron's ``--fp8-param-gather`` / TE ``fp8_model_init``, where the
parameter itself is the quantized tensor, and torchao's ``enable_fsdp_float8_all_gather`` are not modelled); shapes
after tp are the full shape with the split dimension divided, rounded up (``arch.parallel.sharded_numel``).
"""

from __future__ import annotations

from memplan.arch.parallel import sharded_numel
from memplan.arch.tensors import Role, Tensor
from memplan.config import Engine, JobConfig
from memplan.memory.breakdown import TRAIN_PHASES, Phase, Row, Tier
from memplan.memory.te_fp8 import BLOCKWISE_BLOCK, MXFP8_BLOCK, fp8_training
from memplan.units import ceil_div

SCALE_BYTES = 4
"""One fp32 ``scale_inv`` (delayed, tensorwise, torchao tensorwise; a blockwise block's scale)."""
ACCELERATE_DIVISOR = 16
"""accelerate ``convert_model`` keeps an ``nn.Linear`` whose weight has a dim not a multiple of 16."""
ACCELERATE_ROLES = (Role.LINEAR, Role.LM_HEAD, Role.ROUTER)
SAVED = frozenset((Phase.FORWARD, Phase.BACKWARD_START, Phase.BACKWARD))
"""Phases of a copy saved for backward (the registry's phases of ``weights/fp8_copies``)."""
MEGATRON = "TransformerEngine module/linear.py _fp8_workspaces (Megatron-Core is_first_microbatch caching)"
DEEPSPEED = "accelerate utils/transformer_engine.py convert_model; TransformerEngine module/linear.py saved weightmat"
TORCHAO = "torchao/float8/float8_linear.py matmul_with_hp_or_float8_args (per-GEMM cast)"


def te_copy_bytes(*, rows: int, cols: int, recipe: str) -> int:
    """Bytes of TransformerEngine's quantized copy of one rows × cols weight with row- and column-wise usage.

    Formula (module docstring): delayed/tensorwise 2n + 4; mxfp8 2·(n + ⌈n/32⌉); blockwise
    2n + 8·⌈rows/128⌉·⌈cols/128⌉, with n = rows·cols.
    """
    n = rows * cols
    if recipe == "mxfp8":
        return 2 * (n + ceil_div(n, MXFP8_BLOCK))
    if recipe == "blockwise":
        return 2 * n + 2 * SCALE_BYTES * ceil_div(rows, BLOCKWISE_BLOCK) * ceil_div(cols, BLOCKWISE_BLOCK)
    return 2 * n + SCALE_BYTES


def _rank_shape(tensor: Tensor, tp: int) -> tuple[int, int]:
    """(rows, cols) of one copy on one tp rank: the elements ``sharded_numel`` keeps, over the input width."""
    cols = tensor.shape[-1]
    return ceil_div(sharded_numel(Tensor(tensor.name, tensor.shape, tensor.role), tp), cols), cols


def te_bytes(tensors: list[Tensor], cfg: JobConfig, recipe: str) -> int:
    """Sum of ``te_copy_bytes`` over ``tensors`` on one rank: each local copy (routed experts: ⌈copies/ep⌉) its own."""
    total = 0
    for tensor in tensors:
        rows, cols = _rank_shape(tensor, cfg.tp)
        copies = ceil_div(tensor.copies, cfg.ep) if tensor.routed else tensor.copies
        total += copies * te_copy_bytes(rows=rows, cols=cols, recipe=recipe)
    return total


def megatron_tensors(tensors: list[Tensor]) -> list[Tensor]:
    """The TE modules' weights under Megatron-Core: every linear weight (dense, attention, experts), no output layer."""
    return [t for t in tensors if t.role is Role.LINEAR and len(t.shape) == 2]


def accelerate_tensors(tensors: list[Tensor]) -> list[Tensor]:
    """The ``nn.Linear`` weights accelerate swaps for ``te.Linear``: linear, lm_head and router weights (a router is
    an ``nn.Linear`` in some Hugging Face MoE modules: counted, the safe side) with both dims multiples of 16, without
    the Hugging Face grouped expert parameters."""
    return [t for t in tensors if t.role in ACCELERATE_ROLES and len(t.shape) == 2 and not t.routed
            and all(d % ACCELERATE_DIVISOR == 0 for d in t.shape)]


def torchao_bytes(tensors: list[Tensor], cfg: JobConfig) -> int:
    """The largest single cast torchao holds: max over the matmul weights of n + 4 (n: the rank's elements of the
    GEMM's weight, all local experts of a grouped GEMM)."""
    sizes = [sharded_numel(t, cfg.tp, cfg.ep) + SCALE_BYTES for t in tensors if t.role in (Role.LINEAR, Role.LM_HEAD)]
    return max(sizes, default=0)


def rows(tensors: list[Tensor], cfg: JobConfig, *, in_flight: int = 1) -> list[Row]:
    """``weights/fp8_copies`` of a training job with fp8 GEMMs on the reported stage's ``tensors``; [] otherwise.
    ``in_flight``: micro-batches whose forward ran and backward has not (a pipeline's): each saved its own copies
    under deepspeed (te.Linear quantizes the weight at every forward, nothing cached); megatron's cached workspace
    and torchao's per-GEMM cast do not grow with it."""
    if not fp8_training(cfg) or not cfg.job.trains:
        return []
    engine = cfg.effective_engine
    if engine is Engine.MEGATRON:
        nbytes = te_bytes(megatron_tensors(tensors), cfg, cfg.engine_config.fp8_recipe)
        return [Row("weights/fp8_copies", Tier.GPU, nbytes, MEGATRON,
                    f"TE's cached {cfg.engine_config.fp8_recipe} fp8 weights (row- and column-wise), whole step",
                    phases=frozenset(TRAIN_PHASES))] if nbytes else []
    if engine is Engine.DEEPSPEED:
        nbytes = in_flight * te_bytes(accelerate_tensors(tensors), cfg, "delayed")
        note = f"te.Linear's fp8 weights (row- and column-wise) saved for backward by {in_flight} micro-batch(es)"
        return [Row("weights/fp8_copies", Tier.GPU, nbytes, DEEPSPEED, note, phases=SAVED)] if nbytes else []
    nbytes = torchao_bytes(tensors, cfg)
    return [Row("weights/fp8_copies", Tier.GPU, nbytes, TORCHAO, "the largest weight's per-GEMM fp8 cast",
                phases=SAVED)] if nbytes else []
