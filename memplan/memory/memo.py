"""Memoized size-free pieces of the memory model: computed once per (architecture, configuration without its
sizes, stage) and reused by every estimate that differs only in micro-batch, sequence length or context.

Sweeps, ``max-batch``/``max-context`` searches and the planner estimate one job at many sizes. Most rows do not
depend on the size at all (weights, gradients, optimizer states, LoRA adapters, the optimizer step's
temporaries). ``size_free`` memoizes such a function of a ``Context`` and makes the memo exact by construction:
the function is called with a Context that carries only what the key holds, the architecture, the stage and
the configuration with ``micro_batch``, ``seq_len`` and ``infer.context`` replaced by ``UNREAD``, and with
``UNREAD`` as its GPU and host. Reading any of those inside the memoized function raises ``SizeRead`` (a bug,
loud at the first estimate), so an answer can never be one that another size would give.

Pure Python and no heavy imports (``memplan.memory`` stays light); the cache is bounded (cleared when full).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from memplan.arch.tensors import Tensor
from memplan.config import JobConfig
from memplan.memory.context import Context

_T = TypeVar("_T")

SIZE_FIELDS = ("micro_batch", "seq_len")
"""JobConfig fields a sweep varies; ``infer.context`` too (``search.with_size``)."""


class SizeRead(AssertionError):
    """A size-free memoized function read a size, the GPU or the host: its memo would be keyed on too little."""


class _Unread:
    """Stands for a value a size-free function must not read: any use but hashing and identity raises."""

    __slots__ = ()

    def __hash__(self) -> int:
        return 0x51_7E

    def __repr__(self) -> str:
        return "UNREAD"

    def _fail(self, *args: Any, **kwargs: Any) -> Any:
        raise SizeRead("a size-free memoized function of memplan.memory.memo read a size, the GPU or the host")

    __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = __bool__ = __index__ = __int__ = __float__ = _fail  # type: ignore[assignment]
    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __truediv__ = __rtruediv__ = _fail
    __floordiv__ = __rfloordiv__ = __mod__ = __rmod__ = __pow__ = __rpow__ = __neg__ = _fail
    __getattr__ = __iter__ = __len__ = __str__ = __format__ = _fail  # type: ignore[assignment]


UNREAD: Any = _Unread()

class _Key:
    """A size-free configuration as a dict key, its hash computed once."""

    __slots__ = ("cfg", "hash")

    def __init__(self, cfg: JobConfig) -> None:
        self.cfg, self.hash = cfg, hash(cfg)

    def __hash__(self) -> int:
        return self.hash

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Key) and (self.cfg is other.cfg or self.cfg == other.cfg)


_LAST: list[tuple[Any, Any]] = [(None, None)]
"""(the last configuration made size-free, its key): an estimate asks once per memoized piece. One-entry memos
hold one tuple, replaced whole and read once, so threads sharing them can only miss, never mix two entries."""


def size_free_key(cfg: JobConfig) -> Any:
    """``size_free_config(cfg)`` as a dict key whose hash is computed once (a JobConfig hashes every field)."""
    return _size_free_key(cfg)


def size_free_config(cfg: JobConfig) -> JobConfig:
    """``cfg`` with its sizes replaced by ``UNREAD`` (no validation: ``model_copy``); equal for two configurations
    that differ only in sizes, and hashable (every JobConfig field is frozen)."""
    return _size_free_key(cfg).cfg


def _size_free_key(cfg: JobConfig) -> _Key:
    last = _LAST[0]
    if last[0] is cfg:
        return last[1]
    free = _Key(cfg.model_copy(update={**dict.fromkeys(SIZE_FIELDS, UNREAD),
                                       "infer": cfg.infer.model_copy(update={"context": UNREAD})}))
    _LAST[0] = (cfg, free)
    return free


_CACHE: dict[tuple, tuple[object, Any]] = {}
_CACHE_LIMIT = 4096


def size_free(fn: Callable[[Context], _T]) -> Callable[[Context], _T]:
    """Memoize ``fn(ctx)`` by (fn, architecture, size-free configuration, stage) (module docstring). The
    architecture is kept with its entry and compared by identity, so a recycled ``id`` cannot hit. A list
    result is returned as a new list each time (callers may extend it)."""

    last: list[tuple[Any, ...]] = [(None, None, None, None)]
    """(configuration object, architecture, stage, entry) of the last call (the same estimate asks again)."""

    @functools.wraps(fn)
    def memoized(ctx: Context) -> _T:
        prev = last[0]
        if prev[0] is ctx.cfg and prev[1] is ctx.arch and prev[2] == ctx.stage:
            hit = prev[3]
        else:
            free = _size_free_key(ctx.cfg)
            key = (fn, id(ctx.arch), free, ctx.stage)
            hit = _CACHE.get(key)
            if hit is None or hit[0] is not ctx.arch:
                result = fn(Context(ctx.arch, free.cfg, UNREAD, UNREAD, stage_override=ctx.stage))
                if len(_CACHE) >= _CACHE_LIMIT:
                    _CACHE.clear()
                hit = _CACHE[key] = (ctx.arch, result)
            last[0] = (ctx.cfg, ctx.arch, ctx.stage, hit)
        return list(hit[1]) if isinstance(hit[1], list) else hit[1]  # type: ignore[return-value]

    return memoized


_CANONICAL: dict[int, tuple[object, tuple[Any, ...]]] = {}


def canonical_layers(arch: Any) -> tuple[tuple[int, Any], ...]:
    """Every layer of ``arch`` as (class, canonical layer): the layer with its tensors' names replaced by
    ``UNREAD``, so that two blocks that differ only in their names (``model.layers.3.`` against ``.4.``) are equal
    (any other field still tells them apart), and the index of the first layer equal to it. Memoized per
    architecture (kept and compared by identity)."""
    from dataclasses import replace

    hit = _CANONICAL.get(id(arch))
    if hit is None or hit[0] is not arch:
        first: dict[Any, tuple[int, Any]] = {}
        canons = [replace(layer, tensors=tuple(_nameless(t) for t in layer.tensors)) for layer in arch.layers]
        for i, canon in enumerate(canons):
            first.setdefault(canon, (i, canon))
        layers = tuple(first[canon] for canon in canons)
        if len(_CANONICAL) >= 256:
            _CANONICAL.clear()
        hit = _CANONICAL[id(arch)] = (arch, layers)
    return hit[1]


_TENSOR_FIELDS = tuple(f.name for f in dataclasses.fields(Tensor)) == ("name", "shape", "role", "projections", "copies",
                                                                       "routed")
"""Tensor has exactly these fields, in this order: ``_nameless`` may build the Tensor itself (else ``replace``)."""


def _nameless(t: Tensor) -> Tensor:
    """``dataclasses.replace(t, name=UNREAD)``, built directly while Tensor's fields are those ``_TENSOR_FIELDS``
    names (a model has thousands of tensors, and ``replace`` walks the fields generically)."""
    if _TENSOR_FIELDS:
        return Tensor(UNREAD, t.shape, t.role, t.projections, t.copies, t.routed)
    return dataclasses.replace(t, name=UNREAD)


_PER_CONFIG: list[tuple[Any, Any, dict]] = [(None, None, {})]
"""The configuration and architecture of the estimate in progress, and its per-layer-class results."""


def per_layer_class(ctx: Context, layer_index: int, compute: Callable[..., _T], *args: Any) -> _T:
    """``compute(spec, cfg, layer, *args)`` for layer ``layer_index`` of ``ctx``, with ``layer`` its name-free
    canonical form (``canonical_layers``), computed once per class of equal canonical layers and ``args``
    (hashable) for the configuration in progress: the blocks of a model are alike, and an estimate sums them.
    ``compute`` sees neither the index nor the names (reading a name raises ``SizeRead``), so equal keys give
    equal results by construction. The memo lives while the same configuration object is estimated."""
    slot = _PER_CONFIG[0]
    if slot[0] is not ctx.cfg or slot[1] is not ctx.arch:
        slot = _PER_CONFIG[0] = (ctx.cfg, ctx.arch, {})
    cls, layer = canonical_layers(ctx.arch)[layer_index]
    key = (compute, cls, *args)
    memo = slot[2]
    if key not in memo:
        memo[key] = compute(ctx.arch.spec, ctx.cfg, layer, *args)
    return memo[key]



GPU_KEY_FIELDS = ("supports_bf16",)
"""The GPU attributes a ``gpu_narrowed`` function may read (the flash backward workspace's dtype,
``activations._attention_backward_rows``); reading any other raises ``GpuRead``."""


class GpuRead(Exception):
    """A function memoized by ``gpu_narrowed`` read a GPU attribute outside ``GPU_KEY_FIELDS``: it then runs on the
    real GPU, unmemoized. Not an AttributeError, so ``getattr(gpu, name, default)`` cannot quietly take the default."""


class _GpuView:
    """The GPU inside a ``gpu_narrowed`` function: the ``GPU_KEY_FIELDS``, each read from the real GPU and logged,
    and nothing else (any other attribute, comparison, hash or conversion raises ``GpuRead``)."""

    __slots__ = ("_gpu", "_log")

    def __init__(self, gpu: Any) -> None:
        object.__setattr__(self, "_gpu", gpu)
        object.__setattr__(self, "_log", {})

    def __getattr__(self, name: str) -> Any:
        if name not in GPU_KEY_FIELDS:
            raise GpuRead(f"gpu_narrowed: a memoized function read the GPU's {name}, not among GPU_KEY_FIELDS")
        value = getattr(object.__getattribute__(self, "_gpu"), name)
        object.__getattribute__(self, "_log").setdefault(name, value)
        return value

    def _fail(self, *args: Any, **kwargs: Any) -> Any:
        raise GpuRead("gpu_narrowed: a memoized function used the GPU other than by reading GPU_KEY_FIELDS")

    __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = __hash__ = __bool__ = __setattr__ = _fail  # type: ignore[assignment]
    __iter__ = __len__ = __str__ = __format__ = __reduce__ = __reduce_ex__ = _fail  # type: ignore[assignment]


_SCOPE: list[dict[tuple, tuple[object, list[tuple[tuple[tuple[str, Any], ...], list[Any], tuple[str, ...]]]]] | None] \
    = [None]
"""The memo of the ``narrowed_scope`` in progress (None: none, ``gpu_narrowed`` calls through): (fn, id of the
architecture, size-free key, sizes, stage, host) -> (the architecture, entries), each entry the GPU reads its run
made (name, value) in order, its rows and what it appended to ``missing``."""
_NARROWED_LIMIT = 512


@contextlib.contextmanager
def narrowed_scope() -> Iterator[None]:
    """Inside, ``gpu_narrowed`` functions are memoized (a sweep group: its GPUs' estimates at the same points); the
    memo lives as long as the outermost scope, so nothing outside a sweep, nor a function patched between two
    sweeps, ever meets an entry."""
    outer = _SCOPE[0]
    if outer is None:
        _SCOPE[0] = {}
    try:
        yield
    finally:
        if outer is None:
            _SCOPE[0] = None
_READS_MORE: set[Any] = set()
"""Functions that once read the GPU beyond ``GPU_KEY_FIELDS``: run on the real GPU from then on, unmemoized."""


def gpu_narrowed(fn: Callable[[Context, list[str]], list[_T]]) -> Callable[[Context, list[str]], list[_T]]:
    """Inside a ``narrowed_scope``, memoize ``fn(ctx, missing)`` (its rows, and what it appends to ``missing``)
    by (fn, architecture, configuration, stage, host) and the GPU attributes it read; exact by construction, as
    ``size_free``. ``fn`` runs with a Context whose GPU answers only ``GPU_KEY_FIELDS`` (``_GpuView``), each read
    logged. A deterministic function given the same inputs and the same answers to the reads it made takes the
    same path, so a GPU that answers those reads alike (read here from the real GPU, in order, so that a GPU
    tracing its reads, ``vector_probe.TracedGpu``, records what the function would read) gets the logged result.
    A sweep's NVIDIA and AMD GPUs differ in the runtime rows only, which ``components.stage_rows`` adds after
    ``job_rows``. A function that reads more of the GPU (``GpuRead``) runs on the real one, unmemoized. The
    configuration is keyed by its size-free key (hashed once, ``size_free_key``) and its sizes; the architecture
    is kept with its entry and compared by identity."""

    @functools.wraps(fn)
    def memoized(ctx: Context, missing: list[str]) -> list[_T]:
        memo = _SCOPE[0]
        if memo is None or fn in _READS_MORE:
            return fn(ctx, missing)
        cfg = ctx.cfg
        key = (fn, id(ctx.arch), _size_free_key(cfg), cfg.micro_batch, cfg.seq_len, cfg.infer.context, ctx.stage,
               ctx.host)
        slot = memo.get(key)
        if slot is None or slot[0] is not ctx.arch:
            if len(memo) >= _NARROWED_LIMIT:
                memo.clear()
            slot = memo[key] = (ctx.arch, [])
        for reads, rows, added in slot[1]:
            if all(getattr(ctx.gpu, name) == value for name, value in reads):
                missing.extend(added)
                return list(rows)
        view = _GpuView(ctx.gpu)
        own: list[str] = []
        try:
            rows = fn(Context(ctx.arch, cfg, view, ctx.host, stage_override=ctx.stage), own)  # type: ignore[arg-type]
        except GpuRead:
            _READS_MORE.add(fn)
            return fn(ctx, missing)
        slot[1].append((tuple(object.__getattribute__(view, "_log").items()), rows, tuple(own)))
        missing.extend(own)
        return list(rows)

    return memoized
