"""runtime/nccl_communicators: NCCL's device buffers per communicator a training engine creates (memory.nccl).

Expectations are written here from NCCL's own constants (github NVIDIA/nccl src/include/device.h, src/init.cc,
src/transport/nvls.cc) and from published NCCL logs and measurements, not from the code under test.
"""

from __future__ import annotations

import pytest

from memplan.api import estimate
from memplan.errors import MemplanError
from memplan.measure import compare as cmp
from memplan.measure import fsdp2
from memplan.memory import nccl

MIB = 2**20
# NCCL's constants, written out again: src/include/device.h and src/init.cc.
LL = 8 * 512 * 8 * 16  # NCCL_LL_LINES_PER_THREAD * NCCL_LL_MAX_NTHREADS * NCCL_STEPS * sizeof(ncclLLFifoLine)
LL128 = 120 * 640 * 8 * 8  # NCCL_LL128_ELEMS_PER_THREAD * NCCL_LL128_MAX_NTHREADS * NCCL_STEPS * sizeof(uint64_t)
SIMPLE = 1 << 22  # DEFAULT_BUFFSIZE
GRANULE = 2 * MIB
LOGGED_RECEIVE, LOGGED_SEND = 10_485_760, 2_097_152
"""The two allocation sizes NCCL_DEBUG_SUBSYS=ALLOC printed per (peer, channel) on 8 x H100 (NVIDIA/nccl #1685)."""
PAIR = LOGGED_RECEIVE + LOGGED_SEND
CHANNELS = 32  # "Channel 00/1 ... Channel 31/1" per pair in the same log
NODES_CHANNELS = 16  # multi-node logs: "Channel 00/08" on 2 x 8 GPUs (#1412), channels up to 15 on H100 (#1453)
NET_PEER_CHANNELS = 2  # src/graph/paths.cc ncclTopoGetNchannels: nNetChannels = 2
NVLS_H100 = 16 * 2 * 128 * 1024 * 8  # NVLS_NCHANNELS_SM90 * (UC reduce + MC broadcast) * chunk * NCCL_STEPS, per head


def nccl_row(**kw: object) -> int:
    est = estimate(kw.pop("model", "llama-3.1-8b"), kw.pop("gpu", "h100-sxm-80gb"), **kw)
    return sum(r.bytes for r in est.rows if r.component == "runtime/nccl_communicators")


