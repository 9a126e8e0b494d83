"""torch.distributed.pipelining's buffers (``memory.pp_stage_buffers``) observed in the installed torch: two CPU
processes (gloo), each a pipeline rank of one-Linear stages, run Schedule1F1B (v = 1) and ScheduleInterleaved1F1B
(v = 2) for two steps of m = 4 micro-batches of [2, 8, 16] fp32. After each forward the worker sums the bytes its
stages hold: outputs in ``fwd_cache`` (not the last stage's), buffers in ``args_recv_info`` and ``grad_recv_info``.
"""

from __future__ import annotations

import textwrap

import pytest
from conftest import gloo_ranks

pytest.importorskip("torch", reason="the pipelining observation needs torch (pip install memplan[measure])")

from memplan.memory.pp_stage_buffers import output_counts, recv_buffer_counts

pytestmark = pytest.mark.measure
B, S, D, M, P = 2, 8, 16, 4, 2
X = B * S * D * 4  # one fp32 stage-boundary tensor

WORKER = textwrap.dedent('''
    import json, os, sys, warnings
    import torch, torch.distributed as dist, torch.nn as nn
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B
    warnings.simplefilter("ignore")
    B, S, D, M, P = %d, %d, %d, %d, %d

    def held(stages):
        outs = sum(t.nbytes for st in stages if not st.is_last for o, _ in st.fwd_cache.values() for t in o)
        recv = sum(i.buffer.nbytes for st in stages for r in st.args_recv_info.values() for i in r
                   if i.buffer is not None)
        grad = sum(i.buffer.nbytes for st in stages for r in st.grad_recv_info.values() for i in r
                   if i.buffer is not None)
        return outs, recv, grad

    class Saved:
        """A tensor autograd saved, counted while the graph holds it (saved_tensors_hooks); parameters not."""
        alive = top = 0

        def __init__(self, t, params):
            self.t, self.n = t, 0 if t.untyped_storage().data_ptr() in params else t.nbytes
            Saved.alive += self.n
            Saved.top = max(Saved.top, Saved.alive)

        def __del__(self):
            Saved.alive -= self.n

    def run(rank, v, gpipe=False):
        stages = [PipelineStage(nn.Sequential(nn.Linear(D, D), nn.Tanh()), rank + c * P, P * v, torch.device("cpu"))
                  for c in range(v)]
        params = {q.untyped_storage().data_ptr() for st in stages for q in st.submod.parameters()}
        peak = [0, 0, 0]
        for st in stages:
            def wrapped(*a, _orig=st.forward_one_chunk, **k):
                out = _orig(*a, **k)
                peak[:] = [max(x, y) for x, y in zip(peak, held(stages))]
                return out
            st.forward_one_chunk = wrapped
        loss = lambda y, t: ((y - t) ** 2).mean()
        if gpipe:
            sched = ScheduleGPipe(stages[0], M, loss_fn=loss)
        else:
            sched = Schedule1F1B(stages[0], M, loss_fn=loss) if v == 1 else ScheduleInterleaved1F1B(stages, M, loss_fn=loss)
        x, t = torch.randn(B * M, S, D), torch.randn(B * M, S, D)
        Saved.alive = Saved.top = 0
        base = 0
        with torch.autograd.graph.saved_tensors_hooks(lambda t: Saved(t, params), lambda h: h.t):
            for i in range(2):
                if i == 1:  # the second step, above what the first one left alive
                    base = Saved.top = Saved.alive
                sched.step(x) if rank == 0 else sched.step(target=t, losses=[])
        return {"outputs": peak[0], "recv": peak[1], "grad_recv": peak[2], "after_step": list(held(stages)[1:]),
                "saved": Saved.top - base, "saved_kept": base}

    def main(rank):
        dist.init_process_group("gloo", rank=rank, world_size=P)
        out = {"rank": rank, "v1": run(rank, 1), "v2": run(rank, 2), "gpipe": run(rank, 1, gpipe=True)}
        report(out)
''') % (B, S, D, M, P)


@pytest.fixture(scope="module")
def observed(tmp_path_factory) -> dict[int, dict]:
    return gloo_ranks(tmp_path_factory.mktemp("pipelining"), WORKER)


@pytest.mark.parametrize("v", [1, 2])
@pytest.mark.parametrize("rank", range(P))
def test_receive_buffers_are_one_per_micro_batch_and_kept(observed: dict, rank: int, v: int) -> None:
    got = observed[rank][f"v{v}"]
    recv, grad = recv_buffer_counts(P, rank, v, M)
    assert (got["recv"], got["grad_recv"]) == (recv * X, grad * X)
    assert got["after_step"] == [recv * X, grad * X]  # still held after the step


@pytest.mark.parametrize("v", [1, 2])
@pytest.mark.parametrize("rank", range(P))
def test_kept_outputs_are_covered(observed: dict, rank: int, v: int) -> None:
    """1F1B: exactly p − s outputs on the first rank (none counted on the last); interleaved: at most the count."""
    got = observed[rank][f"v{v}"]["outputs"]
    if v == 1:
        assert got == output_counts(P, rank, v, M) * X
    else:
        assert 0 < got <= output_counts(P, rank, v, M) * X


def test_gpipe_holds_every_micro_batch_on_cpu(observed: dict) -> None:
    """ScheduleGPipe measured (rank 0: a Linear and a Tanh, each micro-batch saving the Linear's input and the Tanh's
    output, 2·X): all m micro-batches' saved tensors and stage outputs alive at once, where Schedule1F1B holds p − s
    (``arch.pp_schedules``: m and min(m, p − s) micro-batches), counted in the second step above what stays alive
    between steps: on the first stage the saved tensors of torch 2.13's metadata inference forward (the first step's
    ``_initialize_stage``, a real forward with grad), one micro-batch's 2·X, stay alive for good, but only because
    this worker's ``Saved`` pack hook holds the Tanh's saved output (a cycle through its ``grad_fn`` that no backward
    breaks on a stage whose inputs need no grad): without the hook torch frees that graph before the step's first
    forward (tests/test_measure_pp_metadata.py), so memplan counts no row for it."""
    from memplan.arch.pp_schedules import max_held
    from memplan.memory.pp_stage_buffers import named_output_counts

    gpipe, one_f_one_b = observed[0]["gpipe"], observed[0]["v1"]
    assert gpipe["saved"] == max_held("GPipe", P, 0, 1, M) * 2 * X == M * 2 * X
    assert one_f_one_b["saved"] == max_held("1F1B", P, 0, 1, M) * 2 * X == P * 2 * X
    assert gpipe["outputs"] == named_output_counts("GPipe", P, 0, 1, M) * X == M * X
    assert gpipe["saved_kept"] == one_f_one_b["saved_kept"] == 2 * X  # the metadata graph, kept by Saved's cycle
