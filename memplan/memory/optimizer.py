"""Optimizer states: which buffers each optimizer keeps, and their bytes.

Each optimizer is described by the state buffers it allocates per trainable tensor; the
bytes are summed over tensors (some states depend on a tensor's shape: Adafactor's factored
second moment, bitsandbytes' per-block statistics and its 32-bit fallback for small tensors).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from memplan.arch.tensors import Tensor
from memplan.config import OptimizerKind
from memplan.dtypes import Dtype
from memplan.units import bits_to_bytes, ceil_div

BNB_BLOCKSIZE = 256
"""Elements per quantization block of bitsandbytes' block-wise 8-bit optimizer states
(bitsandbytes/optim/optimizer.py, ``Optimizer2State.init_state``: ``blocks = ceil(n / 256)``)."""

BNB_MIN_8BIT_SIZE = 4096
"""bitsandbytes keeps 32-bit states for tensors with fewer elements (``min_8bit_size=4096``)."""

ABSMAX_BITS = 32
"""Each bitsandbytes block stores one fp32 absmax per state (``absmax1``, ``absmax2``)."""


def adam_state_bytes(*, numel: int, state_dtype: Dtype) -> int:
    """Bytes of Adam/AdamW's two moments (exp_avg m, exp_avg_sq v) for ``numel`` parameters.

    Formula: 2 · P · bits(state_dtype) / 8.
    Source: Kingma & Ba 2015, Algorithm 1; ZeRO (Rajbhandari et al. 2020) Sec. 3.1 counts
    them as 4 + 4 bytes of K = 12 in mixed precision.
    Assumptions: one m and one v per parameter, no amsgrad (amsgrad adds a third).
    """
    return 2 * bits_to_bytes(numel, state_dtype.bits)


def one_state_bytes(*, numel: int, state_dtype: Dtype) -> int:
    """Bytes of a single per-parameter state (SGD momentum buffer, Lion's exp_avg).

    Formula: P · bits(state_dtype) / 8.
    Source: Chen et al. 2023 (Lion, "only keeps track of the momentum"); torch.optim.SGD.
    """
    return bits_to_bytes(numel, state_dtype.bits)


def adam8bit_state_bytes(*, numel: int) -> int:
    """Bytes of bitsandbytes' block-wise 8-bit Adam states for one tensor of ``numel`` elements.

    Formula: n ≥ 4096: 2 · (n · 1 + ceil(n / 256) · 4); n < 4096: 2 · n · 4 (32-bit fallback).
    Source: Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization", Sec. 2;
    bitsandbytes/optim/optimizer.py ``Optimizer2State.init_state`` (uint8 state1/state2,
    fp32 absmax1/absmax2 per 256-element block, ``min_8bit_size=4096``).
    Assumptions: the two 256-entry quantization maps (qmap) are shared per optimizer, not per tensor.
    """
    if numel < BNB_MIN_8BIT_SIZE:
        return adam_state_bytes(numel=numel, state_dtype=Dtype.FP32)
    blocks = ceil_div(numel, BNB_BLOCKSIZE)
    return 2 * (numel + bits_to_bytes(blocks, ABSMAX_BITS))


def adafactor_state_bytes(*, shape: Sequence[int], copies: int = 1) -> int:
    """Bytes of Adafactor's factored second moment for one tensor (no first moment).

    Formula: a matrix of shape (..., R, C) keeps a row vector R and a column vector C in fp32
    (times the leading dimensions); a vector keeps a full fp32 second moment.
    Source: Shazeer & Stern 2018, "Adafactor", Algorithm 4; transformers' ``Adafactor``
    (``exp_avg_sq_row``, ``exp_avg_sq_col``; ``beta1=None`` by default, so no exp_avg).
    """
    if len(shape) >= 2:
        lead = 1
        for d in shape[:-2]:
            lead *= d
        elems = lead * (shape[-2] + shape[-1])
    else:
        elems = shape[0] if shape else 1
    return bits_to_bytes(elems * copies, Dtype.FP32.bits)


def state_dtype(*, optimizer: OptimizerKind, weight_dtype: Dtype, master_weights: bool) -> Dtype:
    """The dtype of full-precision optimizer states.

    fp32 when the optimizer updates an fp32 master copy (mixed precision) or the weights are
    fp32; otherwise the weights' own dtype, because ``torch.optim`` allocates states with
    ``torch.zeros_like(p)``. ``adamw-bf16`` forces the weights' 16-bit dtype (pure bf16, as GaLore's
    accounting assumes).
    """
    if optimizer is OptimizerKind.ADAMW_BF16:
        return weight_dtype if weight_dtype.is_16bit else Dtype.BF16
    if master_weights or weight_dtype is Dtype.FP32:
        return Dtype.FP32
    return weight_dtype


def state_rows(
    *, optimizer: OptimizerKind, tensors: Iterable[Tensor], sdtype: Dtype
) -> list[tuple[str, int]]:
    """(component, bytes) of the optimizer's state buffers over ``tensors``, before sharding."""
    tensors = list(tensors)
    numel = sum(t.numel for t in tensors)
    if optimizer in (OptimizerKind.ADAMW, OptimizerKind.ADAMW_BF16):
        half = adam_state_bytes(numel=numel, state_dtype=sdtype) // 2
        return [("optimizer/adam_m", half), ("optimizer/adam_v", half)]
    if optimizer is OptimizerKind.ADAMW_8BIT:
        total = sum(adam8bit_state_bytes(numel=t.numel_each) * t.copies for t in tensors)
        return [("optimizer/adam8bit_states", total)]
    if optimizer is OptimizerKind.ADAFACTOR:
        total = sum(adafactor_state_bytes(shape=t.shape, copies=t.copies) for t in tensors)
        return [("optimizer/adafactor_factored_v", total)]
    if optimizer is OptimizerKind.SGD_MOMENTUM:
        return [("optimizer/momentum", one_state_bytes(numel=numel, state_dtype=sdtype))]
    if optimizer is OptimizerKind.LION:
        return [("optimizer/lion_momentum", one_state_bytes(numel=numel, state_dtype=sdtype))]
    return []
