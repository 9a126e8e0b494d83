"""The last pipeline stage's outputs that torch.distributed.pipelining keeps and returns under
``step(return_outputs=True)`` (``memory.pp_outputs``, engine fsdp2 with pp > 1). Expected bytes are written out here:
m micro-batches of logits, micro_batch × seq × vocab × 2 bytes (bf16), counted from torch's source
(stage.py ``forward_one_chunk``: ``output_chunks.append``; schedules.py ``step``: ``_merge_outputs`` → torch.cat)."""

from __future__ import annotations

import pytest

import memplan
from memplan.arch.build import build_architecture
from memplan.catalog.schema import HostSpec
from memplan.catalog.store import catalog_gpu, catalog_model
from memplan.config import JobConfig
from memplan.engines import rules
from memplan.errors import MemplanError
from memplan.memory import components
from memplan.memory.breakdown import Phase, Tier
from memplan.memory.context import Context

VOCAB = 128256  # Llama-3.1-8B config.json vocab_size
MB, SEQ, M = 2, 4096, 8
LOGITS = MB * SEQ * VOCAB * 2  # one micro-batch's bf16 logits: 2,101,346,304 bytes
IN_FLIGHT, CHUNKS, AFTER, MERGED = ("activations/pp_last_stage_output", "activations/pp_output_chunks",
                                    "activations/pp_output_chunks_after_step", "activations/pp_merged_output")
TRAINING = {Phase.FORWARD, Phase.BACKWARD_START, Phase.BACKWARD}


def _ctx(stage: int, **kw: object) -> Context:
    base = {"job": "pretrain", "engine": "fsdp2", "gpus_per_node": 8, "nodes": 2, "pp": 4, "micro_batch": MB,
            "seq_len": SEQ, "grad_accum": M}
    cfg = JobConfig(**{**base, **kw})
    return Context(build_architecture(catalog_model("llama-3.1-8b")), cfg, catalog_gpu("h100-sxm-80gb"),
                   HostSpec()).at_stage(stage)


def _rows(ctx: Context) -> dict:
    return {r.component: r for r in components.job_rows(ctx, []) if r.component in (IN_FLIGHT, CHUNKS, AFTER, MERGED)}


def test_the_last_stage_keeps_m_minus_one_then_returns_2m_logits() -> None:
    """1F1B, pp 4, m 8: the last stage's backward of micro-batch 7 runs with 7 earlier outputs kept; after the step
    the 8 chunks stay in output_chunks and their torch.cat is returned: 16 logits beside the optimizer step."""
    rows = _rows(_ctx(3))
    assert {n: r.bytes for n, r in rows.items()} == {IN_FLIGHT: LOGITS, CHUNKS: 7 * LOGITS, AFTER: 8 * LOGITS,
                                                     MERGED: 8 * LOGITS}
    assert rows[IN_FLIGHT].phases == {Phase.BACKWARD_START, Phase.BACKWARD}
    assert rows[CHUNKS].phases == TRAINING
    assert rows[AFTER].phases == rows[MERGED].phases == {Phase.OPTIMIZER}
    assert rows[CHUNKS].tier is Tier.GPU


@pytest.mark.parametrize("stage", range(3))
def test_only_the_last_stage_holds_them(stage: int) -> None:
    assert _rows(_ctx(stage)) == {}


def test_one_micro_batch_keeps_none_during_the_step() -> None:
    rows = _rows(_ctx(3, grad_accum=1))
    assert {n: r.bytes for n, r in rows.items()} == {IN_FLIGHT: LOGITS, AFTER: LOGITS, MERGED: LOGITS}


