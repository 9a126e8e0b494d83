"""``memplan sweep``: a grid of models × GPUs × jobs × sizes, each point estimated exactly.

Every grid point is one configuration (one CSV row). The fit matrix (rows models, columns GPUs)
holds one number per cell: the largest micro-batch (``max-batch``) or sequence length / context
(``max-context``) that fits, found by exact re-estimation, or, for ``fits``, the largest swept
batch that fits; 0 when nothing fits. Large grids are spread over worker processes.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import cache
from itertools import product
from typing import Any, Literal

from memplan.catalog.schema import GpuSpec, HostSpec, ModelSpec
from memplan.config import Job, JobConfig, retarget
from memplan.errors import MemplanError
from memplan.estimator import Estimate, estimate
from memplan.memory.breakdown import Tier
from memplan.recipe import Metric, SweepBlock
from memplan.recipe_load import LoadedRecipe
from memplan.search import MAX_BATCH, MAX_CONTEXT_TOKENS, with_size
from memplan.units import counted, parse_fraction_or_size

METRIC_COLUMN = {"max-batch": "max_batch", "max-context": "max_context", "fits": "max_fitting_batch"}
PROCESS_THRESHOLD = 64
"""Grids with at least this many cells are spread over processes (smaller ones are not worth the start-up)."""
CHUNKS_PER_WORKER = 8
MAX_CHUNK_CELLS = 4096
"""Cells per chunk at most: what one worker returns at once and the streamed CSV holds in memory."""
DEFAULT_GPUS_PER_NODE = 8
"""GPU counts above this split into nodes of 8 (DGX/HGX servers) unless told otherwise."""


@dataclass(frozen=True)
class SweepSpec:
    """The grid: every axis is a tuple of values; ``base`` holds the fixed choices (dtype, ZeRO, LoRA...)."""

    models: tuple[str, ...]
    gpus: tuple[str, ...]
    jobs: tuple[Job, ...]
    seq_lens: tuple[int, ...] = (2048,)
    contexts: tuple[int, ...] = (4096,)
    batches: tuple[int, ...] = (1,)
    gpu_counts: tuple[int, ...] = (1,)
    gpus_per_node: int = DEFAULT_GPUS_PER_NODE
    tp: int | Literal["node"] | None = None
    """Tensor-parallel degree of every cell; ``node``: the GPUs of a node; None: the base config's."""
    metric: Metric = "max-batch"
    base: JobConfig = field(default_factory=JobConfig)
    host: HostSpec = field(default_factory=HostSpec)
    min_headroom: str = "0B"
    usd_per_hour: float | None = None
    """Price of one GPU per hour for the cost columns; None: the GPU catalog's ``price_per_hour_usd``."""
    speed: bool = False
    """Add the step-time columns (step time, tokens/s, $ per step and per 1M tokens): a scalar step-time
    model per row, so the sweep is not vectorized."""

    def __post_init__(self) -> None:
        """No choice of the grid is silently ignored: each set field must be read by one of its jobs, and
        sequence lengths (contexts) need a training (inference) job."""
        from memplan.config import unread_by_all

        wrong = unread_by_all(self.base, self.jobs)
        trains = any(j.trains for j in self.jobs)
        if self.seq_lens != SweepSpec.seq_lens and not trains:
            wrong.append("seq_len (inference uses the context)")
        if self.contexts != SweepSpec.contexts and Job.INFER not in self.jobs:
            wrong.append("context (training uses the sequence length)")
        if wrong:
            jobs = ", ".join(j.value for j in self.jobs)
            raise MemplanError(f"{', '.join(wrong)} {'does' if len(wrong) == 1 else 'do'} not apply to the "
                               f"sweep's jobs ({jobs}).")
        from memplan.plan_only import refuse_plan_only

        refuse_plan_only(self.base, "sweep")

    def sizes(self, job: Job) -> tuple[int, ...]:
        """Sequence lengths (training) or contexts (inference) of ``job``."""
        return self.contexts if job is Job.INFER else self.seq_lens

    def layout(self, count: int) -> tuple[int, int]:
        """(GPUs per node, nodes) for ``count`` GPUs."""
        if count <= self.gpus_per_node:
            return count, 1
        if count % self.gpus_per_node:
            raise MemplanError(f"--gpu-count: {counted(count, 'GPU')} is not a whole number of {self.gpus_per_node}-GPU nodes.")
        return self.gpus_per_node, count // self.gpus_per_node


