"""The FSDP1 facts engine fsdp1 rests on (memory/engine_fsdp1.py), observed in the installed torch: two CPU
processes with the gloo backend wrap a tiny model whose blocks hold a frozen weight and two trainable adapter
matrices (LoRA-like), FULL_SHARD, one unit per block plus a frozen root.

- use_orig_params=True with mixed requires_grad: a block's sharded gradient covers its whole FlatParameter shard,
  not only the trainable elements (``gradients/fsdp1_sharded``);
- under ``no_sync()`` the gradient stays unsharded: the whole unit (``gradients/fsdp1_no_sync``);
- a FlatParameter whose parameters are all frozen gets no gradient (the root);
- the root stays unsharded after forward, the blocks are resharded (``weights/fsdp1_unsharded``);
- use_orig_params=False refuses mixed requires_grad in one unit (why fsdp_qlora wraps each LoRA Linear apart).
"""

from __future__ import annotations

import json
import textwrap

import pytest
from conftest import run_two_process_worker

pytest.importorskip("torch", reason="the FSDP1 observation needs torch (pip install memplan[measure])")

from memplan.memory.engine_fsdp1 import shard_bytes

pytestmark = pytest.mark.measure
D, RANK = 64, 4
BLOCK = D * D + RANK * D + D * RANK  # frozen w, adapters a (r × D) and b (D × r)
ROOT = D * D

WORKER = textwrap.dedent('''
    import json, os, sys, torch, torch.distributed as dist, torch.nn as nn, warnings
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP, ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    warnings.simplefilter("ignore")
    D, R = %d, %d

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Linear(D, D, bias=False)
            self.a = nn.Linear(D, R, bias=False)
            self.b = nn.Linear(R, D, bias=False)
            self.w.weight.requires_grad_(False)
        def forward(self, x):
            return self.w(x) + self.b(self.a(x))

    def model(orig):
        m = nn.Sequential(nn.Linear(D, D, bias=False), Block(), Block())
        m[0].weight.requires_grad_(False)
        return FSDP(m, auto_wrap_policy=ModuleWrapPolicy({Block}), use_orig_params=orig,
                    device_id=torch.device("cpu"), sharding_strategy=ShardingStrategy.FULL_SHARD)

    def units(f):
        return [(type(m._fsdp_wrapped_module).__name__, m._handle.flat_param) for m in f.modules()
                if isinstance(m, FSDP) and m._handle is not None]

    def main(rank):
        dist.init_process_group("gloo", rank=rank, world_size=2)
        out = {}
        for nosync in (False, True):
            f = model(True)
            y = f(torch.randn(2, D)).sum()
            out["after_forward"] = [(n, p._full_param_padded.untyped_storage().size() // p.element_size())
                                    for n, p in units(f)]
            if nosync:
                with f.no_sync():
                    y.backward()
            else:
                y.backward()
            out["nosync" if nosync else "sync"] = [(n, None if p.grad is None else p.grad.numel()) for n, p in units(f)]
        try:
            model(False)
            out["refused"] = False
        except ValueError as exc:
            out["refused"] = "requires_grad" in str(exc)
        if rank == 0:
            print(json.dumps(out))
        dist.destroy_process_group()

    if __name__ == "__main__":
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
        import torch.multiprocessing as mp
        mp.spawn(main, nprocs=2)
''') % (D, RANK)


@pytest.fixture(scope="module")
def observed(tmp_path_factory) -> dict:
    stdout = run_two_process_worker(tmp_path_factory.mktemp("fsdp1"), WORKER)
    return json.loads(stdout.strip().splitlines()[-1])


def test_mixed_requires_grad_keeps_the_whole_flat_gradient_shard(observed: dict) -> None:
    blocks = [g for name, g in observed["sync"] if name == "Block"]
    assert blocks == [shard_bytes(BLOCK, 2)] * 2  # elements: the whole unit's shard, adapters and frozen weight
    assert [g for name, g in observed["sync"] if name == "Sequential"] == [None]  # the frozen root: no gradient


def test_no_sync_keeps_the_unsharded_gradient_of_every_unit(observed: dict) -> None:
    assert [g for name, g in observed["nosync"] if name == "Block"] == [BLOCK, BLOCK]


def test_the_root_stays_gathered_after_forward_and_blocks_are_resharded(observed: dict) -> None:
    # the padded unsharded buffer (_full_param_padded) keeps its storage for the root, and is freed (resized to 0)
    # for the blocks: _runtime_utils.py _post_forward_reshard frees it only for non-root units
    sizes = dict(observed["after_forward"][:1])
    assert sizes["Sequential"] == ROOT  # (padded to a multiple of 2: already even)
    assert [n for name, n in observed["after_forward"] if name == "Block"] == [0, 0]


def test_use_orig_params_false_refuses_mixed_requires_grad_in_one_unit(observed: dict) -> None:
    assert observed["refused"] is True
