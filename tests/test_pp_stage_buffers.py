"""torch.distributed.pipelining's own buffers under engine fsdp2 with pp > 1 (``memory.pp_stage_buffers``): each
micro-batch's stage output kept in ``fwd_cache`` until its backward, and one input / output-gradient receive buffer
per micro-batch and chunk (torch/distributed/pipelining/stage.py). Expected bytes are [micro_batch, seq, hidden] ×
2 bytes × a count written out from the schedule here."""

from __future__ import annotations

import pytest

from memplan.arch.build import build_architecture
from memplan.catalog.schema import HostSpec
from memplan.catalog.store import catalog_gpu, catalog_model
from memplan.config import JobConfig
from memplan.engines import rules
from memplan.errors import MemplanError
from memplan.memory import components
from memplan.memory.breakdown import Phase, Tier
from memplan.memory.context import Context

HIDDEN = 4096  # Llama-3.1-8B config.json hidden_size
MB, SEQ, M = 2, 4096, 8
X = MB * SEQ * HIDDEN * 2  # one bf16 stage-boundary tensor
NAMES = ("activations/pp_stage_outputs", "activations/pp_recv_buffers", "activations/pp_grad_recv_buffers")


def _ctx(stage: int, **kw: object) -> Context:
    base = {"job": "pretrain", "engine": "fsdp2", "gpus_per_node": 8, "nodes": 2, "pp": 4, "micro_batch": MB,
            "seq_len": SEQ, "grad_accum": M}
    cfg = JobConfig(**{**base, **kw})
    return Context(build_architecture(catalog_model("llama-3.1-8b")), cfg, catalog_gpu("h100-sxm-80gb"),
                   HostSpec()).at_stage(stage)


def _bytes(ctx: Context) -> dict[str, int]:
    rows = {r.component: r for r in components.job_rows(ctx, [])}
    return {n: rows[n].bytes if n in rows else 0 for n in NAMES}


def _torch_1f1b_outputs_kept(p: int, s: int, m: int) -> int:
    """Schedule1F1B written out for stage s: p − s − 1 warm-up forwards, then forward/backward pairs; the most
    outputs in ``fwd_cache`` at once (a forward adds one, a backward pops one)."""
    warm = min(p - s - 1, m)
    events = ["F"] * warm + ["F", "B"] * (m - warm) + ["B"] * warm
    alive = best = 0
    for e in events:
        alive += 1 if e == "F" else -1
        best = max(best, alive)
    return best


@pytest.mark.parametrize("stage", range(4))
def test_1f1b_stage_buffers(stage: int) -> None:
    """pp 4, m 8: stage s keeps p − s outputs (none counted on the last, whose output is the logits); every stage
    but the first allocates m input buffers, every stage but the last m gradient buffers."""
    got = _bytes(_ctx(stage))
    outputs = _torch_1f1b_outputs_kept(4, stage, M) if stage < 3 else 0
    assert outputs == (4 - stage if stage < 3 else 0)
    assert got == {"activations/pp_stage_outputs": outputs * X,
                   "activations/pp_recv_buffers": (M if stage > 0 else 0) * X,
                   "activations/pp_grad_recv_buffers": (M if stage < 3 else 0) * X}


