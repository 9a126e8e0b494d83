"""CSV: one row per configuration, exact int ``*_bytes`` columns per component and tier, plus GiB columns."""

from __future__ import annotations

from typing import Any

from memplan.catalog.schema import GpuSpec
from memplan.config import JobConfig
from memplan.estimator import Estimate
from memplan.memory.breakdown import Tier, components
from memplan.units import GiB


def estimate_record(est: Estimate) -> dict[str, Any]:
    """A flat record of one estimate (config fields, totals, components) for CSV."""
    cfg = est.config
    rec: dict[str, Any] = {
        "model": est.model.name,
        "params": est.arch.params,
        "gpu": est.gpu.name,
        "gpus_per_node": cfg.gpus_per_node,
        "nodes": cfg.nodes,
    }
    for key, value, nested in _config_cells(cfg):
        if nested or key not in rec:
            rec[key] = value
    for tier in Tier:
        total = est.total(tier)
        rec[f"{tier.value}_total_bytes"] = total
        rec[f"{tier.value}_capacity_bytes"] = est.capacity(tier)
        rec[f"{tier.value}_total_gib"] = round(total / GiB, 4)
        for name, nbytes in components(est.rows, tier).items():
            rec[f"{tier.value}:{name}_bytes"] = nbytes
            rec[f"{tier.value}:{name}_gib"] = round(nbytes / GiB, 4)
    rec["fits"] = est.fits
    rec["headroom_bytes"] = est.headroom_bytes
    return rec


GPU_COLUMNS = ("gpu", "gpu_capacity_bytes", "fits", "headroom_bytes")
"""The columns of ``estimate_record`` that read the estimate's GPU (``Estimate.capacity``, ``fits``, ``headroom_bytes``
read its memory); every other column reads the model, the configuration, the host and the rows only."""


def record_on_gpu(record: dict[str, Any], est: Estimate, gpu: GpuSpec) -> dict[str, Any]:
    """``estimate_record(dataclasses.replace(est, gpu=gpu))`` from ``record = estimate_record(est)``: the same rows
    on another GPU (a sweep's GPUs that read alike share one estimate, ``vector_probe``), only ``GPU_COLUMNS``
    recomputed. Formula: capacity = the GPU's capacity (``GpuSpec.capacity_bytes``); fits = every tier's peak ≤
    its capacity; headroom = the smallest capacity − peak over the GPU and the tiers whose peak is above 0 (as
    ``Estimate``)."""
    peaks = {tier: est.peak(tier) for tier in Tier}
    capacity = {tier: gpu.capacity_bytes if tier is Tier.GPU else est.capacity(tier) for tier in Tier}
    used = [t for t in Tier if t is Tier.GPU or peaks[t] > 0]
    out = dict(record)
    out.update({"gpu": gpu.name, "gpu_capacity_bytes": capacity[Tier.GPU],
                "fits": all(capacity[t] - peaks[t] >= 0 for t in Tier),
                "headroom_bytes": min(capacity[t] - peaks[t] for t in used)})
    return out


_LAST_CONFIG: list[tuple[Any, tuple]] = [(None, ())]
"""The last configuration flattened and its cells: a sweep records one estimate on many GPUs."""

_SIZE_CELLS = {("micro_batch", False): "micro_batch", ("seq_len", False): "seq_len", ("infer_context", True): "context"}
"""The cells of the sizes a sweep varies (``memory.memo.SIZE_FIELDS`` and ``infer.context``): (column, nested) -> field."""

_CELLS: dict[Any, tuple] = {}
"""Size-free configuration (``memory.memo.size_free_key``) -> its cells as dumped from one of its configurations, and
the positions of the size cells among them."""


def _config_cells(cfg: JobConfig) -> tuple[tuple[str, Any, bool], ...]:
    """The configuration's fields as (column, cell, nested) triples, nested models flattened as ``key_sub``;
    memoized for the last configuration object (frozen, so the same object dumps alike), and per configuration
    without its sizes: two configurations equal but for their sizes dump alike but for the size cells (no field
    of JobConfig serializes from another), which are then taken from ``cfg`` itself."""
    from memplan.memory.memo import size_free_key

    last = _LAST_CONFIG[0]  # one tuple, replaced whole: threads can only miss
    if last[0] is cfg:
        return last[1]
    free = size_free_key(cfg)
    hit = _CELLS.get(free)
    if hit is None:
        cells = _dump_cells(cfg)
        at = [(i, _SIZE_CELLS[key, nested]) for i, (key, _, nested) in enumerate(cells) if (key, nested) in _SIZE_CELLS]
        hit = _CELLS[free] = (cells, at)
        if len(_CELLS) > 256:
            _CELLS.clear()
    cells, at = hit
    sizes = {"micro_batch": cfg.micro_batch, "seq_len": cfg.seq_len, "context": cfg.infer.context}
    out = list(cells)
    for i, size in at:
        out[i] = (out[i][0], sizes[size], out[i][2])
    _LAST_CONFIG[0] = (cfg, tuple(out))
    return _LAST_CONFIG[0][1]


def _dump_cells(cfg: JobConfig) -> tuple[tuple[str, Any, bool], ...]:
    cells: list[tuple[str, Any, bool]] = []
    for key, value in cfg.model_dump(mode="json").items():
        if isinstance(value, dict):
            cells += [(f"{key}_{sub}", _list_cell(v), True) for sub, v in value.items()]
        else:
            cells.append((key, _list_cell(value), False))
    return tuple(cells)


def records_to_csv(records: list[dict[str, Any]]) -> str:
    """CSV (stdlib ``csv``, no pandas: ``estimate`` must start fast), ``*_bytes`` columns as exact ints even
    where rows differ in their components (a component a row lacks holds 0 bytes on that tier; an unset
    size stays empty), never floats. Columns: every key, in the order first seen; rows end in ``\\n``."""
    import csv
    import io

    columns = list(dict.fromkeys(key for rec in records for key in rec))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for rec in records:
        writer.writerow([_cell(rec, col) for col in columns])
    return buf.getvalue()


def _cell(rec: dict[str, Any], col: str) -> Any:
    """A record's value in ``col``; a tier component the record lacks is 0 (bytes) or 0.0 (GiB)."""
    value = rec[col] if col in rec else absent(col)
    return "" if value is None else value


def absent(col: str) -> Any:
    """The value of ``col`` in a record that lacks it: a tier component 0 bytes (0.0 GiB), anything else None (an
    empty cell)."""
    if ":" in col and col.endswith("_bytes"):
        return 0
    if ":" in col and col.endswith("_gib"):
        return 0.0
    return None


def _list_cell(value: Any) -> Any:
    """A list (per-layer maps, LoRA targets) as one comma-separated cell; None entries as 'none'."""
    if isinstance(value, list):
        return ",".join("none" if v is None else str(v).lower() if isinstance(v, bool) else str(v) for v in value)
    return value
