"""Large-scale layouts in ``plan``: uneven pipelines, sequence parallelism, the default global batch, the
token budget, and a best plan that ``--top`` never changes."""

from __future__ import annotations

import pytest

from memplan.catalog.schema import HostSpec
from memplan.catalog.store import catalog_gpu, catalog_model
from memplan.config import JobConfig
from memplan.planner.plan import PlanRequest, plan
from memplan.planner.space import SearchSpace


def _plan(model, gpu, base, space=None, **kw):
    return plan(PlanRequest(model=catalog_model(model) if isinstance(model, str) else model, gpu=catalog_gpu(gpu),
                            host=HostSpec(), base=base, space=space or SearchSpace(), **kw))


def test_pp_that_does_not_divide_the_layers_is_planned_with_balanced_stages():
    """32 layers on 3 stages: 32 = 10 + 12 + 10 minimises the largest stage once the embedding (first) and the
    output layer (last) count; the plan's stages say so, and every stage fits the GPU."""
    base = JobConfig(job="full", gpus_per_node=6, seq_len=4096)
    result = _plan("llama-3.1-8b", "a100-sxm-40gb", base, SearchSpace(pp=(3,), tp=(1, 2)), top_k=1)
    assert result.status == "optimal" and result.best.config.pp == 3
    from memplan.planner.stages import stage_table

    stages = stage_table(result.best.estimate)
    assert [s["layers"] for s in stages] == [10, 12, 10]
    assert max(s["gpu_bytes"] for s in stages) <= catalog_gpu("a100-sxm-40gb").memory_bytes


def test_korthikanti_22b_plan_is_feasible_with_sequence_parallelism():
    """Korthikanti et al. 2022, Table 3: 22B (h 6144, 64 heads, 48 layers) on 8 A100 80GB with tp8, selective
    recompute and sequence parallelism; plan, forced to that layout, must find it and turn SP on."""
    from tests.test_published_runs import gpt

    base = JobConfig(job="pretrain", engine="megatron", gpus_per_node=8, seq_len=2048,
                     activation_accounting="paper", flash_attention=False)
    space = SearchSpace(tp=(8,), pp=(1,), zero=(0,), micro_batch=(1,), recompute=("selective",), global_batch=4,
                        per_layer_recompute=False)
    result = _plan(gpt(6144, 64, 48), "a100-sxm-80gb", base, space, top_k=1)
    assert result.status == "optimal"
    assert result.best.config.sequence_parallel


def test_default_global_batch_is_the_documented_token_count():
    """Pre-training plans compare at 2^22 tokens: 1,024 sequences of 4,096 (a multiple of 8 × 16 GPUs)."""
    base = JobConfig(job="pretrain", gpus_per_node=8, nodes=2, seq_len=4096)
    result = _plan("llama-3.2-1b", "h100-sxm-80gb", base, top_k=1)
    cfg = result.best.config
    assert result.best.global_batch == 2**22 // 4096
    assert cfg.micro_batch * cfg.grad_accum * cfg.dp == 2**22 // 4096


def test_train_tokens_budget_is_time_and_gpu_hours():
    base = JobConfig(job="pretrain", gpus_per_node=8, seq_len=4096)
    result = _plan("llama-3.2-1b", "h100-sxm-80gb", base, top_k=1, train_tokens=10**11)
    best = result.best
    seconds = 10**11 / best.tokens_per_s
    assert best.train_budget["seconds"] == pytest.approx(seconds)
    assert best.train_budget["gpu_hours"] == pytest.approx(seconds * 8 / 3600)


@pytest.mark.parametrize("model,gpu,job", [("llama-3.2-1b", "l4", "lora"), ("qwen2.5-0.5b", "a10g", "full")])
def test_top_never_changes_the_best_plan(model, gpu, job):
    base = JobConfig(job=job, seq_len=1024)
    one = _plan(model, gpu, base, top_k=1)
    five = _plan(model, gpu, base, top_k=5)
    assert one.best.config == five.best.config
    assert one.best.step_time_s == five.best.step_time_s


def test_step_time_of_a_fixed_config_is_the_planners_own():
    """``budget.step_time`` (estimate-side, a fixed config) adds the same terms the ILP adds for that plan."""
    from memplan.planner.budget import step_time

    base = JobConfig(job="full", gpus_per_node=4, seq_len=2048)
    result = _plan("llama-3.1-8b", "a100-sxm-40gb", base, top_k=1)
    best = result.best
    got = step_time(catalog_model("llama-3.1-8b"), catalog_gpu("a100-sxm-40gb"), best.config)
    assert got.step_s == pytest.approx(best.step_time_s, rel=1e-9)
    assert got.global_batch == best.global_batch


def test_expert_parallelism_is_searched_for_moe_on_megatron():
    """A Megatron MoE plan searches ep; its best is valid (ep divides the experts and dp) and no slower than
    the best plan with ep fixed to 1 (a subset of the same space)."""
    # two nodes: on one, Megatron without its distributed optimizer (no ZeRO) cannot hold 47B parameters' states
    base = JobConfig(job="pretrain", engine="megatron", gpus_per_node=8, nodes=2, seq_len=2048)
    free = _plan("mixtral-8x7b", "h100-sxm-80gb", base, top_k=1)
    fixed = _plan("mixtral-8x7b", "h100-sxm-80gb", base, SearchSpace(ep=(1,)), top_k=1)
    cfg = free.best.config
    assert 8 % cfg.ep == 0 and cfg.dp % cfg.ep == 0
    assert free.best.step_time_s <= fixed.best.step_time_s * (1 + 1e-9)
