"""Layer classes: layers the planner may treat as interchangeable because they hold identical tensors."""

from __future__ import annotations

from memplan.arch.tensors import Architecture

_CACHE: dict[tuple[int, bool], tuple[Architecture, list[int]]] = {}
_LIMIT = 64


def layer_classes(arch: Architecture, *, by_kind: bool = True) -> list[int]:
    """One class index per layer; equal indices mean identical tensors (names, shapes, copies) and, with
    ``by_kind``, the same attention kind (sliding window) and MoE-ness, which activations depend on.
    Memoized per architecture object (kept with the entry and compared by identity)."""
    key = (id(arch), by_kind)
    hit = _CACHE.get(key)
    if hit is not None and hit[0] is arch:
        return hit[1]
    seen: dict[tuple, int] = {}
    out = []
    for layer in arch.layers:
        sig: tuple[object, ...] = tuple((t.name, t.shape, t.copies) for t in layer.tensors)
        if by_kind:
            sig = (layer.moe, layer.sliding, sig)
        out.append(seen.setdefault(sig, len(seen)))
    if len(_CACHE) >= _LIMIT:
        _CACHE.clear()
    _CACHE[key] = (arch, out)
    return out
