"""Saved activations of deepspeed + fp8 (TransformerEngine through accelerate) in an MoE block: the quantized copies
te.Linear saves beside the 16-bit tensors the Hugging Face modules keep.

accelerate's ``convert_model`` (accelerate/utils/transformer_engine.py) swaps every ``nn.Linear`` whose dims are
multiples of 16 for ``te.Linear`` (``memory.fp8_weights.accelerate_tensors``); each ``_Linear.forward``
(transformer_engine/pytorch/module/linear.py) saves its input quantized, column-wise only (``saved_inputmat``:
``fp8_tensor_bytes``, delayed recipe: accelerate's default ``DelayedScaling``), where ``nn.Linear`` saved the 16-bit
input itself. The block's 16-bit terms count each Linear input once in 16 bits. What changes, per micro-batch:

- every Linear reading the attention norm's output (q, k, v: three; MLA's q_a and kv_a: two; a fused qkv: one)
  saves its own copy and the 16-bit norm output is no longer kept by them: readers · fp8(T·D) − 16-bit(T·D);
- o_proj saves a copy of the attention output, which SDPA / flash attention keep for their own backward: + fp8(T·N·H);
- in an MoE block the post-attention norm output stays saved in 16 bits by the grouped experts (transformers 5:
  ``grouped_mm`` parameters, not ``nn.Linear``), so the router and the shared experts' gate and up projections, all
  te.Linear, each save a copy beside it: + fp8(T·D) per such Linear;
- the shared experts' down projection saves 1 byte of its F-wide input in place of 2 (−T·F_s): not subtracted.

Returns only the MoE block's terms: a dense block's 16-bit count is an over-count (``memory.te_fp8``'s docstring:
B·S·(2D − F) ≤ 0 for every catalog gated MLP) and is left as is. Assumptions: every weight trains; the router is an
``nn.Linear`` (counted where its dims are multiples of 16: the safe side); the 16-bit count keeps the shared down
projection's 16-bit input (not subtracted: over by T·F_s bytes), and an eager attention's o_proj input is its own
contiguous copy (the +T·N·H copy is then an over-count by the 16-bit bytes it replaces). transformers 4.x
``nn.ModuleList`` experts (each an ``nn.Linear``, converted too) are not modelled.
"""

from __future__ import annotations

from memplan.arch.tensors import Layer, Role
from memplan.catalog.schema import ModelSpec
from memplan.config import Engine, JobConfig
from memplan.memory import activations_terms as t
from memplan.memory.activations_block import Dims, Term
from memplan.memory.fp8_weights import accelerate_tensors
from memplan.memory.te_fp8 import fp8_tensor_bytes, fp8_training

RECIPE = "delayed"
"""accelerate's default TE recipe (``te_recipe.DelayedScaling``, accelerate/utils/transformer_engine.py)."""
QKV = frozenset({"q", "k", "v"})
GATE_UP = frozenset({"gate", "up"})


def applies(cfg: JobConfig) -> bool:
    """deepspeed with fp8 GEMMs: TransformerEngine swapped in by accelerate."""
    return cfg.effective_engine is Engine.DEEPSPEED and fp8_training(cfg)


def _copy(count: int) -> int:
    return fp8_tensor_bytes(count=count, recipe=RECIPE)


def block_terms(spec: ModelSpec, layer: Layer, cfg: JobConfig, dm: Dims) -> list[Term]:
    """Signed differences TE's saved inputs make to one MoE block's 16-bit saved bytes (one micro-batch, one rank);
    [] for a dense block or without deepspeed + fp8. Formula: the module docstring."""
    if not applies(cfg) or not layer.moe:
        return []
    swapped = accelerate_tensors(list(layer.tensors))
    converted = [tensor for tensor in swapped if tensor.shape[-1] == dm.d]
    hidden, out = dm.tokens * dm.d, []
    readers = sum(1 for tensor in converted if tensor.projections & QKV)
    if readers:  # nn.Linear q/k/v (none swapped) keep the 16-bit norm output: no change
        out.append(Term("fp8/accelerate_qkv_input", readers * _copy(hidden)
                        - t.tensor_bytes(count=hidden, bits=dm.bits)))
    out += [Term("fp8/accelerate_o_input", _copy(dm.tokens * tensor.shape[-1]))
            for tensor in swapped if "o" in tensor.projections]
    beside = sum(1 for tensor in converted if tensor.role is Role.ROUTER or tensor.projections & GATE_UP)
    out.append(Term("fp8/accelerate_router_shared_input", beside * _copy(hidden)))
    return [term for term in out if term.bytes]
