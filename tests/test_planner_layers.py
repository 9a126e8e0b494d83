"""Per-layer placement and per-layer quantization in the ILP planner: each optimum checked against
exhaustive enumeration through ``estimate``, and each per-layer plan against the uniform policies."""

from __future__ import annotations

from itertools import product

import pytest
from conftest import cli_json
from test_planner import gpu_with, tiny_model

from memplan.arch.build import build_architecture
from memplan.catalog.schema import HostSpec
from memplan.config import Job, JobConfig, Offload
from memplan.estimator import estimate
from memplan.memory.breakdown import Tier
from memplan.memory.context import Context
from memplan.memory.model_states import offloaded_fraction
from memplan.planner.infer_layers import weights_error
from memplan.planner.plan import PlanRequest, plan
from memplan.planner.space import Objective, SearchSpace

HOST = HostSpec()


def _train_request(spec, gpu, base, **space):
    defaults = {"tp": (1,), "pp": (1,), "zero": (3,), "offload_optimizer": (Offload.CPU,),
                "offload_params": (Offload.NONE,), "micro_batch": (1,), "recompute": ("none",), "global_batch": 1}
    return PlanRequest(model=spec, gpu=gpu, host=HOST, base=base, space=SearchSpace(**{**defaults, **space}),
                       top_k=1, suggest=False)