def test_the_vocabulary_parallel_output_layer_splits_them() -> None:
    """tp 2: each rank's logits are [B, S, V/2] (the vocabulary-parallel loss, as activations/logits counts them)."""
    rows = _rows(_ctx(3, tp=2))
    assert rows[MERGED].bytes == M * MB * SEQ * (VOCAB // 2) * 2


def test_interleaved_the_rank_with_the_last_global_stage() -> None:
    """Interleaved 1F1B, p 4, v 2: global stage 7 is chunk 1 of rank 3 (stage s + c·p)."""
    assert _rows(_ctx(3, perf={"virtual_stages": 2}))[MERGED].bytes == M * LOGITS
    assert all(_rows(_ctx(s, perf={"virtual_stages": 2})) == {} for s in range(3))


def test_without_return_outputs_only_the_running_output() -> None:
    """torchtitan's step(return_outputs=False): the running micro-batch's logits are still held through its backward
    (fwd_cache, then backward_one_chunk's stage_output), beside the gradients ``activations/logits`` counts."""
    rows = _rows(_ctx(3, engine_config={"pp_return_outputs": False}))
    assert {n: r.bytes for n, r in rows.items()} == {IN_FLIGHT: LOGITS}


def test_none_with_deallocated_outputs() -> None:
    """Megatron-style deallocation (Llama 3's pipeline) frees every stage output and returns none."""
    assert _rows(_ctx(3, engine_config={"deallocate_pipeline_outputs": True})) == {}


def test_the_last_stage_becomes_the_binding_one() -> None:
    """llama-3.1-8b, pp 4, seq 2048, m 16: stage 0 (embedding, most parameters) binds without the returned outputs;
    with them the last stage's 15 (then 32) logits of 1,050,673,152 bytes make it the answer."""
    kw = {"job": "pretrain", "engine": "fsdp2", "gpus_per_node": 8, "nodes": 2, "pp": 4, "seq_len": 2048,
          "grad_accum": 16}
    without = memplan.estimate("llama-3.1-8b", "h100-sxm-80gb", **kw, engine_config={"pp_return_outputs": False})
    with_outputs = memplan.estimate("llama-3.1-8b", "h100-sxm-80gb", **kw)
    assert (without.stage, with_outputs.stage) == (0, 3)
    rows = {r.component: r.bytes for r in with_outputs.rows}
    assert rows[MERGED] == 16 * 2048 * VOCAB * 2
    assert with_outputs.peak > without.peak


@pytest.mark.parametrize(("kw", "says"), [
    ({"engine": "deepspeed", "pp": 2}, "knob of fsdp2"),
    ({"engine": "fsdp2", "pp": 1}, "pp = 1"),
    ({"engine": "fsdp2", "pp": 2, "engine_config": {"pp_return_outputs": False, "deallocate_pipeline_outputs": True}},
     "deallocate_pipeline_outputs"),
])
def test_the_knob_where_it_moves_no_byte_is_an_error(kw: dict, says: str) -> None:
    cfg = JobConfig(job="pretrain", gpus_per_node=4, **{"engine_config": {"pp_return_outputs": False}, **kw})
    with pytest.raises(MemplanError, match=says):
        rules.check(cfg)


def test_kept_output_under_torch_pipelining_is_an_error() -> None:
    """The loop's model output under torch pipelining is step()'s return value (``pp_return_outputs``): a second
    count of it through ``kept_output`` is refused, not added."""
    cfg = JobConfig(job="pretrain", engine="fsdp2", gpus_per_node=4, pp=2, kept_output="logits")
    with pytest.raises(MemplanError, match="kept_output"):
        rules.check(cfg)


def test_cli_rejects_the_knob_without_a_pipeline(runner) -> None:
    from conftest import run_cli

    out = run_cli(runner, "estimate", "gpt2", "--job", "pretrain", "--engine", "fsdp2", "--gpus", "2",
                  "--no-pp-return-outputs", code=2)
    assert "pp_return_outputs" in out.output


def test_plan_finds_no_layout_the_returned_logits_overflow() -> None:
    """A GPU between the two answers: with return_outputs off a plan fits; on, no recompute frees the logits, and
    plan must not say FITS (its ILP counts the rows on the last stage, and every plan is re-checked by estimate)."""
    from test_planner import gpu_with

    from memplan.config import Offload
    from memplan.estimator import estimate
    from memplan.planner.plan import PlanRequest, plan
    from memplan.planner.space import SearchSpace

    spec = catalog_model("llama-3.2-1b")
    base = JobConfig(job="pretrain", engine="fsdp2", gpus_per_node=6, pp=3, micro_batch=1, seq_len=2048,
                     grad_accum=8, recompute="none")
    off = base.model_copy(update={"engine_config": base.engine_config.model_copy(update={"pp_return_outputs": False})})
    roomy = gpu_with(40_000)
    dropped, kept = estimate(spec, roomy, off).peak(Tier.GPU), estimate(spec, roomy, base).peak(Tier.GPU)
    gpu = gpu_with((dropped + kept) // 2 // 2**20)
    space = SearchSpace(tp=(1,), pp=(3,), micro_batch=(1,), zero=(0,), offload_optimizer=(Offload.NONE,),
                        offload_params=(Offload.NONE,), recompute=("none", "full"), global_batch=16)
    results = {}
    for name, cfg in (("off", off), ("on", base)):
        results[name] = plan(PlanRequest(model=spec, gpu=gpu, host=HostSpec(), base=cfg, space=space, top_k=1,
                                         suggest=False))
    assert results["off"].best is not None and results["off"].best.estimate.fits
    assert results["on"].best is None, results["on"].best
