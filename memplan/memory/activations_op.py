"""Op-level selective activation checkpointing: save matmul outputs, recompute the cheap ops.

torchtitan's ``op`` policy (torchtitan/distributed/activation_checkpoint.py, ``_apply_op_sac`` and its
``_custom_policy``; earlier torchtitan/parallelisms/parallelize_llama.py) wraps each block in
``torch.utils.checkpoint`` with ``create_selective_checkpoint_contexts``: outputs of the ops in its save list
(``aten.mm``, ``aten._scaled_dot_product_flash_attention`` / ``_efficient_attention``, ``reduce_scatter``) are
kept (``CheckpointPolicy.MUST_SAVE``), except that "only every other mm" is saved: the policy counts the block's
``mm`` calls and saves an ``mm`` output when the count is odd (the 1st, 3rd, ...). Everything else (norms,
rotary, activations, the other matmuls) is recomputed in backward, one block at a time.

This is not Megatron's selective recompute (drop the attention core, ``Recompute.SELECTIVE``); it saves far
more than full recompute and far less than none.
"""

from __future__ import annotations

from memplan.arch.tensors import Layer, Role, Tensor
from memplan.memory import activations_block as blk
from memplan.memory import activations_terms as t
from memplan.memory.context import Context

MM_SAVE_PERIOD = 2
"""torchtitan saves the output of every other ``aten.mm`` of a block (``mm_count % 2 == 0`` is recomputed)."""
ROW_PARALLEL = frozenset({"o", "down"})
"""Projections whose output is hidden-wide on each tensor-parallel rank (row-parallel, before the all-reduce)."""
LSE_BITS = 32
"""Flash/efficient attention's saved log-sum-exp: fp32, one per query row and head."""


def block_mms(layer: Layer) -> list[Tensor]:
    """The block's weights that run as ``aten.mm`` in forward order: bias-free dense linears and the router
    (a linear with a bias runs ``aten.addmm``, routed experts ``grouped_mm``: neither is in the save list)."""
    biased = {x.module for x in layer.tensors if x.name.endswith(".bias")}
    return [x for x in layer.tensors if x.role in (Role.LINEAR, Role.ROUTER) and len(x.shape) == 2
            and not x.routed and x.module not in biased]


def saved_mms(layer: Layer) -> list[Tensor]:
    """The mms whose outputs the policy keeps: the 1st, 3rd, 5th, ... of the block."""
    return [x for n, x in enumerate(block_mms(layer), start=1) if n % MM_SAVE_PERIOD]


def _out_width(x: Tensor, tp: int) -> int:
    width = x.shape[0]
    return width if x.projections & ROW_PARALLEL else -(-width // tp)


def op_layer_bytes(ctx: Context, layer_index: int) -> int:
    """Bytes one block keeps for one micro-batch under op-level selective recompute.

    Formula: the block input b/8·B·S·D (the checkpoint's input) + Σ over saved mms of b/8·B·S·out + with flash or
    SDPA attention its output b/8·B·S·n·h and fp32 log-sum-exp 4·B·n·S (n heads, h head dim per rank).
    Source: torchtitan/distributed/activation_checkpoint.py (module docstring); PyTorch
    ``torch/utils/checkpoint.py`` ``create_selective_checkpoint_contexts`` (MUST_SAVE outputs are stored, the
    rest recomputed). Assumes: the layout's linears run as ``aten.mm`` (bias-free) in the order listed;
    full-weight training (LoRA adapters' mms would shift the count); eager attention's ``bmm`` is recomputed.
    """
    spec, cfg = ctx.arch.spec, ctx.cfg
    dm = blk.dims(spec, cfg)
    layer = ctx.arch.layers[layer_index]
    total = blk.block_input_bytes(spec, cfg)
    total += sum(t.tensor_bytes(count=dm.tokens * _out_width(x, cfg.tp), bits=dm.bits) for x in saved_mms(layer))
    if blk.attention_impl(spec, cfg) in ("flash", "sdpa"):
        total += t.tensor_bytes(count=dm.tokens * dm.n * dm.h, bits=dm.bits)
        total += t.tensor_bytes(count=dm.tokens * dm.n, bits=LSE_BITS)
    return total


def recomputed_mm_numel(layer: Layer, tp: int) -> int:
    """Weight elements (per rank) of the mms the policy recomputes in backward: the 2nd, 4th, ... of the block."""
    return sum(x.numel // tp for n, x in enumerate(block_mms(layer), start=1) if not n % MM_SAVE_PERIOD)