@dataclass(frozen=True)
class Cell:
    """One matrix cell's scenario; the metric's own axis (batch or size) is left free."""

    model: str
    gpu: str
    job: Job
    gpus: int
    size: int | None
    """Sequence length / context (None when the metric searches it)."""
    batch: int | None
    """Micro-batch / concurrency (None when the metric searches it)."""


@dataclass
class CellResult:
    cell: Cell
    value: int | None
    """The metric (0: nothing fits); None when the configuration is invalid."""
    records: list[dict[str, Any]]
    estimates: int = 0
    error: str = ""


@dataclass
class SweepResult:
    spec: SweepSpec
    cells: list[CellResult]
    streamed_rows: int | None = None
    """Rows already written by a streamed run (its cells keep no records); None: records kept."""
    partial: bool = False
    """Interrupted (Ctrl-C): only the cells finished so far."""

    @property
    def records(self) -> list[dict[str, Any]]:
        return [r for c in self.cells for r in c.records]

    @property
    def estimates(self) -> int:
        return sum(c.estimates for c in self.cells)


def spec_from_recipe(loaded: LoadedRecipe) -> SweepSpec:
    """The grid of a recipe's ``sweep:`` block; axes it leaves out take the recipe's own values."""
    recipe, base = loaded.recipe, loaded.config
    block = recipe.sweep or SweepBlock()
    hw = recipe.hardware
    return SweepSpec(
        models=block.models or (recipe.model,), gpus=block.gpus or (hw.gpu,), jobs=block.jobs or (base.job,),
        seq_lens=block.seq_lens or (base.seq_len,), contexts=block.contexts or (base.infer.context,),
        batches=block.batches or (base.micro_batch,), gpu_counts=block.gpu_counts or (base.world_size,),
        gpus_per_node=block.gpus_per_node or (hw.gpus_per_node if hw.gpus_per_node > 1 else DEFAULT_GPUS_PER_NODE),
        tp=block.tp, metric=block.metric, base=base, host=loaded.host, min_headroom=recipe.headroom_for(Tier.GPU) or "0B",
    )


def cells(spec: SweepSpec) -> list[Cell]:
    """Every cell of the grid, models outermost (so one worker keeps reading the same model)."""
    out = []
    for model, job, gpu, count in product(spec.models, spec.jobs, spec.gpus, spec.gpu_counts):
        if spec.metric == "max-context":
            out += [Cell(model, gpu, job, count, None, b) for b in spec.batches]
        else:
            out += [Cell(model, gpu, job, count, s, None) for s in spec.sizes(job)]
    return out


@cache
def _model(name: str) -> ModelSpec:
    from memplan.catalog.resolve import load_model

    return load_model(name)


@cache
def _gpu(name: str) -> GpuSpec:
    from memplan.catalog.store import catalog_gpu

    return catalog_gpu(name)


