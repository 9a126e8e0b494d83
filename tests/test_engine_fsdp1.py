"""Engine fsdp1 (memory/engine_fsdp1.py) against arithmetic written here from the FSDP1 sources:
torch/distributed/fsdp/_flat_param.py (one FlatParameter per unit, a padded 1/Nd shard), _runtime_utils.py (the root
is not resharded after forward; no_sync keeps the unsharded gradient; reduce-scatter of one unit's flat gradient),
_limiter_utils.py (two all-gathers in flight), _wrap_utils.py (mixed requires_grad: the whole flat gradient).

Llama-2-7B (config.json): D = 4096, FFN = 11008, L = 32, V = 32000, untied embeddings, no biases."""

from __future__ import annotations

import pytest

import memplan
from memplan.errors import MemplanError
from memplan.memory.breakdown import Tier

D, FFN, L, V = 4096, 11008, 32, 32000
BLOCK = 4 * D * D + 3 * D * FFN + 2 * D  # q, k, v, o; gate, up, down; two RMSNorm weights
ROOT = 2 * V * D + D  # embed_tokens, lm_head, final norm
R = 8
ADAPTERS = 2 * R * (D + D)  # LoRA on q and v: A (r × D) + B (D × r) each
BF16 = 2


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def rows(est, tier: Tier = Tier.GPU) -> dict[str, int]:
    return {r.component: r.bytes for r in est.rows if r.tier is tier}


def lora(**kw):
    fields = dict(job="lora", engine="fsdp1", gpus_per_node=2, dtype="bf16", master_weights=False, seq_len=512,
                  recompute="full", lora={"rank": R, "alpha": 16, "dtype": "bf16", "targets": ("q", "v")},
                  cuda_context_bytes=0, allocator_reserve_pct=0)
    fields.update(kw)
    return memplan.estimate("llama-2-7b", "a100-sxm-80gb", **fields)


def test_flat_params_are_one_padded_shard_per_unit_and_mixed_requires_grad_keeps_whole_block_grads():
    got = rows(lora())
    block = BF16 * (BLOCK + ADAPTERS)
    assert got["weights/fsdp1_flat_params"] == L * ceil_div(block, 2) + ceil_div(BF16 * ROOT, 2)
    # use_orig_params=True: a block's adapters and frozen weights share one FlatParameter, whose whole gradient exists
    # (_wrap_utils.py: "total_param_numel ... instead of nonfrozen_param_numel"); the frozen root has none
    assert got["gradients/fsdp1_sharded"] == L * ceil_div(block, 2)
    assert got["gradients/fsdp1_reduce_scatter"] == block + ceil_div(block, 2)
    # the root stays gathered from forward to backward; two blocks in flight under limit_all_gathers
    assert got["weights/fsdp1_unsharded"] == BF16 * ROOT + 2 * block
    # torch AdamW: zeros_like of the bf16 shard, m and v
    assert got["optimizer/adam_m"] == got["optimizer/adam_v"] == ceil_div(BF16 * L * ADAPTERS, 2)


def test_adapters_in_their_own_units_have_the_only_gradients():
    got = rows(lora(engine_config={"use_orig_params": False}))
    assert got["gradients/fsdp1_sharded"] == L * ceil_div(BF16 * ADAPTERS, 2)
    assert got["weights/fsdp1_flat_params"] == L * (ceil_div(BF16 * BLOCK, 2) + ceil_div(BF16 * ADAPTERS, 2)) \
        + ceil_div(BF16 * ROOT, 2)


def test_no_sync_keeps_every_unsharded_block_gradient_over_accumulation():
    est = lora(grad_accum=4)
    got = rows(est)
    assert got["gradients/fsdp1_no_sync"] == L * BF16 * (BLOCK + ADAPTERS)
    assert "gradients/fsdp1_sharded" not in got
    no_sync = next(r for r in est.rows if r.component == "gradients/fsdp1_no_sync")
    assert len(no_sync.phases) >= 4  # alive through forward too (accumulating)
    synced = rows(lora(grad_accum=4, engine_config={"no_sync": False}))
    assert synced["gradients/fsdp1_sharded"] == L * ceil_div(BF16 * (BLOCK + ADAPTERS), 2)


