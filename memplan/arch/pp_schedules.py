"""torch.distributed.pipelining's training schedules, replayed: each rank's order of forwards and backwards, and from
it the micro-batches each of its model chunks holds at every moment (the in-flight counts the activations use).

Source: torch 2.13, torch/distributed/pipelining/schedules.py. Names as ``get_schedule_class`` takes them (case
insensitive; torchtitan's ``parallelism.pipeline_parallel_schedule`` passes its string there). Each rank's order:
- ``Schedule1F1B._step_microbatches``: min(m, p − s) forwards, then (backward, forward) pairs, then backwards;
- ``ScheduleGPipe._step_microbatches``: all m forwards, then all m backwards;
- ``ScheduleLoopedBFS._calculate_single_rank_operations``: every chunk's m forwards, chunk by chunk, then the
  backwards chunk by chunk in reverse (micro-batches in reverse);
- ``ScheduleInterleaved1F1B`` / ``ScheduleInterleavedZeroBubble._calculate_single_rank_operations``:
  ``_get_warmup_ops`` and ``_get_1f1b_rank_ops`` (ZB1P: backward split into input (I) and weight (W) parts, the
  W of a backward deferred by ``rank`` steady steps); chunk c of rank s is stage s + c·p (looped);
- ``ScheduleZBVZeroBubble`` and ``ScheduleDualPipeV._calculate_single_rank_operations``
  (``arch.pp_schedules_v``): two chunks per rank in a V, rank s holding stages s and 2p − 1 − s
  (``_utils.generate_stage_to_rank_mapping(style="v")``).
``_PipelineScheduleRuntime._step_microbatches`` runs the order as listed (``OVERLAP_F_B`` runs its sub-actions in
order: the forward, then the backward); the None (bubble) slots change no memory and are dropped here.
"""

from __future__ import annotations

from functools import lru_cache

from memplan.arch import pp_schedules_v
from memplan.config_train import PP_SCHEDULES, pp_schedule_name
from memplan.errors import MemplanError

F, IN, WT, B = "F", "I", "W", "B"
"""Forward; backward for the stage input only (``BACKWARD_INPUT``); backward for the weights
(``BACKWARD_WEIGHT``); the full backward (``FULL_BACKWARD``)."""

SCHEDULES = PP_SCHEDULES
SINGLE = ("1F1B", "GPipe")
"""``PipelineScheduleSingle`` subclasses: one stage per rank (v = 1)."""
V_SHAPE = ("ZBVZeroBubble", "DualPipeV")
"""Exactly two stages per rank in a V (both raise "ZBV requires exactly 2 stages per rank")."""
SPLIT_BACKWARD = ("InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV")
"""Schedules that split backwards into I and W actions."""


canonical = pp_schedule_name


def default_schedule(virtual_stages: int) -> str:
    """What memplan runs when no schedule is named: 1F1B, or Interleaved1F1B with more than one chunk per rank."""
    return "Interleaved1F1B" if virtual_stages > 1 else "1F1B"


def chunk_stages(name: str, pp: int, rank: int, virtual_stages: int) -> tuple[int, ...]:
    """Global stage of each of rank ``rank``'s chunks: s + c·p (looped), or (s, 2p − 1 − s) for a V schedule."""
    if name in V_SHAPE:
        return (rank, 2 * pp - 1 - rank)
    return tuple(rank + c * pp for c in range(max(1, virtual_stages)))


def _rounds(pp: int, m: int) -> int:
    """Micro-batches per round of the interleaved schedules: ``microbatches_per_round`` = m // max(1, m // p)."""
    return m // max(1, m // pp)


def _one_f_one_b(pp: int, rank: int, m: int) -> list[tuple[int, str, int]]:
    warm = min(m, pp - rank)
    out = [(0, F, k) for k in range(warm)]
    for k in range(m - warm):
        out += [(0, B, k), (0, F, warm + k)]
    return out + [(0, B, k) for k in range(m - warm, m)]


def _looped_bfs(v: int, m: int) -> list[tuple[int, str, int]]:
    return ([(c, F, k) for c in range(v) for k in range(m)]
            + [(c, B, k) for c in reversed(range(v)) for k in reversed(range(m))])


