"""``--layers N``: does memplan's prediction for the whole model follow from the N measured layers?

A truncated measurement checks memplan on the first N layers. It says something about the whole
model only if memplan's prediction grows by a fixed amount per layer (or per repeating group of
layers: Gemma-2 alternates sliding and full attention, so its period is 2). ``scaling_check``
verifies that, per component and in exact integer bytes:

    P(L) == P(N + r) + q · (P(N + p) − P(N)),   L − N = q·p + r

with P(n) memplan's GPU rows for the first n layers (CUDA widths, what ``estimate`` reports), L the
model's layers and p the period of the layers from N on (shorter than L − N). The runtime rows
(CUDA context, allocator reserve) are left out: the reserve rounds up once, so it is affine only
to within a byte.
"""

from __future__ import annotations

from typing import Any

from memplan.arch.build import build_architecture
from memplan.arch.tensors import Layer
from memplan.catalog.schema import GpuSpec, HostSpec, ModelSpec
from memplan.config import JobConfig
from memplan.memory.context import Context


def _signature(layer: Layer) -> tuple[int, bool, bool, int]:
    return layer.params, layer.moe, layer.sliding, layer.experts_per_token


def period(layers: tuple[Layer, ...], start: int) -> int | None:
    """The smallest p < L − start such that layers ``start``.. repeat every p layers; None if none."""
    sigs = [_signature(layer) for layer in layers]
    rest = len(sigs) - start
    for p in range(1, rest):
        if all(sigs[i] == sigs[i + p] for i in range(start, len(sigs) - p)):
            return p
    return None


def _prediction(spec: ModelSpec, cfg: JobConfig, gpu: GpuSpec, host: HostSpec) -> dict[str, int]:
    from memplan.measure.compare import predicted_components

    ctx = Context(build_architecture(spec), cfg, gpu, host)
    return predicted_components(ctx, "cuda")[0]


def scaling_check(full: ModelSpec, measured: ModelSpec, cfg: JobConfig, gpu: GpuSpec, host: HostSpec) -> dict[str, Any]:
    """Whether memplan's prediction for ``full`` is the ``measured`` truncation's plus whole periods.

    Returns ``layers`` (N), ``of`` (L), ``period`` (p), ``per_period_bytes`` (component -> bytes added
    by p more layers), ``predicted_bytes`` (P(N) and P(L) summed), ``extrapolated_bytes`` and ``linear``
    (True/False; None when the layers after N do not repeat), with ``nonlinear`` naming the components off.
    """
    from memplan.measure.build import measured_spec

    whole, _ = measured_spec(full, None)
    n, total = measured.num_hidden_layers or 0, whole.num_hidden_layers or 0
    out: dict[str, Any] = {"layers": n, "of": total}
    if n >= total:
        return {**out, "linear": True, "note": "the whole model was measured"}
    p = period(build_architecture(whole).layers, n)
    if p is None:
        return {**out, "linear": None, "note": f"layers {n}..{total - 1} do not repeat: no per-layer extrapolation"}
    predict = lambda count: _prediction(measured_spec(full, count)[0], cfg, gpu, host)  # noqa: E731
    low, high, target = predict(n), predict(n + p), _prediction(whole, cfg, gpu, host)
    steps, rest = divmod(total - n, p)
    tail = predict(n + rest) if rest else low
    names = list(dict.fromkeys([*target, *low, *high]))
    step = {k: high.get(k, 0) - low.get(k, 0) for k in names}
    extrapolated = {k: tail.get(k, 0) + steps * step[k] for k in names}
    off = {k: target.get(k, 0) - extrapolated[k] for k in names if target.get(k, 0) != extrapolated[k]}
    return {**out, "period": p, "per_period_bytes": {k: v for k, v in step.items() if v},
            "predicted_bytes": {"measured_layers": sum(low.values()), "all_layers": sum(target.values())},
            "extrapolated_bytes": sum(extrapolated.values()), "linear": not off, "nonlinear": off}
