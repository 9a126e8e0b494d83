"""The last pipeline stage's returned outputs (``memory.pp_outputs``) measured in the installed torch: two CPU
processes (gloo), a tiny causal LM split in two (embedding + block | block + output layer, logits [2, 16, 1024] fp32
dominating), each schedule run twice, ``step(..., return_outputs=True)`` and ``False``; the second step of each is
metered on every rank (``measure.peak.PeakMeter``: the CPU profiler's allocation events), with one phase per
``forward_one_chunk`` and ``backward_one_chunk`` call, the merge (``_merge_outputs``), and the optimizer step (the
caller holds the returned value through it). The two runs allocate alike but for what return_outputs keeps, so
their difference per phase is what it costs. A hook on each output records whether it is still referenced when its
gradient is made (the running output held through its backward, in both runs), against a plain loop as control.
"""

from __future__ import annotations

import textwrap

import pytest
from conftest import gloo_ranks

pytest.importorskip("torch", reason="the pipelining measurement needs torch (pip install memplan[measure])")

from memplan.memory import pp_outputs

pytestmark = pytest.mark.measure
B, S, D, V, M, P = 2, 16, 16, 1024, 4, 2
FP32_BITS = 32
LOGITS = B * S * V * 4  # one micro-batch's fp32 logits, written out: 131,072 bytes
BOUNDARY = B * S * D * 4
TOLERANCE = M * BOUNDARY
"""A free that gloo's worker thread makes unseen by the profiler (``measure.gloo_comm``, ``PeakMeter.unrecorded_frees``)
keeps a sent stage-boundary tensor ([B, S, D]: activations from the first rank, input gradients from the last)
counted until its address is reused: at most the step's m of them, 8 KiB against 128 KiB logits. On an idle machine
the runs are exact (no unrecorded free)."""

WORKER = textwrap.dedent('''
    import gc, json, os, sys, warnings, weakref
    import torch, torch.distributed as dist, torch.nn as nn, torch.nn.functional as F
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
    from memplan.measure.peak import PeakMeter
    warnings.simplefilter("ignore")
    B, S, D, V, M, P = %d, %d, %d, %d, %d, %d

    class First(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.proj = nn.Embedding(V, D), nn.Linear(D, D)
        def forward(self, ids):
            return torch.tanh(self.proj(self.embed(ids)))

    class Last(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj, self.head = nn.Linear(D, D), nn.Linear(D, V)
        def forward(self, h):
            return self.head(torch.tanh(self.proj(h)))

    def loss_fn(logits, target):
        return F.cross_entropy(logits.flatten(0, 1), target.flatten())

    def run(rank, schedule, keep):
        torch.manual_seed(0)
        mod = First() if rank == 0 else Last()
        stage = PipelineStage(mod, rank, P, torch.device("cpu"))
        sched = schedule(stage, M, loss_fn=loss_fn)
        opt = torch.optim.AdamW(mod.parameters(), foreach=False)
        ids, tgt = torch.randint(0, V, (B * M, S)), torch.randint(0, V, (B * M, S))
        def step():
            if rank == 0:
                return sched.step(ids, return_outputs=keep)
            return sched.step(target=tgt, losses=[], return_outputs=keep)
        out = step()  # the first step allocates the receive buffers
        opt.step()
        opt.zero_grad(set_to_none=True)
        out = None
        stage.clear_runtime_states()  # what the next step() does first: both runs start from the same tensors
        meter, calls, alive = PeakMeter("cpu"), {"f": 0, "b": 0}, []
        def metered(kind, fn):
            def call(*a, **k):
                with meter.phase(kind + str(calls[kind])):
                    calls[kind] += 1
                    out = fn(*a, **k)
                    if kind == "f" and rank == P - 1:  # is the output alive when its gradient is made?
                        out.register_hook(lambda g, ref=weakref.ref(out): alive.append(ref() is not None))
                    return out
            return call
        stage.forward_one_chunk = metered("f", stage.forward_one_chunk)
        stage.backward_one_chunk = metered("b", stage.backward_one_chunk)
        merge = sched._merge_outputs
        def merged(chunks):
            with meter.phase("merge"):
                return merge(chunks)
        sched._merge_outputs = merged
        gc.collect()
        with meter:
            with meter.phase("step"):
                out = step()
            with meter.phase("opt"):
                opt.step()  # the caller still holds out
        return {"phases": meter.phases, "baseline": meter.baseline, "unrecorded": meter.unrecorded_frees,
                "chunks": len(stage.output_chunks), "returned": 0 if out is None else out.nbytes, "alive": alive}

    def unpipelined():
        """The control: the same last module and loss in a plain loop that drops the output before backward."""
        torch.manual_seed(0)
        mod, alive = Last(), []
        out = mod(torch.randn(B, S, D))
        out.register_hook(lambda g, ref=weakref.ref(out): alive.append(ref() is not None))
        loss = loss_fn(out, torch.randint(0, V, (B, S)))
        del out
        loss.backward()
        return alive

    def main(rank):
        dist.init_process_group("gloo", rank=rank, world_size=P)
        res = {"rank": rank, "control": unpipelined()}
        for name, schedule in (("1f1b", Schedule1F1B), ("gpipe", ScheduleGPipe)):
            res[name] = {"keep": run(rank, schedule, True), "drop": run(rank, schedule, False)}
        report(res)
''') % (B, S, D, V, M, P)