def largest_ok(slack_at: Callable[[int], int], *, hi: int) -> int:
    """The largest v in [1, hi] with ``slack_at(v) >= 0``, or 0 when even 1 fails.

    ``slack_at`` (free bytes, negative when over) must not increase with v. Memory is nearly
    affine in the batch and (with flash attention) in the sequence, so the secant through the last
    two points predicts the crossing: about four exact evaluations per search instead of the
    2·log2(hi) of a bisection. Inside the bracket, regula falsi with the Illinois correction
    (Dowell & Jarratt 1971) handles curvature, and a step that does not halve the bracket is
    followed by a bisection, so the worst case stays logarithmic.
    """
    s_lo = slack_at(1)
    if s_lo < 0:
        return 0
    lo, bad, s_bad, v = 1, 0, 0, min(2, hi)
    while not bad:
        if v <= lo:
            return lo
        s = slack_at(v)
        if s < 0:
            bad, s_bad = v, s
            break
        used = s_lo - s
        nxt = v + (s * (v - lo)) // used + 1 if used > 0 else 2 * v
        lo, s_lo, v = v, s, min(max(nxt, v + 1), hi)
    last, slow = 0, False
    while bad - lo > 1:
        width = bad - lo
        secant = min(max(lo + (s_lo * width) // (s_lo - s_bad), lo + 1), bad - 1)
        mid = (lo + bad) // 2 if slow else secant
        s = slack_at(mid)
        if s >= 0:
            lo, s_lo, s_bad = mid, s, s_bad // 2 if last > 0 else s_bad
            last = 1
        else:
            bad, s_bad, s_lo = mid, s, s_lo // 2 if last < 0 else s_lo
            last = -1
        slow = not slow and 2 * (bad - lo) > width
    return lo


_RETARGETED: dict[tuple[int, Job], tuple[JobConfig, JobConfig]] = {}
"""(id of a grid's base configuration, job) -> (that base, ``config.retarget`` of it): kept with its entry and
compared by identity, so a recycled ``id`` cannot hit."""


def retargeted(base: JobConfig, job: Job) -> JobConfig:
    """``config.retarget(base, job)``, memoized: a pure function of a frozen configuration, asked once per cell
    (and per class of GPUs of a vectorized group) with the same grid base and a handful of jobs."""
    hit = _RETARGETED.get((id(base), job))
    if hit is None or hit[0] is not base:
        if len(_RETARGETED) >= 64:
            _RETARGETED.clear()
        hit = _RETARGETED[(id(base), job)] = (base, retarget(base, job))
    return hit[1]


def cell_config(spec: SweepSpec, job: Job, gpn: int, nodes: int) -> JobConfig:
    """The grid's base configuration for ``job`` on ``gpn`` × ``nodes`` GPUs (``--tp node``: a node's GPUs), before
    any size is set."""
    update: dict[str, Any] = {"job": job, "gpus_per_node": gpn, "nodes": nodes}
    if spec.tp is not None:
        update["tp"] = gpn if spec.tp == "node" else spec.tp
    return retargeted(spec.base, job).model_copy(update=update)  # only fields the job reads


class _Evaluator:
    """Exact estimates of one cell, memoized by the free axis' value."""

    def __init__(self, spec: SweepSpec, cell: Cell) -> None:
        gpn, nodes = spec.layout(cell.gpus)
        self.spec, self.cell = spec, cell
        self.model, self.gpu = _model(cell.model), _gpu(cell.gpu)
        cfg = cell_config(spec, cell.job, gpn, nodes)
        if cell.size is not None:
            cfg = with_size(cfg, "context", cell.size)
        if cell.batch is not None:
            cfg = with_size(cfg, "micro_batch", cell.batch)
        self.cfg = cfg
        self.free = "micro_batch" if cell.batch is None else "context"
        self.required = parse_fraction_or_size(spec.min_headroom, total=self.gpu.capacity_bytes, field="--min-headroom")
        self.memo: dict[int, Estimate] = {}

    def at(self, value: int) -> Estimate:
        if value not in self.memo:
            cfg = with_size(self.cfg, self.free, value)  # type: ignore[arg-type]
            self.memo[value] = estimate(self.model, self.gpu, cfg, host=self.spec.host)
        return self.memo[value]

    def slack(self, value: int) -> int:
        est = self.at(value)
        return min(est.headroom_bytes, est.headroom(Tier.GPU) - self.required)


def evaluate(spec: SweepSpec, cell: Cell, evaluator: Callable[[SweepSpec, Cell], _Evaluator] | None = None) -> CellResult:
    """The metric of one cell and one CSV record per swept value of its free axis (``evaluator``: where the
    estimates come from, default ``_Evaluator``; ``vector_probe.shared_evaluate`` shares them between GPUs)."""
    from memplan.report.cost import cost_record
    from memplan.report.csv_out import estimate_record

    column = METRIC_COLUMN[spec.metric]
    try:
        ev = (evaluator or _Evaluator)(spec, cell)
        rows = spec.batches if ev.free == "micro_batch" else spec.sizes(cell.job)
        missing = ev.at(rows[0]).not_modelled
        error = ""
        if spec.metric == "fits":
            value: int | None = max((b for b in rows if ev.slack(b) >= 0), default=0)
        elif missing:  # what grows with batch or context is not modelled: no largest value to find
            value, error = None, f"{spec.metric} needs {' and '.join(missing)}, which {cell.model} does not model"
        else:
            value = largest_ok(ev.slack, hi=MAX_BATCH if ev.free == "micro_batch" else MAX_CONTEXT_TOKENS)
        price = spec.usd_per_hour if spec.usd_per_hour is not None else ev.gpu.price_per_hour_usd
        records = []
        for v in rows:
            est = ev.at(v)
            records.append({**estimate_record(est), "ok": ev.slack(v) >= 0, "required_headroom_bytes": ev.required,
                            "not_modelled": ",".join(est.not_modelled), column: value, "error": error,
                            **cost_record(price, est, speed=spec.speed)})
        return CellResult(cell, value, records, len(ev.memo), error)
    except MemplanError as exc:
        return CellResult(cell, None, [error_record(spec, cell, column, str(exc))], error=str(exc))


def error_record(spec: SweepSpec, cell: Cell, column: str, message: str) -> dict[str, Any]:
    """The CSV record of an invalid cell, with the columns ``estimate_record`` names the same way."""
    gpn, nodes = spec.layout(cell.gpus)
    size_key = "infer_context" if cell.job is Job.INFER else "seq_len"
    return {"model": cell.model, "gpu": cell.gpu, "gpus_per_node": gpn, "nodes": nodes, "job": cell.job.value,
            "micro_batch": cell.batch, size_key: cell.size, column: None, "error": message}


MAX_AXIS_VALUE = 2**31
"""Largest batch, sequence length or context a sweep takes: the vectorized path multiplies them in int64 columns
(``vector_frame``), and 2^31 tokens or sequences already need far more than any GPU holds."""


def base_at_counts(build: Callable[..., JobConfig], gpu_counts: tuple[int, ...], gpus_per_node: int) -> JobConfig:
    """The grid's base JobConfig, validated at a GPU count of the grid rather than at one GPU: ``build(gpus_per_node=,
    nodes=)`` at each count's layout in turn, the first that validates (a --pp, --cp or --tp must divide some
    count; each cell then takes its own count and is checked again, an invalid one becoming an n/a cell). When
    no count validates, the first count's error: every cell would be invalid. Counts that are not whole nodes are
    ``validate``'s to report."""
    probe = SweepSpec(models=(), gpus=(), jobs=(), gpus_per_node=max(1, gpus_per_node))
    first: MemplanError | None = None
    for count in gpu_counts:
        try:
            gpn, nodes = probe.layout(count)
            return build(gpus_per_node=gpn, nodes=nodes)
        except MemplanError as exc:
            first = first or exc
    if first is not None:
        raise first
    return build()


def validate(spec: SweepSpec) -> None:
    """Fail fast on names and values that would make every cell an error (exit 2 in the CLI)."""
    if spec.gpus_per_node < 1:
        raise MemplanError(f"--gpus-per-node must be a positive integer, got {spec.gpus_per_node}.")
    for flag, values in (("--batch", spec.batches), ("--seq-len", spec.seq_lens), ("--context", spec.contexts)):
        if any(v > MAX_AXIS_VALUE for v in values):
            raise MemplanError(f"{flag}: values above 2^31 ({MAX_AXIS_VALUE:,}) are past any GPU's memory and the "
                               "sweep's 64-bit columns; use smaller values.")
    for name in spec.models:
        _model(name)
    for name in spec.gpus:
        _gpu(name)
    for count in spec.gpu_counts:
        spec.layout(count)
    for gpu in spec.gpus:
        parse_fraction_or_size(spec.min_headroom, total=_gpu(gpu).capacity_bytes, field="--min-headroom")
    if spec.base.quant is not None:
        from memplan.memory.quant import get_format

        get_format(spec.base.quant)
    check_engine(spec)


def _evaluate_chunk(spec: SweepSpec, chunk: list[Cell]) -> list[CellResult]:
    return [evaluate(spec, c) for c in chunk]


def chunked(items: list[Cell], size: int) -> Iterator[list[Cell]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def iter_results(spec: SweepSpec, *, workers: int | None = None, chunk_cells: int | None = None,
                 progress: Callable[[int], None] | None = None) -> Iterator[list[CellResult]]:
    """The cells' results in grid order, a chunk at a time (at most ``2·workers`` chunks in flight, so
    memory stays bounded however large the grid); ``progress(n)`` after each n cells.

    Chunks hold ``chunk_cells`` cells (default: the grid spread as 8 chunks per worker, at most 4,096
    cells). A KeyboardInterrupt or a worker's failure cancels the queued chunks without waiting for them.
    """
    todo = cells(spec)
    workers = default_workers() if workers is None else workers
    size = chunk_cells or max(1, min(MAX_CHUNK_CELLS, len(todo) // (max(workers, 1) * CHUNKS_PER_WORKER)))
    if workers <= 1 or len(todo) < PROCESS_THRESHOLD:
        for chunk in chunked(todo, size):
            out = []
            for c in chunk:
                out.append(evaluate(spec, c))
                if progress:
                    progress(1)
            yield out
        return
    import functools

    yield from pooled(functools.partial(_evaluate_chunk, spec), chunked(todo, size), workers=workers, progress=progress)


def start_method() -> str:
    """'fork' where it is safe and cheap, else 'spawn'.

    A forked worker starts with this process's imports and memos (the catalog, each architecture's size-free
    tensors) instead of importing memplan again (about 0.4 s of a core). Fork copies only the calling thread, so
    it is taken only on Linux while this process runs a single OS thread (``Threads:`` of /proc/self/status):
    with a second thread alive (OpenBLAS's pool once numpy is imported, unless ``OPENBLAS_NUM_THREADS=1``; a
    notebook's kernel threads) a lock held by that thread would stay held forever in the child."""
    if sys.platform != "linux":
        return "spawn"
    try:
        with open("/proc/self/status") as status:
            threads = next((int(line.split()[1]) for line in status if line.startswith("Threads:")), 0)
    except (OSError, ValueError):
        return "spawn"
    return "fork" if threads == 1 else "spawn"


def pooled(work: Callable[[Any], list[Any]], items: Iterator[Any], *, workers: int,
           progress: Callable[[int], None] | None = None) -> Iterator[list[Any]]:
    """``work(item)`` for each item on ``workers`` processes, results in order, at most 2·workers items in flight
    (memory stays bounded); Ctrl-C, a worker's failure or a consumer that stops drops the queued items.

    The calling process is one of the workers and ``workers − 1`` processes are started: forked where
    ``start_method`` allows (they start with this process's imports), else spawned (each first imports memplan,
    about half a second). The pool is given the latest items in flight, at most two per spawned
    process; this process runs the earliest ones not given away, and waits only when every item in flight is
    done or with the pool. So a one-item run spawns nothing, and no core waits while a worker starts."""
    import multiprocessing
    from collections import deque

    spawned = max(1, workers - 1)
    pool = ProcessPoolExecutor(max_workers=spawned, mp_context=multiprocessing.get_context(start_method()))
    window = 2 * max(workers, 1)
    pending: deque = deque()
    """Entries in order: [future (None: not given to the pool), item, result once run here (None: not yet)]."""

    def refill() -> None:
        while len(pending) < window:
            item = next(items, None)
            if item is None:
                break
            pending.append([None, item, None])
        if workers <= 1:  # the pool does all
            for e in pending:
                if e[0] is None:
                    e[0] = pool.submit(work, e[1])
            return
        busy = sum(1 for e in pending if e[0] is not None and not e[0].done())
        for e in reversed(pending):
            if busy >= 2 * spawned:
                break
            if e[0] is None and e[2] is None and e is not pending[0]:
                e[0] = pool.submit(work, e[1])
                busy += 1

    def run_here(entry: list[Any]) -> list[Any]:
        if entry[2] is None:
            entry[2] = work(entry[1])
        return entry[2]

    try:
        refill()
        while pending:
            head = pending[0]
            while head[0] is not None and not head[0].done():  # run our own next items meanwhile
                own = next((e for e in pending if e[0] is None and e[2] is None), None)
                if own is None:
                    break
                run_here(own)
            pending.popleft()
            done = run_here(head) if head[0] is None else head[0].result()
            refill()
            if progress:
                progress(len(done))
            yield done
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def run(spec: SweepSpec, *, workers: int | None = None, progress: Callable[[int], None] | None = None) -> SweepResult:
    """Evaluate every cell (in worker processes for large grids) and keep every record."""
    return SweepResult(spec, [r for chunk in iter_results(spec, workers=workers, progress=progress) for r in chunk])


def check_engine(spec: SweepSpec) -> None:
    """A MemplanError when the grid's engine (``--engine``) runs none of its jobs at any of its GPU counts (every cell would
    be n/a); a grid where it runs some keeps the others as n/a cells with the engine's rule."""
    from memplan.engines.rules import violation

    if spec.base.engine is None:
        return
    reasons = []
    for job in spec.jobs:
        for count in spec.gpu_counts:
            reason = violation(cell_config(spec, job, *spec.layout(count)))
            if reason is None:
                return
            reasons.append(reason)
    raise MemplanError(f"engine {spec.base.engine.value} runs no cell of the grid: {reasons[0].rstrip('.')}.")
