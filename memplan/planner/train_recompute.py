"""Per-layer activation recomputation for the training ILP: each layer's saved bytes per micro-batch in
every recompute mode (the functions ``estimate`` sums), the seconds recomputing it adds, and a valid
lower bound on those seconds that lets the solver prune dear global choices early.
"""

from __future__ import annotations

from itertools import product
from typing import Any

from memplan.arch.parallel import arch_stage_ranges, in_flight_micro_batches
from memplan.arch.tensors import Layer
from memplan.config import JobConfig, Recompute
from memplan.memory import activations as act
from memplan.memory.breakdown import Phase
from memplan.memory.context import Context
from memplan.planner import act_offload, steptime
from memplan.planner.classes import layer_classes
from memplan.planner.ilp import Factor, LayerBlock
from memplan.planner.setting import SAVINGS, TrainSetting, config_for

LAYER_DIMS = ("tp", "pp", "micro_batch", "seq_len")


def micro_batches(setting: TrainSetting, key: tuple) -> int:
    """Micro-batches per replica in a step under a (tp, pp, micro-batch, seq) key: the ``grad_accum`` that
    ``setting.config_for`` derives from the global batch (``ilp_model.Problem.micro_batches``)."""
    tp, pp, mb = key[0], key[1], key[2]
    replicas = max(1, setting.base.world_size // (tp * pp * setting.base.cp))
    return max(1, setting.global_batch // (mb * replicas))


def layer_block(setting: TrainSetting, dims: dict[str, tuple]) -> LayerBlock | None:
    """Per-layer recompute modes: bytes per micro-batch by (tp, pp, micro-batch, seq), recompute seconds.

    Bytes do not depend on pp (only the stage a layer lands on does, which the ILP handles), and
    identical layers share their values, so each (class, tp, micro-batch, seq) is computed once.
    """
    arch = setting.arch
    modes = tuple(Recompute(m).value for m in dims["recompute"])
    classes = layer_classes(arch)
    # each class is evaluated on its last layer: the first block of a LoRA job may save less (its input has no
    # grad: ``activations_lora.first_block_input_grad``), so it must not stand for the others; counting it like
    # them only over-counts it, and the exact re-check holds the true bytes
    first = {c: i for i, c in enumerate(classes)}
    shape_dims = ("tp", "micro_batch", "seq_len")
    per_class: dict[tuple, tuple[dict, dict, dict, dict]] = {}
    for key in product(*(dims[d] for d in shape_dims)):
        cfg = config_for(setting.base, dict(zip(shape_dims, key, strict=True)))
        ctx = Context(arch, cfg, setting.gpu, setting.host)
        if not act.modelled(ctx):
            return None
        counting = act.counting_for(cfg)
        for c, i in first.items():
            gpu, secs, work, held = {}, {}, {}, {}
            for m in modes:
                mode = Recompute(m)
                gpu[m] = act.layer_micro_bytes(ctx, i, mode)
                secs[m] = recompute_seconds(setting, cfg, arch.layers[i], mode)
                recomputed = mode is not Recompute.NONE
                work[m] = act.workspace_bytes(ctx, mode, {i}) if recomputed else 0
                held[m] = act.layer_kwargs_bytes(ctx, {i}, counting) if recomputed else 0
            per_class[(c, *key)] = (gpu, secs, work, held)
    gpu_t: list[dict[str, dict[tuple, int]]] = [{m: {} for m in modes} for _ in arch.layers]
    sec_t: list[dict[str, dict[tuple, float]]] = [{m: {} for m in modes} for _ in arch.layers]
    work_t: list[dict[str, dict[tuple, int]]] = [{m: {} for m in modes} for _ in arch.layers]
    held_t: list[dict[str, dict[tuple, int]]] = [{m: {} for m in modes} for _ in arch.layers]
    for tp, pp, mb, seq in product(*(dims[d] for d in LAYER_DIMS)):
        key = (tp, pp, mb, seq)
        for i, c in enumerate(classes):
            gpu, secs, work, held = per_class[(c, tp, mb, seq)]
            for m in modes:
                gpu_t[i][m][key] = gpu[m]
                sec_t[i][m][key] = secs[m]
                work_t[i][m][key] = work[m]
                held_t[i][m][key] = held[m]
    cpu_t, classes = act_offload.adjust_block(setting, classes, gpu_t, sec_t, work_t)
    modes = _undominated(modes, gpu_t, sec_t)
    tables: list[Any] = [gpu_t, sec_t, work_t, held_t] + ([cpu_t] if cpu_t else [])
    for table in tables:
        for per in table:
            for m in [m for m in per if m not in modes]:
                del per[m]
    return LayerBlock(modes=modes, key_dims=LAYER_DIMS, gpu=gpu_t, seconds=sec_t, workspace=work_t, cpu=cpu_t,
                      flight_workspace=held_t, classes=classes, savings_rank={m: SAVINGS[m] for m in modes},
                      phases=_phases("activations/layers"),
                      workspace_phases=act_offload.workspace_phases(setting.base,
                                                                    _phases("activations/recompute_workspace")),
                      flight_phases=_phases("activations/layer_kwargs"))


def _phases(component: str) -> frozenset[str]:
    """The registry's phases of ``component`` (``memory.registry``), as the ILP's phase names."""
    from memplan.memory import registry

    return frozenset(p.value for p in registry.lookup(component).phases)


def _undominated(modes: tuple[str, ...], gpu: list, secs: list) -> tuple[str, ...]:
    """Drop a mode that, for every layer and key, costs at least the time of another allowed mode
    and saves no bytes over it (e.g. selective recompute with flash attention: no S×S core to drop)."""
    keep = []
    for m in modes:
        dominated = any(
            o != m and all(gpu[i][o][k] <= gpu[i][m][k] and secs[i][o][k] <= secs[i][m][k]
                           for i in range(len(gpu)) for k in gpu[i][m])
            and any(gpu[i][o][k] < gpu[i][m][k] or secs[i][o][k] < secs[i][m][k]
                    for i in range(len(gpu)) for k in gpu[i][m])
            for o in modes)
        if not dominated:
            keep.append(m)
    return tuple(keep)


def recompute_bounds(setting: TrainSetting, dims: dict[str, tuple], states: Factor, shape: Factor,
                     layers: LayerBlock, cap: int, stage_map: dict[int, tuple[int, ...]] | None = None,
                     moments: dict | None = None, chunk_map: dict[int, tuple[int, ...]] | None = None,
                     ) -> dict[tuple, float | None]:
    """A lower bound on the recompute seconds any plan with layer key (tp, pp, micro-batch, seq) needs,
    or None when no plan with that key can fit (its layers cannot save enough even all recomputed).

    Per stage s of p: need = Σ_layers F·A_none + leanest states + shape − capacity; every byte
    saved costs at least the cheapest seconds-per-byte of any mode, so seconds ≥ need × that ratio.
    A valid inequality (it ignores the recompute workspace, which only adds need), it lets the ILP
    prune global choices whose per-layer optimum is dear without branching on them. F is the stage's micro-batches
    in flight (p − s, more when interleaved: ``arch.parallel.in_flight_micro_batches``). Bytes are those of the
    start of backward, the phase in which every saved activation is alive. ``stage_map``: the stage of every layer
    per pp (default: the balanced contiguous stages); ``moments``/``chunk_map`` (``ilp_moments``): where a key has them,
    F is each layer's chunk count at the moment with the most bytes in the least-saving mode (one of the ILP's rows,
    so the bound stays valid), the moment's constant bytes included.
    """
    start = Phase.BACKWARD_START.value
    lean: dict[tuple, list[int]] = {}
    for key, e in states.entries.items():
        tp, pp = key[0], key[1]
        cur = lean.setdefault((tp, pp), list(e.gpu_in(start)))
        lean[tp, pp] = [min(a, b) for a, b in zip(cur, e.gpu_in(start), strict=True)]
    out: dict[tuple, float | None] = {}
    none = min(layers.modes, key=lambda m: layers.savings_rank.get(m, 0))  # the least-saving mode allowed
    for key in {k for per in layers.gpu for m in per.values() for k in m}:
        tp, pp = key[0], key[1]
        shp = shape.entries.get(key)
        if shp is None or (tp, pp) not in lean:
            out[key] = None
            continue
        total = 0.0
        where = (stage_map or {}).get(pp)
        ranges = arch_stage_ranges(setting.arch, pp)
        for s in range(pp):
            members = [i for i, st in enumerate(where) if st == s] if where else list(ranges[s])
            flights, const = _flights(setting, layers, key, pp, s, members, none, moments or {}, chunk_map or {})
            base = sum(flights[i] * layers.gpu[i][none][key] for i in members)
            need = base + const + lean[tp, pp][s] + shp.gpu_in(start)[s] - cap
            if need <= 0:
                continue
            best_ratio, max_saving = None, 0
            for i in members:
                savings = [(flights[i] * (layers.gpu[i][none][key] - layers.gpu[i][m][key]), layers.seconds[i][m][key])
                           for m in layers.modes if m != none]
                savings = [(sv, sec) for sv, sec in savings if sv > 0]
                if not savings:
                    continue
                max_saving += max(sv for sv, _ in savings)
                ratio = min(sec / sv for sv, sec in savings)
                best_ratio = ratio if best_ratio is None else min(best_ratio, ratio)
            if best_ratio is None or max_saving < need:
                total = -1.0
                break
            total += need * best_ratio
        out[key] = None if total < 0 else total
    return out


def _flights(setting: TrainSetting, layers: LayerBlock, key: tuple, pp: int, s: int, members: list[int], none: str,
             moments: dict, chunk_map: dict[int, tuple[int, ...]]) -> tuple[dict[int, int], int]:
    """(micro-batches in flight per layer of stage ``s``, constant bytes) for ``recompute_bounds``: the whole-stage
    1F1B / interleaved count, or, with moments, the moment whose row is largest with every layer in ``none``."""
    rows = moments.get((pp, s, key))
    if not rows:
        group, extra = act.interleave_knobs(setting.base)
        flight = in_flight_micro_batches(pp, s, setting.base.perf.virtual_stages, micro_batches(setting, key),
                                         group=group, extra=extra)
        return dict.fromkeys(members, flight), 0
    chunks = chunk_map[pp]
    held, const = max(rows, key=lambda r: sum(r[0][chunks[i]] * layers.gpu[i][none][key] for i in members) + r[1])
    return {i: held[chunks[i]] for i in members}, const


def recompute_seconds(setting: TrainSetting, cfg: JobConfig, layer: Layer, mode: Recompute) -> float:
    """Step time a recomputed layer adds: its forward again (full), its attention core (selective) or the
    matmuls op-level checkpointing does not keep (op)
    (``steptime.recompute_seconds``)."""
    return steptime.recompute_seconds(setting.arch, setting.gpu, cfg, setting.global_batch, layer, mode)
