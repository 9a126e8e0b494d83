"""Scalar probes of a vectorized sweep group, shared by every GPU whose bytes are the same by construction.

The scalar memory model (``memplan.estimator.estimate``) is a deterministic function of its inputs. It
reads the GPU through the attributes of a ``GpuSpec``; every other input of a sweep group (model, job
config, host) is the same for all the group's GPUs. So when an estimate on GPU A read only the
attributes R of A, an estimate on GPU B with the same values of R takes the same path and returns the same
rows, and B's ``Estimate`` is A's with ``gpu`` replaced (its capacity, fit and headroom then follow from
B's own memory). ``TracedGpu`` records R while an estimate runs: the fields and properties it reads
(a property counts as itself, not as the fields it is built from, so ``calibration`` stands for the
profile lookup and not the name), and ``*`` (the whole spec) for anything else (``__dict__``, a pydantic
method): then only an equal spec shares. GPUs are grouped by R's values, each group is estimated once
per probe point (on its first GPU), and the grouping is re-checked against every attribute read by the
end of the group's work (``Prober.shares``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from pydantic import PrivateAttr

from memplan.catalog.schema import GpuSpec
from memplan.grid import METRIC_COLUMN, Cell, SweepSpec, _Evaluator, _gpu
from memplan.units import parse_fraction_or_size

TIERS = ("gpu", "cpu", "nvme")


def tier_of(col: str) -> str:
    return col.split(":", 1)[0]


def is_fitted(col: str) -> bool:
    return ":" in col and col.endswith("_bytes")


class NotExact(Exception):
    """A fit failed a check: the group goes to the scalar path."""


WHOLE = "*"
"""The read set holds this when an estimate read the GPU other than through a field or a property."""

UNTRACKED = frozenset({"__class__"})
"""Reads that every GpuSpec answers alike (``isinstance``)."""

_READS: list[set[str] | None] = []
"""The read set of the estimate in progress (top of the stack); None inside a property being read."""


class TracedGpu(GpuSpec):
    """A GpuSpec that adds the name of each field or property an estimate reads to the current read set. A property's
    value is computed once per TracedGpu (``capacity_bytes``, ``calibration``: a profile file looked up): the group's
    estimates read the GPU as it is when the group starts, as ``Prober.read`` does for the other GPUs."""

    _properties: dict[str, Any] = PrivateAttr(default_factory=dict)

    def __getattribute__(self, name: str) -> Any:
        reads = _READS[-1] if _READS else None
        if name in UNTRACKED or name in GpuSpec.model_fields:
            if reads is not None and name not in UNTRACKED:
                reads.add(name)
            return super().__getattribute__(name)
        if reads is not None:
            reads.add(name if name in PROPERTIES else WHOLE)
        kept = name in KEPT
        if kept:
            known = super().__getattribute__("__pydantic_private__")["_properties"]
            if name in known:
                return known[name]
        _READS.append(None)  # what a property reads inside is the property's value, compared as a whole
        try:
            value = super().__getattribute__(name)
        finally:
            _READS.pop()
        if kept:
            known[name] = value
        return value


PROPERTIES = frozenset(name for name in dir(GpuSpec) if isinstance(getattr(GpuSpec, name, None), property))
"""GpuSpec's properties (pydantic's included): a read of one is recorded by its name."""

KEPT = frozenset(name for cls in GpuSpec.__mro__ if cls.__module__.startswith("memplan.")
                 for name, value in vars(cls).items() if isinstance(value, property))
"""memplan's own GpuSpec properties, computed once per TracedGpu: functions of the spec (``calibration`` of the
calibration profiles as well)."""


def traced(gpu: GpuSpec) -> TracedGpu:
    return TracedGpu.model_construct(_fields_set=gpu.model_fields_set, **{k: getattr(gpu, k) for k in GpuSpec.model_fields})


@dataclass
class Probe:
    """The scalar model at one point of one GPU: its record (as ``grid.evaluate`` writes it) and slack."""

    record: dict[str, Any]
    slack: int
    phases: dict[str, Any]
    """Fitted column -> the phases its rows are alive in (``Row.phases``, from memory/registry.py; None: all)."""
    step: tuple
    """The step's phases (``Estimate.step_phases``): a tier's peak is its largest total over them."""


_LAST_VALIDATED: list[tuple[Any, Any]] = [(None, None)]
"""((configuration, its set fields), ``make_config`` of it or None): ``Prober.validated``'s last answer."""


