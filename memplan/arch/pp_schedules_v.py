"""The V-shaped schedules of torch.distributed.pipelining, each rank's compute order (``arch.pp_schedules``).

Rank s holds two chunks: local chunk 0 is global stage s, local chunk 1 is stage 2p − 1 − s
(torch/distributed/pipelining/_utils.py ``generate_stage_to_rank_mapping(style="v")``), so rank 0 holds the first
stage (the embedding) and the last (the output layer and the loss). Actions: (local chunk, kind, micro-batch), kind
F (forward), IN (backward for the input), WT (backward for the weights), B (full backward).

Source: torch 2.13, torch/distributed/pipelining/schedules.py, ``ScheduleZBVZeroBubble`` and ``ScheduleDualPipeV``
``_calculate_single_rank_operations``, transcribed step by step (the None slots dropped).
"""

from __future__ import annotations

F, IN, WT, B = "F", "I", "W", "B"


def zbv(pp: int, rank: int, m: int) -> list[tuple[int, str, int]]:
    """``ScheduleZBVZeroBubble``: it plans max(2p − 1, m) micro-batches and drops the actions of those ≥ m."""
    n = max(2 * pp - 1, m)
    out: list[tuple[int, str, int]] = []
    cnt = {(c, k): 0 for c in (0, 1) for k in (F, IN, WT)}

    def add(chunk: int, kind: str, index: int | None = None) -> None:
        k = cnt[(chunk, kind)] if index is None else index
        out.append((chunk, kind, k))
        if index is None:
            cnt[(chunk, kind)] += 1

    for _ in range(2 * (pp - rank) - 1):
        add(0, F)
    for _ in range(rank):
        add(1, F)
        add(0, F)
    for _ in range(pp - rank):
        add(1, F)
        add(1, IN, cnt[(1, IN)])
        add(1, WT, cnt[(1, IN)])
        cnt[(1, IN)] += 1
    while cnt[(1, F)] < cnt[(0, F)] or cnt[(0, F)] < n:
        if cnt[(0, F)] < n:
            add(0, F)
        add(0, IN, cnt[(0, IN)])
        add(0, WT, cnt[(0, IN)])
        cnt[(0, IN)] += 1
        add(1, F)
        add(1, IN, cnt[(1, IN)])
        add(1, WT, cnt[(1, IN)])
        cnt[(1, IN)] += 1
    w0, w1 = cnt[(0, IN)], cnt[(1, IN)]
    for _ in range(rank):
        add(0, IN)
        add(1, IN)
    for _ in range(pp - rank):
        add(0, IN)
        add(0, WT, w0)
        w0 += 1
    out += [(1, WT, k) for k in range(w1, cnt[(1, IN)])]
    out += [(0, WT, k) for k in range(w0, cnt[(0, IN)])]
    return [a for a in out if a[2] < m]


class _DualPipeV:
    """``ScheduleDualPipeV._calculate_single_rank_operations``'s counters and weight queue."""

    def __init__(self) -> None:
        self.out: list[tuple[int, str, int]] = []
        self.counters: dict[tuple[int, str], int] = {}
        self.queue: list[tuple[int, int]] = []

    def add(self, chunk: int, kind: str) -> None:
        key = (chunk, IN if kind == B else kind)
        k = self.counters.get(key, 0)
        self.out.append((chunk, kind, k))
        if kind == B:
            self.counters[(chunk, IN)] = k + 1
            self.counters[(chunk, WT)] = self.counters.get((chunk, WT), 0) + 1
            return
        if kind == IN:
            self.queue.append((chunk, k))
        self.counters[key] = k + 1

    def weight(self) -> None:
        if self.queue:
            chunk, k = self.queue.pop(0)
            self.out.append((chunk, WT, k))
            self.counters[(chunk, WT)] = self.counters.get((chunk, WT), 0) + 1

    def overlap(self, forward: int, backward: int) -> None:
        """``add_overlap_f_b``: the forward, then the full backward (run in that order by the runtime)."""
        self.add(forward, F)
        self.add(backward, B)


def dualpipev(pp: int, rank: int, m: int) -> list[tuple[int, str, int]]:
    """``ScheduleDualPipeV`` (DeepSeek-V3's DualPipe folded into a V; m ≥ 2p, the class raises otherwise)."""
    s = _DualPipeV()
    for _ in range((pp - rank - 1) * 2):                      # step 1: F0
        s.add(0, F)
    for _ in range(rank + 1):                                 # step 2: F0 F1
        s.add(0, F)
        s.add(1, F)
    for _ in range(pp - rank - 1):                            # step 3: I1 W1 F1
        s.add(1, IN)
        s.weight()
        s.add(1, F)
    for i in range(m - pp * 2 + rank + 1):                    # step 4: F0B1 - F1B0
        if i == 0 and rank == pp - 1:
            s.add(0, F)
            s.add(1, B)
        else:
            s.overlap(0, 1)
        s.overlap(1, 0)
    for _ in range(pp - rank - 1):                            # step 5: B1 - F1B0
        s.add(1, B)
        s.overlap(1, 0)
    zb, steps = False, rank + 1                               # step 6: B1 B0, the second half zero bubble
    for i in range(steps):
        if i == steps // 2 and rank % 2 == 1:
            zb = True
        s.add(1, IN if zb else B)
        if i == steps // 2 and rank % 2 == 0:
            zb = True
        s.add(0, IN if zb else B)
    for _ in range(pp - rank - 1):                            # step 7: W0 B0
        s.weight()
        s.add(0, IN if zb else B)
    for _ in range(rank + 1):                                 # step 8: W0
        s.weight()
    return s.out
