"""Which weights train in an adapter job, for the activation model (frozen weights save less).

In LoRA (Hu et al. 2021) the base weights are frozen: autograd saves a linear layer's input only for its
weight's gradient (PyTorch ``mm`` in derivatives.yaml), and a norm's normalized tensor only for its
weight's. What still trains is each adapter: its lora_A reads the base input (saved), its lora_B
the r-wide lora_A output (saved). Which modules get adapters is ``memplan.memory.peft``'s rule.

QLoRA (Dettmers et al. 2023) differs: bitsandbytes' 4-bit (and 8-bit) matmul keeps its input whenever the input
or the weight needs a gradient, frozen weight or not (bitsandbytes/autograd/_functions.py, ``MatMul4Bit.forward``:
``if any(ctx.needs_input_grad[:2]): ctx.tensors = (A, B)``), so every quantized linear of a block saves its input
as a trained one would (``quantized_inputs``).

MoE experts and routers are parameters, not ``nn.Linear`` modules: peft adapts them through
``target_parameters`` (``ParamWrapper``), which adds B·A to the weight in every forward, so the
merged weight (in the compute dtype) is a new tensor that the expert ``grouped_mm`` / router linear
saves, along with the adapters cast to the compute dtype. Measured with peft 0.21.
"""

from __future__ import annotations

from memplan.arch.parallel import sharded_numel
from memplan.arch.tensors import Layer, Role, Tensor
from memplan.config import Job, JobConfig, Recompute
from memplan.memory import litgpt, peft
from memplan.memory.activations_block import ALL_TRAIN, Trainable, activation_bits
from memplan.units import bits_to_bytes

ROUTER = "router"
"""Pseudo-projection of an MoE router (its tensor has no abstract projection)."""


def adapter_job(cfg: JobConfig) -> bool:
    return cfg.job in (Job.LORA, Job.QLORA)


def block_trainable(spec_family: object, layer: Layer, cfg: JobConfig, layer_index: int | None = None) -> Trainable:
    """The block's trained projections and LoRA modules; every weight trains outside adapter jobs.

    An adapter whose dtype is the activations' reads the base input itself (saved once, like a
    trained weight's input); fp32 adapters on a 16-bit model get their own fp32 copy of it. With
    ``lora.dropout`` > 0 every adapted module saves its own dropout output (peft ``lora.Linear.forward``:
    ``lora_A(dropout(x))``, one ``nn.Dropout`` per module in ``lora_dropout[adapter]``) and its mask.
    The first block's input does not require grad (``first_block_input_grad``).
    """
    if not adapter_job(cfg):
        return ALL_TRAIN
    bits = cfg.lora.dtype.bits
    dropout = cfg.lora.dropout > 0  # lora_A then reads the dropout's output, a new tensor per module
    shared_input = bits == activation_bits(cfg) and not dropout
    fused_qkv = litgpt.applies(cfg)
    masks = 0
    dense: set[str] = set()
    routed: set[str] = set()
    adapters: list[tuple[int, int]] = []
    adapted: set[str] = set()
    merged = 0
    for tensor in layer.tensors:
        if not peft.is_targeted(tensor, cfg.lora, spec_family):  # type: ignore[arg-type]
            continue
        names = set(tensor.projections) | ({ROUTER} if tensor.role is Role.ROUTER else set())
        if tensor.routed or tensor.role is Role.ROUTER:  # peft ParamWrapper: W + B·A each forward
            routed |= names
            merged += _merged_bytes(tensor, cfg, adapter_cast=not shared_input)
            if tensor.role is Role.ROUTER:
                dense |= names  # the router linear now saves its input
            continue
        rank = peft.adapter_ranks(tensor, cfg.lora)[0]
        adapted |= names
        if shared_input:
            dense |= names
        if fused_qkv and names <= set(litgpt.QKV):
            continue  # litgpt's one LoRAQKVLinear adapter for q, k, v: activations._litgpt_adapter
        adapters.append((0 if shared_input else tensor.shape[1], rank))
        masks += tensor.shape[1] if dropout else 0
    input_grad = layer_index != 0 or first_block_input_grad(cfg)
    quantized = quantized_inputs(layer, cfg, layer_index)
    if not input_grad:  # MatMul4Bit keeps A only when an input needs a gradient: not the block's own normed input
        quantized -= set(litgpt.QKV)
    dense |= quantized
    return Trainable(norms=False, dense=frozenset(dense), routed=frozenset(routed), adapters=tuple(adapters),
                     adapter_bits=bits, merged_weight_bytes=merged, adapter_mask_width=masks,
                     input_grad=input_grad, adapted=frozenset(adapted))


