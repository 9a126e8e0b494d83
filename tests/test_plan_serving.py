"""Inference plans: exact capacity objectives agree with estimate; expert parallelism; data-parallel replicas."""

from __future__ import annotations

from memplan.catalog.resolve import load_model
from memplan.catalog.schema import HostSpec
from memplan.catalog.store import catalog_gpu
from memplan.config import JobConfig
from memplan.estimator import estimate
from memplan.planner.plan import PlanRequest, plan
from memplan.planner.space import Objective, SearchSpace
from memplan.search import largest_fitting


def _req(model: str, gpu: str, objective: Objective, space: SearchSpace | None = None, **base: object) -> PlanRequest:
    cfg = JobConfig.model_validate({"job": "infer", **base})
    return PlanRequest(model=load_model(model), gpu=catalog_gpu(gpu), host=HostSpec(), base=cfg,
                       space=space or SearchSpace(), objective=objective, top_k=1, suggest=False)


def test_max_concurrency_plan_equals_estimate_max_batch() -> None:
    # Issue 12: plan --objective max-batch tried powers of two only and disagreed with estimate --max-batch.
    for engine in ("vllm", None):
        result = plan(_req("llama-3.1-8b", "rtx-4090", Objective.MAX_CONCURRENCY, SearchSpace(tp=(1,), pp=(1,)),
                           engine=engine, infer={"context": 1500}))
        assert result.status == "optimal", engine
        chosen = result.candidates[0].config
        est = estimate("llama-3.1-8b", "rtx-4090", chosen.model_copy(update={"micro_batch": 1}))
        assert chosen.micro_batch == largest_fitting(est, "micro_batch"), engine
        assert chosen.micro_batch & (chosen.micro_batch - 1), "an exact integer, here not a power of two"


def test_max_context_plan_equals_estimate_max_context() -> None:
    result = plan(_req("llama-3.1-8b", "rtx-4090", Objective.MAX_CONTEXT, SearchSpace(tp=(1,), pp=(1,)),
                       engine="vllm", micro_batch=2))
    assert result.status == "optimal"
    chosen = result.candidates[0].config
    assert chosen.infer.context == largest_fitting(estimate("llama-3.1-8b", "rtx-4090", chosen), "context")


def test_deepseek_v3_infer_plan_uses_expert_parallelism() -> None:
    # Issue 12: plan deepseek-v3 --gpu h200 --gpus 8 --nodes 128 --job infer said INFEASIBLE while
    # estimate --tp 8 --ep 8 fits.
    result = plan(_req("deepseek-v3", "h200-sxm-141gb", Objective.THROUGHPUT, SearchSpace(tp=(8,), pp=(1,)),
                       gpus_per_node=8, nodes=128, infer={"context": 4096}))
    assert result.status == "optimal"
    assert result.candidates[0].estimate.fits and result.candidates[0].config.ep > 1


def test_replicas_multiply_throughput() -> None:
    # r data-parallel replicas serve r times the tokens/s of one (same tp, pp, batch, context).
    one = plan(_req("llama-3.1-8b", "h100-sxm-80gb", Objective.THROUGHPUT, SearchSpace(tp=(1,), pp=(1,)),
                    engine="vllm", micro_batch=8, infer={"context": 1024}))
    four = plan(_req("llama-3.1-8b", "h100-sxm-80gb", Objective.THROUGHPUT, SearchSpace(tp=(1,), pp=(1,)),
                     engine="vllm", micro_batch=8, gpus_per_node=4, infer={"context": 1024}))
    a, b = one.candidates[0].tokens_per_s, four.candidates[0].tokens_per_s
    assert abs(b - 4 * a) <= 1e-9 * b


def test_min_gpus_serves_c_sequences_of_t_tokens() -> None:
    # "The cheapest layout that serves C concurrent sequences of T tokens": 600 × 8k of Llama-3.1-8B with vLLM.
    req = _req("llama-3.1-8b", "h100-sxm-80gb", Objective.MIN_GPUS, gpus_per_node=8, nodes=4, engine="vllm",
               micro_batch=600, infer={"context": 8192})
    result = plan(req)
    assert result.status == "optimal"
    best = result.candidates[0]
    replicas = best.extras["replicas"]
    assert best.config.micro_batch * replicas >= 600 and best.estimate.fits
    # one fewer GPU cannot hold them: a replica of tp × pp GPUs holds C sequences, so the fewest GPUs are the
    # smallest tp · pp · ceil(600 / C) over the layouts of one 8-GPU node (pp = 2 can win: only the last stage
    # pays the sampler's profile peak)
    fewest = None
    for tp, pp in ((1, 1), (1, 2), (2, 1), (1, 4), (2, 2), (4, 1), (1, 8), (2, 4), (4, 2), (8, 1)):
        one = estimate("llama-3.1-8b", "h100-sxm-80gb", job="infer", engine="vllm", tp=tp, pp=pp, gpus_per_node=8,
                       infer={"context": 8192})
        gpus = tp * pp * -(-600 // largest_fitting(one, "micro_batch"))
        fewest = gpus if fewest is None else min(fewest, gpus)
    assert best.config.world_size == fewest


def test_max_concurrency_counts_every_replica() -> None:
    # 8 GPUs: the plan maximizes sequences over all data-parallel replicas, batch (per replica) × replicas.
    result = plan(_req("llama-3.1-8b", "h100-sxm-80gb", Objective.MAX_CONCURRENCY, SearchSpace(pp=(1,)),
                       engine="vllm", gpus_per_node=8, infer={"context": 32768}))
    best = result.candidates[0]
    one = estimate("llama-3.1-8b", "h100-sxm-80gb", job="infer", engine="vllm", infer={"context": 32768})
    per_gpu = largest_fitting(one, "micro_batch")
    assert best.config.micro_batch * best.config.dp >= 8 * per_gpu
