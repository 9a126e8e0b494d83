"""vLLM's hybrid KV-cache manager: sliding-window layers hold only their window's blocks.

vLLM V1 groups the attention layers of a worker into KV-cache groups of equal size, one spec per group
(vllm/v1/core/kv_cache_utils.py ``_get_kv_cache_groups_uniform_page_size``): with F full-attention and S
sliding-window layers, the group size is min(F, S), or max(F, S) when max < 1.5 × min; each type fills
cdiv(count, group size) groups (the last one padded). The pool is ``group size`` tensors shared by one layer
of each group, so ``num_blocks = available // page_size // group_size`` (``get_kv_cache_config_from_groups``,
``get_num_blocks``), and every group takes its own blocks out of that one pool:

- a full-attention group: cdiv(S, block_size) blocks for a sequence of S tokens
  (``FullAttentionSpec.max_memory_usage_bytes``);
- a sliding-window group: cdiv(min(window − 1 + max_num_batched_tokens, S), block_size) + 1 blocks
  (``SlidingWindowSpec.max_memory_usage_bytes``: the last window − 1 computed tokens plus the step's new ones,
  one block more because the window need not start at a block boundary).

vLLM logs "GPU KV cache size" as num_blocks // len(groups) × block_size (``_report_kv_cache_config``) and the
maximum concurrency as num_blocks / the blocks one max_model_len request takes
(``get_max_concurrency_for_kv_cache_config``). A model without sliding layers is one group of all layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from memplan.memory.context import Context
from memplan.units import ceil_div

HYBRID_FROM = (0, 10, 0)
"""First release whose V1 engine ships the hybrid KV-cache manager by default (vLLM 0.10.0, July 2025); earlier
releases, and ``--disable-hybrid-kv-cache-manager``, page sliding layers like full ones
(``unify_hybrid_kv_cache_specs``), which memplan keeps for them (the safe side)."""
PAD_RATIO = Fraction(3, 2)
"""Group size is the larger layer count when it is below 1.5 × the smaller (``_get_kv_cache_groups_uniform_page_size``)."""


@dataclass(frozen=True)
class Groups:
    """The KV-cache groups of one worker: layers per group, full-attention and sliding-window groups, and the
    tokens a sliding group keeps (window − 1 + max_num_batched_tokens; 0 without sliding groups)."""

    size: int
    full: int
    sliding: int
    window_tokens: int

    @property
    def count(self) -> int:
        return self.full + self.sliding

    def blocks_per_sequence(self, tokens: int, block_size: int) -> int:
        """Blocks one sequence of ``tokens`` takes over all groups: full × cdiv(S, b) + sliding × (cdiv(min(W − 1 +
        T, S), b) + 1)."""
        window = ceil_div(min(self.window_tokens, tokens), block_size) + 1 if self.sliding else 0
        return self.full * ceil_div(tokens, block_size) + self.sliding * window


ONE_GROUP = Groups(size=1, full=1, sliding=0, window_tokens=0)
"""Every layer in one full-attention group (the default of ``vllm.Pool``; ``size`` is not read there)."""


def groups(ctx: Context, *, hybrid: bool, max_num_batched_tokens: int) -> Groups:
    """The worker's KV-cache groups: one group of all its layers unless ``hybrid`` and some layers slide."""
    layers = [layer for _, layer in ctx.layers]
    sliding = sum(1 for layer in layers if layer.sliding)
    full = len(layers) - sliding
    window = ctx.arch.spec.sliding_window
    if not hybrid or not sliding or window is None:
        return Groups(size=len(layers), full=1, sliding=0, window_tokens=0)
    tokens = window - 1 + max_num_batched_tokens
    if not full:
        return Groups(size=sliding, full=0, sliding=1, window_tokens=tokens)
    low, high = min(full, sliding), max(full, sliding)
    size = high if high < PAD_RATIO * low else low
    return Groups(size=size, full=ceil_div(full, size), sliding=ceil_div(sliding, size), window_tokens=tokens)


def longest_sequence(g: Groups, *, blocks: int, block_size: int, limit: int) -> int:
    """The longest sequence (≤ ``limit``) whose blocks over all groups fit in ``blocks``: a binary search on
    ``Groups.blocks_per_sequence``, which grows with the length; 0 when one token does not fit."""
    lo, hi = 0, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if g.blocks_per_sequence(mid, block_size) <= blocks:
            lo = mid
        else:
            hi = mid - 1
    return lo
