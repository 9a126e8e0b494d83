"""Reserved memory the CUDA caching allocator holds in segments that the start of backward cannot use.

PyTorch's caching allocator (c10/cuda/CUDACachingAllocator.cpp) serves a request from one cached free block at least
as large (``get_free_block``: best fit, ``pool.blocks.lower_bound``); a block never spans two segments (blocks merge
only with free neighbours of their own segment, ``try_merge_blocks``); a request that finds no such block gets a new
segment sized by ``get_allocation_size``; segments go back to the driver only on ``empty_cache`` or after a failed
``cudaMalloc``. So a segment made for a smaller tensor stays reserved, unused, while a later, larger tensor takes a
segment of its own. At the start of backward of a 16-bit causal-LM step whose loss runs in fp32, every request of
the loss chain is an fp32 B·(S−1)·V or B·S·V tensor (transformers ``logits.float()``, ``shift_logits.contiguous()``,
``log_softmax``, ``nll_loss_backward``, ``_log_softmax_backward_data``, ``slice_backward``), and two kinds of cached
segments are smaller than all of them:

- the 16-bit lm_head output's own segment (B·S·V·2 bytes), made before any fp32 logits exist and reused by the next
  step's lm_head output, free from ``logits.float()`` until ``ToCopyBackward`` returns the 16-bit gradient
  (``logits16_segment_bytes``);
- with activation checkpointing, the segments of one block's forward working set: the block runs under
  ``no_grad`` and frees every intermediate into the cache, each intermediate at most B·S·F wide
  (``layer_segments_bytes``).

``backward_start_stranded`` adds them; ``memory.components`` makes the allocator reserve at least the reserved bytes
this gives at the start of backward (``reserved_floor``). That is ``torch.cuda.max_memory_reserved`` on a GPU with room
to spare. Near the capacity it is conservative: a wholly free segment is released when a ``cudaMalloc`` fails
(``release_cached_blocks``, then the allocation is retried), so only the free parts of segments still in use can
make a step run out of memory. Pure integer arithmetic, no torch (``backward_start_stranded`` reads the context).
"""

from __future__ import annotations

from memplan.memory.context import Context
from memplan.units import MiB, ceil_div, round_up

K_MIN_BLOCK_SIZE = 512
"""``kMinBlockSize``: every request is rounded up to a multiple of 512 bytes (``round_size``)."""
K_SMALL_SIZE = 1 * MiB
"""``kSmallSize``: requests up to 1 MiB go to the small pool."""
K_SMALL_BUFFER = 2 * MiB
"""``kSmallBuffer``: a small-pool segment."""
K_LARGE_BUFFER = 20 * MiB
"""``kLargeBuffer``: the segment of a request between 1 MiB and ``kMinLargeAlloc``."""
K_MIN_LARGE_ALLOC = 10 * MiB
"""``kMinLargeAlloc``: from here a request gets a segment of its own size, rounded up to ``kRoundLarge``."""
K_ROUND_LARGE = 2 * MiB
"""``kRoundLarge``: the rounding of a large segment."""
SRC = ("c10/cuda/CUDACachingAllocator.cpp (round_size, get_allocation_size, get_free_block best fit, "
       "try_merge_blocks within one segment); transformers 4.38 LlamaForCausalLM.forward (logits.float(), "
       "shift_logits.contiguous(), CrossEntropyLoss)")


def round_size(nbytes: int) -> int:
    """Bytes the allocator books for a request of ``nbytes``: max(512, ⌈n/512⌉·512) (``round_size``, without the
    optional power-of-two divisions, which are off by default)."""
    return max(K_MIN_BLOCK_SIZE, round_up(nbytes, K_MIN_BLOCK_SIZE))


def segment_bytes(nbytes: int) -> int:
    """Bytes of the segment ``cudaMalloc``'d for a request of ``nbytes`` that finds no cached block.

    Formula (``get_allocation_size``): r = ``round_size(n)``; 2 MiB if r ≤ 1 MiB; 20 MiB if r < 10 MiB; else r rounded
    up to a multiple of 2 MiB.
    """
    rounded = round_size(nbytes)
    if rounded <= K_SMALL_SIZE:
        return K_SMALL_BUFFER
    if rounded < K_MIN_LARGE_ALLOC:
        return K_LARGE_BUFFER
    return round_up(rounded, K_ROUND_LARGE)


def holds(segment: int, request: int) -> bool:
    """Whether a segment of ``segment`` bytes, wholly free, can serve a request of ``request`` bytes (one block never
    spans two segments, so a request needs one segment at least ``round_size(request)`` large)."""
    return round_size(request) <= segment


def loss_chain_smallest(*, batch: int, seq: int, vocab: int) -> int:
    """Bytes of the smallest request of the fp32 loss chain: the shifted logits, 4·B·(S−1)·V (the unshifted fp32
    logits and ``slice_backward``'s gradient are 4·B·S·V)."""
    return 4 * batch * max(seq - 1, 1) * vocab