def test_receive_buffers_round_to_what_nccl_logged() -> None:
    raw = LL + LL128 + SIMPLE
    assert raw == 9_633_792
    assert -(-raw // GRANULE) * GRANULE == LOGGED_RECEIVE
    assert nccl.receive_bytes(nccl.DEFAULT_BUFFSIZE) == LOGGED_RECEIVE
    assert nccl.connection_pair_bytes(nccl.NcclSettings()) == PAIR


def test_8xh100_fsdp2_one_communicator_with_ring_tree_and_nvls() -> None:
    expected = CHANNELS * 2 * PAIR + 8 * NVLS_H100  # ring and tree neighbours; 8 NVLS heads
    assert expected == 1024 * MIB
    assert nccl_row(job="full", engine="fsdp2", gpus_per_node=8) == expected
    assert nccl_row(job="full", engine="pytorch", gpus_per_node=8) == expected


def test_two_ranks_share_the_ring_and_tree_neighbour() -> None:
    assert nccl_row(job="full", engine="pytorch", gpus_per_node=2) == CHANNELS * PAIR + 2 * NVLS_H100


def test_no_nvls_without_nvswitch_or_when_disabled() -> None:
    ring_tree = CHANNELS * 2 * PAIR
    assert nccl_row(job="full", engine="fsdp2", gpus_per_node=8, gpu="a100-sxm-80gb") == ring_tree
    assert nccl_row(job="full", engine="fsdp2", gpus_per_node=8, engine_config={"nccl_nvls_enable": 0}) == ring_tree


def test_nccl_knobs_resize_the_buffers() -> None:
    small = -(-(LL + LL128 + MIB) // GRANULE) * GRANULE + LOGGED_SEND
    assert nccl_row(job="full", engine="fsdp2", gpus_per_node=8, engine_config={"nccl_buffsize": MIB}) == \
        CHANNELS * 2 * small + 8 * NVLS_H100
    assert nccl_row(job="full", engine="fsdp2", gpus_per_node=8, engine_config={"nccl_max_nchannels": 8}) == \
        8 * 2 * PAIR + 8 * (8 * 2 * 128 * 1024 * 8)  # NVLS channels clamp to maxCTAs (nvls.cc ncclNvlsTuning)
    before_2_21 = 16 * 2 * SIMPLE * 8  # NCCL < 2.21: buffSize = NCCL_BUFFSIZE, 16 channels, 8 heads
    assert before_2_21 == 1024 * MIB
    assert nccl_row(job="full", engine="fsdp2", gpus_per_node=8,
                    engine_config={"nccl_nvls_chunksize": SIMPLE // 8}) == CHANNELS * 2 * PAIR + before_2_21


def test_megatron_groups_on_a_first_stage() -> None:
    # 2 nodes x 8: tp 8 (one node), pp 2, dp 1. Groups on stage 0: tensor (8), model-parallel (16 across both nodes,
    # 8 NVLS heads per node), embedding (2 ranks, one per node: no NVLS), one pipeline neighbour on the other node,
    # and the default group (16 ranks: training.py all-reduces start_time_tensor on it; every Megatron group is a
    # new_group, so it is a communicator of its own).
    got = nccl_row(job="full", engine="megatron", gpus_per_node=8, nodes=2, tp=8, pp=2, micro_batch=1, seq_len=256,
                   model="llama-3.2-1b")
    tensor = CHANNELS * 2 * PAIR + 8 * NVLS_H100
    model_parallel = NODES_CHANNELS * 2 * PAIR + 8 * NVLS_H100
    embedding = NODES_CHANNELS * PAIR
    neighbour = NET_PEER_CHANNELS * PAIR
    world = NODES_CHANNELS * 2 * PAIR + 8 * NVLS_H100
    assert got == tensor + model_parallel + embedding + neighbour + world


def test_groups_across_nodes_get_no_nvls_heads() -> None:
    # tp 8 fills each node, so each data-parallel group has one rank per node: ring and tree only.
    got = nccl_row(job="full", engine="fsdp2", gpus_per_node=8, nodes=2, tp=8, model="llama-3.2-1b", seq_len=256)
    tensor = CHANNELS * 2 * PAIR + 8 * NVLS_H100
    data_parallel = NODES_CHANNELS * PAIR  # two ranks: the ring's and the tree's neighbour are the same GPU
    world = NODES_CHANNELS * 2 * PAIR + 8 * NVLS_H100  # the 2-D mesh's default group (trainer barriers), 16 ranks
    assert got == tensor + data_parallel + world


def test_expert_all_to_all_against_nccls_published_growth() -> None:
    """NVIDIA/nccl #1685: one all_to_all_single across 8 x H100 grew each GPU's non-PyTorch memory from 1.06 GB to
    4.34 GB. memplan's 7 peers x 32 channels x (10 + 2) MiB comes to 86% of that growth; the rest (kernels loaded for
    the all-to-all, NCCL's work buffers) is not modelled, so the row is not above the measurement."""
    model = nccl.p2p_bytes(7, False, nccl.NcclSettings())
    assert model == 7 * CHANNELS * PAIR
    growth = round((4.34 - 1.06) * 1e9)
    assert 0.80 * growth <= model <= growth


def test_vllm_tp2_growth_covers_one_two_rank_communicator() -> None:
    """vLLM's profiler logged 1.79 GiB more non-torch memory at tp=2 than tp=1 on H100 (PR #10511): NCCL (vLLM's
    pynccl and torch's device group) and the custom all-reduce buffers. One two-rank communicator must fit inside."""
    from memplan.engines import vllm

    one = nccl_row(job="full", engine="pytorch", gpus_per_node=2)
    assert one == CHANNELS * PAIR + 2 * NVLS_H100 == 448 * MIB
    assert one <= vllm.NON_TORCH_TP_BYTES


def test_no_row_on_one_gpu_or_serving() -> None:
    assert nccl_row(job="full", engine="fsdp2", gpus_per_node=1) == 0
    assert nccl_row(job="infer", engine="vllm", tp=2, gpus_per_node=2) == 0


def test_cpu_gloo_measurements_leave_the_row_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """The FSDP2 measurement runs two CPU processes over gloo: no NCCL, so its answer must not move with the row."""
    from memplan.memory import components, nccl_groups

    ctx = fsdp2.context(fsdp2.Case("llama"))
    rows, _ = components.stage_rows(ctx)
    assert any(r.component == "runtime/nccl_communicators" and r.bytes for r in rows)
    with_row = cmp.answer_phases(ctx, "cpu"), cmp.predicted_components(ctx, "cpu")[0]
    monkeypatch.setattr(nccl_groups, "rows", lambda ctx: [])
    assert (cmp.answer_phases(ctx, "cpu"), cmp.predicted_components(ctx, "cpu")[0]) == with_row


def test_knobs_that_move_no_byte_are_errors() -> None:
    with pytest.raises(MemplanError, match="one GPU"):
        estimate("llama-3.1-8b", "h100-sxm-80gb", job="full", engine_config={"nccl_buffsize": MIB})
    with pytest.raises(MemplanError, match="NVLink SHARP"):
        estimate("llama-3.1-8b", "a100-sxm-80gb", job="full", gpus_per_node=8, engine_config={"nccl_nvls_enable": 0})


def test_published_allocator_metrics_leave_nccl_out() -> None:
    """torch.cuda.max_memory_allocated/reserved never see NCCL's own allocations: the compared answer drops the row."""
    from memplan.estimator import estimate as estimate_rows
    from memplan.measure import published_gpu as pg
    from memplan.memory.breakdown import Tier

    est = estimate_rows("llama-3.2-1b", "h100-sxm-80gb", job="full", engine="fsdp2", gpus_per_node=2, seq_len=256,
                   cuda_context_bytes=0, allocator_reserve_pct=0)
    rows = [r for r in est.rows if r.tier is Tier.GPU and r.component != "runtime/nccl_communicators"]
    tensors = max(sum(r.bytes for r in rows if p in r.phases) for p in est.step_phases)
    assert est.peak(Tier.GPU) - pg.outside_torch(est, pg.ALLOCATED) == tensors
    assert pg.outside_torch(est, pg.WITH_CONTEXT) == 0


def test_nvls_chunk_with_nvls_off_is_an_error() -> None:
    with pytest.raises(MemplanError, match="NCCL_NVLS_ENABLE=0"):
        estimate("llama-3.1-8b", "h100-sxm-80gb", job="full", gpus_per_node=8,
                 engine_config={"nccl_nvls_enable": 0, "nccl_nvls_chunksize": 2**19})


def _pipeline_peers(stage: int, virtual_stages: int) -> tuple[int, int]:
    """(pipeline neighbours, bytes of the row) on ``stage`` of fsdp2 pp 4 on one node of 8 H100s (dp 2)."""
    from memplan.arch.build import build_architecture
    from memplan.catalog.schema import HostSpec
    from memplan.catalog.store import catalog_gpu, catalog_model
    from memplan.config import JobConfig
    from memplan.memory import nccl_groups
    from memplan.memory.context import Context

    cfg = JobConfig(job="pretrain", engine="fsdp2", gpus_per_node=8, pp=4, grad_accum=8,
                    perf={"virtual_stages": virtual_stages})
    ctx = Context(build_architecture(catalog_model("llama-3.2-1b")), cfg, catalog_gpu("h100-sxm-80gb"),
                  HostSpec()).at_stage(stage)
    peers = {name: n for name, n, _ in nccl_groups.communicators(ctx)[1]}["pipeline neighbours"]
    return peers, nccl_groups.nccl_bytes(ctx)[0]


def test_interleaved_pipeline_end_ranks_have_two_neighbours() -> None:
    """1F1B: the first and last ranks talk to one neighbour. Interleaved (v = 2): chunk 0 ends on rank 3 and chunk 1
    starts on rank 0 (stage 3 → stage 4), so rank 0 also receives from rank 3: two peers, 32 channels more of
    (10 + 2) MiB inside the node."""
    assert [_pipeline_peers(s, 1)[0] for s in range(4)] == [1, 2, 2, 1]
    assert [_pipeline_peers(s, 2)[0] for s in range(4)] == [2, 2, 2, 2]
    assert _pipeline_peers(0, 2)[1] - _pipeline_peers(0, 1)[1] == CHANNELS * PAIR


WORLD_8 = CHANNELS * 2 * PAIR + 8 * NVLS_H100
"""One communicator over the 8 GPUs of an H100 node: ring and tree neighbours on 32 channels, 8 NVLS heads."""


def test_deepspeed_data_parallel_group_is_a_clone_of_the_world() -> None:
    """deepspeed/utils/groups.py _clone_world_group: the data-parallel group is new_group(range(world_size)), and
    ZeRO-3 barriers on the default group while building its optimizer (stage3.py _setup_for_real_optimizer): two
    communicators over the same 8 GPUs, 2 GiB."""
    assert WORLD_8 == 1024 * MIB
    for zero in (0, 1, 2, 3):
        assert nccl_row(job="full", engine="deepspeed", zero=zero, gpus_per_node=8) == 2 * WORLD_8


def test_default_group_is_the_data_parallel_group_of_ddp_and_1d_fsdp() -> None:
    """DDP (process_group=None) and a 1-D mesh of world size (device_mesh.py returns the default group) create one."""
    for engine in ("pytorch", "fsdp1", "fsdp2"):
        assert nccl_row(job="full", engine=engine, gpus_per_node=8) == WORLD_8


def test_hsdp_adds_the_default_group_to_shard_and_replicate() -> None:
    # 8 GPUs, shard 4 (ranks 0-3: 4 NVLS heads), replicate 2 (ranks 0, 4: one neighbour, 2 heads), world 8.
    shard = CHANNELS * 2 * PAIR + 4 * NVLS_H100
    replicate = CHANNELS * PAIR + 2 * NVLS_H100
    assert nccl_row(job="full", engine="fsdp2", gpus_per_node=8, engine_config={"hsdp_shard_size": 4}) == \
        shard + replicate + WORLD_8


def test_megatron_counts_the_default_group_even_at_dp_equal_world() -> None:
    """parallel_state.py's data-parallel group is a new_group even when it spans the world."""
    assert nccl_row(job="full", engine="megatron", gpus_per_node=8, seq_len=256, model="llama-3.2-1b") == 2 * WORLD_8
