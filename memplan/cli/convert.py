"""Options to configuration: :func:`job_config` is the one mapping from options to a ``JobConfig``,
:func:`search_space` the one mapping to a ``SearchSpace`` (both read the declarations in ``groups``)."""

from __future__ import annotations

from enum import Enum
from typing import Any

from memplan.cli.opts import Opts
from memplan.config import Job
from memplan.errors import MemplanError
from memplan.options import OPTS, quant_name, size_or_none

# -- options -> JobConfig ------------------------------------------------------------------------

def choices(opts: Opts, name: str) -> tuple[Any, ...] | None:
    """The values of a comma-list option, each read as its declared type (None when not given)."""
    text, opt = opts.get(name), OPTS[name]
    if text is None:
        return None
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    flag = opt.flags[0]
    if not items:
        raise MemplanError(f"{flag}: give at least one value.")
    if opt.kind is int:
        return int_list(str(text), flag, minimum=0 if name == "zero" else 1)
    kind: Any = opt.kind
    if isinstance(kind, type) and issubclass(kind, Enum):
        from memplan.errors import did_you_mean

        allowed = [str(m.value) for m in kind]
        for v in items:
            if v not in allowed:
                raise MemplanError(f"{flag}: unknown choice {v!r}.{did_you_mean(v, allowed)}")
        return tuple(kind(v) for v in items)
    return tuple(opt.item(v) if opt.item else v for v in items)


def int_list(text: str | None, flag: str, *, minimum: int = 1) -> tuple[int, ...] | None:
    """Integers from a comma list such as ``1,2,4`` (None when the flag is not given)."""
    if text is None:
        return None
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise MemplanError(f"{flag}: expected comma-separated integers such as 1,2,4, got {text!r}.") from None
    if not values or any(v < minimum for v in values):
        kind = "positive integers" if minimum == 1 else f"integers of at least {minimum}"
        raise MemplanError(f"{flag}: values must be {kind}, got {text!r}.")
    return values


def job_fields(opts: Opts) -> dict[str, Any]:
    """The JobConfig fields the options set, as a nested dict (``lora.rank`` -> {"lora": {"rank": ...}})."""
    out: dict[str, Any] = {}
    for name, value in opts.items():
        opt = OPTS.get(name)
        if opt is None or opt.field is None:
            continue
        if name in opts.lists:
            picked = choices(opts, name) or ()
            if opt.base == "none" or not picked or (opt.base == "single" and len(picked) != 1):
                continue
            value = picked[0]
        elif opt.convert is not None and value is not None:
            value = opt.convert(value)
        if value is None:
            continue
        head, _, tail = opt.field.partition(".")
        if tail:
            out.setdefault(head, {})[tail] = value
        else:
            out[head] = value
    return out


def job_config(opts: Opts, base: Any = None, **fields: Any) -> Any:
    """A validated JobConfig: ``base`` (a recipe's, or the defaults), the options given, then ``fields``."""
    from memplan.estimator import make_config

    data = job_fields(opts)
    if base is not None:
        for key, value in list(data.items()):
            if isinstance(value, dict):
                data[key] = {**getattr(base, key).model_dump(), **value}
    return make_config(base, **{**data, **fields})


def host(opts: Opts) -> Any:
    """The host (CPU RAM and NVMe per node) from ``--cpu-ram`` and ``--nvme``."""
    from memplan.catalog.schema import HostSpec

    data: dict[str, int] = {}
    ram = size_or_none(opts.get("cpu_ram"), "--cpu-ram")
    if ram is not None:
        if ram <= 0:
            raise MemplanError("--cpu-ram must be positive.")
        data["cpu_ram_bytes"] = ram
    nvme = size_or_none(opts.get("nvme"), "--nvme")
    if nvme is not None:
        data["nvme_bytes"] = nvme
    return HostSpec(**data)


# -- options -> SearchSpace ----------------------------------------------------------------------

