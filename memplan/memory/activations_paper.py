"""Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models":
the closed forms of Table 2 and Sec. 4.3, as reference values for the term-by-term model.

In the paper's symbols s sequence, b micro-batch, h hidden, a heads, t tensor-parallel size
(memplan's S, B, D, N, tp). All values in bytes, 16-bit activations and 1-byte dropout masks,
for a GPT-3 style block (LayerNorm, 4h GeLU MLP, dropout, attention without a fused kernel).
"""

from __future__ import annotations

from memplan.config import Recompute
from memplan.units import ceil_div

ATTENTION_SBH = 11
"""Sec. 4.1 attention block: QKV input 2 + Q,K 4 + V 2 + projection input 2 + dropout mask 1 (×sbh)."""
MLP_SBH = 19
"""Sec. 4.1 MLP: input 2 + GeLU input 8 + GeLU output 8 + dropout mask 1 (×sbh)."""
LAYERNORM_SBH = 4
"""Sec. 4.1: two LayerNorms, each storing its 16-bit input (2sbh)."""
LAYER_SBH = ATTENTION_SBH + MLP_SBH + LAYERNORM_SBH
"""34: the sbh coefficient of Eq. 1, sbh(34 + 5as/h)."""
SCORES_AS2B = 5
"""Sec. 4.1: softmax output 2as²b + dropout mask as²b + dropout output 2as²b."""
REPLICATED_SBH = 10
"""Sec. 4.2.1: parts not split by tensor parallelism: LayerNorm inputs 4, QKV and MLP inputs 4,
the two dropout masks 2 (×sbh)."""
FULL_RECOMPUTE_SBH = 2
"""Table 2, full activation recompute: the 16-bit layer input, 2sbh."""


def korthikanti_layer_bytes(*, s: int, b: int, h: int, a: int, t: int = 1, sequence_parallel: bool = False,
                            recompute: Recompute = Recompute.NONE) -> int:
    """Activation bytes of one transformer layer, a row of Korthikanti et al. 2022 Table 2.

    Formula (paper symbols): none: sbh(34 + 5as/h); tensor parallel: sbh(10 + 24/t + 5as/(ht));
    tensor + sequence parallel: sbh/t (34 + 5as/h); selective recompute: sbh(10 + 24/t), with sequence
    parallelism 34sbh/t; full recompute: 2sbh (2sbh/t with sequence parallelism, which the table omits).
    Source: Korthikanti et al. 2022, Table 2 and Eq. 1-4. Divisions by t round up.
    """
    sbh, scores = s * b * h, SCORES_AS2B * a * s * s * b
    if recompute is Recompute.FULL:
        full = FULL_RECOMPUTE_SBH * sbh
        return ceil_div(full, t) if sequence_parallel else full
    if recompute is Recompute.SELECTIVE:
        scores = 0
    if sequence_parallel:
        return ceil_div(LAYER_SBH * sbh + scores, t)
    split = (LAYER_SBH - REPLICATED_SBH) * sbh + scores
    return REPLICATED_SBH * sbh + ceil_div(split, t)


def korthikanti_output_bytes(*, s: int, b: int, h: int, v: int, t: int = 1) -> int:
    """Bytes of the output layer on the last stage: 4sbh/t·(1 + v/h) = 4sbh/t + 4sbv/t.

    Formula: final LayerNorm input 2sbh/t + output-projection input 2sbh/t + fp32 logits for the
    cross-entropy 4sbv/t. Source: Korthikanti et al. 2022 Sec. 4.3 (with sequence parallelism).
    """
    return ceil_div(4 * s * b * h, t) + ceil_div(4 * s * b * v, t)


def korthikanti_embedding_bytes(*, s: int, b: int, h: int, p: int = 1, t: int = 1) -> int:
    """Bytes of the embedding dropout masks on the first stage: sbhp/t (p micro-batches in flight).

    Source: Korthikanti et al. 2022 Sec. 4.3.
    """
    return ceil_div(s * b * h * p, t)