def _torch_interleaved_outputs_kept(p: int, r: int, v: int, m: int) -> tuple[int, int]:
    """ScheduleInterleaved1F1B written out for rank r (torch schedules.py ``_get_warmup_ops``: (v − 1)·p +
    2·(p − 1 − r) warm-up forwards, capped at m·v; forward i runs local chunk (i // p) mod v, backward k runs chunk
    v − 1 − (k // p) mod v; m a multiple of p): (most chunk micro-batches in flight on the rank, most outputs kept
    by its chunks other than the last global stage)."""
    total = m * v
    warm = min((v - 1) * p + 2 * (p - 1 - r), total)
    events = ["F"] * warm + ["F", "B"] * (total - warm) + ["B"] * warm
    alive = [0] * v
    fwd = bwd = best_all = best_kept = 0
    for e in events:
        if e == "F":
            alive[(fwd // p) % v] += 1
            fwd += 1
        else:
            alive[v - 1 - (bwd // p) % v] -= 1
            bwd += 1
        kept = sum(alive[c] for c in range(v) if r + c * p != p * v - 1)
        best_all, best_kept = max(best_all, sum(alive)), max(best_kept, kept)
    return best_all, best_kept


def test_interleaved_stage_buffers() -> None:
    """pp 4, v 2, m 8: rank 1 runs global stages 1 and 5 of 8, rank 3 stages 3 and 7 (the last). Written out, rank 1
    has at most 9 chunk micro-batches in flight, counted ⌈9/2⌉ = 5 per chunk as the activations are: 10 outputs; rank
    3 has 5 in flight (counted 3 per chunk: 6), which torch's rounds of p forwards per chunk can put all on stage 3:
    6 outputs. Input buffers: 8 per chunk not the first stage; gradient buffers: 8 per chunk not the last."""
    assert _torch_interleaved_outputs_kept(4, 1, 2, M) == (9, 9)
    assert _torch_interleaved_outputs_kept(4, 3, 2, M) == (5, 5)
    assert _bytes(_ctx(1, perf={"virtual_stages": 2})) == dict(zip(NAMES, (10 * X, 16 * X, 16 * X), strict=True))
    assert _bytes(_ctx(3, perf={"virtual_stages": 2})) == dict(zip(NAMES, (6 * X, 16 * X, 8 * X), strict=True))


@pytest.mark.parametrize(("p", "v", "m"), [(4, 2, 8), (4, 4, 8), (8, 2, 16), (2, 2, 4), (16, 8, 32), (16, 8, 16)])
def test_outputs_cover_torch_interleaved_schedule(p: int, v: int, m: int) -> None:
    """On every rank the outputs counted are at least the most torch's interleaved schedule keeps."""
    from memplan.memory.pp_stage_buffers import output_counts

    for r in range(p):
        assert output_counts(p, r, v, m) >= _torch_interleaved_outputs_kept(p, r, v, m)[1], (p, r, v, m)


def test_paper_accounting_counts_in_flight_inputs_once() -> None:
    """Under the paper's accounting the first norm saves the stage input (Korthikanti et al. 2022), the very receive
    buffer of an in-flight micro-batch: stage 1 of 1F1B pp 4 holds 3 in flight, so 8 − 3 = 5 buffers are extra."""
    got = _bytes(_ctx(1, activation_accounting="paper"))
    assert got["activations/pp_recv_buffers"] == (M - 3) * X


def test_paper_accounting_interleaved_takes_off_only_the_inputs_in_flight() -> None:
    """Interleaved pp 4, v 2, m 8, rank 1 (stages 1 and 5, both receiving, equal chunks): the written-out schedule
    has at most 9 chunk micro-batches in flight, so 16 − 9 = 7 buffers are extra (not 16 − 2·⌈9/2⌉ = 6)."""
    in_flight = _torch_interleaved_outputs_kept(4, 1, 2, M)[0]
    assert in_flight == 9
    got = _bytes(_ctx(1, activation_accounting="paper", perf={"virtual_stages": 2}))
    assert got["activations/pp_recv_buffers"] == (2 * M - in_flight) * X


def test_sequence_parallel_splits_the_boundary_tensor() -> None:
    """With tp 2 and sequence parallelism the tensor crossing stages is [micro_batch, seq/2, hidden] per rank."""
    got = _bytes(_ctx(1, tp=2, sequence_parallel=True))
    assert got["activations/pp_grad_recv_buffers"] == M * X // 2


def test_buffers_phases() -> None:
    """Receive buffers are allocated once and kept (every phase); outputs live from forward to their backward."""
    rows = {r.component: r for r in components.job_rows(_ctx(1), [])}
    assert Phase.OPTIMIZER in rows["activations/pp_recv_buffers"].phases
    assert rows["activations/pp_stage_outputs"].phases == frozenset({Phase.FORWARD, Phase.BACKWARD_START})
    assert all(rows[n].tier is Tier.GPU for n in NAMES)


def test_deallocating_stage_keeps_none() -> None:
    """``deallocate_pipeline_outputs`` (Megatron-Core's name; Llama 3 Sec. 3.3.2): no kept outputs, no buffers."""
    assert _bytes(_ctx(1, engine_config={"deallocate_pipeline_outputs": True})) == dict.fromkeys(NAMES, 0)


def test_megatron_deallocates_its_outputs() -> None:
    """Megatron-LM sets deallocate_pipeline_outputs = True (arguments.py core_transformer_config_from_args) and
    receives into per-message buffers: no rows."""
    assert _bytes(_ctx(1, engine="megatron")) == dict.fromkeys(NAMES, 0)


@pytest.mark.parametrize(("kw", "needle"), [({"pp": 1}, "pp = 1"), ({"engine": "megatron"}, "knob of fsdp2")])
def test_knob_where_it_moves_nothing_is_refused(kw: dict, needle: str) -> None:
    base = {"job": "pretrain", "engine": "fsdp2", "gpus_per_node": 8, "pp": 4}
    cfg = JobConfig(**{**base, **kw}, engine_config={"deallocate_pipeline_outputs": True})
    with pytest.raises(MemplanError, match=needle):
        rules.check(cfg)


DS_NAMES = ("activations/pp_stage_outputs", "activations/pp_stage_inputs", "activations/pp_recv_buffers",
            "activations/pp_grad_recv_buffers")


def _ds_bytes(stage: int, **kw: object) -> dict[str, int]:
    rows = {r.component: r for r in components.job_rows(_ctx(stage, engine="deepspeed", zero=1, **kw), [])}
    return {n: rows[n].bytes if n in rows else 0 for n in DS_NAMES}


@pytest.mark.parametrize(("stage", "m"), [(s, M) for s in range(4)] + [(0, 2), (1, 2)])
def test_deepspeed_pipe_buffers(stage: int, m: int) -> None:
    """DeepSpeed's pipeline engine (runtime/pipe/engine.py): per in-flight micro-batch, the stage output
    (pipe_buffers['outputs'], none counted on the last stage: the loss) and the received input
    (pipe_buffers['inputs'], a clone the module never sees: none on the first stage); one pipe_recv_buf off the first
    stage and one grad_layer off the last. In flight: TrainSchedule.num_pipe_buffers' min(stages − stage_id,
    micro_batches), which is 1F1B's most forwards alive, written out."""
    flight = min(4 - stage, m)
    assert flight == _torch_1f1b_outputs_kept(4, stage, m)
    assert _ds_bytes(stage, grad_accum=m) == {
        "activations/pp_stage_outputs": (flight if stage < 3 else 0) * X,
        "activations/pp_stage_inputs": (flight if stage > 0 else 0) * X,
        "activations/pp_recv_buffers": (1 if stage > 0 else 0) * X,
        "activations/pp_grad_recv_buffers": (1 if stage < 3 else 0) * X}


def test_deepspeed_partitions_what_crosses_stages_over_tensor_parallelism() -> None:
    """tp 2 (pipe_partitioned/grad_partitioned default True): outputs and both receive buffers hold half of X; the
    kept inputs are the gathered full X, the module's own input: under the paper's accounting (the first norm saves
    its input) the activations hold them already."""
    flight = 4 - 1
    assert _ds_bytes(1, tp=2) == {"activations/pp_stage_outputs": flight * X // 2,
                                  "activations/pp_stage_inputs": flight * X,
                                  "activations/pp_recv_buffers": X // 2, "activations/pp_grad_recv_buffers": X // 2}
    assert _ds_bytes(1, tp=2, activation_accounting="paper")["activations/pp_stage_inputs"] == 0
    assert _ds_bytes(1, activation_accounting="paper")["activations/pp_stage_inputs"] == flight * X  # the clone's source


def test_deepspeed_pipe_buffer_phases() -> None:
    rows = {r.component: r for r in components.job_rows(_ctx(1, engine="deepspeed", zero=1), [])}
    assert rows["activations/pp_stage_inputs"].phases == frozenset({Phase.FORWARD, Phase.BACKWARD_START})
    assert Phase.OPTIMIZER in rows["activations/pp_grad_recv_buffers"].phases


@pytest.mark.parametrize(("name", "p", "v", "m"), [("InterleavedZeroBubble", 4, 2, 8), ("ZBVZeroBubble", 4, 2, 8),
                                                  ("DualPipeV", 4, 2, 8), ("Interleaved1F1B", 4, 2, 8)])
def test_named_outputs_live_until_the_weight_backward(name: str, p: int, v: int, m: int) -> None:
    """torch 2.13 stage.py: an input backward (I) keeps ``stage_output`` in ``backward_state`` until the weight
    backward (W) pops it, a full backward (B) drops it. Counted here on torch's own order (``_torch_order``): +1 per
    forward of a chunk that is not the last global stage, −1 per B or W of it; the peak over the order."""
    from test_pp_schedules import _torch_order

    from memplan.arch import pp_schedules as ps
    from memplan.memory.pp_stage_buffers import named_output_counts

    for rank, actions in _torch_order(name, p, m, v).items():
        stages = ps.chunk_stages(name, p, rank, v)
        alive = peak = 0
        for chunk, kind, _ in actions:
            if stages[chunk] == p * v - 1:
                continue
            alive += 1 if kind == ps.F else -1 if kind in (ps.B, ps.WT) else 0
            peak = max(peak, alive)
        assert named_output_counts(name, p, rank, v, m) == peak, (name, rank)


@pytest.mark.parametrize(("name", "v"), [("InterleavedZeroBubble", 2), ("ZBVZeroBubble", 2), ("DualPipeV", 2),
                                         ("Interleaved1F1B", 2)])
def test_input_backwards_leave_their_gradients_on_the_receive_buffers(name: str, v: int) -> None:
    """torch 2.13 _backward.py ``stage_backward_input`` sets ``inp.grad`` on the receive buffer and never clears it
    (``stage_backward`` does, ``val.grad = None``); stage.py skips the first stage's I. Counted on torch's own order:
    the I actions of chunks that are not global stage 0; X each in backward and the optimizer step."""
    from test_pp_schedules import _torch_order

    from memplan.arch import pp_schedules as ps
    from memplan.memory.activations_block import block_input_bytes

    p, m = 4, 8
    orders = _torch_order(name, p, m, v)
    arch = build_architecture(catalog_model("llama-3.1-8b"))
    for rank in range(p):
        stages = ps.chunk_stages(name, p, rank, v)
        expected = sum(1 for chunk, kind, _ in orders[rank] if kind == ps.IN and stages[chunk] != 0)
        cfg = JobConfig(job="pretrain", engine="fsdp2", gpus_per_node=8, pp=p, seq_len=1024, grad_accum=m,
                        perf={"virtual_stages": v}, engine_config={"pp_schedule": name})
        ctx = Context(arch, cfg, catalog_gpu("h100-sxm-80gb"), None).at_stage(rank)
        rows = {r.component: r for r in components.stage_rows(ctx)[0]}
        got = rows.get("activations/pp_input_grads_kept")
        x = 1024 * 4096 * 2  # one micro-batch's hidden states [1, 1024, 4096] in bf16
        assert block_input_bytes(arch.spec, cfg) == x
        assert (got.bytes if got else 0) == expected * x, (name, rank)
        if got:
            assert set(got.phases) == {Phase.BACKWARD, Phase.OPTIMIZER}
