"""Named torch.distributed.pipelining schedules (``engine_config.pp_schedule``) in the estimate: which engines and
layouts take them (exit 2 otherwise), their in-flight activations, the V layout, the stage buffers and the bubble.
Expectations come from the schedules' definitions (torch's schedules.py) and the 1F1B numbers memplan already
pins, never from the code under test."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from memplan.arch.build import build_architecture
from memplan.catalog.schema import HostSpec
from memplan.catalog.store import catalog_gpu, catalog_model
from memplan.cli.app import app
from memplan.config import JobConfig
from memplan.engines import rules
from memplan.memory import components
from memplan.memory.context import Context
from memplan.planner import cost

HIDDEN = 4096  # Llama-3.1-8B config.json
MB, SEQ, M, P = 1, 2048, 8, 4
X = MB * SEQ * HIDDEN * 2  # one bf16 stage-boundary tensor
ARCH = build_architecture(catalog_model("llama-3.1-8b"))


def _cfg(schedule: str | None, v: int = 1, **kw: object) -> JobConfig:
    base = {"job": "pretrain", "engine": "fsdp2", "gpus_per_node": 8, "pp": P, "micro_batch": MB, "seq_len": SEQ,
            "grad_accum": M, "perf": {"virtual_stages": v},
            "engine_config": {"pp_schedule": schedule} if schedule else {}}
    return JobConfig(**{**base, **kw})


def _rows(cfg: JobConfig, stage: int) -> dict[str, int]:
    ctx = Context(ARCH, cfg, catalog_gpu("h100-sxm-80gb"), HostSpec()).at_stage(stage)
    return {r.component: r.bytes for r in components.job_rows(ctx, [])}


@pytest.mark.parametrize("kw,needle", [
    ({"engine": "megatron"}, "Megatron-LM runs 1F1B"),
    ({"engine": "deepspeed", "zero": 1}, "TrainSchedule"),
    ({"pp": 1}, "needs a pipeline"),
    ({"perf": {"virtual_stages": 1}, "engine_config": {"pp_schedule": "ZBVZeroBubble"}}, "exactly 2 stages"),
    ({"perf": {"virtual_stages": 3}, "engine_config": {"pp_schedule": "DualPipeV"}}, "exactly 2 stages"),
    ({"perf": {"virtual_stages": 1}, "engine_config": {"pp_schedule": "LoopedBFS"}}, "several stages"),
    ({"perf": {"virtual_stages": 2}}, "one stage per rank"),
    ({"perf": {"virtual_stages": 2}, "grad_accum": 4, "engine_config": {"pp_schedule": "DualPipeV"}},
     "at least as many micro-batches"),
    ({"perf": {"virtual_stages": 2}, "grad_accum": 9, "engine_config": {"pp_schedule": "Interleaved1F1B"}},
     "multiple of its rounds"),
    ({"job": "lora", "perf": {"virtual_stages": 2}, "engine_config": {"pp_schedule": "ZBVZeroBubble"}},
     "pretrain and full jobs"),
])
def test_refused_where_torch_or_the_engine_does_not_run_it(kw: dict, needle: str) -> None:
    """Each refusal is one sentence naming the rule (torch's class checks; other engines' own schedules)."""
    reason = rules.violation(_cfg("GPipe", **kw))
    assert reason is not None and needle in reason


def test_cli_refuses_with_exit_2() -> None:
    out = CliRunner().invoke(app, ["estimate", "llama-3.1-8b", "--job", "full", "--engine", "megatron", "--pp", "4",
                                   "--gpus", "8", "--pp-schedule", "gpipe"])
    assert out.exit_code == 2 and "torch.distributed.pipelining" in out.output


def test_names_in_any_case() -> None:
    """torchtitan passes ``pipeline_parallel_schedule`` to ``get_schedule_class``, which lowers both sides."""
    assert _cfg("interleaved1f1b", 2).engine_config.pp_schedule == "Interleaved1F1B"
    with pytest.raises(ValueError):
        _cfg("zero-bubble")


@pytest.mark.parametrize("stage", range(P))
def test_named_1f1b_is_todays_default(stage: int) -> None:
    """1F1B named or not: the same rows (torch's Schedule1F1B is the order memplan models)."""
    assert _rows(_cfg("1F1B"), stage) == _rows(_cfg(None), stage)


@pytest.mark.parametrize("stage", range(P - 1))
def test_gpipe_keeps_every_micro_batch(stage: int) -> None:
    """GPipe runs all m forwards before any backward: the blocks' saved bytes are m micro-batches' on every rank,
    where 1F1B holds p − s (the per-micro-batch bytes from 1F1B's row divided by its p − s), and torch keeps all m
    stage outputs in ``fwd_cache``."""
    one_f_one_b, gpipe = _rows(_cfg(None), stage), _rows(_cfg("GPipe"), stage)
    per_micro_batch = one_f_one_b["activations/layers"] // (P - stage)
    assert gpipe["activations/layers"] == M * per_micro_batch
    assert gpipe["activations/pp_stage_outputs"] == M * X


def test_v_shape_puts_both_ends_on_rank_zero() -> None:
    """ZBVZeroBubble: rank 0 holds stage 0 (embedding) and stage 2p − 1 (final norm, output layer, loss); the last
    rank holds stages p − 1 and p, neither end."""
    first, last = _rows(_cfg("ZBVZeroBubble", 2), 0), _rows(_cfg("ZBVZeroBubble", 2), P - 1)
    assert "activations/loss" in first and "activations/embeddings" in first
    assert "activations/loss" not in last and "activations/logits" not in last
    ctx = Context(ARCH, _cfg("ZBVZeroBubble", 2), catalog_gpu("h100-sxm-80gb"), HostSpec())
    ranks = [ctx.at_stage(s) for s in range(P)]
    assert set(ARCH.post) <= set(ranks[0].tensors) and set(ARCH.pre) <= set(ranks[0].tensors)
    assert not set(ARCH.post) & set(ranks[-1].tensors)
    held = sorted(i for r in ranks for i, _ in r.layers)
    assert held == list(range(len(ARCH.layers)))  # every block once
    assert ranks[0].layers[0][0] == 0 and ranks[0].layers[-1][0] == len(ARCH.layers) - 1  # both ends of the V


def test_zero_bubble_keeps_weight_op_output_gradients() -> None:
    """Between I and W torch keeps each weight op's output gradient (_backward.py stage_backward_input's prehooks):
    per Llama-3.1-8B block and token q 4096 + k 1024 + v 1024 + o 4096 + gate, up 14336 each + down 4096 linear
    outputs and two RMSNorm widths 4096, bf16."""
    from memplan.memory import pp_schedule_flight as psf

    per_layer = SEQ * MB * (4096 + 1024 + 1024 + 4096 + 2 * 14336 + 4096 + 2 * 4096) * 2
    ctx = Context(ARCH, _cfg("ZBVZeroBubble", 2), catalog_gpu("h100-sxm-80gb"), HostSpec()).at_stage(1)
    sizes = psf.chunk_sizes(ctx)
    assert psf.weight_grad_bytes(ctx) == tuple(n * per_layer for n in sizes)
    assert _rows(_cfg("ZBVZeroBubble", 2), 1).get("activations/pp_weight_grad_pending", 0) > 0
    assert "activations/pp_weight_grad_pending" not in _rows(_cfg("GPipe"), 1)


@pytest.mark.parametrize("name,v,idle", [("1F1B", 1, 3), ("GPipe", 1, 3), ("Interleaved1F1B", 2, 1.5),
                                         ("LoopedBFS", 2, 1.5), ("InterleavedZeroBubble", 2, 0.5),
                                         ("ZBVZeroBubble", 2, 0), ("DualPipeV", 2, 1)])
def test_bubble(name: str, v: int, idle: float) -> None:
    """p = 4, m = 8, F = I = W: 1F1B/GPipe p − 1; interleaved (p − 1)/v; ZB1P (p − 1)(F + B − 2W) per chunk;
    ZB-V none once m ≥ 2p − 1; DualPipe (PP/2 − 1)(F&B + B − 3W) with PP = 2p (DeepSeek-V3 Table 2)."""
    assert cost.bubble_slots(name, P, v, M) == pytest.approx(idle)
    assert cost.bubble_slots("ZBVZeroBubble", P, 2, 5) == 2  # torch plans 2p − 1 = 7 and drops two


def test_plan_chooses_schedules_only_where_fsdp2_pipelines() -> None:
    """``plan --pp-schedule`` as a dimension: every candidate with a schedule is fsdp2 with pp > 1 and runs (issue
    11: no plan combines what its engine cannot run); the megatron and pp = 1 plans carry none; several schedules
    are ranked."""
    from memplan.catalog.schema import Family, GpuSpec, ModelSpec
    from memplan.config import Engine, Job, Offload
    from memplan.planner.plan import PlanRequest, plan
    from memplan.planner.space import SearchSpace

    spec = ModelSpec(name="tiny-schedules", source="test", family=Family.LLAMA, hidden_size=256,
                     intermediate_size=768, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
                     vocab_size=4000)
    gpu = GpuSpec(name="test-4gib", vendor="nvidia", source="test", memory_mib=4096, marketed_memory_gb=4,
                  bf16_dense_tflops=100.0, hbm_bandwidth_gbps=1000.0, interconnect_gbps=100.0, pcie_gen=4)
    base = JobConfig(job=Job.FULL, gpus_per_node=4, seq_len=256, cuda_context_bytes=0, allocator_reserve_pct=5)
    space = SearchSpace(tp=(1,), pp=(1, 2), zero=(0, 1), offload_optimizer=(Offload.NONE,),
                        offload_params=(Offload.NONE,), micro_batch=(1,), global_batch=16,
                        engines=(Engine.FSDP2, Engine.MEGATRON),
                        pp_schedules=("GPipe", "1F1B", "ZBVZeroBubble", "DualPipeV"))
    result = plan(PlanRequest(model=spec, gpu=gpu, host=HostSpec(), base=base, space=space, top_k=12, suggest=False))
    named = {c.config.engine_config.pp_schedule for c in result.candidates} - {None}
    assert len(named) >= 2
    for cand in result.candidates:
        cfg = cand.config
        assert rules.violation(cfg) is None
        if cfg.engine_config.pp_schedule is not None:
            assert cfg.effective_engine is Engine.FSDP2 and cfg.pp > 1
    assert len({c.config.model_dump_json() for c in result.candidates}) == len(result.candidates)  # no duplicates


@pytest.mark.parametrize("stage,inputs,grads", [(0, M, M), (1, 2 * M, 2 * M), (P - 1, 2 * M, 2 * M)])
def test_v_shape_receive_buffers(stage: int, inputs: int, grads: int) -> None:
    """torch allocates m input buffers per non-first stage and m gradient buffers per non-last stage
    (stage.py ``_setup_forward_recv_info``/``_create_grad_recv_info``, also between two stages of one rank): in the V,
    rank 0 holds stages 0 and 2p − 1 (m of each kind), the others two middle stages (2m of each)."""
    rows = _rows(_cfg("DualPipeV", 2), stage)
    assert rows.get("activations/pp_grad_recv_buffers", 0) == grads * X
    assert rows.get("activations/pp_recv_buffers", 0) == inputs * X  # no recompute: none counted as saved inputs


def test_weights_of_a_v_rank_are_not_reused_for_the_same_stage_index() -> None:
    """Rank 2 of a V holds other layers than stage 2 of the contiguous split (its two chunks, ``v_chunk_ranges``), so
    the memoized weight bytes of one must not answer for the other: the planner estimates ZBVZeroBubble and
    Interleaved1F1B layouts in one process, and a stale entry once made the re-check reject a plan that fits. Expected:
    the interleaved stage's ``weights/params`` are the same whether or not the V rank was estimated first."""
    from memplan.memory import memo, weights

    def params(cfg: JobConfig) -> int:
        memo._CACHE.clear()  # the size-free memo above it would answer from the first call
        return _rows(cfg, 2)["weights/params"]

    interleaved = _cfg("Interleaved1F1B", v=2, zero=0)  # unsharded: the stage's whole weights
    weights._CACHE.clear()
    alone = params(interleaved)
    weights._CACHE.clear()
    assert params(_cfg("ZBVZeroBubble", v=2, zero=0)) != alone  # rank 2 of the V: 10 layers, stage 2: 9
    assert params(_cfg("Interleaved1F1B", v=2, zero=0)) == alone
