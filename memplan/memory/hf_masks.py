"""The attention masks a transformers model's forward builds once and keeps through its whole layer loop.

Read in transformers 5.20.2 (``masking_utils.py``, ``models/<family>/modeling_<family>.py``). The model's forward
builds its masks before the loop (``causal_mask_mapping``, or one ``causal_mask``) and passes them to every layer, so
each mask it builds is alive in every layer's attention and MLP stage; it is freed when the forward returns, before
the logits. Which masks it builds:

- the sliding-window mask (``create_sliding_window_causal_mask``) when a layer slides, and always in the models of
  ``BOTH_MASKS``, whatever their layers use;
- the full-attention mask (``create_causal_mask``), except where the window applies to every layer without
  ``layer_types`` (``MistralModel`` / ``MixtralModel`` / ``Phi3Model`` / ``Qwen3MoeModel.forward``: ``mask_function =
  create_causal_mask if self.config.sliding_window is None else create_sliding_window_causal_mask``, one mask);
  models with ``layer_types`` (``Qwen2Model``: ``if self.has_sliding_layers``) build it next to the sliding one.

What a built mask is:

- eager (``masking_utils.eager_mask``): always materialised, ``torch.where(mask, 0, min)`` over the expanded
  (B, 1, T, S) shape, B·T·S in the compute dtype;
- SDPA (``masking_utils.sdpa_mask``): None (``is_causal``) where ``_ignore_causal_mask_sdpa`` allows it, else a
  (B, 1, T, S) bool tensor. The full mask is None in a prefill without padding (Falcon's ALiBi path passes
  ``allow_is_causal_skip=False``: always a mask); the sliding mask is never skipped once S reaches the window
  (``local_attention_size is not None and kv_length >= local_attention_size``);
- flash attention: no 4-D mask.

Assumptions: a mask per sequence (``generate`` passes an all-ones ``attention_mask``, which makes the mask (B, 1, T, S);
a bare forward without one broadcasts a (1, 1, T, S) mask over the batch, so this over-counts it), and a prefill of
the whole prompt (T = S; a chunked prefill with T < S also materialises the SDPA full mask, not counted here).
"""

from __future__ import annotations

from collections.abc import Iterable

from memplan.arch.tensors import Layer
from memplan.catalog.schema import Family, ModelSpec
from memplan.units import bits_to_bytes

BOOL_BITS = 8
BOTH_MASKS = frozenset({Family.GEMMA2, Family.GEMMA3, Family.QWEN2_MOE})
"""Models whose forward builds the full and the sliding mask whatever their layers use (``Gemma2Model.forward``,
``Gemma3TextModel.forward``, ``Qwen2MoeModel.forward``: ``causal_mask_mapping``). ``Qwen2MoeConfig`` sets
``sliding_window = 0`` unless ``use_sliding_window``, and a window of 0 is never skipped: an unused bool mask."""
ALWAYS_FULL_SDPA_MASK = frozenset({Family.FALCON})
"""``FalconModel.forward``: ``create_causal_mask(..., allow_is_causal_skip=False)`` for its ALiBi bias."""


def built_masks(spec: ModelSpec, layers: Iterable[Layer]) -> tuple[bool, bool]:
    """(full, sliding): whether the model's forward builds each mask (module docstring)."""
    sliding = spec.family in BOTH_MASKS or any(layer.sliding for layer in layers)
    full = spec.family in BOTH_MASKS or spec.layer_types is not None or not sliding
    return full, sliding


def materialised_masks(spec: ModelSpec, layers: Iterable[Layer], impl: str, kv_tokens: int) -> int:
    """How many (B, 1, T, S) masks the forward keeps through its loop under ``impl`` (eager, sdpa, flash)."""
    full, sliding = built_masks(spec, layers)
    if impl == "eager":
        return int(full) + int(sliding)
    if impl != "sdpa":
        return 0
    window = spec.sliding_window if spec.sliding_window is not None else 0
    return int(full and spec.family in ALWAYS_FULL_SDPA_MASK) + int(sliding and window <= kv_tokens)


def loop_mask_bytes(spec: ModelSpec, layers: Iterable[Layer], *, impl: str, batch: int, tokens: int, kv_tokens: int,
                    bits: int) -> int:
    """Bytes of the masks alive through the whole layer loop: m·B·T·S × w/8, m = ``materialised_masks``, w the
    compute dtype's bits under eager (``eager_mask``), 8 under SDPA (a bool mask, ``sdpa_mask``)."""
    count = materialised_masks(spec, layers, impl, kv_tokens)
    width = bits if impl == "eager" else BOOL_BITS
    return bits_to_bytes(count * batch * tokens * kv_tokens, width)


def additive_mask_bytes(*, batch: int, tokens: int, kv_tokens: int, bits: int) -> int:
    """Bytes SDPA adds for a bool mask during one masked layer's call: B·T·S × bits/8, its additive copy
    (PyTorch ``convert_boolean_attn_mask``: ``where(mask, 0, -inf)`` in the query's dtype)."""
    return bits_to_bytes(batch * tokens * kv_tokens, bits)
