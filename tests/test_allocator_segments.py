"""The caching allocator's segment rules (c10/cuda/CUDACachingAllocator.cpp) and the segments the start of backward
cannot use; expectations are written out by hand from the allocator's constants and the tensors' shapes."""

from memplan.estimator import estimate
from memplan.memory import allocator_segments as seg
from memplan.memory.breakdown import Phase, Tier

MIB = 1024 * 1024


def test_segment_sizes_follow_the_allocator_rules():
    assert seg.round_size(1) == 512 and seg.round_size(513) == 1024
    assert seg.segment_bytes(100) == 2 * MIB  # small pool: kSmallBuffer
    assert seg.segment_bytes(1024 * 1024) == 2 * MIB  # exactly kSmallSize is still small
    assert seg.segment_bytes(1024 * 1024 + 1) == 20 * MIB  # 1-10 MiB: kLargeBuffer
    assert seg.segment_bytes(10 * MIB) == 10 * MIB  # from kMinLargeAlloc: own size
    assert seg.segment_bytes(10 * MIB + 1) == 12 * MIB  # rounded up to kRoundLarge


def test_the_shifted_fp32_logits_segment_holds_the_unshifted_gradient():
    # B=8, S=2048, V=32000: 4·B·(S-1)·V = 2,096,128,000 B rounds to 1000 × 2 MiB = 2,097,152,000 = 4·B·S·V
    shifted = 4 * 8 * 2047 * 32000
    assert seg.segment_bytes(shifted) == 1000 * 2 * MIB
    assert seg.holds(seg.segment_bytes(shifted), 4 * 8 * 2048 * 32000)


def test_the_bf16_logits_segment_is_stranded_under_an_fp32_loss():
    # bf16 lm_head output B=8, S=2048, V=32000: 2·8·2048·32000 = 1,048,576,000 B = 500 × 2 MiB, half the fp32 chain
    assert seg.logits16_segment_bytes(batch=8, seq=2048, vocab=32000, bits=16) == 500 * 2 * MIB
    assert seg.logits16_segment_bytes(batch=8, seq=2048, vocab=32000, bits=32) == 0  # no upcast, nothing stranded


def test_block_segments_count_only_when_smaller_than_the_chain():
    chain = 4 * 8 * 2047 * 32000
    mlp = 2 * 8 * 2048 * 11008  # Llama-2-7B gate output, 344 MiB
    assert seg.layer_segments_bytes(working_set=123, largest=mlp, chain_smallest=chain) == 123
    assert seg.layer_segments_bytes(working_set=123, largest=chain, chain_smallest=chain) == 0


def test_reserved_floor():
    assert seg.reserved_floor(allocated_at_phase=90, allocated_peak=100, stranded=30) == 20
    assert seg.reserved_floor(allocated_at_phase=90, allocated_peak=100, stranded=5) == 0


def _llama7b_qlora(**extra):
    return estimate("llama-2-7b", "h100-sxm-80gb", job="qlora", micro_batch=8, seq_len=2048, recompute="full",
                    cuda_context_bytes=0, transformers_version="4.38", attention="sdpa", **extra)