def _interleaved(pp: int, rank: int, v: int, m: int, zero_bubble: bool) -> list[tuple[int, str, int]]:
    """``_get_1f1b_rank_ops`` with ``_get_warmup_ops`` (multiply_factor 2, or 1 for zero bubble); local chunks."""
    g = _rounds(pp, m)
    warm = min((v - 1) * g + (1 if zero_bubble else 2) * (pp - 1 - rank), m * v)
    fwd = [(step // g) % v for step in range(m * v)]
    bwd = [v - 1 - ((step - warm) // g) % v for step in range(warm, warm + m * v)]
    seen: dict[tuple[str, int], int] = {}
    out: list[tuple[int, str, int]] = []

    def add(chunk: int, kind: str) -> None:
        k = seen.get((kind, chunk), 0)
        seen[(kind, chunk)] = k + 1
        out.append((chunk, kind, k))

    back, weights = IN if zero_bubble else B, 0
    for op in range(m * v + warm):  # warm-up forwards, steady (forward, backward) pairs, cool-down backwards
        if op < m * v:
            add(fwd[op], F)
        if op < warm:
            continue
        add(bwd[op - warm], back)
        if zero_bubble and op - warm >= rank:
            add(bwd[weights], WT)
            weights += 1
    while zero_bubble and weights < m * v:
        add(bwd[weights], WT)
        weights += 1
    return out


@lru_cache(maxsize=512)
def rank_actions(name: str, pp: int, rank: int, virtual_stages: int, micro_batches: int) -> tuple[tuple[int, str, int], ...]:
    """Rank ``rank``'s compute actions in order: (local chunk, F/I/W/B, micro-batch)."""
    v, m = max(1, virtual_stages), micro_batches
    if name == "1F1B":
        return tuple(_one_f_one_b(pp, rank, m))
    if name == "GPipe":
        return tuple([(0, F, k) for k in range(m)] + [(0, B, k) for k in range(m)])
    if name == "LoopedBFS":
        return tuple(_looped_bfs(v, m))
    if name in ("Interleaved1F1B", "InterleavedZeroBubble"):
        return tuple(_interleaved(pp, rank, v, m, name == "InterleavedZeroBubble"))
    if name == "ZBVZeroBubble":
        return tuple(pp_schedules_v.zbv(pp, rank, m))
    if name == "DualPipeV":
        return tuple(pp_schedules_v.dualpipev(pp, rank, m))
    raise MemplanError(f"Unknown pipeline schedule '{name}'.")


@lru_cache(maxsize=512)
def flight_states(name: str, pp: int, rank: int, virtual_stages: int,
                  micro_batches: int) -> tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]:
    """The distinct (held, awaiting W) per-chunk counts of micro-batches right after each forward and each input
    backward of rank ``rank`` (the only actions after which a count grows), in schedule order.

    held_c: micro-batches whose forward ran on chunk c and whose backward has not finished: a full backward (B) or a
    weight backward (W) ends it. awaiting_c: those whose input backward (I) ran, their W not yet: between the two
    torch keeps the chunk's autograd graph (``_backward.stage_backward_input`` runs ``autograd.grad`` with
    ``retain_graph=True`` and keeps ``param_groups``' intermediate nodes, which reach every earlier node of the
    chunk; only the output side is detached) and the gradients of the weight ops' outputs (the prehooks' ``grads``),
    freed by ``stage_backward_weight``."""
    v = 2 if name in V_SHAPE else max(1, virtual_stages)
    held, waiting = [0] * v, [0] * v
    out, seen = [], set()
    for chunk, kind, _ in rank_actions(name, pp, rank, v, micro_batches):
        if kind == F:
            held[chunk] += 1
        elif kind == IN:
            waiting[chunk] += 1
        elif kind == WT:
            held[chunk] -= 1
            waiting[chunk] -= 1
            continue
        else:
            held[chunk] -= 1
            continue
        state = (tuple(held), tuple(waiting))
        if state not in seen:
            seen.add(state)
            out.append(state)
    return tuple(out)


def peak_chunk_bytes(name: str, pp: int, rank: int, micro_batches: int, chunk_bytes: tuple[int, ...],
                     grad_bytes: tuple[int, ...] | None = None) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
    """(bytes, held counts, awaiting-W counts) at the rank's largest Σ_c held_c · ``chunk_bytes[c]`` + awaiting_c ·
    ``grad_bytes[c]`` over ``flight_states``. ``chunk_bytes[c]``: one micro-batch's saved bytes of chunk c;
    ``grad_bytes[c]``: what one micro-batch of chunk c keeps from its I to its W beyond them (None: nothing)."""
    v = len(chunk_bytes)
    grads = grad_bytes or (0,) * v

    def total(state: tuple[tuple[int, ...], tuple[int, ...]]) -> int:
        held, waiting = state
        return sum(h * b + w * g for h, w, b, g in zip(held, waiting, chunk_bytes, grads, strict=True))

    best = max(flight_states(name, pp, rank, v, micro_batches), key=total)
    return total(best), best[0], best[1]


def max_held(name: str, pp: int, rank: int, virtual_stages: int, micro_batches: int) -> int:
    """The most chunk micro-batches rank ``rank`` holds at once, over all its chunks (``flight_states``)."""
    return max(sum(held) for held, _ in flight_states(name, pp, rank, virtual_stages, micro_batches))


def whole_stage_flight(name: str, pp: int, rank: int, virtual_stages: int, micro_batches: int) -> int:
    """The rank's micro-batches in flight in whole-stage units: ⌈most chunk micro-batches held at once / chunks⌉,
    as ``arch.parallel.in_flight_micro_batches`` rounds the interleaved count (GPipe: m; 1F1B: min(m, p − s))."""
    v = 2 if name in V_SHAPE else max(1, virtual_stages)
    return -(-max_held(name, pp, rank, v, micro_batches) // v)