def search_space(opts: Opts) -> Any:
    """A validated SearchSpace from the comma-list options (and the per-layer switches); errors name the flag."""
    from pydantic import ValidationError

    from memplan.catalog.store import format_validation_error
    from memplan.planner.space import SearchSpace

    infer = opts.get("job") is Job.INFER
    data: dict[str, Any] = {}
    for name in opts:
        opt = OPTS[name]
        if opt.dim is None:
            continue
        value = choices(opts, name) if name in opts.lists else opts[name]
        dim = opt.infer_dim if infer and opt.infer_dim else opt.dim
        if name == "context" and not infer:
            continue
        data[dim] = value
    if opts.get("job") is Job.QLORA and data.get("quant") is not None and set(data["quant"]) == {None}:
        raise MemplanError("--quant: QLoRA keeps the frozen weights in 4 bits, so 'none' alone is not a choice; use "
                           "--job lora for 16-bit frozen weights.")
    if any(z > 3 for z in data.get("zero") or ()):
        raise MemplanError(f"--zero: ZeRO stages are 0, 1, 2 and 3, got {','.join(map(str, data['zero']))}.")
    try:
        return SearchSpace.model_validate(data)
    except ValidationError as exc:
        raise MemplanError(f"invalid search space: {format_validation_error(exc)}.") from None


# -- per-layer options ---------------------------------------------------------------------------

def layer_set(text: str, num_layers: int, flag: str) -> list[int]:
    """Layer indices from '0-39,70,72-79' (each within the model's layers): ``memplan.preflight.layer_ranges``."""
    from memplan.preflight import layer_ranges

    return layer_ranges(text, num_layers, flag)


def quant_map(text: str, num_layers: int) -> tuple[str | None, ...]:
    """A per-layer format map from '0-39=int8,40-79=nf4' (none/bf16/fp16 = 16-bit); every layer exactly once."""
    fmts: dict[int, str | None] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        layers, sep, fmt = part.partition("=")
        if not sep or not fmt.strip():
            raise MemplanError(f"--quant-map: expected LAYERS=FORMAT such as 0-39=int8, got {part!r}.")
        for i in layer_set(layers, num_layers, "--quant-map"):
            if i in fmts:
                raise MemplanError(f"--quant-map: layer {i} is given twice.")
            fmts[i] = quant_name(fmt.strip())
    if len(fmts) != num_layers:
        raise MemplanError(f"--quant-map covers {len(fmts)} of the model's {num_layers} layers; give every layer a format.")
    return tuple(fmts[i] for i in range(num_layers))


def model_and_config(model: str, opts: Opts) -> tuple[Any, Any]:
    """The model (loaded only when a per-layer option needs its layers) and the job's JobConfig."""
    fields: dict[str, Any] = {}
    spec: Any = model
    qmap, offload = opts.get("quant_map"), opts.get("offload_layers")
    if qmap is not None or offload is not None:
        from memplan.catalog.resolve import load_model

        spec = load_model(model)
        layers = spec.num_hidden_layers or 0
        if not layers:
            raise MemplanError(f"per-layer options need the model's layers; {spec.name} knows only a parameter count.")
        if qmap is not None:
            fields["quant_map"] = quant_map(qmap, layers)
        if offload is not None:
            off = set(layer_set(offload, layers, "--offload-layers"))
            fields["infer"] = {**job_fields(opts).get("infer", {}), "offload_map": tuple(i in off for i in range(layers))}
    return spec, job_config(opts, **fields)


# -- options -> a sweep's report settings ------------------------------------------------------------

def sweep_report(opts: Opts) -> dict[str, Any]:
    """The SweepSpec fields of ``--usd-per-hour`` and ``--speed`` (those given)."""
    from memplan.report.cost import checked_usd_per_hour

    out: dict[str, Any] = {}
    if opts.get("usd_per_hour") is not None:
        out["usd_per_hour"] = checked_usd_per_hour(opts["usd_per_hour"], "--usd-per-hour")
    if opts.get("speed"):
        out["speed"] = True
    return out
