"""The feed-forward half of a block: dense MLP, mixture of experts, and the hidden dropout masks.

Like ``activations_block`` (the attention half), each function decides per family which
``activations_terms`` occur; sources are the transformers 5.x ``modeling_<family>.py`` files and
``integrations/moe.py``.
"""

from __future__ import annotations

from memplan.arch.tensors import Layer
from memplan.catalog.schema import Family, ModelSpec
from memplan.config import JobConfig
from memplan.memory import activations_terms as t
from memplan.memory.activations_block import Counting, Dims, Term, Trainable
from memplan.units import ceil_div

ACT_SAVED = {
    "gelu": 1, "gelu_pytorch_tanh": 1, "silu": 1, "swish": 1, "relu2": 1,
    "quick_gelu": 2, "gelu_python": 3, "gelu_new": 4, "gelu_accurate": 4, "gelu_fast": 7,
    "relu": 0, "tanh": 0, "sigmoid": 0,
}
"""F-wide tensors an activation saves besides its output, for transformers ``ACT2FN`` names: fused
kernels save their input (1), ReLU/tanh/sigmoid their output (0), Python formulas their intermediates.
Measured with ``memplan.measure.saved`` on transformers 5.x; other names count as 1."""
ACT_KEEPS_OUTPUT = frozenset({"relu", "tanh", "sigmoid"})
"""Activations whose backward reads their own output, so it is saved even when the next weight is frozen."""
HIDDEN_DROPOUTS = {Family.GPT2: 2, Family.OPT: 2, Family.PHI3: 2, Family.FALCON: 1}
"""Hidden-wide dropouts per block: after attention and after the MLP (GPT-2 resid_dropout, OPT
dropout, Phi-3 resid_*_dropout); Falcon's parallel block has one (hidden_dropout)."""
MOE_WEIGHTS_FP32 = frozenset({Family.MIXTRAL, Family.DEEPSEEK})
"""Routers whose top-k weights stay fp32 (Mixtral, DeepSeek-V3); Qwen3-MoE casts them to the dtype."""
SHARED_EXPERT_GATE = frozenset({Family.QWEN2_MOE})
"""``F.sigmoid(shared_expert_gate(x)) * shared_expert(x)`` (``Qwen2MoeSparseMoeBlock``): the product saves the
shared expert's output (B·S·D) and the sigmoid's (B·S·1), which its own backward also reads."""
NOT_GATED = frozenset({Family.GPT2, Family.OPT, Family.FALCON})


def _act(spec: ModelSpec, counting: Counting) -> tuple[int, bool]:
    """(F-wide tensors the activation saves besides its output, whether it keeps its output)."""
    if counting.paper:
        return 1, False  # Korthikanti et al. 2022 count a GeLU's input (8sbh) and output (8sbh)
    return ACT_SAVED.get(spec.hidden_act, 1), spec.hidden_act in ACT_KEEPS_OUTPUT


FUSED_GATED_SAVED = 2
"""F-wide tensors a fused gated activation saves: its input, the gate and up halves (2F)."""


def fused_gated_mlp_bytes(*, tokens: int, ffn: int, bits: int, down_trains: bool = True) -> int:
    """Bytes of a gated MLP's intermediates under the paper's rule (each activation its input only), the
    gated product taken as one fused activation: its 2F input, plus the F-wide down-projection input.

    Formula: b/8·tokens·F·(2 + 1 if down's weight trains). Source: Megatron-Core ``fusions/fused_bias_swiglu.py``
    (``SwiGLUFunction.forward`` saves its input only; its output is ``linear_fc2``'s saved input) and
    TransformerEngine ``LayerNormMLP`` (saves fc1's output and the activation's output), the layout the
    megatron engine's ``paper`` accounting stands for; Korthikanti et al. 2022 Sec. 4.1 count a GeLU's input.
    """
    factors = FUSED_GATED_SAVED + (1 if down_trains else 0)
    return factors * t.tensor_bytes(count=tokens * ffn, bits=bits)


def _gated(spec: ModelSpec) -> bool:
    """Whether the model's MLPs (and experts) are gated (gate · act(up))."""
    return spec.mlp_gated and spec.family not in NOT_GATED


def _dense(spec: ModelSpec, *, tokens: int, ffn: int, bits: int, gated: bool, counting: Counting,
           down_trains: bool) -> int:
    if counting.paper and gated:
        return fused_gated_mlp_bytes(tokens=tokens, ffn=ffn, bits=bits, down_trains=down_trains)
    saved, keeps = _act(spec, counting)
    return t.mlp_bytes(tokens=tokens, ffn=ffn, bits=bits, gated=gated, act_saved=saved, down_trains=down_trains,
                       act_keeps_output=keeps)


