"""Megatron-Core's distributed optimizer under expert parallelism, and its precision-aware optimizer's dtypes.

Sources: megatron/core/parallel_state.py ``initialize_model_parallel`` (the expert mesh: expert data-parallel
size = world / (expert_tensor_parallel · ep · pp), expert_tensor_parallel defaulting to tp);
megatron/core/optimizer/__init__.py (``get_megatron_optimizer`` builds one distributed optimizer over the dense
parameters with the data-parallel group and one over the expert parameters with the expert data-parallel group);
megatron/core/optimizer/optimizer_config.py (``use_precision_aware_optimizer``, ``exp_avg_dtype``,
``exp_avg_sq_dtype``, ``store_param_remainders``); TransformerEngine transformer_engine/pytorch/optimizers/
fused_adam.py (``FusedAdam(master_weight_dtype, exp_avg_dtype, exp_avg_sq_dtype, store_param_remainders)``).
"""

from __future__ import annotations

from memplan.config import JobConfig
from memplan.dtypes import Dtype
from memplan.units import bits_to_bytes, ceil_div

MOMENT_DTYPES = {"fp32": Dtype.FP32, "fp16": Dtype.FP16, "bf16": Dtype.BF16}
REMAINDER_BITS = 16
"""Bits of an fp32 main param that a bf16 param lacks (fp32 = bf16's 16 high bits + a 16-bit remainder)."""


def expert_data_parallel(cfg: JobConfig) -> int:
    """Ranks over which Megatron's distributed optimizer shards the routed experts' states: the expert
    data-parallel size world/(tp·ep·pp) = dp/ep (memplan's dp = world/(tp·pp) includes cp), at least 1.

    Source: parallel_state.py ``initialize_model_parallel`` (expert_tensor_parallel_size defaults to tp).
    """
    return max(1, cfg.dp // cfg.ep)


def sharded_bytes(nbytes: int, *, numel: int, expert_numel: int, dp: int, edp: int) -> int:
    """One rank's bytes of a distributed-optimizer buffer of ``nbytes`` over ``numel`` elements, of which
    ``expert_numel`` belong to routed experts: the dense part over dp ranks, the experts' over edp ranks.

    Formula: ceil((nbytes − E)/dp) + ceil(E/edp), E = ceil(nbytes · expert_numel / numel).
    Source: optimizer/__init__.py (separate distributed optimizers for dense and expert parameters, each
    sharding its buffers over its own data-parallel group); distrib_optimizer.py (shards rounded up).
    """
    if numel == 0:
        return 0
    expert = ceil_div(nbytes * expert_numel, numel)
    return ceil_div(nbytes - expert, dp) + ceil_div(expert, edp)


def moment_dtypes(cfg: JobConfig) -> tuple[Dtype, Dtype]:
    """(exp_avg, exp_avg_sq) dtypes: fp32 unless the precision-aware optimizer lowers them."""
    knobs = cfg.engine_config
    if not knobs.use_precision_aware_optimizer:
        return Dtype.FP32, Dtype.FP32
    return MOMENT_DTYPES[knobs.exp_avg_dtype], MOMENT_DTYPES[knobs.exp_avg_sq_dtype]


def adam_moment_bytes(cfg: JobConfig, numel: int) -> list[tuple[str, int]]:
    """(component, bytes) of AdamW's two moments over ``numel`` elements in their dtypes (before sharding).

    Formula: numel · (bits(exp_avg) + bits(exp_avg_sq))/8, one row each. Source: fused_adam.py (states
    allocated in ``exp_avg_dtype`` / ``exp_avg_sq_dtype``); DeepSeek-AI 2024, Sec. 3.3.3 ("We adopt BF16 for
    tracking the first and second moments in AdamW").
    """
    m, v = moment_dtypes(cfg)
    return [("optimizer/adam_m", bits_to_bytes(numel, m.bits)), ("optimizer/adam_v", bits_to_bytes(numel, v.bits))]


def main_param_bits(cfg: JobConfig, param_dtype: Dtype) -> int:
    """Bits per element of the fp32 main params: 32, or the 16-bit remainder beside the bf16 param when the
    precision-aware optimizer stores remainders (``store_param_remainders``, bf16 params only).

    Source: optimizer_config.py ``store_param_remainders`` ("store the 16-bit FP32 parameter remainders ...
    excluding the 16 bits shared with the BF16 parameters"); fused_adam.py (``store_param_remainders`` requires
    bf16 params with fp32 master weights).
    """
    knobs = cfg.engine_config
    if knobs.use_precision_aware_optimizer and knobs.store_param_remainders and param_dtype is Dtype.BF16:
        return REMAINDER_BITS
    return Dtype.FP32.bits