SCHEDULES = ("1f1b", "gpipe")


@pytest.fixture(scope="module")
def observed(tmp_path_factory) -> dict[int, dict]:
    return gloo_ranks(tmp_path_factory.mktemp("pp_outputs"), WORKER)


def _rows() -> dict[str, int]:
    """memplan's rows for this job with return_outputs, beyond those without it: ``kept_counts`` × ``output_bytes`` of
    the tiny model's logits (``IN_FLIGHT`` is in both runs)."""
    one = pp_outputs.output_bytes(tokens=B * S, vocab=V, bits=FP32_BITS)
    both = pp_outputs.kept_counts(M, return_outputs=False)
    return {name: count * one for name, count in pp_outputs.kept_counts(M).items() if name not in both}


def _diff(run: dict, phase: str) -> int:
    return run["keep"]["phases"][phase] - run["drop"]["phases"][phase]


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_the_running_output_is_alive_beside_its_gradient(observed: dict, schedule: str) -> None:
    """The ``IN_FLIGHT`` row: with return_outputs off too, each micro-batch's logits are still referenced when their
    gradient is made (fwd_cache, then backward_one_chunk's stage_output); a plain loop that drops the output before
    backward (the control, what ``activations/logits`` assumes) has freed them by then."""
    last = observed[P - 1]
    assert last["control"] == [False]
    assert last[schedule]["drop"]["alive"] == [True] * M
    assert pp_outputs.kept_counts(M, return_outputs=False) == {pp_outputs.IN_FLIGHT: 1}


def test_the_output_bytes_are_the_logits() -> None:
    assert pp_outputs.output_bytes(tokens=B * S, vocab=V, bits=FP32_BITS) == LOGITS


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_both_runs_start_alike(observed: dict, schedule: str) -> None:
    for rank in range(P):
        run = observed[rank][schedule]
        assert run["keep"]["baseline"] == run["drop"]["baseline"]


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_the_last_stage_returns_the_concatenation_and_keeps_the_chunks(observed: dict, schedule: str) -> None:
    keep, drop = observed[P - 1][schedule]["keep"], observed[P - 1][schedule]["drop"]
    assert (keep["chunks"], keep["returned"]) == (M, M * LOGITS)
    assert (drop["chunks"], drop["returned"]) == (0, 0)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_the_optimizer_step_holds_the_chunks_and_the_merged_copy(observed: dict, schedule: str) -> None:
    """2m outputs beside the optimizer step: ``output_chunks`` (cleared only by the next step()) and the torch.cat."""
    rows = _rows()
    expected = rows[pp_outputs.CHUNKS_AFTER] + rows[pp_outputs.MERGED]
    assert expected == 2 * M * LOGITS
    assert abs(_diff(observed[P - 1][schedule], "opt") - expected) <= TOLERANCE


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_the_backwards_hold_the_earlier_outputs(observed: dict, schedule: str) -> None:
    """Backward k runs with the k earlier outputs kept (the current one is fwd_cache's in both runs): the largest,
    m − 1, is the row of the forward and backward phases."""
    run = observed[P - 1][schedule]
    diffs = [_diff(run, f"b{k}") for k in range(M)]
    for k, got in enumerate(diffs):
        assert abs(got - k * LOGITS) <= TOLERANCE, (k, diffs)
    assert abs(max(diffs) - _rows()[pp_outputs.CHUNKS]) <= TOLERANCE


def test_the_forwards_hold_no_more_than_the_row(observed: dict) -> None:
    """1F1B's forward k runs after k backwards: the difference is k − 1 outputs, not k, because the schedule's loop
    variable ``output`` holds the previous micro-batch's output in both runs until the next forward returns
    (schedules.py ``Schedule1F1B._step_microbatches``); the row, m − 1 kept outputs, is that difference plus the one
    both runs hold. GPipe runs every forward before a backward: nothing kept yet."""
    one_f1b, gpipe = observed[P - 1]["1f1b"], observed[P - 1]["gpipe"]
    for k in range(1, M):
        assert abs(_diff(one_f1b, f"f{k}") - (k - 1) * LOGITS) <= TOLERANCE
    assert all(abs(_diff(gpipe, f"f{k}")) <= TOLERANCE for k in range(M))
    assert max(_diff(one_f1b, f"f{k}") for k in range(M)) + LOGITS <= _rows()[pp_outputs.CHUNKS] + TOLERANCE


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_the_merge_is_covered_by_the_optimizer_step(observed: dict, schedule: str) -> None:
    """The moment of torch.cat (2m outputs and the gradients) is no higher than the optimizer step's, where the row
    counts the 2m (``pp_outputs.kept_counts``' assumption)."""
    keep = observed[P - 1][schedule]["keep"]["phases"]
    assert keep["merge"] <= keep["opt"]


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_the_first_stage_holds_nothing_more(observed: dict, schedule: str) -> None:
    run = observed[0][schedule]
    assert run["keep"]["phases"].keys() == run["drop"]["phases"].keys()
    assert all(abs(_diff(run, phase)) <= TOLERANCE for phase in run["keep"]["phases"])
