"""Partial optimizer offload (``optimizer_gpu_layers``, DeepSpeed ZeRO-3 ``offload_optimizer.ratio``): the
optimizer-side states of the pre-block tensors and of layers 0..N-1 stay on the GPU, the rest go to the CPU."""

from __future__ import annotations

from functools import cache

import pytest

from memplan.arch.build import build_architecture
from memplan.catalog.resolve import load_model
from memplan.catalog.schema import HostSpec
from memplan.catalog.store import catalog_gpu
from memplan.config import JobConfig
from memplan.errors import MemplanError
from memplan.estimator import estimate, make_config
from memplan.memory import components
from memplan.memory import model_states as ms
from memplan.memory.breakdown import Tier, tier_total
from memplan.memory.context import Context

MODEL, GPU = "llama-3.1-8b", "h100-sxm-80gb"
LAYERS = 32
P = 8_030_261_248
"""Llama-3.1-8B: embed_tokens 128256·4096 = 525,336,576; 32 layers of 218,112,000; norm 4096; lm_head 525,336,576."""
BASE = {"job": "full", "zero": 3, "offload_optimizer": "cpu", "gpus_per_node": 8}
"""dp = 8 divides every state buffer of Llama-3.1-8B, so per-layer and per-set partitions round alike."""
LIVE = ("gradients/zero3_live_grads", "gradients/zero3_reduce_bucket", "optimizer/step_temporaries")
"""GPU rows that do not move with the optimizer split: ZeRO-3's live gradients, its reduce (IPG) bucket and the
step temporaries."""


@cache
def arch():
    return build_architecture(load_model(MODEL))


def ctx_for(**kw) -> Context:
    return Context(arch(), make_config(**{**BASE, **kw}), catalog_gpu(GPU), HostSpec())


def state_bytes(rows, tier: Tier) -> int:
    """Optimizer-side bytes on ``tier``: gradients (paper), fp32 gradient partition, master copy, states."""
    return sum(r.bytes for r in rows if r.tier is tier and r.component.startswith(("gradients", "optimizer"))
               and r.component not in LIVE)


def stage_rows(ctx: Context, stage: int):
    return components.job_rows(ctx.at_stage(stage), [])


def layers_sum(ctx: Context, indices) -> tuple[int, int]:
    pairs = [ms.layer_optimizer_bytes(ctx, i) for i in indices]
    return sum(g for g, _ in pairs), sum(c for _, c in pairs)


@pytest.mark.parametrize(("kw", "stage", "expected"), [
    ({"accounting": "deepspeed", "optimizer": "adamw"}, 0,
     [("weights/params", "gpu", 2007565312), ("optimizer/master_fp32", "cpu", 32121044992),
      ("gradients/fp32_partition", "cpu", 32121044992), ("optimizer/adam_m", "cpu", 32121044992),
      ("optimizer/adam_v", "cpu", 32121044992), ("weights/zero3_live_params", "gpu", 1050673152),
      ("gradients/zero3_live_grads", "gpu", 1050673152),
      ("gradients/zero3_reduce_bucket", "gpu", 2 * 500_000_000), ("weights/zero3_prefetch", "gpu", 2 * 50_000_000),
      ("weights/zero3_persistent", "gpu", 2 * 65 * 4096), ("runtime/model_load_fp32", "cpu", 0),
      ("runtime/cpu_buffer", "cpu", 64242089984)]),
    ({"accounting": "paper", "optimizer": "adamw-8bit", "pp": 2}, 0,
     [("weights/params", "gpu", 2007564288), ("gradients", "cpu", 16060514304),
      ("optimizer/master_fp32", "cpu", 32121028608), ("optimizer/adam8bit_states", "cpu", 16311459840)]),
    ({"accounting": "paper", "optimizer": "adamw-8bit", "pp": 2}, 1,
     [("weights/params", "gpu", 2007566336), ("gradients", "cpu", 16060530688),
      ("optimizer/master_fp32", "cpu", 32121061376), ("optimizer/adam8bit_states", "cpu", 16311476480)]),
])
def test_none_keeps_the_rows_byte_for_byte(kw, stage, expected):
    """Rows recorded from the code before partial offload existed. Hand check of the first: each fp32 buffer
    is 4·P = 32,121,044,992 bytes per node (ceil(4P/8) per rank × 8 ranks) and the buffer factor adds 50% of 4 of them.
    DeepSpeed's buffers beyond its estimator (added with the engine profiles): the bf16 reduce bucket of
    reduce_bucket_size = 5e8 elements, the prefetch of stage3_prefetch_bucket_size = 5e7 elements, and the
    65 norm weights of 4096 elements (under stage3_param_persistence_threshold = 1e5) kept gathered."""
    rows = components._train_rows(ctx_for(**kw).at_stage(stage))
    assert [(r.component, r.tier.value, r.bytes) for r in rows] == expected
    assert not any(r.note.startswith("partial offload") for r in rows)
    if stage == 0 and kw["accounting"] == "deepspeed":
        assert expected[1][2] == 4 * P and expected[-1][2] == 4 * P * 4 // 2


