"""flash-attention 2's backward workspace (memory/flash_workspace.py), against arithmetic written from ``mha_bwd`` in
``flash_api.cpp`` (PyTorch's ``aten/src/ATen/native/transformers/cuda/flash_attn`` copy and Dao-AILab's ``csrc``):
``softmax_d`` = empty({b, h, seqlen_q_rounded}, fp32), ``dq_accum`` = empty({b, seqlen_q_rounded, h,
head_size_rounded}, fp32), GQA ``dk_expanded``/``dv_expanded`` = empty({b, seqlen_k, num_heads, head_size}) in the
inputs' dtype; seqlen rounded to 128, head_size_rounded round(., 32) up to 128 then round(., 64) (PyTorch), or
round(., 32) up to 192 then 256 (Dao-AILab)."""

from __future__ import annotations

from memplan.arch.build import build_architecture
from memplan.catalog.resolve import load_model
from memplan.catalog.schema import HostSpec
from memplan.catalog.store import catalog_gpu
from memplan.config import JobConfig
from memplan.estimator import estimate
from memplan.measure import compare as cmp
from memplan.memory import flash_workspace as fw
from memplan.memory.breakdown import Phase, Tier
from memplan.memory.context import Context

FP32 = 4
BF16 = 2
MIB = 2**20
ROW = "activations/flash_backward_workspace"
SDPA_ROW = "activations/sdpa_backward_workspace"


def test_llama_3_1_8b_at_8k_tokens_accumulates_dq_in_128_mib() -> None:
    # b=1, s=8192 (a multiple of 128), N=32 heads of 128 (already a multiple of 32)
    assert fw.dq_accum_bytes(1, 32, 8192, 128) == 1 * 8192 * 32 * 128 * FP32 == 128 * MIB
    assert fw.softmax_d_bytes(1, 32, 8192) == 1 * 32 * 8192 * FP32 == 1 * MIB
    # GQA K=8: dK and dV over all 32 query heads in bf16, 2 · 8192 · 32 · 128 · 2
    assert fw.gqa_expanded_bytes(1, 32, 8, 8192, 128, 16) == 2 * 8192 * 32 * 128 * BF16 == 128 * MIB
    assert fw.backward_workspace_bytes(1, 32, 8, 8192, 8192, 128) == 257 * MIB


def test_sequence_rounds_to_128_and_head_dims_round_as_each_source_says() -> None:
    assert fw.softmax_d_bytes(2, 4, 129) == 2 * 4 * 256 * FP32
    assert fw.dq_accum_bytes(2, 4, 1000, 64) == 2 * 1024 * 4 * 64 * FP32
    assert fw.rounded_head_dim(80) == fw.rounded_head_dim(80, dao=True) == 96    # phi-2: round(80, 32)
    assert fw.rounded_head_dim(160) == 192                                       # PyTorch: round(160, 64)
    assert fw.rounded_head_dim(160, dao=True) == 160                             # Dao-AILab: round(160, 32)
    assert fw.rounded_head_dim(200, dao=True) == 256                             # Dao-AILab: > 192 -> 256
    assert fw.rounded_head_dim(200) == 256                                       # PyTorch: round(200, 64)
    assert fw.padded_head_dim(60) == 64 and fw.rounded_head_dim(60) == 64        # 60 -> 64 (8) -> 64 (32)


def test_mha_writes_dk_dv_in_place_and_deterministic_mode_multiplies_dq_accum() -> None:
    assert fw.gqa_expanded_bytes(1, 32, 32, 4096, 128, 16) == 0
    splits = fw.deterministic_splits(1, 8, 132)  # H100 SXM: 132 SMs over 8 (batch, head) blocks -> 17
    assert splits == 17
    assert fw.dq_accum_bytes(1, 8, 512, 128, splits=splits) == 17 * 512 * 8 * 128 * FP32


def _rows(gpu: str = "h100-sxm-80gb", model: str = "llama-3.1-8b", **kw) -> dict[str, tuple[int, frozenset]]:
    fields = dict(job="full", micro_batch=1, seq_len=8192) | kw
    est = estimate(model, gpu, **fields)
    return {r.component: (r.bytes, r.phases) for r in est.rows if r.tier is Tier.GPU}


def test_flash_and_sdpa_jobs_get_the_row_in_backward_only() -> None:
    expected = (1 * 8192 * 32 * 128 * FP32 + 1 * 32 * 8192 * FP32 + 2 * 8192 * 32 * 128 * BF16,
                frozenset({Phase.BACKWARD}))
    assert _rows(attention="flash")[ROW] == expected
    assert _rows(attention="sdpa")[ROW] == expected  # unmasked SDPA on an H100 runs PyTorch's flash kernel


def test_no_flash_row_for_eager_fp32_pre_ampere_or_masked_sdpa() -> None:
    assert ROW not in _rows(attention="eager")
    assert ROW not in _rows(attention="sdpa", dtype="fp32")          # flash takes fp16/bf16 only
    assert ROW not in _rows(gpu="t4", attention="sdpa", dtype="fp16")  # flash needs sm80
    legacy = _rows(model="llama-2-7b", attention="sdpa", transformers_version="4.38", seq_len=2048)
    assert ROW not in legacy and SDPA_ROW in legacy  # 4.38's explicit mask: the memory-efficient kernel instead


def test_transformers_4_37_repeat_kv_leaves_no_gqa_expansion() -> None:
    # repeat_kv hands the kernel N-head k and v: dK/dV are written in place
    got = _rows(attention="sdpa", transformers_version="4.40")[ROW][0]
    assert got == 1 * 8192 * 32 * 128 * FP32 + 1 * 32 * 8192 * FP32


def test_cpu_answer_does_not_move_with_the_flash_workspace(monkeypatch) -> None:
    # CPU runs a different SDPA kernel: the CPU answer must not see the row, however large it is
    cfg = JobConfig(job="full", micro_batch=1, seq_len=1024, attention="sdpa")
    ctx = Context(build_architecture(load_model("llama-3.1-8b")), cfg, catalog_gpu("h100-sxm-80gb"), HostSpec())
    before = cmp.answer_phases(ctx, "cpu")
    monkeypatch.setattr(fw, "backward_workspace_bytes", lambda *a, **k: 10**15)
    assert cmp.answer_phases(ctx, "cpu") == before
    assert _rows(attention="sdpa", seq_len=1024)[ROW][0] == 10**15  # while the CUDA estimate takes it


def test_a_model_with_masked_and_unmasked_layers_keeps_one_attention_workspace() -> None:
    # Gemma-3-1B under SDPA: sliding layers (window 512 < 8192) get a mask (memory-efficient kernel), global layers
    # run flash; one layer's backward runs at a time, so only the larger workspace is a row. Flash: 4 heads of
    # 256, 1 kv head: dq_accum 8192·4·256·4 + softmax_d 4·8192·4 + GQA dK/dV 2·8192·4·256·2 bytes.
    flash = 8192 * 4 * 256 * FP32 + 4 * 8192 * FP32 + 2 * 8192 * 4 * 256 * BF16
    rows = _rows(model="gemma-3-1b", job="lora", attention="sdpa")
    assert rows[ROW][0] == flash
    assert SDPA_ROW not in rows