def test_no_shard_replicates_and_gathers_nothing():
    got = rows(lora(engine_config={"sharding_strategy": "NO_SHARD"}))
    assert got["weights/fsdp1_flat_params"] == L * BF16 * (BLOCK + ADAPTERS) + BF16 * ROOT
    assert got["gradients/fsdp1_sharded"] == L * BF16 * (BLOCK + ADAPTERS)
    assert "weights/fsdp1_unsharded" not in got and "gradients/fsdp1_reduce_scatter" not in got


def test_shard_grad_op_keeps_every_unit_gathered_and_the_limiter_off_gathers_all():
    every = BF16 * (ROOT + L * (BLOCK + ADAPTERS))
    assert rows(lora(engine_config={"sharding_strategy": "SHARD_GRAD_OP"}))["weights/fsdp1_unsharded"] == every
    assert rows(lora(engine_config={"limit_all_gathers": False}))["weights/fsdp1_unsharded"] == every


def test_cpu_offload_moves_shards_grads_and_states_to_the_host_and_keeps_units_in_flight_on_the_gpu():
    est = lora(offload_params="cpu", offload_optimizer="cpu", engine_config={"use_orig_params": False})
    gpu, cpu = rows(est), rows(est, Tier.CPU)
    shards = L * (ceil_div(BF16 * BLOCK, 2) + ceil_div(BF16 * ADAPTERS, 2)) + ceil_div(BF16 * ROOT, 2)
    assert cpu["weights/fsdp1_flat_params"] == 2 * shards  # per node: both ranks' shards
    assert cpu["gradients/fsdp1_sharded"] == 2 * L * ceil_div(BF16 * ADAPTERS, 2)
    assert "optimizer/adam_m" in cpu and "optimizer/adam_m" not in gpu
    assert "weights/fsdp1_flat_params" not in gpu
    # in flight: root + 2 blocks (with their adapters) gathered, plus each one's shard copied to the GPU
    gathered = BF16 * ROOT + 2 * BF16 * (BLOCK + ADAPTERS)
    copies = ceil_div(BF16 * ROOT, 2) + 2 * ceil_div(BF16 * BLOCK, 2)  # flat_param_to(device) of each shard
    assert gpu["weights/fsdp1_unsharded"] == gathered + copies


def test_qlora_packed_weights_are_sharded_and_their_quant_states_stay_whole():
    got = rows(lora(job="qlora", quant="nf4-dq", engine_config={"use_orig_params": False}))
    linear = 4 * D * D + 3 * D * FFN
    packed_block = linear // 2  # two 4-bit codes per byte, in bf16 quant storage (same bytes)
    block = packed_block + BF16 * 2 * D
    assert got["weights/fsdp1_flat_params"] == L * (ceil_div(block, 2) + ceil_div(BF16 * ADAPTERS, 2)) \
        + ceil_div(BF16 * ROOT, 2)
    # double-quantized absmax: one 8-bit code per 64-element block, nested fp32 absmax per 256 blocks, per tensor
    # offset (4 B) and the two code books (16 + 256 fp32 entries)
    shapes = [(D, D)] * 4 + [(FFN, D)] * 3
    per_block = sum(ceil_div(o * i, 64) + 4 * ceil_div(ceil_div(o * i, 64), 256) + 4 + 64 + 1024 for o, i in shapes)
    assert got["weights/quant_state"] == L * per_block


def test_full_training_mixed_precision_shards_fp32_and_gathers_bf16():
    est = memplan.estimate("llama-2-7b", "a100-sxm-80gb", job="full", engine="fsdp1", gpus_per_node=8,
                           dtype="bf16", seq_len=512, cuda_context_bytes=0, allocator_reserve_pct=0)
    got = rows(est)
    fp32 = 4
    assert got["weights/fsdp1_flat_params"] == L * ceil_div(fp32 * BLOCK, 8) + ceil_div(fp32 * ROOT, 8)
    assert got["gradients/fsdp1_sharded"] == got["weights/fsdp1_flat_params"]
    total = L * BLOCK + ROOT
    assert got["optimizer/adam_m"] == ceil_div(fp32 * total, 8)
    # bf16 units in flight, plus each one's bf16 _mp_shard cast from the fp32 shard (_use_low_precision_shard)
    assert got["weights/fsdp1_unsharded"] == BF16 * ROOT + 2 * BF16 * BLOCK \
        + ceil_div(BF16 * ROOT, 8) + 2 * ceil_div(BF16 * BLOCK, 8)