ACCOUNTINGS = [("deepspeed", "adamw"), ("deepspeed", "adamw-8bit"), ("paper", "adamw"), ("paper", "adamw-8bit")]


@pytest.mark.parametrize(("accounting", "optimizer"), ACCOUNTINGS)
def test_all_layers_kept_offloads_only_the_post_block_tensors(accounting, optimizer):
    ctx = ctx_for(accounting=accounting, optimizer=optimizer, optimizer_gpu_layers=LAYERS)
    rows = components._train_rows(ctx)
    pre_gpu, _ = ms.tensors_optimizer_bytes(ctx, list(arch().pre))
    _, post_cpu = ms.tensors_optimizer_bytes(ctx, list(arch().post))
    gpu = layers_sum(ctx, range(LAYERS))[0]
    assert state_bytes(rows, Tier.GPU) == pre_gpu + gpu
    assert state_bytes(rows, Tier.CPU) == post_cpu
    # Any N at or beyond the layer count means the same: only final norm and lm_head are offloaded.
    more = components._train_rows(ctx_for(accounting=accounting, optimizer=optimizer, optimizer_gpu_layers=100))
    assert more == rows


@pytest.mark.parametrize(("accounting", "optimizer"), ACCOUNTINGS)
def test_each_layer_moves_exactly_its_bytes_between_tiers(accounting, optimizer):
    """From N = L down to 0 the GPU loses layer N-1's states and the CPU gains them, nothing else changes."""
    prev = components._train_rows(ctx_for(accounting=accounting, optimizer=optimizer, optimizer_gpu_layers=LAYERS))
    for n in range(LAYERS - 1, -1, -1):
        ctx = ctx_for(accounting=accounting, optimizer=optimizer, optimizer_gpu_layers=n)
        rows = components._train_rows(ctx)
        gpu, cpu = ms.layer_optimizer_bytes(ctx, n)
        assert gpu > 0 and cpu == gpu * 8
        assert state_bytes(prev, Tier.GPU) - state_bytes(rows, Tier.GPU) == gpu
        assert state_bytes(rows, Tier.CPU) - state_bytes(prev, Tier.CPU) == cpu
        assert tier_total(rows, Tier.GPU) < tier_total(prev, Tier.GPU)
        assert tier_total(rows, Tier.CPU) >= tier_total(prev, Tier.CPU)
        prev = rows


@pytest.mark.parametrize(("accounting", "optimizer"), ACCOUNTINGS)
def test_zero_layers_differs_from_none_only_by_the_embeddings(accounting, optimizer):
    kw = {"accounting": accounting, "optimizer": optimizer}
    if optimizer == "adamw-8bit":  # DeepSpeed's offload runs DeepSpeedCPUAdam only (engine rule): estimate refuses
        with pytest.raises(MemplanError, match="DeepSpeedCPUAdam"):
            estimate(MODEL, GPU, **BASE, **kw)
        return
    full = estimate(MODEL, GPU, **BASE, **kw)
    zero = estimate(MODEL, GPU, **BASE, **kw, optimizer_gpu_layers=0)
    emb_gpu, emb_cpu = ms.tensors_optimizer_bytes(ctx_for(**kw), list(arch().pre))
    assert emb_gpu > 0 and emb_cpu == 8 * emb_gpu
    assert state_bytes(full.rows, Tier.GPU) == 0
    assert state_bytes(zero.rows, Tier.GPU) == emb_gpu
    assert state_bytes(full.rows, Tier.CPU) - state_bytes(zero.rows, Tier.CPU) == emb_cpu
    others = [(r.component, r.tier, r.bytes) for r in full.rows
              if not r.component.startswith(("gradients", "optimizer", "runtime"))]
    assert others == [(r.component, r.tier, r.bytes) for r in zero.rows
                      if not r.component.startswith(("gradients", "optimizer", "runtime"))]


def test_same_component_appears_once_per_tier():
    rows = components._train_rows(ctx_for(optimizer_gpu_layers=16))
    adam_m = [r for r in rows if r.component == "optimizer/adam_m"]
    assert [r.tier for r in adam_m] == [Tier.GPU, Tier.CPU]
    # 4 bytes/param: embeddings + 16 layers on the GPU (÷ dp 8); 16 layers + norm + lm_head on the CPU (× 8 ranks ÷ dp 8).
    assert adam_m[0].bytes == 4 * (525_336_576 + 16 * 218_112_000) // 8
    assert adam_m[1].bytes == 4 * (16 * 218_112_000 + 4096 + 525_336_576)
    assert adam_m[0].note.startswith("partial offload: pre-block tensors and layers 0-15")


