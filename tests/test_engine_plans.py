"""The planner searches only combinations the engine runs (memplan.engines.rules)."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memplan.catalog.schema import Family, GpuSpec, HostSpec, ModelSpec
from memplan.config import Engine, Job, JobConfig, Offload, OptimizerKind, Recompute, ZeroStage
from memplan.engines import rules
from memplan.engines.profiles import PROFILES
from memplan.errors import MemplanError
from memplan.planner.plan import PlanRequest, plan
from memplan.planner.space import SearchSpace

SPEC = ModelSpec(name="tiny-engines", source="test", family=Family.LLAMA, hidden_size=256, intermediate_size=768,
                 num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, vocab_size=4000)
TRAIN_ENGINES = (Engine.PYTORCH, Engine.FSDP2, Engine.DEEPSPEED, Engine.MEGATRON)


def gpu_with(memory_mib: int) -> GpuSpec:
    return GpuSpec(name=f"test-{memory_mib}mib", vendor="nvidia", source="test", memory_mib=memory_mib,
                   marketed_memory_gb=max(1, memory_mib // 1000), bf16_dense_tflops=100.0, hbm_bandwidth_gbps=1000.0,
                   interconnect_gbps=100.0, pcie_gen=4)


@settings(max_examples=14, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(engines=st.one_of(st.none(), st.lists(st.sampled_from(TRAIN_ENGINES), min_size=1, max_size=3, unique=True)),
       optimizers=st.lists(st.sampled_from([OptimizerKind.ADAMW, OptimizerKind.ADAMW_8BIT, OptimizerKind.LION]),
                           min_size=1, max_size=2, unique=True),
       memory_mib=st.sampled_from([60, 120, 400]), gpus=st.sampled_from([2, 4]),
       recompute=st.one_of(st.none(), st.lists(st.sampled_from(list(Recompute)), min_size=1, max_size=4, unique=True)))
def test_no_plan_combines_what_its_engine_cannot_run(engines, optimizers, memory_mib, gpus, recompute):
    """``recompute`` None: the planner's own per-layer modes (all four), as ``plan`` searches without --recompute."""
    base = JobConfig(job=Job.FULL, gpus_per_node=gpus, seq_len=256, cuda_context_bytes=0, allocator_reserve_pct=5)
    space = SearchSpace(tp=(1, 2), pp=(1, 2), zero=(0, 1, 2, 3), offload_optimizer=(Offload.NONE, Offload.CPU),
                        offload_params=(Offload.NONE, Offload.CPU), micro_batch=(1,), optimizer=tuple(optimizers),
                        recompute=tuple(recompute) if recompute else None, global_batch=2 * gpus,
                        engines=tuple(engines) if engines else None)
    try:
        result = plan(PlanRequest(model=SPEC, gpu=gpu_with(memory_mib), host=HostSpec(), base=base, space=space,
                                  top_k=5, suggest=False))
    except MemplanError as exc:  # a space where the engines run nothing is a user error, named by the rule
        assert "engine" in str(exc).lower() or "valid" in str(exc).lower(), exc
        return
    for cand in result.candidates:
        assert rules.violation(cand.config) is None, (cand.config.effective_engine, rules.violation(cand.config))
        modes = {cand.config.recompute, *(cand.config.recompute_map or ())}
        assert modes <= set(PROFILES[cand.config.effective_engine].recompute), (cand.config.effective_engine, modes)
        if engines:
            assert cand.config.engine in engines


def test_zero3_with_pipeline_is_never_planned_by_default():
    """The README's ZeRO-3 + pp plan: DeepSpeed asserts against it, so the planner keeps pp with ZeRO 0/1 only."""
    base = JobConfig(job=Job.FULL, gpus_per_node=4, seq_len=256, cuda_context_bytes=0, allocator_reserve_pct=5)
    space = SearchSpace(tp=(1,), pp=(2,), zero=(0, 1, 2, 3), offload_optimizer=(Offload.NONE,),
                        offload_params=(Offload.NONE,), micro_batch=(1,), global_batch=4)
    # MiB: a two-rank data-parallel ring and one pipeline neighbour, 32 channels x (10 + 2) MiB each, plus the default
    # group of 4 ranks (two neighbours) that DeepSpeed and a 2-D fsdp2 mesh also create (memory.nccl_groups)
    nccl = 2 * 32 * (10 + 2) + 2 * 32 * (10 + 2)
    result = plan(PlanRequest(model=SPEC, gpu=gpu_with(400 + nccl), host=HostSpec(), base=base, space=space, top_k=5,
                              suggest=False))
    assert result.candidates
    assert all(c.config.zero < ZeroStage.GRADIENTS for c in result.candidates)


def _megatron_plan(recompute: tuple[Recompute, ...] | None, memory_mib: int):
    base = JobConfig(job=Job.FULL, engine=Engine.MEGATRON, gpus_per_node=1, seq_len=256, cuda_context_bytes=0,
                     allocator_reserve_pct=5)
    space = SearchSpace(tp=(1,), pp=(1,), zero=(0,), micro_batch=(1,), recompute=recompute, global_batch=1)
    return plan(PlanRequest(model=SPEC, gpu=gpu_with(memory_mib), host=HostSpec(), base=base, space=space, top_k=5,
                            suggest=False))


def test_megatron_plans_never_recompute_op_level():
    """Megatron-LM recomputes whole layers or sub-modules (--recompute-granularity full/selective), not torchtitan's
    op-level policy: the planner leaves ``op`` out of its per-layer modes on megatron and says why, and a space that
    asks for ``op`` alone is refused. The GPU is sized between the plan with no recompute (which must not fit) and
    the one recomputing every layer (which must), so recompute is chosen."""
    base = JobConfig(job=Job.FULL, engine=Engine.MEGATRON, gpus_per_node=1, seq_len=256, micro_batch=1,
                     cuda_context_bytes=0, allocator_reserve_pct=5)
    from memplan.estimator import estimate
    from memplan.memory.breakdown import Tier

    peak = {m: estimate(SPEC, gpu_with(10**6), base.model_copy(update={"recompute": m})).peak(Tier.GPU)
            for m in (Recompute.NONE, Recompute.FULL)}
    mib = (peak[Recompute.NONE] + peak[Recompute.FULL]) // 2 // 2**20
    result = _megatron_plan(None, mib)
    assert result.candidates
    assert any(e.startswith("recompute=op: ") and "megatron" in e for e in result.excluded)
    for cand in result.candidates:
        assert Recompute.OP not in (cand.config.recompute, *(cand.config.recompute_map or ()))
    try:
        _megatron_plan((Recompute.OP,), mib)
    except MemplanError as exc:
        assert "op" in str(exc) and "megatron" in str(exc)
    else:
        raise AssertionError("a megatron plan over --recompute op alone must be refused")