def test_stream_pools_count_only_as_reserved_memory():
    assert "runtime/fsdp1_stream_pools" not in rows(lora())  # allocator_reserve_pct=0: allocated bytes only
    got = rows(lora(allocator_reserve_pct=10))
    # a block's buffer whose free event is pending, at least (the construction cache adds where it is larger)
    assert got["runtime/fsdp1_stream_pools"] >= BF16 * (BLOCK + ADAPTERS)


@pytest.mark.parametrize(("fields", "words"), [
    ({"zero": 3}, "ZeRO stages are DeepSpeed's"),
    ({"offload_params": "cpu", "offload_optimizer": "none"}, "CPUOffload"),
    ({"tp": 2}, "data parallelism only"),
    ({"lora": {"rank": 8, "alpha": 16, "dtype": "fp32", "targets": ("q",)}}, "one dtype"),
    ({"engine_config": {"no_sync": False}}, "accumulation"),
    ({"job": "full", "lora": None, "engine_config": {"use_orig_params": False}}, "frozen parameters"),
    ({"gpus_per_node": 1, "engine_config": {"sharding_strategy": "NO_SHARD"}}, "dp=1"),
    ({"master_weights": True}, "no fp32 master copy"),
    ({"lora": {"rank": 8, "alpha": 16, "dtype": "bf16", "targets": ("q",), "paged_optimizer": True}}, "torch.optim"),
    ({"job": "galore", "lora": None}, "galore job"),
    ({"engine": "fsdp2", "lora": {"rank": 8, "alpha": 16, "dtype": "bf16", "targets": ("q",), "paged_optimizer": True}},
     "torch.optim"),
])
def test_fsdp1_rules_name_what_does_not_run(fields: dict, words: str) -> None:
    base = dict(job="lora", engine="fsdp1", gpus_per_node=2, dtype="bf16",
                lora={"rank": 8, "alpha": 16, "dtype": "bf16", "targets": ("q",)})
    base.update(fields)
    if base.get("lora") is None:
        base.pop("lora")
    with pytest.raises(MemplanError, match=words):
        memplan.estimate("llama-2-7b", "a100-sxm-80gb", **base)


def test_fsdp2_runs_lora_with_per_parameter_shards_and_gradients_only_for_the_adapters():
    # torchtune recipes/lora_finetune_distributed.py: fully_shard per layer and root; FSDP2 shards each parameter
    # on dim 0 and a frozen parameter gets no gradient (_fsdp_param.py), unlike FSDP1's mixed FlatParameter
    est = lora(engine="fsdp2")
    got = rows(est)
    block = BF16 * (BLOCK + ADAPTERS)
    assert got["weights/fsdp2_params"] == L * ceil_div(block, 2) + ceil_div(BF16 * ROOT, 2)
    assert got["gradients/lora_adapters"] == L * ceil_div(BF16 * ADAPTERS, 2)
    assert got["weights/fsdp_all_gather"] == BF16 * ROOT + 2 * block  # root + block × (1 + fsdp_prefetch=1)
    assert got["optimizer/adam_v"] == ceil_div(BF16 * L * ADAPTERS, 2)
    assert rows(lora(engine="fsdp2", engine_config={"fsdp_prefetch": 2}))["weights/fsdp_all_gather"] \
        == BF16 * ROOT + 3 * block


def test_post_backward_stream_keeps_the_sharded_gradients_cached_for_forward():
    """_post_backward_hook reduce-scatters into a shard allocated on the post-backward stream; after zero_grad that
    block is cached in that stream's pool, which the forward's and the loss's tensors cannot use."""
    from memplan.memory.breakdown import Phase

    assert "runtime/fsdp1_grad_stream_pool" not in rows(lora())  # no reserve: allocated bytes only
    est = lora(allocator_reserve_pct=10, engine_config={"use_orig_params": False})
    # one unit per block's adapters: ceil(2·ADAPTERS/2) bytes each, rounded up to the allocator's 512 B
    shard = ceil_div(BF16 * ADAPTERS, 2)
    assert rows(est)["runtime/fsdp1_grad_stream_pool"] == L * ceil_div(shard, 512) * 512
    row = next(r for r in est.rows if r.component == "runtime/fsdp1_grad_stream_pool")
    assert row.phases == frozenset({Phase.FORWARD, Phase.BACKWARD_START})  # allocated gradients in the others
    offload = lora(allocator_reserve_pct=10, engine_config={"use_orig_params": False}, offload_params="cpu",
                   offload_optimizer="cpu")
    assert "runtime/fsdp1_grad_stream_pool" not in rows(offload)  # _offload_grad drops the GPU shard at once