class Prober:
    """Scalar estimates of one group (model, job, GPU count) on the GPUs that share its first GPU's reads,
    memoized by (batch, size); each other GPU's probe is the same estimate with its own GPU."""

    def __init__(self, spec: SweepSpec, cell: Cell, values: dict[tuple[str, str], Any] | None = None) -> None:
        self.ev = _Evaluator(spec, cell)
        self.spec = spec
        self.reads: set[str] = set()
        self.gpu = traced(self.ev.gpu)
        self.estimates: dict[tuple[int, int], Any] = {}
        self.failed: dict[tuple[int, int], Exception] = {}
        self.memo: dict[tuple[str, int, int], Probe] = {}
        self.values: dict[tuple[str, str], Any] = {} if values is None else values
        """(GPU, attribute) -> value, shared by the probers of one group (``calibration`` reads a file)."""
        self.evaluated = 0
        self.own: dict[str, tuple[GpuSpec, int, int, float | None]] = {}
        """GPU name -> ``terms``."""
        self._validated: Any = False
        """``validated``'s memo: False before it runs."""

    def shares(self, gpu: str) -> bool:
        """True when ``gpu`` answers every read of this prober's estimates so far like its first GPU (the
        whole spec for ``*``)."""
        if WHOLE in self.reads:
            return _gpu(gpu) == self.ev.gpu
        return all(self.read(gpu, name) == self.read(self.ev.cell.gpu, name) for name in self.reads)

    def read(self, gpu: str, name: str) -> Any:
        """``gpu``'s attribute ``name``, read once per group."""
        if (gpu, name) not in self.values:
            self.values[(gpu, name)] = getattr(_gpu(gpu), name)
        return self.values[(gpu, name)]

    def estimate(self, b: int, s: int, missing_ok: bool = False) -> Any:
        """The scalar Estimate at micro-batch ``b`` and size ``s`` on the first GPU, its reads recorded; NotExact
        when something is not modelled (unless ``missing_ok``). A MemplanError it raises is raised again at the
        same point (another GPU answering the reads made until then alike would raise it too)."""
        if (b, s) in self.failed:
            raise self.failed[(b, s)]
        if (b, s) not in self.estimates:
            from memplan.errors import MemplanError

            _READS.append(self.reads)
            try:
                est = self.exact(b, s)
            except MemplanError as exc:
                self.failed[(b, s)] = exc
                raise
            finally:
                _READS.pop()
            self.evaluated += 1
            self.estimates[(b, s)] = est
        est = self.estimates[(b, s)]
        if est.not_modelled and not missing_ok:
            raise NotExact("not modelled")
        return est

    def exact(self, b: int, s: int) -> Any:
        """``estimator.estimate`` of the first GPU at (b, s). The group's configuration is validated once
        (``validated``) and each size set on the validated one (``estimator.estimate_validated``): no JobConfig
        validator reads a size, so that is the configuration ``estimate`` would validate at (b, s). Sizes that are
        not positive, or a configuration that does not validate, take ``estimate`` itself (its own error)."""
        from memplan.estimator import estimate, estimate_validated
        from memplan.search import with_size

        base = self.validated() if b > 0 and s > 0 else None
        if base is None:
            cfg = with_size(with_size(self.ev.cfg, "context", s), "micro_batch", b)
            return estimate(self.ev.model, self.gpu, cfg, host=self.spec.host)
        cfg = with_size(with_size(base, "context", s), "micro_batch", b)
        return estimate_validated(self.ev.model, self.gpu, cfg, host=self.spec.host)

    def validated(self) -> Any:
        """``estimator.make_config`` of the group's configuration, once; None when it does not validate. The
        probers of a group's GPU classes hold equal configurations (``grid._Evaluator`` reads no GPU to build it):
        the last one validated is reused when equal, its set fields too (``make_config`` dumps only those)."""
        if self._validated is False:
            from memplan.errors import MemplanError
            from memplan.estimator import make_config

            cfg = self.ev.cfg
            key = (cfg, frozenset(cfg.model_fields_set))
            last = _LAST_VALIDATED[0]
            if last[0] == key:
                self._validated = last[1]
                return self._validated
            try:
                self._validated = make_config(cfg)
            except MemplanError:
                self._validated = None
            _LAST_VALIDATED[0] = (key, self._validated)
        return self._validated

    def at(self, b: int, s: int, gpu: str | None = None) -> Probe:
        """The probe of ``gpu`` (default: the first GPU) at (b, s): the shared estimate with that GPU. Another
        GPU's record is the first GPU's with the columns that read the GPU recomputed (``csv_out.record_on_gpu``)."""
        name = self.ev.cell.gpu if gpu is None else gpu
        if (name, b, s) not in self.memo:
            from memplan.memory.breakdown import Tier
            from memplan.report.cost import cost_record
            from memplan.report.csv_out import estimate_record, record_on_gpu

            spec, est = self.spec, self.estimate(b, s)
            own, capacity, required, price = self.terms(name)
            first = None if name == self.ev.cell.gpu else self.at(b, s)
            rec = estimate_record(est) if first is None else record_on_gpu(first.record, est, own)
            slack = min(rec["headroom_bytes"], capacity - est.peak(Tier.GPU) - required)
            rec.update({"ok": slack >= 0, "required_headroom_bytes": required, "not_modelled": "",
                        METRIC_COLUMN[spec.metric]: None, "error": "", **cost_record(price, est)})
            self.memo[(name, b, s)] = Probe(rec, slack, first.phases if first else self.phases(est),
                                            tuple(est.step_phases))
        return self.memo[(name, b, s)]

    def terms(self, name: str) -> tuple[GpuSpec, int, int, float | None]:
        """(spec, capacity, required headroom, price per hour) of GPU ``name``, once per prober."""
        if name not in self.own:
            spec, own = self.spec, _gpu(name)
            capacity = own.capacity_bytes
            required = parse_fraction_or_size(spec.min_headroom, total=capacity, field="--min-headroom")
            price = spec.usd_per_hour if spec.usd_per_hour is not None else own.price_per_hour_usd
            self.own[name] = (own, capacity, required, price)
        return self.own[name]

    @staticmethod
    def phases(est: Any) -> dict[str, Any]:
        """Fitted column -> the phases its rows are alive in; NotExact when one column's rows differ."""
        phases: dict[str, Any] = {}
        for row in est.rows:
            col = f"{row.tier.value}:{row.component}_bytes"
            if phases.setdefault(col, row.phases) != row.phases:
                raise NotExact(f"{col}: rows alive in different phases")
        return phases