def first_block_input_grad(cfg: JobConfig) -> bool:
    """Whether the first block's input requires grad in an adapter job: not when the embedding is frozen and
    nothing asks for it, so a frozen norm over it, and in a parallel block an adapter-less MLP, save nothing.

    Source: autograd saves an op's inputs only when the op records a backward node (some input requires grad);
    peft ``PeftModel.__init__`` calls ``enable_input_require_grads`` only for k-bit or gradient-checkpointed
    models (``_prepare_model_for_gradient_checkpointing``), as ``prepare_model_for_kbit_training`` does for QLoRA.
    Measured (peft 0.21): Phi's block 0 saves neither its input_layernorm nor its MLP, Llama's no input_layernorm.
    Assumes: plain LoRA without recompute; QLoRA (unless litgpt's layout, which never enables input gradients:
    ``memory.litgpt``) or any recompute keeps the conservative count.
    """
    no_recompute = cfg.recompute is Recompute.NONE and all(m is Recompute.NONE for m in cfg.recompute_map or ())
    peft_lora = cfg.job is Job.LORA or (cfg.job is Job.QLORA and litgpt.applies(cfg))  # litgpt: never asked for
    return not peft_lora or not no_recompute or cfg.effective_activation_accounting == "paper"


def quantized_inputs(layer: Layer, cfg: JobConfig, layer_index: int | None = None) -> set[str]:
    """Projections of the block whose input a bitsandbytes 4-bit linear keeps for backward (QLoRA): every
    dense linear that bitsandbytes quantizes (not MoE experts, which are fused parameters, not ``nn.Linear``).

    Source: bitsandbytes/autograd/_functions.py ``MatMul4Bit.forward`` saves ``ctx.tensors = (A, B)`` when
    ``any(ctx.needs_input_grad[:2])``: with adapters upstream (or ``enable_input_require_grads``, which
    peft's ``prepare_model_for_kbit_training`` sets) the hidden states require grad, so A is kept.
    The 8-bit ``MatMul8bitLt.forward`` does the same (``ctx.tensors = (CAt, subA, A)``; CAt only when the weight
    needs a gradient, subA only for outlier columns).
    From bitsandbytes 0.43.2 the 4-bit matmul keeps ``(None, B)`` (``JobConfig.bnb_version``,
    ``bnb_workspace.matmul4bit_keeps_input``): nothing, then.
    Assumes: the layer's format (``weights.layer_format``: the per-layer map, else the job's) is a bitsandbytes
    one; GPTQ/AWQ kernels are not covered here.
    """
    from memplan.memory.bnb_workspace import INT8, matmul4bit_keeps_input
    from memplan.memory.quant import Library, get_format
    from memplan.memory.weights import layer_format

    fmt = layer_format(cfg, layer_index) if cfg.job is Job.QLORA else None
    if fmt is None or get_format(fmt).library is not Library.BITSANDBYTES:
        return set()
    if fmt != INT8 and not matmul4bit_keeps_input(cfg):  # bitsandbytes >= 0.43.2: ctx.tensors = (None, B)
        return set()
    return {p for t in layer.tensors if t.role is Role.LINEAR and len(t.shape) == 2 and not t.routed
            for p in t.projections}


def _merged_bytes(tensor: Tensor, cfg: JobConfig, *, adapter_cast: bool) -> int:
    """One rank's share of a merged MoE weight (experts split over ep, ffn over tp) in the compute
    dtype; with fp32 adapters also their compute-dtype cast (experts only: the router's was not seen)."""
    bits = activation_bits(cfg)
    total = bits_to_bytes(sharded_numel(tensor, cfg.tp, cfg.ep), bits)
    if adapter_cast and tensor.routed:
        total += sum(bits_to_bytes(sharded_numel(a, 1, cfg.ep), bits) for a in peft.module_adapters(tensor, cfg.lora))
    return total


def head_trains(cfg: JobConfig) -> bool:
    """Whether the embedding, final norm and output layer train (never in adapter jobs: peft's
    ``all-linear`` leaves the output layer out)."""
    return not adapter_job(cfg)