def test_the_reserve_covers_the_stranded_segments_at_the_start_of_backward():
    est = _llama7b_qlora()
    reserve = next(r.bytes for r in est.rows if r.component == "runtime/allocator_reserve")
    # bf16 logits segment (500 × 2 MiB) + one block's no-grad MLP working set 2·B·S·(D + 3F), Llama-2-7B D=4096, F=11008
    stranded = 500 * 2 * MIB + 2 * 8 * 2048 * (4096 + 3 * 11008)
    at_start = est.phases(Tier.GPU)[Phase.BACKWARD_START] - reserve
    allocated = est.peak(Tier.GPU) - reserve
    assert reserve == max(allocated // 10 + (allocated % 10 > 0), at_start + stranded - allocated)
    assert reserve > allocated // 10  # here the segments, not the 10%, set the reserve


def test_no_floor_without_the_reserve():
    est = _llama7b_qlora(allocator_reserve_pct=0)
    assert next(r.bytes for r in est.rows if r.component == "runtime/allocator_reserve") == 0


def test_current_transformers_keep_the_percentage():
    est = estimate("llama-2-7b", "h100-sxm-80gb", job="qlora", micro_batch=8, seq_len=2048, recompute="full",
                   cuda_context_bytes=0)
    reserve = next(r.bytes for r in est.rows if r.component == "runtime/allocator_reserve")
    allocated = est.peak(Tier.GPU) - reserve
    assert reserve == allocated // 10 + (allocated % 10 > 0)


def test_a_stream_pool_books_each_request_rounded_to_512():
    assert seg.stream_pool_bytes([1, 512, 513, 3 * MIB]) == 512 + 512 + 1024 + 3 * MIB


class _Replay:
    """A best-fit caching allocator written here from CUDACachingAllocator.cpp's large pool: a request takes the
    smallest free block at least its rounded size (the oldest segment on ties), splits it when more than kSmallSize
    would remain, else gets a new segment; a freed block merges with free neighbours of its own segment only."""

    def __init__(self) -> None:
        self.segments: list[list[list]] = []  # each segment: blocks [size, free]
        self.live: dict[str, int] = {}

    def alloc(self, name: str, nbytes: int) -> None:
        size = seg.round_size(nbytes)
        fits = [(b[0], i, j) for i, s in enumerate(self.segments) for j, b in enumerate(s) if b[1] and b[0] >= size]
        if not fits:
            self.segments.append([[seg.segment_bytes(nbytes), True]])
            fits = [(self.segments[-1][0][0], len(self.segments) - 1, 0)]
        _, i, j = min(fits)
        block = self.segments[i][j]
        if block[0] - size > seg.K_SMALL_SIZE:  # should_split for the large pool
            self.segments[i].insert(j + 1, [block[0] - size, True])
            block[0] = size
        block[1] = False
        self.live[name] = (i, id(block))

    def free(self, name: str) -> None:
        i, key = self.live.pop(name)
        s = self.segments[i]
        j = next(k for k, b in enumerate(s) if id(b) == key)
        s[j][1] = True
        merged: list[list] = []
        for b in s:
            if merged and merged[-1][1] and b[1]:
                merged[-1][0] += b[0]
            else:
                merged.append(b)
        s[:] = merged

    def reserved(self) -> int:
        return sum(b[0] for s in self.segments for b in s)


def test_a_replay_of_the_loss_chain_strands_exactly_the_16_bit_logits_segment():
    """transformers 4.38's loss chain, forward end to the start of backward, three steps (B=8, S=2048, V=32000):
    at the peak (log_softmax's backward) the only reserved bytes beyond the live ones (up to rounding) are the bf16
    logits' segment."""
    b, s, v = 8, 2048, 32000
    bf16, full, shifted = 2 * b * s * v, 4 * b * s * v, 4 * b * (s - 1) * v
    a = _Replay()
    for _ in range(3):
        a.alloc("logits16", bf16)
        a.alloc("logits32", full)  # kept in the model output until after the step
        a.free("logits16")
        a.alloc("shift", shifted)
        a.alloc("lsm", shifted)
        a.free("shift")
        a.alloc("grad_nll", shifted)
        a.alloc("grad_lsm", shifted)
        live = full + 3 * shifted
        stranded = a.reserved() - live
        a.free("grad_nll")
        a.free("lsm")
        a.alloc("grad_slice", full)
        a.free("grad_lsm")
        a.alloc("grad16", bf16)
        a.free("grad_slice")
        a.free("grad16")
        a.free("logits32")
    expected = seg.logits16_segment_bytes(batch=b, seq=s, vocab=v, bits=16)
    assert expected <= stranded <= expected + 4 * seg.K_SMALL_SIZE  # four unsplit fp32 blocks round up < 1 MiB each
