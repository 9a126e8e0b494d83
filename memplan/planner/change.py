"""A request change as data: ``config.*``, ``space.*`` and ``hardware.*`` paths and their new values, what a
suggestion carries (``suggest``); :func:`apply` makes the change. The report writes the same paths as command-line
options (``memplan.report.flags``)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from memplan.catalog.store import catalog_gpu
from memplan.config import Job, JobConfig, retarget
from memplan.planner.request import PlanRequest
from memplan.planner.space import SearchSpace


def _nest(out: dict[str, Any], path: str, value: Any) -> None:
    """Set ``path`` (``infer.context``) in the nested dict ``out`` (a copy of each dict on the way)."""
    head, _, rest = path.partition(".")
    if rest:
        inner = out.get(head)
        out[head] = inner = dict(inner) if isinstance(inner, dict) else {}
        _nest(inner, rest, value)
    else:
        out[head] = value


def _merged(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``old`` with ``new``'s values, nested dicts (a nested model's fields) merged, not replaced."""
    out = dict(old)
    for key, value in new.items():
        both = isinstance(value, dict) and isinstance(old.get(key), dict)
        out[key] = _merged(old[key], value) if both else value
    return out


HARDWARE_CONFIG = ("gpus_per_node", "nodes")
"""``hardware.*`` changes that are JobConfig fields (the cluster's shape); ``gpu`` is the GPU's catalog name, the
others are host (HostSpec) fields."""


def apply(req: PlanRequest, changes: dict[str, Any]) -> PlanRequest:
    """The request with ``changes`` made: ``config.<field>`` (dotted into nested models) and ``hardware.gpus_per_node``
    / ``hardware.nodes`` in the JobConfig, revalidated (a new ``job`` first drops the fields it does not read,
    ``config.retarget``); ``space.<field>`` in the SearchSpace; ``hardware.gpu``, a catalog name; other
    ``hardware.*`` in the host. Raises ValueError (pydantic's ValidationError is one) when the result is invalid,
    MemplanError for an unknown GPU."""
    config: dict[str, Any] = {}
    space: dict[str, Any] = {}
    host: dict[str, Any] = {}
    gpu = req.gpu
    for path, value in changes.items():
        head, _, rest = path.partition(".")
        if head == "config" or (head == "hardware" and rest in HARDWARE_CONFIG):
            _nest(config, rest, value)
        elif head == "space":
            space[rest] = value
        elif head == "hardware" and rest == "gpu":
            gpu = catalog_gpu(value)
        elif head == "hardware":
            host[rest] = value
        else:
            raise ValueError(f"unknown request change {path!r}")
    base = req.base
    if config:
        start = retarget(base, Job(config["job"])) if "job" in config else base  # fields the new job reads
        base = JobConfig.model_validate(_merged(start.model_dump(exclude_unset=True), config))
    new_space = SearchSpace.model_validate({**req.space.model_dump(), **space}) if space else req.space
    new_host = req.host.model_copy(update=host) if host else req.host
    return replace(req, gpu=gpu, host=new_host, base=base, space=new_space)
