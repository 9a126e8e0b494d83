"""The ILP's data: factor tables, per-layer blocks, the problem and its solution, and the unit rounding
that keeps every coefficient conservative (demand rounded up, capacity down)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from memplan.arch.parallel import in_flight_micro_batches
from memplan.arch.pp_schedules import whole_stage_flight

UNIT = 1024
"""ILP memory unit in bytes (KiB): demand is rounded up to it, capacity down."""

SECONDS_SCALE = 1e3
"""Seconds objectives are solved in milliseconds: HiGHS treats objective values within about 1e-6 of the
incumbent as no better (an absolute tolerance), which in seconds would merge plans of a 10 ms step that
differ by a microsecond (0.01%); ``Solution.objective`` is reported in seconds again."""

ERROR_SCALE = 1e6
"""``min_error``: errors (mean relative MSE, one layer's share about 1e-6 for a 70B model) are scaled so that
the solver's absolute and relative MIP gaps (1e-6, 1e-4) stay far below one layer's difference."""
PRIMARY_TIE_REL = 1e-9
PRIMARY_TIE_ABS = 1e-9
"""Second stage of a lexicographic solve: plans within this of the best primary value (batch, context,
KiB, scaled error; distinct plans differ by 1 or more) are ties, broken by step seconds."""

SOLVER_MAX_COEFF = 10**15
"""HiGHS refuses a model with a matrix value of magnitude 1e15 or more (its ``large_matrix_value``);
in ``UNIT``s that is about 10^18 bytes."""


@dataclass(frozen=True)
class Entry:
    """One row of a factor: bytes per pipeline stage on the GPU, bytes per node on CPU/NVMe, seconds."""

    gpu: tuple[int, ...] = ()
    cpu: int = 0
    nvme: int = 0
    seconds: float = 0.0
    value: float = 0.0
    error: float = 0.0
    """Quality loss (the ``min_error`` objective), e.g. of the tensors outside the blocks."""
    cpu_floor: int = 0
    """CPU bytes per node this row needs whatever the per-layer blocks add (a second, separate constraint)."""
    phase_gpu: tuple[tuple[str, tuple[int, ...]], ...] = ()
    """Bytes per pipeline stage alive in each phase of the step ((phase, per-stage bytes), ...); empty: ``gpu``
    is alive in every phase. With phases, ``gpu`` is their per-stage maximum (a conservative summary)."""
    persist_gpu: tuple[int, ...] = ()
    """Per stage: bytes (the gradients) alive in ``Problem.persist_phases`` only when the chosen shape row
    ``accumulates`` (gradient accumulation: micro-batch k ≥ 2 runs forward with the earlier gradients)."""
    accumulates: bool = False
    """Shape rows: whether this shape runs more than one micro-batch per step (``persist_gpu`` applies)."""

    def gpu_in(self, phase: str | None) -> tuple[int, ...]:
        """Per-stage bytes alive in ``phase`` (None: the all-phase summary ``gpu``)."""
        if phase is None or not self.phase_gpu:
            return self.gpu
        return dict(self.phase_gpu).get(phase, ())


@dataclass
class Factor:
    name: str
    dims: tuple[str, ...]
    entries: dict[tuple, Entry]


@dataclass
class LayerBlock:
    """One per-layer decision (recompute, optimizer placement, weight format and placement): a mode per layer.

    ``gpu[l][m][key]`` bytes on the layer's GPU (per in-flight micro-batch when ``in_flight``), ``cpu``
    bytes per node, ``seconds`` step time, ``error`` quality loss; ``key`` ranges over ``key_dims``.
    """

    modes: tuple[str, ...]
    key_dims: tuple[str, ...]
    gpu: list[dict[str, dict[tuple, int]]]
    seconds: list[dict[str, dict[tuple, float]]]
    cpu: list[dict[str, dict[tuple, int]]] | None = None
    classes: list[int] | None = None
    workspace: list[dict[str, dict[tuple, int]]] | None = None
    """Bytes live once, while one layer in this mode runs (the largest such layer of the stage counts)."""
    flight_workspace: list[dict[str, dict[tuple, int]]] | None = None
    """Like ``workspace`` but held per micro-batch in flight (the checkpoint's saved keyword arguments)."""
    in_flight: bool = True
    """Multiply a layer's GPU bytes by the micro-batches in flight on its stage (1F1B: p − s)."""
    savings_rank: dict[str, int] = field(default_factory=dict)
    key_bounds: dict[tuple, float] = field(default_factory=dict)
    """A valid lower bound on the layers' seconds for each key (a cut that tightens the relaxation)."""
    name: str = "recompute"
    error: list[dict[str, dict[tuple, float]]] | None = None
    """Quality loss per layer, mode and key (the ``min_error`` objective)."""
    contiguous: bool = False
    """Group only runs of adjacent identical layers (needed when the layer order matters, ``suffix_mode``)."""
    stages: bool = True
    """Whether the block spans pipeline stages; False: its bytes are nonzero only under pp = 1 (the ILP groups
    its layers over the whole model and adds them to the pp = 1 memory row alone)."""
    suffix_mode: str | None = None
    """The layers in this mode form a suffix of the layer order (DeepSpeed's partial offload: the last
    sub-groups go to the CPU); the ILP orders the groups and ``modes()`` puts it on each group's last layers."""
    phases: frozenset[str] | None = None
    """The phases in which ``gpu`` bytes are alive (None: all), e.g. saved activations: forward and the
    start of backward."""
    workspace_phases: frozenset[str] | None = None
    """The phases in which ``workspace`` is alive (None: all), e.g. the recompute workspace: backward."""
    flight_phases: frozenset[str] | None = None
    """The phases in which ``flight_workspace`` is alive (None: all)."""
    phase_gpu: dict[str, list[dict[str, dict[tuple, int]]]] | None = None
    """Extra GPU bytes per phase, per layer, mode and key, beside ``gpu`` (e.g. the fp32 gradients of a layer's
    GPU-side optimizer, alive at the optimizer step only)."""

    def alive(self, phase: str | None, which: frozenset[str] | None) -> bool:
        return phase is None or which is None or phase in which


@dataclass
class Problem:
    dims: dict[str, tuple]
    factors: list[Factor]
    layers: LayerBlock | None
    num_layers: int
    gpu_capacity: int
    cpu_capacity: int
    nvme_capacity: int
    objective: str = "min_seconds"
    """``min_seconds``, ``max_value`` (Σ entry.value, ties by seconds) or ``min_gpu_bytes``."""
    gpu_scale_pct: float = 0.0
    """The GPU demand is multiplied by (1 + pct/100): the allocator reserve row."""
    cuts: list[dict[str, Any]] = field(default_factory=list)
    extra_blocks: list[LayerBlock] = field(default_factory=list)
    """Further per-layer decisions beside ``layers``; their bytes, seconds and errors add up per layer."""
    phases: tuple[str, ...] = ()
    """The phases of the step: one GPU memory constraint per phase, pipeline degree and stage (the answer is
    the largest phase total); empty: one constraint per stage with every byte alive at once."""
    persist_phases: tuple[str, ...] = ()
    """The phases in which ``Entry.persist_gpu`` counts when the chosen shape ``accumulates``."""
    stage_map: dict[int, tuple[int, ...]] = field(default_factory=dict)
    """Per pipeline degree, the stage of every layer (``arch.parallel.stage_index``: balanced, uneven
    stages); a degree missing here splits the layers evenly."""

    virtual_stages: int = 1
    """Model chunks per pipeline stage (interleaved 1F1B): how many micro-batches a stage holds in flight
    (``flight``)."""

    vp_group: int | None = None
    """Megatron's ``microbatch_group_size_per_vp_stage`` (None: p) for ``flight`` (``memory.activations_layers.
    interleave_knobs``)."""
    vp_extra: int = 0
    """The extra warm-up forward of Megatron's ``overlap_moe_expert_parallel_comm`` (1, else 0) for ``flight``."""

    pp_schedule: str | None = None
    """A named torch.distributed.pipelining schedule (``engine_config.pp_schedule``, engine fsdp2): ``flight`` takes
    its replay's count (``arch.pp_schedules.whole_stage_flight``) where the step's micro-batches are known."""

    cooldown: dict[tuple[int, int, tuple], list[tuple[int, dict[int, int]]]] = field(default_factory=dict)
    """FSDP2's interleaved cool-down (``ilp_cooldown``): (pp, stage, layer key) → per j, (j·g bytes, micro-batches
    of each layer freed by then)."""

    chunk_map: dict[int, tuple[int, ...]] = field(default_factory=dict)
    """Per pipeline degree, the model chunk (within its stage) of every layer, where ``cooldown`` needs the layers of
    one chunk apart: the per-layer groups do not span chunks there."""

    moments: dict[tuple[int, int, tuple], tuple[tuple[tuple[int, ...], int], ...]] = field(default_factory=dict)
    """Per (pp, stage, layer key), the moments of the per-chunk in-flight count (``ilp_moments``): (micro-batches each
    chunk holds, constant bytes); one memory row each, the layers weighted by their chunk's count (``chunk_map``)."""

    global_batch: int | None = None
    """Sequences per step, with ``world`` GPUs and context parallelism ``cp``: what ``micro_batches`` reads."""
    world: int = 1
    cp: int = 1

    def micro_batches(self, key_dims: tuple[str, ...], key: tuple) -> int | None:
        """Micro-batches per replica in a step under a block key's tp, pp and micro-batch, as ``setting.config_for``
        sets ``grad_accum``: global batch // (micro-batch · world/(tp·pp·cp)), at least 1; None when unknown."""
        if self.global_batch is None or not {"tp", "pp", "micro_batch"} <= set(key_dims):
            return None
        d = dict(zip(key_dims, key, strict=True))
        replicas = max(1, self.world // (d["tp"] * d["pp"] * self.cp))
        return max(1, self.global_batch // (d["micro_batch"] * replicas))

    def flight(self, pp: int, stage: int, micro_batches: int | None = None) -> int:
        """Micro-batches whose per-layer bytes stage ``stage`` of ``pp`` holds at its peak: p − s under 1F1B, more
        under the interleaved schedule, at most the step's ``micro_batches`` (``arch.parallel.
        in_flight_micro_batches``, the count ``estimate`` uses)."""
        if self.pp_schedule is not None and pp > 1 and micro_batches is not None:
            return whole_stage_flight(self.pp_schedule, pp, stage, self.virtual_stages, micro_batches)
        return in_flight_micro_batches(pp, stage, self.virtual_stages, micro_batches, group=self.vp_group,
                                       extra=self.vp_extra)

    _flights: dict[tuple, int] = field(default_factory=dict, init=False, repr=False, compare=False)

    def key_flight(self, pp: int, stage: int, key_dims: tuple[str, ...], key: tuple) -> int:
        """``flight`` capped at the micro-batches of the block key's step (``micro_batches``), memoized: the ILP
        builders ask once per layer group, mode and key."""
        memo = (pp, stage, key_dims, key)
        out = self._flights.get(memo)
        if out is None:
            out = self._flights[memo] = self.flight(pp, stage, self.micro_batches(key_dims, key))
        return out

    def layer_flight(self, pp: int, stage: int, layer: int, key_dims: tuple[str, ...], key: tuple,
                     moment: int | dict[tuple, int] | None) -> int:
        """Micro-batches whose bytes ``layer`` (on ``stage``) holds in the memory row of ``moment`` (``ilp_moments``: one
        moment index, or one per layer key, a key left out counting none there): its chunk's count at that moment,
        else the whole-stage ``key_flight``."""
        rows = self.moments.get((pp, stage, key))
        if rows and moment is not None:
            t = moment.get(key) if isinstance(moment, dict) else moment
            return 0 if t is None else rows[min(t, len(rows) - 1)][0][self.chunk_map[pp][layer]]
        return self.key_flight(pp, stage, key_dims, key)

    @property
    def blocks(self) -> list[LayerBlock]:
        return ([self.layers] if self.layers is not None else []) + list(self.extra_blocks)


@dataclass
class Solution:
    status: str
    choice: dict[str, Any]
    modes: list[str]
    objective: float
    seconds: float
    block_modes: dict[str, list[str]] = field(default_factory=dict)
    """Per-layer modes of every block by name (``modes`` is the first block's)."""
    gap: float | None = None
    """A ``feasible`` solution's proven relative distance to the optimum, when the search knows it."""


def ceil_unit(n: int) -> int:
    return -(-n // UNIT)


def stage_of(layer: int, num_layers: int, pp: int, stage_map: dict[int, tuple[int, ...]] | None = None) -> int:
    """The pipeline stage of ``layer``: from ``stage_map`` when it has ``pp``, else an even split."""
    if stage_map and pp in stage_map:
        return stage_map[pp][layer]
    return layer // (num_layers // pp)


def safe_name(text: Any) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in str(text))
