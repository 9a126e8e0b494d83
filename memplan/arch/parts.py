"""Building blocks of parameter tensors shared by the family layouts (``build``, ``build_families``):
linear weights with optional biases, norms, attention projections, gated MLPs, routers.

Shapes are (out_features, in_features) for every linear weight, as ``nn.Linear`` stores it.
"""

from __future__ import annotations

from memplan.arch.tensors import Role, Tensor
from memplan.catalog.schema import ModelSpec
from memplan.errors import MemplanError

Tensors = list[Tensor]


def _weight(name: str, out_f: int, in_f: int, projections: set[str], *, bias: bool = False,
            copies: int = 1, routed: bool = False) -> Tensors:
    """A linear layer's weight (out, in) and, if ``bias``, its bias (out,)."""
    out = [Tensor(f"{name}.weight", (out_f, in_f), Role.LINEAR, frozenset(projections), copies, routed)]
    if bias:
        out.append(Tensor(f"{name}.bias", (out_f,), Role.BIAS, copies=copies, routed=routed))
    return out


def _norm(name: str, dim: int, *, bias: bool = False) -> Tensors:
    """An RMSNorm (weight) or LayerNorm (weight and bias) over ``dim`` features."""
    out = [Tensor(f"{name}.weight", (dim,), Role.NORM)]
    if bias:
        out.append(Tensor(f"{name}.bias", (dim,), Role.NORM))
    return out


def _need(spec: ModelSpec, field: str) -> int:
    value = getattr(spec, field)
    if value is None:
        raise MemplanError(f"model {spec.name!r} (family {spec.family}) needs {field} to build its tensors.")
    return int(value)


def _dims(spec: ModelSpec) -> tuple[int, int, int, int]:
    """(D hidden, N*H query width, K*H key/value width, F ffn)."""
    h = spec.dim_per_head
    ffn = spec.intermediate_size or 0
    return _need(spec, "hidden_size"), _need(spec, "num_attention_heads") * h, spec.kv_heads * h, ffn


def _attention(spec: ModelSpec, *, qkv_bias: bool, o_bias: bool, prefix: str = "self_attn",
               o_name: str = "o_proj") -> Tensors:
    d, q, kv, _ = _dims(spec)
    return [*_weight(f"{prefix}.q_proj", q, d, {"q"}, bias=qkv_bias),
            *_weight(f"{prefix}.k_proj", kv, d, {"k"}, bias=qkv_bias),
            *_weight(f"{prefix}.v_proj", kv, d, {"v"}, bias=qkv_bias),
            *_weight(f"{prefix}.{o_name}", d, q, {"o"}, bias=o_bias)]


def _gated_mlp(prefix: str, d: int, f: int, *, bias: bool = False, names: tuple[str, str, str] = (
        "gate_proj", "up_proj", "down_proj"), copies: int = 1, routed: bool = False) -> Tensors:
    gate, up, down = names
    return [*_weight(f"{prefix}.{gate}", f, d, {"gate"}, bias=bias, copies=copies, routed=routed),
            *_weight(f"{prefix}.{up}", f, d, {"up"}, bias=bias, copies=copies, routed=routed),
            *_weight(f"{prefix}.{down}", d, f, {"down"}, bias=bias, copies=copies, routed=routed)]


def _qk_norms(spec: ModelSpec) -> Tensors:
    h = spec.dim_per_head
    return [*_norm("self_attn.q_norm", h), *_norm("self_attn.k_norm", h)] if spec.qk_norm else []


def _pre_post_norms(d: int) -> Tensors:
    return [*_norm("input_layernorm", d), *_norm("post_attention_layernorm", d)]


def _router(prefix: str, spec: ModelSpec) -> Tensors:
    return [Tensor(f"{prefix}.gate.weight", (_need(spec, "num_experts"), _need(spec, "hidden_size")), Role.ROUTER)]