def logits16_segment_bytes(*, batch: int, seq: int, vocab: int, bits: int) -> int:
    """Bytes of the 16-bit lm_head output's segment left unused by the fp32 loss chain at the start of backward.

    Formula: ``segment_bytes``(B·S·V·bits/8) when that segment cannot hold ``loss_chain_smallest``, else 0 (fp32
    logits: no upcast, the chain reuses it). Source: module docstring.
    Assumption: the lm_head output is the first tensor of its size in the step, so it gets (and in later steps
    reuses) a segment of its own size.
    """
    if bits >= 32:
        return 0
    segment = segment_bytes(ceil_div(batch * seq * vocab * bits, 8))
    return 0 if holds(segment, loss_chain_smallest(batch=batch, seq=seq, vocab=vocab)) else segment


def layer_segments_bytes(*, working_set: int, largest: int, chain_smallest: int) -> int:
    """Bytes of one checkpointed block's forward working set, cached in segments too small for the loss chain.

    Formula: ``working_set`` when ``segment_bytes(largest)`` cannot hold ``chain_smallest``, else 0 (the chain may
    reuse them). ``working_set`` is the block's no-grad forward peak beyond its input (the caller's estimate),
    ``largest`` its widest intermediate.
    Source: module docstring (a block run under ``no_grad`` frees every intermediate; segments are made per
    request and never merged).
    """
    return working_set if not holds(segment_bytes(largest), chain_smallest) else 0


def reserved_floor(*, allocated_at_phase: int, allocated_peak: int, stranded: int) -> int:
    """The allocator reserve that makes the reserved peak at least the reserved bytes of one phase.

    Formula: max(0, A_phase + stranded − A_peak): max_memory_reserved ≥ allocated + stranded at that phase, and
    memplan's reserved answer is A_peak + reserve.
    """
    return max(0, allocated_at_phase + stranded - allocated_peak)


def backward_start_stranded(ctx: Context) -> int:
    """Bytes of cached segments the start of backward cannot use, on the reported stage (0 where it does not apply).

    Formula: ``logits16_segment_bytes`` + [full recompute on any block] ``layer_segments_bytes`` with the block's
    working set B·S·(D + 3F)·b/8 (``inference.mlp_workspace_bytes``, gated: the normed input and gate, up, act·up of the
    MLP, a lower bound of the LoRA block's, whose adapters add their own B·S·F outputs) and its widest tensor B·S·F·b/8.
    Applies to a training job's last stage whose loss runs in fp32 over 16-bit logits (``loss_fp32``) in the
    transformers 4.37-4.40 layouts (``transformers_version``: ``LlamaForCausalLM.forward`` returns ``logits.float()``,
    so the 16-bit logits are freed before the chain). Current transformers keep the 16-bit logits in the model output
    and upcast inside ``ForCausalLMLoss``: not covered yet (the floor is not a share of the allocated bytes, which the
    ILP and the vectorized sweep, ``memplan.vector``, assume of the reserve).
    """
    from memplan.config import Engine, Recompute
    from memplan.memory import activations
    from memplan.memory import activations_block as blk
    from memplan.memory.inference import mlp_workspace_bytes

    cfg = ctx.cfg
    if (not cfg.job.trains or not ctx.holds_output or not cfg.loss_fp32 or cfg.transformers_version is None
            or cfg.effective_engine is Engine.MEGATRON or not activations.modelled(ctx)
            or cfg.effective_activation_accounting == "paper"):
        return 0
    dm = blk.dims(ctx.arch.spec, cfg)
    vocab = ceil_div(ctx.arch.spec.vocab_size or 0, cfg.tp)
    total = logits16_segment_bytes(batch=dm.b, seq=dm.s, vocab=vocab, bits=dm.bits)
    if any(mode is Recompute.FULL for mode in activations.layer_modes(ctx).values()) and dm.f:
        work = mlp_workspace_bytes(batch=dm.b, tokens=dm.s, ffn=dm.f, hidden=dm.d, bits=dm.bits,
                                   gated=ctx.arch.spec.mlp_gated)
        total += layer_segments_bytes(working_set=work, largest=ceil_div(dm.tokens * dm.f * dm.bits, 8),
                                      chain_smallest=loss_chain_smallest(batch=dm.b, seq=dm.s, vocab=vocab))
    return total


def stream_pool_bytes(requests: list[int]) -> int:
    """Bytes a stream's pool keeps for ``requests`` alive at once and freed together: Σ ``round_size`` (small requests
    pack into shared 2 MiB segments, large ones into segments of their own rounded size), the least it reserves.
    A block is reused only by requests of the stream it was allocated on (``get_free_block`` compares
    ``stream`` in its ``BlockPool`` key), so these bytes serve no other stream's tensors."""
    return sum(round_size(n) for n in requests)