def test_partial_optimizer_offload_matches_enumeration_and_beats_full_offload():
    """A GPU between 'every state on the GPU' and 'every optimizer state on the CPU': the ILP keeps the
    optimizer states of as many leading layers on the GPU as fit (DeepSpeed's ratio), which is faster
    than offloading all of them, and no kept-layer count above its choice fits."""
    spec = tiny_model(512, 8, 4, 2, 8000)
    base = JobConfig(job=Job.FULL, seq_len=512, cuda_context_bytes=0, allocator_reserve_pct=0,
                     zero=3, offload_optimizer=Offload.CPU)
    on_gpu = estimate(spec, gpu_with(10**6), base.model_copy(update={"optimizer_gpu_layers": 8})).peak(Tier.GPU)
    all_off = estimate(spec, gpu_with(10**6), base).peak(Tier.GPU)
    assert all_off < on_gpu
    gpu = gpu_with((all_off + on_gpu) // 2 // 2**20)
    best = plan(_train_request(spec, gpu, base)).best
    assert best is not None and best.estimate.fits
    kept = best.config.optimizer_gpu_layers
    assert kept is not None and 0 < kept < 8, best.layer_map
    fitting = [n for n in range(9) if estimate(spec, gpu, base.model_copy(update={"optimizer_gpu_layers": n})).fits]
    assert kept == max(fitting)
    full = plan(_train_request(spec, gpu, base, per_layer_offload=False)).best
    assert full is not None and full.config.optimizer_gpu_layers is None
    assert best.step_time_s < full.step_time_s
    ratio = offloaded_fraction(Context(build_architecture(spec), best.config, gpu, HOST))
    assert best.extras["offload_ratio"] == pytest.approx(ratio, abs=1e-6)
    assert f"layers 0-{kept - 1} on gpu" in best.layer_map


def _infer_request(spec, gpu, base, objective=Objective.THROUGHPUT, **space):
    defaults = {"tp": (1,), "pp": (1,), "batch": (base.micro_batch,), "context": (base.infer.context,)}
    return PlanRequest(model=spec, gpu=gpu, host=HOST, base=base, space=SearchSpace(**{**defaults, **space}),
                       objective=objective, top_k=1, suggest=False)


def test_per_layer_quant_max_quality_equals_enumeration():
    """LQ-LoRA-style: the least quantization error over every int8/nf4 map of a 4-layer model that fits."""
    spec = tiny_model(512, 4, 4, 2, 8000)
    base = JobConfig(job=Job.INFER, micro_batch=1, cuda_context_bytes=0, allocator_reserve_pct=0,
                     infer={"context": 512})
    arch = build_architecture(spec)
    sizes = {q: estimate(spec, gpu_with(10**6), base.model_copy(update={"quant": q})).peak(Tier.GPU)
             for q in ("int8", "nf4")}
    gpu = gpu_with((sizes["int8"] + sizes["nf4"]) // 2 // 2**20)
    assert not estimate(spec, gpu, base.model_copy(update={"quant": "int8"})).fits
    result = plan(_infer_request(spec, gpu, base, Objective.MAX_QUALITY, quant=("int8", "nf4"),
                                 offload_params=(Offload.NONE,)))  # quantize, not stream 16-bit layers
    best = result.best
    assert best is not None and best.estimate.fits
    errors = []
    for fmts in product(("int8", "nf4"), repeat=4):
        cfg = base.model_copy(update={"quant": "int8", "quant_map": fmts})
        if estimate(spec, gpu, cfg).fits:
            errors.append(weights_error(arch, cfg))
    assert weights_error(arch, best.config) == pytest.approx(min(errors), rel=1e-9)
    assert set(best.config.quant_map) == {"int8", "nf4"}, best.layer_map
    assert best.extras["weights_sqnr_db"] > 0


def test_per_layer_quant_throughput_takes_the_smallest_format():
    spec = tiny_model(512, 4, 4, 2, 8000)
    base = JobConfig(job=Job.INFER, micro_batch=1, infer={"context": 512})
    best = plan(_infer_request(spec, gpu_with(80_000), base, quant=("int8", "nf4"), per_layer_quant=True)).best
    assert best is not None and set(best.config.quant_map) == {"nf4"}


def test_per_layer_weight_offload_streams_the_fewest_layers():
    """Weights that do not fit: the ILP offloads the fewest layers to CPU RAM (each costs PCIe time per
    token), exactly the smallest count for which estimate says the plan fits."""
    spec = tiny_model(1024, 8, 8, 2, 8000)
    base = JobConfig(job=Job.INFER, micro_batch=1, cuda_context_bytes=0, allocator_reserve_pct=0,
                     infer={"context": 512})
    need = estimate(spec, gpu_with(10**6), base).peak(Tier.GPU)
    gpu = gpu_with(need * 6 // 10 // 2**20)
    assert not estimate(spec, gpu, base).fits
    assert plan(_infer_request(spec, gpu, base, offload_params=(Offload.NONE,))).status == "infeasible"
    assert plan(_infer_request(spec, gpu, base)).status == "optimal"  # per-layer offload is on by default
    best = plan(_infer_request(spec, gpu, base, offload_params=(Offload.NONE, Offload.CPU))).best
    assert best is not None and best.estimate.fits
    off = sum(best.config.infer.offload_map)
    fitting = [k for k in range(9) if estimate(spec, gpu, base.model_copy(update={
        "infer": base.infer.model_copy(update={"offload_map": (False,) * (8 - k) + (True,) * k})})).fits]
    assert off == min(fitting) > 0
    assert best.config.infer.offload_map[-1], "accelerate's auto map offloads the last layers"
    assert "cpu: layers" in best.layer_map


def test_cli_per_layer_errors_and_json(runner):
    from memplan.cli.app import app

    res = runner.invoke(app, ["plan", "llama-3.1-8b", "--job", "infer", "--quant", "nf4", "--per-layer-quant"])
    assert res.exit_code == 2 and "two --quant choices" in res.stderr
    res = runner.invoke(app, ["plan", "llama-3.1-8b", "--job", "infer", "--quant", "int8,q4_k_m", "--per-layer-quant"])
    assert res.exit_code == 2 and "one library" in res.stderr
    res = runner.invoke(app, ["plan", "llama-3.1-8b", "--job", "full", "--objective", "max-quality"])
    assert res.exit_code == 2 and "frozen base model" in res.stderr
    out = cli_json(runner, "plan", "llama-3.1-70b", "--gpu", "h100-sxm-80gb", "--job", "infer", "--quant", "int8,nf4",
                   "--objective", "max-quality", "-c", "8192", "-b", "2", "--top", "1", "--offload-params", "none")
    best = out["best"]
    assert out["status"] == "optimal"
    assert set(best["config"]["quant_map"]) == {"int8", "nf4"}
    assert 20.7 < best["layer_plan"]["weights_sqnr_db"] < 41.3  # between all-nf4 and all-int8


def test_estimate_per_layer_flags(runner):
    """What plan prints can be re-checked with estimate: --quant-map, --offload-layers, --optimizer-gpu-layers."""
    from memplan.cli.app import app

    out = cli_json(runner, "estimate", "llama-3.1-70b", "--job", "infer", "--quant-map", "0-39=int8,40-79=nf4",
                   "--offload-layers", "70-79")
    assert out["config"]["quant_map"] == ["int8"] * 40 + ["nf4"] * 40
    assert out["config"]["infer"]["offload_map"] == [False] * 70 + [True] * 10
    assert out["memory"]["cpu"]["components"]["weights/cpu_offloaded"] > 0
    part = cli_json(runner, "estimate", "llama-3.1-8b", "--zero", "3", "--offload-optimizer", "cpu",
                    "--optimizer-gpu-layers", "16")
    full = cli_json(runner, "estimate", "llama-3.1-8b", "--zero", "3", "--offload-optimizer", "cpu")
    assert part["config"]["optimizer_gpu_layers"] == 16
    assert part["memory"]["gpu"]["total_bytes"] > full["memory"]["gpu"]["total_bytes"]
    for args, words in ((["--quant-map", "0-30=int8"], "covers 31 of"), (["--quant-map", "0-31=int9"], "int8"),
                        (["--quant-map", "0-31=int8,5=nf4"], "given twice"), (["--offload-layers", "0-40"], "outside"),
                        (["--optimizer-gpu-layers", "3"], "ZeRO stage 3")):
        res = runner.invoke(app, ["estimate", "llama-3.1-8b", *args])
        assert res.exit_code == 2 and words in res.stderr, (args, res.stderr)
        assert "Traceback" not in res.stderr


def test_max_quality_breaks_ties_by_speed():
    """Every layer fits in 16 bits only if some are offloaded: max-quality (zero error either way) must still
    offload the fewest layers, as the throughput plan does (a lexicographic second solve, not a tiny weight)."""
    spec = tiny_model(1024, 8, 8, 2, 8000)
    base = JobConfig(job=Job.INFER, micro_batch=1, cuda_context_bytes=0, allocator_reserve_pct=0,
                     infer={"context": 512})
    gpu = gpu_with(estimate(spec, gpu_with(10**6), base).peak(Tier.GPU) * 6 // 10 // 2**20)
    space = {"quant": (None, "int8", "nf4"), "offload_params": (Offload.NONE, Offload.CPU)}
    quality = plan(_infer_request(spec, gpu, base, Objective.MAX_QUALITY, **space)).best
    fast16 = plan(_infer_request(spec, gpu, base, quant=(None,), offload_params=(Offload.NONE, Offload.CPU))).best
    assert quality is not None and fast16 is not None
    assert weights_error(build_architecture(spec), quality.config) == 0.0
    assert sum(quality.config.infer.offload_map) == sum(fast16.config.infer.offload_map) > 0
    assert quality.extras["weights_sqnr_db"] is None


def test_gguf_layer_block_matches_estimate_layer_by_layer():
    """llama.cpp's mix rules give some layers more bits by index: the per-layer block must carry each
    layer's own bytes, so block + outside-the-blocks equals estimate's weight rows exactly."""
    from memplan import load_model
    from memplan.planner.infer import build

    spec = load_model("llama-3.2-1b")
    base = JobConfig(job=Job.INFER, micro_batch=1, quant="q4_k_m", infer={"context": 512})
    req = _infer_request(spec, gpu_with(80_000), base, quant=("q4_k_m", "q8_0"), per_layer_quant=True)
    problem, _, _ = build(req)
    block = problem.extra_blocks[0]
    key = (1, 1, "q4_k_m", 1)
    outside = next(f for f in problem.factors if f.name == "weights").entries[(1, 1, 1, "q4_k_m")].gpu[0]
    layers = [block.gpu[i]["q4_k_m"][key] for i in range(len(block.gpu))]
    assert len(set(layers)) > 1, "q4_k_m gives some layers more bits"
    exact = estimate(spec, gpu_with(80_000), base)
    weights = sum(r.bytes for r in exact.rows if r.tier is Tier.GPU and r.component.startswith("weights"))
    assert outside + sum(layers) == weights


def test_partial_offload_when_cpu_ram_binds():
    """DeepSpeed's CPU figure is 1.5 · max(load, steady): with CPU RAM just above what keeping 24 of
    GPT-2 XL's 48 layers on the GPU needs, and a GPU that holds no more than those 24, the ILP must find
    exactly that split (a row that added the load peak to every offloaded layer would call it infeasible)."""
    from memplan import load_model

    spec = load_model("gpt2-xl")
    base = JobConfig(job=Job.FULL, seq_len=512, gpus_per_node=7, cuda_context_bytes=0, allocator_reserve_pct=0,
                     zero=3, offload_optimizer=Offload.CPU)

    def at(n):
        return estimate(spec, gpu_with(10**6), base.model_copy(update={"optimizer_gpu_layers": n}))

    gpu = gpu_with(-(-at(24).peak(Tier.GPU) // 2**20))
    assert not estimate(spec, gpu, base.model_copy(update={"optimizer_gpu_layers": 25})).fits
    host = HostSpec(cpu_ram_bytes=at(24).total(Tier.CPU) + 2**20)
    req = _train_request(spec, gpu, base, global_batch=7)
    best = plan(PlanRequest(model=spec, gpu=gpu, host=host, base=base, space=req.space, top_k=1, suggest=False)).best
    assert best is not None and best.config.optimizer_gpu_layers == 24


def test_qlora_per_layer_formats_equal_enumeration():
    """LQ-LoRA's own setting, fine-tuning a frozen quantized base: the least error over every
    nf4-dq/int8 map of a 4-layer model that fits, with the adapters' states and activations counted."""
    spec = tiny_model(512, 4, 4, 2, 8000)
    base = JobConfig(job=Job.QLORA, seq_len=256, cuda_context_bytes=0, allocator_reserve_pct=0)
    arch = build_architecture(spec)
    sizes = {q: estimate(spec, gpu_with(10**6), base.model_copy(update={"quant": q})).peak(Tier.GPU)
             for q in ("int8", "nf4-dq")}
    gpu = gpu_with((sizes["int8"] + sizes["nf4-dq"]) // 2 // 2**20)
    req = _train_request(spec, gpu, base, zero=(0,), offload_optimizer=(Offload.NONE,), quant=("nf4-dq", "int8"))
    best = plan(PlanRequest(model=spec, gpu=gpu, host=HOST, base=base, space=req.space,
                            objective=Objective.MAX_QUALITY, top_k=1, suggest=False)).best
    assert best is not None and best.estimate.fits
    errors = [weights_error(arch, base.model_copy(update={"quant_map": fmts}))
              for fmts in product(("nf4-dq", "int8"), repeat=4)
              if estimate(spec, gpu, base.model_copy(update={"quant_map": fmts})).fits]
    assert weights_error(arch, best.config) == pytest.approx(min(errors), rel=1e-9)
    assert set(best.config.quant_map) == {"nf4-dq", "int8"}
    assert "weights " in best.layer_map and best.extras["weights_sqnr_db"] > 0


def test_training_per_layer_quant_errors(runner):
    from memplan.cli.app import app

    for args, words in ((["--job", "full", "--quant", "int8,nf4", "--per-layer-quant"], "frozen base model"),
                        (["--job", "qlora", "--quant", "nf4-dq,int8", "--per-layer-quant"], "max-quality"),
                        (["--job", "qlora", "--quant", "nf4-dq,int8", "--objective", "max-quality", "--zero", "3",
                          "--offload-params", "cpu"], "whole on each GPU")):
        res = runner.invoke(app, ["plan", "llama-3.2-1b", *args])
        assert res.exit_code == 2 and words in res.stderr, (args, res.stderr)


def test_csv_carries_per_layer_maps(runner):
    from memplan.cli.app import app

    res = runner.invoke(app, ["estimate", "llama-3.2-1b", "--job", "infer", "--offload-layers", "0-3",
                              "--quant-map", "0-7=none,8-15=nf4", "--format", "csv"])
    assert res.exit_code == 0, res.stderr
    row = res.stdout.splitlines()[1]
    assert "true,true,true,true,false" in row and "none,none" in row and "nf4,nf4" in row


def test_a_time_limit_in_the_split_part_is_reported(monkeypatch):
    """The split part of the space cut short by the time limit: the plan from the other part is returned
    as the best incumbent, never as optimal."""
    import math

    from memplan import load_model
    from memplan.planner import ilp
    from memplan.planner.ilp_model import Solution

    real = ilp.IlpBuilder._solve

    def short(self, time_limit, solver):
        if self.p.dims.get("opt_split") == ("layers",):
            return Solution("time_limit", {}, [], math.nan, math.nan)
        return real(self, time_limit, solver)

    monkeypatch.setattr(ilp.IlpBuilder, "_solve", short)
    base = JobConfig(job=Job.FULL)
    from memplan.catalog.store import catalog_gpu

    result = plan(PlanRequest(model=load_model("llama-3.1-8b"), gpu=catalog_gpu("h100-sxm-80gb"), host=HOST,
                              base=base, top_k=1, suggest=False))
    assert result.status == "optimal" and result.solver_status.startswith("feasible")


def test_per_layer_format_edge_cases(runner):
    # GGUF per layer: the global format is a GGUF one, so llama.cpp's input layer is counted on the host
    out = cli_json(runner, "plan", "llama-3.2-1b", "--job", "infer", "--quant", "none,q4_k_m", "--per-layer-quant",
                   "--objective", "max-quality", "--top", "1")
    assert out["best"]["config"]["quant"] == "q4_k_m"
    # QLoRA with GPTQ layers: the global format is GPTQ too, not QLoRA's default NF4
    out = cli_json(runner, "plan", "llama-3.2-1b", "--job", "qlora", "--quant", "none,gptq-4bit",
                   "--objective", "max-quality", "--gpu", "l4", "--top", "1")
    assert out["status"] == "optimal" and out["best"]["config"]["quant"] == "gptq-4bit"
    from memplan.cli.app import app

    res = runner.invoke(app, ["plan", "llama-3.2-1b", "--job", "qlora", "--quant", "q8_0,q4_k_m",
                              "--objective", "max-quality"])
    assert res.exit_code == 2 and "GGUF" in res.stderr


def test_min_cost_keeps_the_cheapest_first(runner):
    out = cli_json(runner, "plan", "qwen2.5-7b", "--gpus", "8", "--objective", "min-cost", "--top", "3",
                   "--global-batch", "64")
    cost = [c["config"]["gpus_per_node"] * c["config"]["nodes"] / c["tokens_per_s"]
            for c in [out["best"], *out["alternatives"]]]
    assert cost == sorted(cost)


def test_max_batch_breaks_ties_by_speed(runner):
    """Lexicographic: the largest batch first, then the fastest plan of that batch, which the throughput
    objective over the same batch must not beat (a 1e-6·seconds tie-break sat below the solver's gap)."""
    args = ("plan", "llama-3.2-1b", "--gpu", "a100-sxm-40gb", "--job", "full", "--top", "1", "--zero", "0,1",
            "--offload-optimizer", "none", "--offload-params", "none")
    best = cli_json(runner, *args, "--objective", "max-batch")["best"]
    cfg = best["config"]
    fastest = cli_json(runner, *args, "--batch", str(cfg["micro_batch"]), "--global-batch",
                       str(cfg["micro_batch"] * cfg["grad_accum"]), "--objective", "throughput")["best"]
    assert best["step_time_s"] == pytest.approx(fastest["step_time_s"], rel=1e-9)