def slack_at(prober: Prober, b: int, s: int, gpu: str) -> int:
    """``gpu``'s slack at (b, s) as ``grid._Evaluator.slack`` computes it: free bytes on the tiers' peaks,
    less the required headroom, from the estimate its class shares."""
    from memplan.memory.breakdown import Tier

    own = _gpu(gpu)
    est = dataclasses.replace(prober.estimate(b, s), gpu=own)
    required = parse_fraction_or_size(prober.spec.min_headroom, total=own.capacity_bytes, field="--min-headroom")
    return min(est.headroom_bytes, est.headroom(Tier.GPU) - required)


def context_results(spec: SweepSpec, model: str, job: Any, count: int) -> list[Any]:
    """``max-context`` cells of (model, job, count), every GPU × batch in grid order: on each GPU the scalar
    path's own search (``grid.largest_ok`` over [1, MAX_CONTEXT_TOKENS] of that GPU's slack) and records, the
    estimates shared by the GPUs that read alike (module docstring), so each answer is the scalar path's by
    construction and only the estimates are fewer. NotExact (the group takes the scalar path) when a GPU's
    reads come to differ from its class's or something is not modelled; a MemplanError too."""
    from memplan.grid import CellResult, largest_ok
    from memplan.search import MAX_CONTEXT_TOKENS

    column, sizes = METRIC_COLUMN[spec.metric], spec.sizes(job)
    classes: list[Prober] = []
    values: dict[tuple[str, str], Any] = {}
    out = []
    for gpu in spec.gpus:
        prober = next((p for p in classes if p.shares(gpu)), None)
        if prober is None:
            prober = Prober(spec, Cell(model, gpu, job, count, None, spec.batches[0]), values)
            classes.append(prober)
        for b in spec.batches:
            def ok(s: int, p: Prober = prober, b: int = b, g: Any = gpu) -> Any:
                return slack_at(p, b, s, g)

            value = largest_ok(ok, hi=MAX_CONTEXT_TOKENS)
            records = [{**prober.at(b, s, gpu).record, column: value} for s in sizes]
            out.append((prober, CellResult(Cell(model, gpu, job, count, None, b), value, records)))
    if not all(p.shares(r.cell.gpu) for p, r in out):
        raise NotExact("a GPU read differs")
    return [r for _, r in out]


class SharedEvaluator(_Evaluator):
    """``grid._Evaluator`` of one cell whose estimates are its class's (``Prober``), with the cell's own GPU."""

    def __init__(self, spec: SweepSpec, cell: Cell, prober: Prober) -> None:
        super().__init__(spec, cell)
        self.prober = prober

    def at(self, value: int) -> Any:
        if value not in self.memo:
            b, s = (value, self.cell.size) if self.free == "micro_batch" else (self.cell.batch, value)
            assert b is not None and s is not None, "a cell searched along one size has the other fixed"
            self.memo[value] = dataclasses.replace(self.prober.estimate(b, s, missing_ok=True), gpu=self.gpu)
        return self.memo[value]


def shared_evaluate(spec: SweepSpec, group: list[Cell]) -> list[Any]:
    """``grid.evaluate`` of each cell of one (model, job, GPU count) group, in order, each GPU's estimates being
    those of the first GPU of its class (the GPUs answering every read alike, module docstring), errors included:
    the scalar path's records by construction, with fewer estimates (a group the fit cannot take: what is not
    modelled, a configuration the model refuses). NotExact when a GPU's reads come to differ from its class's."""
    from memplan.grid import evaluate

    classes: list[Prober] = []
    values: dict[tuple[str, str], Any] = {}
    out = []
    for cell in group:
        prober = next((p for p in classes if p.shares(cell.gpu)), None)
        if prober is None:
            prober = Prober(spec, cell, values)
            classes.append(prober)

        def shared(spec: SweepSpec, cell: Cell, p: Prober = prober) -> SharedEvaluator:
            return SharedEvaluator(spec, cell, p)

        out.append((prober, evaluate(spec, cell, shared)))
    if not all(p.shares(r.cell.gpu) for p, r in out):
        raise NotExact("a GPU read differs")
    return [r for _, r in out]
