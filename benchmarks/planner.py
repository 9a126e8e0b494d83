"""Planner speed: first the issue-13 targets (``planner_targets``: wall seconds of four ``plan`` runs, each also as
a ratio to a fixed baseline workload timed in the same run), then how the step-time search scales with the
number of layers and of global options (rows listed, rows solved exactly, build and search seconds, and the
monolithic MIP the search replaced, for comparison), the time of exhaustive enumeration (every global choice ×
every per-layer recompute map, exact bytes from ``estimate``) where it is still possible, and inference.

Run: python benchmarks/planner.py        (prints tables; no assertions)
Targets: see ``planner_targets``: one node ≤ 0.5 s; 70B over 16 GPUs ≤ 2 s; 405B over 16k GPUs ≤ 5 s; 1T over
3,072 GPUs ≤ 10 s, optimal or clearly labelled.
"""

from __future__ import annotations

import sys
import time
import warnings
from itertools import product
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import planner_targets
from memplan.arch.build import build_architecture
from memplan.catalog.schema import Family, GpuSpec, HostSpec, ModelSpec
from memplan.config import Job, JobConfig, Offload, Recompute
from memplan.estimator import estimate
from memplan.planner import train
from memplan.planner.dims import resolve
from memplan.planner.ilp import IlpBuilder
from memplan.planner.ilp_search import RowSearch, searcher
from memplan.planner.space import Objective, SearchSpace
from memplan.planner.train_offload import partition

warnings.simplefilter("ignore")
MODES = (Recompute.NONE, Recompute.SELECTIVE, Recompute.FULL)


def model(layers: int) -> ModelSpec:
    return ModelSpec(name=f"bench-{layers}l", source="benchmark", family=Family.LLAMA, hidden_size=4096,
                     intermediate_size=14336, num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=8,
                     vocab_size=128256)


def gpu(memory_mib: int) -> GpuSpec:
    return GpuSpec(name="bench-gpu", vendor="nvidia", source="benchmark", memory_mib=memory_mib, marketed_memory_gb=80,
                   bf16_dense_tflops=989.0, hbm_bandwidth_gbps=3350.0, interconnect_gbps=450.0, pcie_gen=5)


def space(options: str) -> SearchSpace:
    if options == "1":
        return SearchSpace(tp=(8,), pp=(1,), zero=(1,), offload_optimizer=(Offload.NONE,),
                           offload_params=(Offload.NONE,), micro_batch=(1,), recompute=MODES, global_batch=8)
    if options == "small":
        return SearchSpace(tp=(4, 8), pp=(1, 2), zero=(1, 3), offload_optimizer=(Offload.NONE,),
                           offload_params=(Offload.NONE,), micro_batch=(1, 2), recompute=MODES, global_batch=16)
    return SearchSpace(recompute=MODES, global_batch=64)


def solve_once(layers: int, options: str, memory_mib: int, mip: bool) -> tuple[float, float, int, int, int, str]:
    """Build and solve every part of the space (``train_offload.partition``, as ``memplan plan`` does), with the
    row search ``plan`` uses, or with the monolithic MIP (``mip``); (build s, solve s, combos, rows, rows solved,
    status)."""
    spec, g, host = model(layers), gpu(memory_mib), HostSpec()
    base = JobConfig(job=Job.FULL, gpus_per_node=8, nodes=2, seq_len=8192, micro_batch=1)
    sp = space(options)
    arch = build_architecture(spec)
    gb = sp.global_batch or 64
    dims, _ = resolve(arch, base, sp, Objective.THROUGHPUT, host, gb)
    setting = train.TrainSetting(arch=arch, gpu=g, host=host, base=base, global_batch=gb)
    build = solve = 0.0
    rows = solved = 0
    statuses, best = [], None
    for part in partition(dims, base.job):
        t0 = time.perf_counter()
        problem, _ = train.build_problem(setting, part, "min_seconds")
        builder = IlpBuilder(problem) if mip else searcher(problem)
        t1 = time.perf_counter()
        sol = builder.solve(time_limit=60)
        t2 = time.perf_counter()
        build, solve = build + t1 - t0, solve + t2 - t1
        if isinstance(builder, RowSearch):
            rows, solved = rows + len(builder.rows), solved + builder.evaluated
        statuses.append(sol.status)
        if sol.status in ("optimal", "feasible") and (best is None or sol.objective < best):
            best = sol.objective
    combos = 1
    for d, values in dims.items():
        if d != "recompute":
            combos *= len(values)
    status = "optimal" if best is not None and "feasible" not in statuses else "/".join(statuses)
    return build, solve, combos, rows, solved, status


