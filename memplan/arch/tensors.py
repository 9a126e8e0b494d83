"""The tensors of a model: one record per parameter tensor of the Hugging Face module tree.

Every memory component reads this one structure: weights and quantization per tensor,
LoRA and GaLore per targeted matrix, ZeRO-3's largest layer, MoE's routed experts.
Like nanoGPT's sizing notebook, the breakdown is slash-keyed and sums to the real count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property

from memplan.catalog.schema import ModelSpec


class Role(StrEnum):
    EMBEDDING = "embedding"        # token embedding table (V x D)
    POSITION = "position"          # learned position embeddings
    LM_HEAD = "lm_head"            # output projection (absent when tied)
    LINEAR = "linear"              # a weight matrix of a linear layer (quantizable, LoRA-targetable)
    BIAS = "bias"
    NORM = "norm"
    ROUTER = "router"              # MoE gate / router weight (kept in 16-bit by quantizers)
    OTHER = "other"


PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
"""Abstract projection names; fused HF modules (GPT-2 c_attn, Phi-3 qkv_proj) map to several."""


@dataclass(frozen=True, slots=True)
class Tensor:
    """One parameter tensor (or ``copies`` identical ones, e.g. a layer's routed experts).

    ``shape`` is (out_features, in_features) for linear weights, as ``nn.Linear`` stores it.
    ``projections`` names the abstract projections a linear weight implements.
    """

    name: str
    shape: tuple[int, ...]
    role: Role
    projections: frozenset[str] = frozenset()
    copies: int = 1
    routed: bool = False

    @property
    def numel_each(self) -> int:
        return math.prod(self.shape)

    @property
    def numel(self) -> int:
        return self.numel_each * self.copies

    @property
    def module(self) -> str:
        """The HF module path holding this tensor (name without ``.weight``/``.bias``)."""
        return self.name.rsplit(".", 1)[0]


@dataclass(frozen=True, slots=True)
class Layer:
    """One transformer block: its tensors, whether it routes to experts, its attention span."""

    tensors: tuple[Tensor, ...]
    moe: bool = False
    sliding: bool = False
    experts_per_token: int = 0

    @property
    def params(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def active_params(self) -> int:
        """Parameters one token touches: routed experts count only top-k of their copies."""
        total = 0
        for t in self.tensors:
            if t.routed:
                total += t.numel_each * min(self.experts_per_token, t.copies)
            else:
                total += t.numel
        return total


@dataclass(frozen=True)
class Architecture:
    """All parameter tensors of a model: before the blocks, the blocks, after the blocks.

    ``extra`` holds modules outside the main forward pass, e.g. DeepSeek-V3's multi-token
    prediction block, which is resident in memory when loaded.
    """

    spec: ModelSpec
    pre: tuple[Tensor, ...]
    layers: tuple[Layer, ...]
    post: tuple[Tensor, ...]
    extra: tuple[Tensor, ...] = field(default=())

    def all_tensors(self) -> list[Tensor]:
        out = list(self.pre)
        for layer in self.layers:
            out.extend(layer.tensors)
        out.extend(self.post)
        out.extend(self.extra)
        return out

    @cached_property
    def params(self) -> int:
        return (
            sum(t.numel for t in self.pre)
            + sum(layer.params for layer in self.layers)
            + sum(t.numel for t in self.post)
            + sum(t.numel for t in self.extra)
        )

    @cached_property
    def active_params(self) -> int:
        """Parameters used per token (MoE: top-k routed experts), excluding ``extra``."""
        return (
            sum(t.numel for t in self.pre if t.role is not Role.EMBEDDING and t.role is not Role.POSITION)
            + sum(layer.active_params for layer in self.layers)
            + sum(t.numel for t in self.post)
        )

    @cached_property
    def largest_layer_params(self) -> int:
        """Largest single module gathered at once (ZeRO-3's live parameters): a block or the embeddings."""
        if self.spec.largest_layer_params:
            return self.spec.largest_layer_params
        candidates = [t.numel for t in self.pre + self.post]
        candidates += [layer.params for layer in self.layers]
        return max(candidates) if candidates else self.params

    def breakdown(self) -> dict[str, int]:
        """Slash-keyed parameter counts (``layers/self_attn.q_proj.weight``) that sum to ``params``."""
        out: dict[str, int] = {}
        for prefix, tensors in (("pre", self.pre), ("post", self.post), ("extra", self.extra)):
            for t in tensors:
                out[f"{prefix}/{t.name}"] = out.get(f"{prefix}/{t.name}", 0) + t.numel
        for layer in self.layers:
            for t in layer.tensors:
                key = f"layers/{t.name}"
                out[key] = out.get(key, 0) + t.numel
        return out