@pytest.mark.parametrize(("accounting", "optimizer"), ACCOUNTINGS)
@pytest.mark.parametrize("n", [0, 8, 16, 20, LAYERS])
def test_pipeline_stages_split_by_global_layer_index(accounting, optimizer, n):
    """pp = 2: stage 0 holds the embeddings and layers 0-15, stage 1 layers 16-31, the final norm and lm_head."""
    ctx = ctx_for(accounting=accounting, optimizer=optimizer, pp=2, optimizer_gpu_layers=n)
    pre_gpu, _ = ms.tensors_optimizer_bytes(ctx, list(arch().pre))
    _, post_cpu = ms.tensors_optimizer_bytes(ctx, list(arch().post))
    first, second = stage_rows(ctx, 0), stage_rows(ctx, 1)
    assert state_bytes(first, Tier.GPU) == pre_gpu + layers_sum(ctx, range(min(n, 16)))[0]
    assert state_bytes(first, Tier.CPU) == layers_sum(ctx, range(min(n, 16), 16))[1]
    assert state_bytes(second, Tier.GPU) == layers_sum(ctx, range(16, max(n, 16)))[0]
    assert state_bytes(second, Tier.CPU) == post_cpu + layers_sum(ctx, range(max(n, 16), LAYERS))[1]
    if n <= 16:  # no tensor of stage 1 keeps its states on the GPU: no empty GPU rows either
        assert not [r for r in second if r.tier is Tier.GPU and r.component.startswith("optimizer")]


def test_rounding_per_set_stays_within_one_byte_per_buffer_and_layer():
    """dp = 7 does not divide the buffers: the 33 per-group figures (embeddings + 32 layers) each round up once
    per buffer, the set once, so their sum exceeds the set by fewer than 3 · 32 bytes (42 here)."""
    ctx = ctx_for(gpus_per_node=7, optimizer="adamw-8bit", optimizer_gpu_layers=LAYERS)
    rows = components._train_rows(ctx)
    pre_gpu, _ = ms.tensors_optimizer_bytes(ctx, list(arch().pre))
    hand = pre_gpu + layers_sum(ctx, range(LAYERS))[0]
    buffers = 3  # master copy, fp32 gradient partition, 8-bit states
    assert 0 < hand - state_bytes(rows, Tier.GPU) <= buffers * LAYERS


def test_offloaded_fraction_matches_deepspeed_ratio():
    """N = 16 of 32: offloaded = 16·218,112,000 + 4096 + 525,336,576 = 4,015,132,672 of P = 8,030,261,248
    params, ratio 0.50000026 (the final norm tips it past ½). In DeepSpeed's stage3.py with sub_group_size set
    to one layer's partition (27,264,000 elements at dp 8) the sub-groups are [embeddings], 32 layers,
    [norm + lm_head]: k = 34, and ``i >= int((1 - ratio)·k)`` offloads from int(0.49999974·34) = 16, i.e.
    layer 15 as well. The param fraction truncates one sub-group short; a mid-interval ratio such as
    (k - 17 - 0.5)/k = 0.4853 keeps exactly the embeddings and layers 0-15."""
    ratio = ms.offloaded_fraction(ctx_for(optimizer_gpu_layers=16))
    assert ratio == 4_015_132_672 / P
    assert int((1 - ratio) * 34) == 16 and int((1 - 16.5 / 34) * 34) == 17
    assert ms.offloaded_fraction(ctx_for()) == 1.0
    assert ms.offloaded_fraction(ctx_for(optimizer_gpu_layers=LAYERS)) == (4096 + 525_336_576) / P
    assert ms.offloaded_fraction(ctx_for(optimizer_gpu_layers=0)) == 1 - 525_336_576 / P
    assert ms.offloaded_fraction(ctx_for(offload_optimizer="none", zero=2)) == 0.0
    assert ms.offloaded_fraction(ctx_for(pp=2, optimizer_gpu_layers=16)) == ratio  # the whole model's


def test_layer_optimizer_bytes_by_hand():
    """One Llama-3.1-8B layer, dp 8, bf16 + AdamW: deepspeed = 16 bytes/param (master, fp32 grad, m, v),
    paper = 14 (bf16 gradient, master, m, v); per GPU ÷ 8, per node × 8 processes ÷ 8."""
    layer = 218_112_000
    assert ms.layer_optimizer_bytes(ctx_for(), 5) == (16 * layer // 8, 16 * layer)
    assert ms.layer_optimizer_bytes(ctx_for(accounting="paper"), 5) == (14 * layer // 8, 14 * layer)


@pytest.mark.parametrize("kw", [
    {"zero": 2, "offload_optimizer": "cpu"},
    {"zero": 3, "offload_optimizer": "none"},
    {"zero": 3, "offload_optimizer": "nvme"},
    {"zero": 3, "offload_optimizer": "cpu", "job": "infer"},
])
def test_validator_needs_zero3_and_cpu_offload(kw):
    with pytest.raises(ValueError, match="optimizer_gpu_layers"):
        JobConfig(**{**BASE, **kw, "optimizer_gpu_layers": 4})
    with pytest.raises(MemplanError, match="optimizer_gpu_layers"):
        make_config(**{**BASE, **kw, "optimizer_gpu_layers": 4})
