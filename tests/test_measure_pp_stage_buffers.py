"""torch.distributed.pipelining's buffers (``memory.pp_stage_buffers``) observed in the installed torch: two CPU
processes (gloo), each a pipeline rank of one-Linear stages, run Schedule1F1B (v = 1) and ScheduleInterleaved1F1B
(v = 2) for two steps of m = 4 micro-batches of [2, 8, 16] fp32. After each forward the worker sums the bytes its
stages hold: outputs in ``fwd_cache`` (not the last stage's), buffers in ``args_recv_info`` and ``grad_recv_info``.
"""

from __future__ import annotations

import json
import textwrap

import pytest
from conftest import run_two_process_worker

pytest.importorskip("torch", reason="the pipelining observation needs torch (pip install memplan[measure])")

from memplan.memory.pp_stage_buffers import output_counts, recv_buffer_counts

pytestmark = pytest.mark.measure
B, S, D, M, P = 2, 8, 16, 4, 2
X = B * S * D * 4  # one fp32 stage-boundary tensor

WORKER = textwrap.dedent('''
    import json, os, sys, warnings
    import torch, torch.distributed as dist, torch.nn as nn
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B
    warnings.simplefilter("ignore")
    B, S, D, M, P = %d, %d, %d, %d, %d

    def held(stages):
        outs = sum(t.nbytes for st in stages if not st.is_last for o, _ in st.fwd_cache.values() for t in o)
        recv = sum(i.buffer.nbytes for st in stages for r in st.args_recv_info.values() for i in r
                   if i.buffer is not None)
        grad = sum(i.buffer.nbytes for st in stages for r in st.grad_recv_info.values() for i in r
                   if i.buffer is not None)
        return outs, recv, grad

    def run(rank, v):
        stages = [PipelineStage(nn.Sequential(nn.Linear(D, D), nn.Tanh()), rank + c * P, P * v, torch.device("cpu"))
                  for c in range(v)]
        peak = [0, 0, 0]
        for st in stages:
            def wrapped(*a, _orig=st.forward_one_chunk, **k):
                out = _orig(*a, **k)
                peak[:] = [max(x, y) for x, y in zip(peak, held(stages))]
                return out
            st.forward_one_chunk = wrapped
        loss = lambda y, t: ((y - t) ** 2).mean()
        sched = Schedule1F1B(stages[0], M, loss_fn=loss) if v == 1 else ScheduleInterleaved1F1B(stages, M, loss_fn=loss)
        x, t = torch.randn(B * M, S, D), torch.randn(B * M, S, D)
        for _ in range(2):
            sched.step(x) if rank == 0 else sched.step(target=t, losses=[])
        return {"outputs": peak[0], "recv": peak[1], "grad_recv": peak[2], "after_step": list(held(stages)[1:])}

    def main(rank):
        dist.init_process_group("gloo", rank=rank, world_size=P)
        out = {"rank": rank, "v1": run(rank, 1), "v2": run(rank, 2)}
        every = [None] * P
        dist.all_gather_object(every, out)  # one writer: two ranks printing at once can interleave their lines
        if rank == 0:
            for o in every:
                print(json.dumps(o), flush=True)
        dist.destroy_process_group()

    if __name__ == "__main__":
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
        import torch.multiprocessing as mp
        mp.spawn(main, nprocs=P)
''') % (B, S, D, M, P)


@pytest.fixture(scope="module")
def observed(tmp_path_factory) -> dict[int, dict]:
    stdout = run_two_process_worker(tmp_path_factory.mktemp("pipelining"), WORKER)
    lines = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    return {o["rank"]: o for o in lines}


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
