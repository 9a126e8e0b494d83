"""torch.distributed.pipelining's metadata inference (torch 2.13) frees its autograd graph: no memplan row.

The first ``step()`` runs ``_initialize_pp_stages`` (torch/distributed/pipelining/schedules.py lines 451-478): per
stage ``_prepare_forward_infra`` → stage.py ``PipelineStage._forward_metadata_inference`` (line 1883), a real forward
of micro-batch 0 under ``torch.enable_grad()`` (line 1942) on ``_to_tensor`` copies of the inputs (line 1852:
``arg.detach().requires_grad_(arg.requires_grad)``), its outputs kept in ``self._fwd_outputs_for_bwd_meta`` (line
1957); then ``_prepare_backward_infra`` → ``_backward_metadata_inference`` (line 1976) takes them into locals and sets
the attributes to None (line 2005). On the first global stage the inputs (token ids, or any input that does not
require grad) make ``_autograd_grad_for_inputs`` (_backward.py lines 160-161, ``if not inputs_requiring_grad:
return``) return before ``torch.autograd.grad``, so the graph's saved tensors are never released by a backward: they
die with the last reference to the outputs, the function's locals, at its return (line 2105), before the step's
first forward. ``_post_metadata_inference_cleanup`` (line 2116) clears the attributes again. Nothing keeps them
(not ``_stage_meta``: ``extract_tensor_metas`` stores shapes and dtypes only).

Observed here (two CPU gloo ranks, Schedule1F1B, m = 4): a sentinel on the metadata output's ``grad_fn`` and a weak
reference to its storage are gone after each ``step()`` on both ranks. The graph outlives the step only on the first
rank under a ``saved_tensors_hooks`` whose pack returns an object holding the tensor itself (as
tests/test_measure_pp_stage_buffers.py's counter does) around an op that saves its own output (``Tanh``): packed
object → output → ``grad_fn`` → packed object is a cycle through C++ that ``gc`` cannot see, which only a backward
(never run there) would break; with ``GELU`` (saves its input) it is freed even under that hook. So the ``saved_kept``
that the stage-buffer test measures is its instrument's artefact, and memplan counts no metadata-inference row.
"""

from __future__ import annotations

import textwrap

import pytest
from conftest import gloo_ranks

pytest.importorskip("torch", reason="the pipelining observation needs torch (pip install memplan[measure])")

pytestmark = pytest.mark.measure
B, S, D, M, P = 2, 8, 16, 4, 2

WORKER = textwrap.dedent('''
    import contextlib, gc, json, os, sys, warnings, weakref
    import torch, torch.distributed as dist, torch.nn as nn
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B
    from torch.distributed.pipelining import stage as stage_mod
    from torch.multiprocessing.reductions import StorageWeakRef
    warnings.simplefilter("ignore")
    B, S, D, M, P = %d, %d, %d, %d, %d
    WATCH = []

    class Sentinel:
        pass

    def watch(orig):
        def wrapped(self, *a, **k):
            out = orig(self, *a, **k)
            o = self._fwd_outputs_for_bwd_meta[0]
            s = Sentinel()
            o.grad_fn.register_prehook(lambda g, _s=s: None)  # the node holds s while it lives
            WATCH.append((weakref.ref(s), StorageWeakRef(o.untyped_storage())))
            return out
        return wrapped

    stage_mod.PipelineStage._forward_metadata_inference = watch(stage_mod.PipelineStage._forward_metadata_inference)

    class Holder:  # a pack hook's object holding the saved tensor itself
        def __init__(self, t):
            self.t = t

    def run(rank, act, hooks):
        WATCH.clear()
        stage = PipelineStage(nn.Sequential(nn.Linear(D, D), act()), rank, P, torch.device("cpu"))
        sched = Schedule1F1B(stage, M, loss_fn=lambda y, t: ((y - t) ** 2).mean())
        x, t = torch.randn(B * M, S, D), torch.randn(B * M, S, D)
        cm = torch.autograd.graph.saved_tensors_hooks(Holder, lambda h: h.t) if hooks else contextlib.nullcontext()
        with cm:
            for _ in range(2):
                sched.step(x) if rank == 0 else sched.step(target=t, losses=[])
        gc.collect()
        return {"ran": len(WATCH), "node_alive": any(r() is not None for r, _ in WATCH),
                "storage_alive": any(not w.expired() for _, w in WATCH)}

    def main(rank):
        dist.init_process_group("gloo", rank=rank, world_size=P)
        out = {"rank": rank, "tanh": run(rank, nn.Tanh, False), "tanh_hooks": run(rank, nn.Tanh, True),
               "gelu_hooks": run(rank, nn.GELU, True)}
        report(out)
''') % (B, S, D, M, P)


@pytest.fixture(scope="module")
def observed(tmp_path_factory) -> dict[int, dict]:
    return gloo_ranks(tmp_path_factory.mktemp("pp_metadata"), WORKER)


@pytest.mark.parametrize("rank", range(P))
def test_metadata_inference_graph_is_freed(observed: dict, rank: int) -> None:
    """Without hooks, no stage keeps its metadata-inference graph or output past ``step()`` (first rank included)."""
    got = observed[rank]["tanh"]
    assert got["ran"] == 1  # the first step's metadata inference ran once, and only then
    assert not got["node_alive"] and not got["storage_alive"]


def test_kept_graph_is_the_hooks_cycle(observed: dict) -> None:
    """A pack hook holding an op's saved output keeps the first rank's graph (no backward breaks the cycle there);
    the last rank runs its metadata backward and frees it; an op saving its input makes no cycle."""
    assert observed[0]["tanh_hooks"]["node_alive"] and observed[0]["tanh_hooks"]["storage_alive"]
    assert not observed[1]["tanh_hooks"]["node_alive"]
    assert not any(observed[rank]["gelu_hooks"]["node_alive"] for rank in range(P))


def test_memplan_counts_no_metadata_row() -> None:
    """No registry entry for the metadata inference: it holds nothing at the step's peak."""
    from memplan.memory.registry import REGISTRY

    assert not [name for name in REGISTRY if "metadata" in name]
