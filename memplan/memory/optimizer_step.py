"""The optimizer step's temporaries: bytes torch.optim.AdamW allocates during ``step()`` beyond its states.

They are alive in the optimizer-step phase only (registry ``optimizer/step_temporaries``), next to the
states and the gradients, after the saved activations are gone. Which implementation runs is
``JobConfig.optimizer_impl``: torch picks ``foreach`` on CUDA when neither ``foreach`` nor ``fused`` is
given (torch/optim/optimizer.py ``_default_to_fused_or_foreach``: foreach only when every tensor is on a
native CUDA device), ``for-loop`` on CPU.
"""

from __future__ import annotations

from memplan.arch.tensors import Architecture
from memplan.config import Engine, Job, OptimizerImpl, OptimizerKind
from memplan.memory.breakdown import Row, Tier
from memplan.memory.context import Context
from memplan.units import bits_to_bytes

FOR_LOOP_TEMPORARIES = 2
"""``_single_tensor_adam`` (torch/optim/adam.py): ``denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)``
holds two state-sized temporaries of the tensor being updated (the sqrt, then the quotient) before the
in-place ``add_``; one tensor at a time."""
FOREACH_TEMPORARIES = 1
"""``_multi_tensor_adam`` (torch/optim/adam.py): ``exp_avg_sq_sqrt = torch._foreach_sqrt(device_exp_avg_sqs)``
copies every second moment of the (device, dtype) group at once; the following ``_foreach_div_``/``_foreach_add_``
work in place on that copy, and AdamW's decay (``_foreach_mul_``) is in place."""
SOURCE = {
    OptimizerImpl.FOR_LOOP: "torch/optim/adam.py _single_tensor_adam: sqrt and quotient of one tensor (2 × largest)",
    OptimizerImpl.FOREACH: "torch/optim/adam.py _multi_tensor_adam: torch._foreach_sqrt(exp_avg_sqs) (1 × v)",
    OptimizerImpl.FUSED: "torch/optim/adam.py _fused_adam: torch._fused_adamw_, one in-place kernel (no temporaries)",
}
TORCH_ADAM = (OptimizerKind.ADAMW, OptimizerKind.ADAMW_BF16)


def for_loop_temp_bytes(*, largest_numel: int, state_bits: int) -> int:
    """Bytes of the for-loop AdamW step's temporaries: 2 · largest tensor · state bits / 8.

    Source: torch/optim/adam.py ``_single_tensor_adam`` (see ``FOR_LOOP_TEMPORARIES``).
    Assumes: no amsgrad, not capturable, no maximize.
    """
    return FOR_LOOP_TEMPORARIES * bits_to_bytes(largest_numel, state_bits)


def foreach_temp_bytes(*, second_moment_bytes: int) -> int:
    """Bytes of the foreach AdamW step's temporaries: one more copy of every second moment on the device.

    Source: torch/optim/adam.py ``_multi_tensor_adam`` (see ``FOREACH_TEMPORARIES``).
    Assumes: one param group (or groups stepped one after another; the largest group counts then), no amsgrad.
    """
    return FOREACH_TEMPORARIES * second_moment_bytes


def fused_temp_bytes() -> int:
    """Bytes of the fused AdamW step's temporaries: 0 (``torch._fused_adamw_`` updates m, v and the
    parameter in one kernel; torch/optim/adam.py ``_fused_adam``)."""
    return 0


def largest_update_numel(arch: Architecture) -> int:
    """Elements of the largest parameter tensor the optimizer updates in one piece.

    transformers >= 5 stores each MoE layer's routed experts as fused 3-D parameters (``gate_up_proj``
    of E·2F·D, ``down_proj`` of E·D·F), so the routed tensors of a layer count together by kind.
    """
    largest = 0
    for tensors in [arch.pre, arch.post, *[layer.tensors for layer in arch.layers]]:
        fused = {"gate_up": 0, "down": 0}
        for t in tensors:
            if t.routed:
                fused["down" if "down" in t.projections else "gate_up"] += t.numel
            else:
                largest = max(largest, t.numel)
        largest = max(largest, *fused.values())
    return largest


def _largest_and_bits(ctx: Context) -> tuple[int, int]:
    """(largest trainable tensor's elements on this GPU, bits of its AdamW states)."""
    from memplan.memory import optimizer as opt
    from memplan.memory import peft

    cfg = ctx.cfg
    if cfg.job in (Job.LORA, Job.QLORA):
        tensors = peft.lora_tensors(ctx.arch, cfg.lora)
        return max((t.numel for t in tensors), default=0), peft.adapter_state_dtype(cfg).bits
    sdtype = opt.state_dtype(optimizer=cfg.optimizer, weight_dtype=cfg.dtype, master_weights=cfg.uses_master_weights)
    return largest_update_numel(ctx.arch) // cfg.tp, sdtype.bits


def temp_bytes(ctx: Context, *, second_moment_bytes: int) -> int:
    """The step temporaries of ``ctx``'s optimizer on the GPU that holds ``second_moment_bytes`` of AdamW v.

    Formula: torch AdamW only (adamw, adamw-bf16) with v on this GPU: for-loop 2 · min(largest tensor, v) ·
    state bits/8; foreach 1 · v; fused 0. Other optimizers: 0 (bitsandbytes 8-bit and paged AdamW, SGD with
    or without momentum update in place; Adafactor and Lion not modelled here). QLoRA: 0, its AdamW is
    bitsandbytes' ``paged_adamw_32bit`` (QLoRA's qlora.py default, see ``peft.adapter_state_dtype``), whose
    ``optimizer_update_32bit`` kernel updates m, v and the parameter in place (bitsandbytes/functional.py).
    Assumes: the largest tensor is split evenly by tensor parallelism; with ZeRO a rank's v is a shard.
    """
    cfg = ctx.cfg
    # fsdp_qlora train.py and torchtune's QLoRA step torch.optim.AdamW, not bitsandbytes' paged AdamW
    bnb_paged = cfg.job is Job.QLORA and cfg.effective_engine not in (Engine.FSDP1, Engine.FSDP2)
    if cfg.optimizer not in TORCH_ADAM or not second_moment_bytes or bnb_paged:
        return 0
    if cfg.effective_optimizer_impl is OptimizerImpl.FUSED:
        return fused_temp_bytes()
    if cfg.effective_optimizer_impl is OptimizerImpl.FOREACH:
        return foreach_temp_bytes(second_moment_bytes=second_moment_bytes)
    largest, bits = _largest_and_bits(ctx)
    return min(for_loop_temp_bytes(largest_numel=largest, state_bits=bits), FOR_LOOP_TEMPORARIES * second_moment_bytes)


def rows(ctx: Context, state_rows: list[Row]) -> list[Row]:
    """``optimizer/step_temporaries`` on the GPU (alive in the optimizer step only), from the AdamW second
    moments the GPU holds in ``state_rows``; none when the GPU holds none (optimizer offloaded: DeepSpeedCPUAdam
    updates in place in C++)."""
    v = sum(r.bytes for r in state_rows if r.tier is Tier.GPU and r.component == "optimizer/adam_v")
    n = temp_bytes(ctx, second_moment_bytes=v)
    if not n:
        return []
    impl = ctx.cfg.effective_optimizer_impl
    return [Row("optimizer/step_temporaries", Tier.GPU, n, SOURCE[impl], f"{impl.value} AdamW (optimizer_impl)")]