def _moe_terms(spec: ModelSpec, layer: Layer, dm: Dims, counting: Counting, tr: Trainable) -> list[Term]:
    """Router, routed experts (top-k copies of each token) and DeepSeek's shared experts."""
    experts, top_k = spec.num_experts or 0, layer.experts_per_token or spec.num_experts_per_tok or 0
    ffn = ceil_div(spec.moe_intermediate_size or spec.intermediate_size or 0, dm.tp)
    fam = spec.family
    router = t.moe_router_bytes(tokens=dm.seq_tokens, experts=experts, top_k=top_k, normalized=True)
    if fam is Family.DEEPSEEK:  # F.linear(x.float(), weight.float()): fp32 copies of input and weight
        if dm.bits != t.FP32_BITS:
            router += t.tensor_bytes(count=experts * dm.d, bits=t.FP32_BITS)
            if tr.trains("router"):
                router += t.tensor_bytes(count=dm.seq_tokens * dm.d, bits=t.FP32_BITS)
        router += t.tensor_bytes(count=dm.seq_tokens * experts, bits=t.BOOL_BITS)  # group-limited routing mask
    weight_bits = t.FP32_BITS if fam in MOE_WEIGHTS_FP32 else dm.bits
    routed = t.moe_experts_bytes(pairs=dm.seq_tokens * top_k, hidden=dm.d, ffn=ffn, experts=experts, bits=dm.bits,
                                 weight_bits=weight_bits, up_trains=tr.routed_trains("gate", "up"),
                                 down_trains=tr.routed_trains("down"), fused_act=counting.paper and _gated(spec))
    terms = [Term("moe/router", 0 if counting.paper else router), Term("moe/experts", routed)]
    if spec.n_shared_experts:
        full = spec.shared_expert_intermediate_size or (
            (spec.moe_intermediate_size or spec.intermediate_size or 0) * spec.n_shared_experts)
        shared = _dense(spec, tokens=dm.tokens, ffn=ceil_div(full, dm.tp), bits=dm.bits, gated=True,
                        counting=counting, down_trains=tr.trains("down"))
        if fam in SHARED_EXPERT_GATE and not counting.paper:  # sigmoid(gate(x)) * shared(x): both saved
            shared += t.tensor_bytes(count=dm.tokens * (dm.d + 1), bits=dm.bits)
        terms.append(Term("moe/shared", shared))
    return terms


def mlp_terms(spec: ModelSpec, layer: Layer, dm: Dims, counting: Counting, tr: Trainable) -> list[Term]:
    """The MLP's (or MoE's) saved tensors after its input."""
    if layer.moe:
        return _moe_terms(spec, layer, dm, counting, tr)
    gated = spec.mlp_gated and spec.family not in NOT_GATED
    if spec.parallel_attn and not tr.grad_path("gate", "up", "down"):
        return [Term("mlp", 0)]  # block 0 of a parallel block: the MLP reads the norm of an input without grad
    return [Term("mlp", _dense(spec, tokens=dm.tokens, ffn=dm.f, bits=dm.bits, gated=gated, counting=counting,
                               down_trains=tr.trains("down")))]


def dropout_terms(spec: ModelSpec, cfg: JobConfig, dm: Dims, counting: Counting) -> list[Term]:
    """Hidden-wide dropout masks of the block (attention-probability dropout is in the scores)."""
    sites = HIDDEN_DROPOUTS.get(spec.family, 0) if cfg.dropout else 0
    if not sites:
        return []
    return [Term("dropout", sites * t.dropout_bytes(count=dm.seq_tokens * dm.d, mask_bits=counting.mask_bits))]


def adapter_terms(dm: Dims, tr: Trainable, counting: Counting) -> list[Term]:
    """LoRA: per adapted module, lora_A's input when it is a cast copy, and the r-wide lora_A output.

    Formula: B·S·(in + r)·a/8 per module with a cast copy, B·S·r·a/8 otherwise (a: adapter bits).
    Source: Hu et al. 2021 Sec. 4.1 (h = W x + B A x); peft ``lora.Linear.forward``: ``x`` is cast to
    the adapter weights' dtype (``_cast_input_dtype``; a new tensor per module when the adapters are
    fp32, peft's ``autocast_adapter_dtype`` default), lora_A saves it, lora_B saves A's output.
    With ``lora_dropout`` > 0 the saved copy is the dropout's output, plus its mask (``dropout_bytes``; on CPU a
    noise tensor in the dropout input's dtype, the adapters' after ``_cast_input_dtype``).
    """
    mask_bits = tr.adapter_bits if counting.cpu else counting.mask_bits
    total = sum(t.tensor_bytes(count=dm.tokens * (width + rank), bits=tr.adapter_bits) for width, rank in tr.adapters)
    total += t.dropout_bytes(count=dm.tokens * tr.adapter_mask_width, mask_bits=mask_bits)
    terms = [Term("lora", total)] if total else []
    if tr.merged_weight_bytes:
        terms.append(Term("lora/merged_weights", tr.merged_weight_bytes))
    return terms