def enumerate_once(layers: int, memory_mib: int) -> tuple[float, int]:
    """Exhaustive search over one global choice and every per-layer map (3^L estimates)."""
    spec, g = model(layers), gpu(memory_mib)
    base = JobConfig(job=Job.FULL, gpus_per_node=8, nodes=2, seq_len=8192, tp=8, zero=1)
    t0 = time.perf_counter()
    count = 0
    for modes in product(MODES, repeat=layers):
        cfg = base.model_copy(update={"recompute_map": modes, "recompute": Recompute.FULL})
        estimate(spec, g, cfg)
        count += 1
    return time.perf_counter() - t0, count


def infer_once(layers: int, memory_mib: int) -> tuple[float, float, int, str]:
    """Inference with per-layer formats (int8, nf4) and per-layer CPU offload: build and solve seconds."""
    from memplan.planner.infer import build
    from memplan.planner.plan import PlanRequest

    spec, g = model(layers), gpu(memory_mib)
    base = JobConfig(job=Job.INFER, micro_batch=4, infer={"context": 8192})
    sp = SearchSpace(tp=(1,), pp=(1,), quant=("int8", "nf4"), per_layer_quant=True,
                     offload_params=(Offload.NONE, Offload.CPU))
    req = PlanRequest(model=spec, gpu=g, host=HostSpec(), base=base, space=sp, objective=Objective.MAX_QUALITY)
    t0 = time.perf_counter()
    problem, _, _ = build(req)
    builder = IlpBuilder(problem)
    t1 = time.perf_counter()
    sol = builder.solve(time_limit=60)
    return t1 - t0, time.perf_counter() - t1, len(builder.prob.variables()), sol.status


def main() -> None:
    planner_targets.main()
    print()
    print("Step-time search: build and solve seconds, 16 GPUs, 8k tokens, per-layer recompute none/selective/full;")
    print("rows: global choices listed / solved exactly by the row search; MIP s: the monolithic MIP it replaced")
    print(f"{'layers':>6} {'global options':>15} {'combos':>7} {'rows':>11} {'build s':>8} {'search s':>8} "
          f"{'MIP s':>8} status")
    for layers, options in product((8, 32, 80, 128), ("1", "small", "default")):
        build, solve, combos, rows, solved, status = solve_once(layers, options, 40_000, mip=False)
        mip = solve_once(layers, options, 40_000, mip=True)[1] if layers <= 32 else float("nan")
        print(f"{layers:>6} {options:>15} {combos:>7} {f'{rows}/{solved}':>11} {build:>8.3f} {solve:>8.3f} "
              f"{mip:>8.3f} {status}")
    print("  (MIP s: not run above 32 layers, where it takes tens of seconds per solve)")
    print()
    print("Exhaustive enumeration of per-layer maps for one global choice (3^L exact estimates)")
    print(f"{'layers':>6} {'estimates':>9} {'seconds':>8}")
    for layers in (2, 4, 6, 8):
        seconds, count = enumerate_once(layers, 40_000)
        print(f"{layers:>6} {count:>9} {seconds:>8.2f}")
    print("  (32 layers would need 3^32 = 1.9e15 estimates)")
    print()
    print("Inference, per-layer weight format (int8/nf4) and placement (GPU/CPU), objective max-quality, 4 × 8k tokens")
    print(f"{'layers':>6} {'variables':>9} {'build s':>8} {'solve s':>8} status")
    for layers in (8, 32, 80, 128):
        build_s, solve_s, nvars, status = infer_once(layers, 4000 + layers * 700)
        print(f"{layers:>6} {nvars:>9} {build_s:>8.3f} {solve_s:>8.3f} {status}")


if __name__ == "__main__":
    main()
