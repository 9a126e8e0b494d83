"""Op-level selective recompute (torchtitan's ``op`` SAC policy): a block keeps its input, every other matmul
output (the 1st, 3rd, ... ``aten.mm`` of the block: q, v, gate, down in Llama's order), and the flash/SDPA
output with its fp32 log-sum-exp (torchtitan/distributed/activation_checkpoint.py). Expectations are independent
arithmetic on Llama-3.1-8B's published shapes (hidden 4096, 32 heads, 8 kv heads of 128, MLP 14336)."""

from __future__ import annotations

from test_planner import gpu_with, tiny_model

from memplan.catalog.schema import HostSpec
from memplan.config import Job, JobConfig, Offload, Recompute
from memplan.estimator import estimate
from memplan.memory.breakdown import Tier
from memplan.planner.plan import PlanRequest, plan
from memplan.planner.space import SearchSpace

D, N, K, H, F = 4096, 32, 8, 128, 14336


def layers_row(est) -> int:
    return next(r.bytes for r in est.rows if r.component == "activations/layers")


def test_op_keeps_every_other_matmul_output_and_the_attention_output():
    b, s, layers = 2, 4096, 32
    est = estimate("llama-3.1-8b", "h100-sxm-80gb", job="full", recompute="op", micro_batch=b, seq_len=s)
    per_token = 2 * (D + N * H + K * H + F + D) + 2 * N * H + 4 * N  # input, q, v, gate, down; attention out, lse
    assert layers_row(est) == layers * b * s * per_token


def test_op_lies_between_full_and_none_and_recomputes_in_backward():
    rows = {m: estimate("llama-3.1-8b", "h100-sxm-80gb", job="full", recompute=m, seq_len=4096) for m in
            ("none", "op", "full")}
    assert layers_row(rows["full"]) < layers_row(rows["op"]) < layers_row(rows["none"])
    work = {m: sum(r.bytes for r in e.rows if r.component == "activations/recompute_workspace") for m, e in rows.items()}
    assert work["op"] == work["full"] > 0 == work["none"]


def test_planner_picks_op_where_it_is_enough_and_faster_than_full():
    spec = tiny_model(512, 2, 4, 2, 8000)
    base = JobConfig(job=Job.FULL, seq_len=2048, micro_batch=2, cuda_context_bytes=0, allocator_reserve_pct=0,
                     optimizer_impl="fused")
    big = gpu_with(10**6)
    peak = {m: estimate(spec, big, base.model_copy(update={"recompute": Recompute(m)})).peak(Tier.GPU) for m in ("op", "none")}
    gpu = gpu_with((peak["op"] + peak["none"]) // 2 // 2**20)  # op everywhere fits, no recompute does not
    space = SearchSpace(tp=(1,), pp=(1,), zero=(0,), offload_optimizer=(Offload.NONE,), offload_params=(Offload.NONE,),
                        micro_batch=(2,), recompute=(Recompute.NONE, Recompute.OP, Recompute.FULL), global_batch=2)
    result = plan(PlanRequest(model=spec, gpu=gpu, host=HostSpec(), base=base, space=space, top_k=1, suggest=False))
    assert result.best is not None and result.best.estimate.fits
    assert Recompute.OP in result.best.config.recompute_map
    assert Recompute.FULL not in result.best.config.recompute_map
