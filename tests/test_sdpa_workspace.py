"""SDPA's memory-efficient (cutlass) backward workspace (memory/sdpa_workspace.py), against arithmetic written from
PyTorch's ``mem_eff_attention/kernel_backward.h`` (``workspace_elements_gk/gv/gq``: gk = splits·J·align(D, I),
gv likewise, gq = ceil(Mq/I)·ceil(D/J) GradQTempStorage of 4 int32 + I·J fp32; ``workspace_size`` =
B·H·align4(gk+gv+gq)·4) and ``attention_backward.cu`` (splits = ceil(keys/J), ≤ 200 // (B·H) when dK/dV are staged,
at least 1; delta (B, H, Mq) fp32)."""

from __future__ import annotations

from memplan.catalog.resolve import load_model
from memplan.config import JobConfig
from memplan.estimator import estimate
from memplan.memory import sdpa_workspace as sw
from memplan.memory.breakdown import Phase, Tier

FP32 = 4
ROW = "activations/sdpa_backward_workspace"


def test_many_blocks_leave_one_key_split_and_stage_dq_in_fp32() -> None:
    # B·H = 8·32 = 256 blocks: 200 // 256 = 0 splits, raised to 1. 64×64 tile, D = 128:
    gk = gv = 1 * 64 * 128                    # one split · J · align(128, 64)
    gq = (2048 // 64) * (128 // 64) * (4 + 64 * 64)  # 32 query blocks · 2 column tiles · (lock header + tile)
    assert sw.backward_workspace_bytes(8, 32, 2048, 2048, 128, 128) == 8 * 32 * (gk + gv + gq) * FP32


def test_few_blocks_split_keys_up_to_the_200_block_budget() -> None:
    # B·H = 32: ceil(512 / 64) = 8 splits wanted, 200 // 32 = 6 allowed
    assert sw.num_splits_key(1, 32, 512, staged_kv=True) == 6
    assert sw.num_splits_key(1, 32, 512, staged_kv=False) == 8
    gk = gv = 6 * 64 * 128
    gq = 8 * 2 * (4 + 64 * 64)
    assert sw.backward_workspace_bytes(1, 32, 512, 512, 128, 128) == 32 * (gk + gv + gq) * FP32


def test_a_tile_that_keeps_dk_dv_in_registers_stages_only_dq() -> None:
    # kOutputInRF = kMaxK <= kBlockSizeI: the 128x128 tile of kMaxK 128
    gq = (2048 // 128) * (128 // 128) * (4 + 128 * 128)
    assert sw.backward_workspace_bytes(2, 8, 2048, 2048, 128, 128, block_i=128, block_j=128) == 2 * 8 * gq * FP32


def test_logsumexp_pads_queries_to_32() -> None:
    assert sw.lse_padding_bytes(2, 4, 500) == 2 * 4 * 12 * FP32
    assert sw.lse_padding_bytes(2, 4, 512) == 0
    assert sw.delta_bytes(2, 4, 500) == 2 * 4 * 500 * FP32


def _gpu_rows(**kw) -> dict[str, tuple[int, frozenset[Phase] | None]]:
    cfg = JobConfig(job="qlora", quant="nf4", micro_batch=8, seq_len=2048, recompute="full", **kw)
    est = estimate("llama-2-7b", "h100-sxm-80gb", **cfg.model_dump(exclude_defaults=True))
    return {r.component: (r.bytes, r.phases) for r in est.rows if r.tier is Tier.GPU}


def test_the_row_exists_in_backward_only_where_sdpa_gets_an_explicit_mask() -> None:
    spec = load_model("llama-2-7b")  # 32 heads of 128
    n, h = spec.num_attention_heads, spec.hidden_size // spec.num_attention_heads
    masked = _gpu_rows(attention="sdpa", transformers_version="4.38")  # 4.38's 4-D mask: no flash kernel
    expected = 8 * n * ((1 * 64 * h) * 2 + 32 * 2 * (4 + 64 * 64)) * FP32 + 8 * n * 2048 * FP32
    assert masked[ROW] == (expected, frozenset({Phase.BACKWARD}))
    assert ROW not in _gpu_rows(attention="sdpa")  # current transformers passes is_causal: flash
    assert ROW not in _gpu_rows(attention="flash", transformers_version="4.38")
