"""The planner's memory constraints are phase peaks: a plan that fits only because gradients and saved
activations are never alive together is found without recompute, and what the ILP accepts is what
``estimate`` accepts (the exact re-check) — with accumulated gradients too."""

from __future__ import annotations

from test_planner import gpu_with, tiny_model

from memplan.catalog.schema import HostSpec
from memplan.config import Job, JobConfig, Offload, Recompute
from memplan.estimator import estimate
from memplan.memory.breakdown import Tier
from memplan.planner.plan import PlanRequest, plan
from memplan.planner.space import SearchSpace

SPEC = tiny_model(512, 2, 4, 2, 8000)
BASE = JobConfig(job=Job.FULL, seq_len=1024, micro_batch=2, cuda_context_bytes=0, allocator_reserve_pct=0,
                 optimizer_impl="fused")


def request(gpu, base=BASE, global_batch=2):
    space = SearchSpace(tp=(1,), pp=(1,), zero=(0,), offload_optimizer=(Offload.NONE,), offload_params=(Offload.NONE,),
                        micro_batch=(base.micro_batch,), recompute=(Recompute.NONE, Recompute.FULL),
                        global_batch=global_batch)
    return PlanRequest(model=SPEC, gpu=gpu, host=HostSpec(), base=base, space=space, top_k=1, suggest=False)


def test_no_recompute_when_only_the_summed_rows_exceed_capacity():
    plain = estimate(SPEC, gpu_with(10**6), BASE)
    mib = (plain.peak(Tier.GPU) + plain.total(Tier.GPU)) // 2 // 2**20  # between the peak and the sum
    assert plain.peak(Tier.GPU) < mib * 2**20 < plain.total(Tier.GPU)
    result = plan(request(gpu_with(mib)))
    assert result.best is not None
    assert result.best.config.recompute is Recompute.NONE
    assert result.best.estimate.fits and result.best.estimate.total(Tier.GPU) > gpu_with(mib).memory_bytes


def test_accumulated_gradients_count_in_the_ilp():
    """With two micro-batches per step the gradients are alive at the start of backward: a capacity between
    the two peaks needs recompute with accumulation and none without."""
    one = estimate(SPEC, gpu_with(10**6), BASE)
    two = estimate(SPEC, gpu_with(10**6), BASE.model_copy(update={"grad_accum": 2}))
    assert two.peak(Tier.GPU) > one.peak(Tier.GPU)
    mib = (one.peak(Tier.GPU) + two.peak(Tier.GPU)) // 2 // 2**20
    single = plan(request(gpu_with(mib), global_batch=2))
    accum = plan(request(gpu_with(mib), global_batch=4))
    assert single.best is not None and single.best.config.recompute is Recompute.NONE
    assert accum.best is not None and accum.best.config.grad_accum == 2
    assert Recompute.FULL in accum.best.config.recompute_map and accum.best.estimate.fits
