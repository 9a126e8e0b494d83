"""Op-level selective activation checkpointing for measured runs: torchtitan's ``op`` policy on HF decoder layers.

torchtitan (torchtitan/distributed/activation_checkpoint.py, ``selective_ac_option = "op"``) wraps each block in
non-reentrant ``torch.utils.checkpoint`` with ``create_selective_checkpoint_contexts``; the same policy here lets
``memplan measure`` check ``memory.activations_op`` against a real step.
"""

from __future__ import annotations

from typing import Any

OP_SAVE = ("mm", "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
           "_scaled_dot_product_flash_attention_for_cpu")
"""torchtitan's op-level save list (torchtitan/distributed/activation_checkpoint.py): ``aten.mm`` and the fused
attention kernels; ``_scaled_dot_product_flash_attention_for_cpu`` is the CPU kernel of the same op, added here
so a CPU run keeps what a CUDA run keeps."""


def op_policy() -> Any:
    """A fresh torchtitan ``op`` policy: MUST_SAVE the outputs of the save list, except every other ``aten.mm``
    (the 2nd, 4th, ... of the block are recomputed); everything else PREFER_RECOMPUTE."""
    import torch
    from torch.utils.checkpoint import CheckpointPolicy

    save = {getattr(torch.ops.aten, name).default for name in OP_SAVE if hasattr(torch.ops.aten, name)}
    count = {"forward": 0, "recompute": 0}

    def policy(ctx: Any, func: Any, *args: Any, **kwargs: Any) -> Any:
        mode = "recompute" if ctx.is_recompute else "forward"
        if func is torch.ops.aten.mm.default:
            count[mode] += 1
        keep = func in save and not (func is torch.ops.aten.mm.default and count[mode] % 2 == 0)
        return CheckpointPolicy.MUST_SAVE if keep else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def op_checkpoint(model: Any) -> None:
    """Switch the checkpointed decoder layers to op-level selective checkpointing (``op_policy``), as torchtitan's
    ``selective_ac_option = "op"`` does: non-reentrant ``torch.utils.checkpoint`` with a selective context."""
    import functools

    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts
    from transformers.modeling_layers import GradientCheckpointingLayer

    def context() -> Any:
        return create_selective_checkpoint_contexts(op_policy())

    func = functools.partial(checkpoint, use_reentrant=False, context_fn=context)
    for block in model.modules():
        if isinstance(block, GradientCheckpointingLayer) and block.gradient_checkpointing:
            # torch types Module attributes as Tensor | Module (Module.__getattr__); transformers sets a callable here
            block._gradient_checkpointing_func = func  # type: ignore[assignment]
