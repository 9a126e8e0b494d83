"""FSDP2's dim-0 padding rule (``memory.fsdp2_shard``), checked with arithmetic written here: ``torch.chunk`` gives
each of N ranks c = ceil(d0 / N) rows until they run out; every rank's parameter storage is padded to c rows."""

from __future__ import annotations

from memplan.arch.tensors import Role, Tensor
from memplan.memory import fsdp2_shard


def test_chunk_rows_follow_torch_chunk() -> None:
    # torch.chunk(arange(5), 2) -> sizes [3, 2]; (1, D) over 2 -> [1, 0]; 5 over 4 -> c = 2: [2, 2, 1, 0]
    assert [fsdp2_shard.chunk_rows(5, 2, r) for r in range(2)] == [3, 2]
    assert [fsdp2_shard.chunk_rows(1, 2, r) for r in range(2)] == [1, 0]
    assert [fsdp2_shard.chunk_rows(5, 4, r) for r in range(4)] == [2, 2, 1, 0]
    assert [fsdp2_shard.chunk_rows(8, 4, r) for r in range(4)] == [2, 2, 2, 2]


def test_a_one_row_gate_pads_every_rank_to_the_whole_row() -> None:
    gate = Tensor("mlp.shared_expert_gate.weight", (1, 64), Role.ROUTER)
    assert fsdp2_shard.padded_shard_numel([gate], 2) == 64  # c = 1 row of 64 on both ranks, not 64 / 2
    assert [fsdp2_shard.rank_shard_numel([gate], 2, r) for r in range(2)] == [64, 0]


def test_routed_experts_chunk_on_the_expert_dim() -> None:
    # transformers >= 5: one (E, F, D) parameter; E = 3 experts of 16 x 8 over 2 ranks -> c = 2 experts
    experts = Tensor("mlp.experts.*.down_proj.weight", (8, 16), Role.LINEAR, copies=3, routed=True)
    assert fsdp2_shard.padded_shard_numel([experts], 2) == 2 * 16 * 8
    assert [fsdp2_shard.rank_shard_numel([experts], 2, r) for r in range(2)] == [2 * 128, 1 * 128]


def test_even_dims_shard_in_exact_halves_and_norms_on_their_length() -> None:
    q = Tensor("self_attn.q_proj.weight", (64, 32), Role.LINEAR)
    norm = Tensor("input_layernorm.weight", (7,), Role.NORM)
    assert fsdp2_shard.padded_shard_numel([q], 2) == 64 * 32 // 2
    assert fsdp2_shard.padded_shard_numel([norm], 2) == 4  # ceil(7 / 2)
    assert sum(fsdp2_shard.rank_shard_numel([q, norm], 2, r) for r in range(2)) == 64 * 32 + 7
