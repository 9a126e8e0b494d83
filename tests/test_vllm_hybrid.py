"""vLLM's hybrid KV-cache manager: sliding-window layers keep only their window's blocks (vllm_hybrid).

Expected values are vLLM's formulas written out here (vllm/v1/core/kv_cache_utils.py
``_get_kv_cache_groups_uniform_page_size``, ``get_num_blocks``, ``_report_kv_cache_config``;
vllm/v1/kv_cache_interface.py ``SlidingWindowSpec.max_memory_usage_bytes``) on Gemma-3-1B's shapes:
26 layers, 22 with a 512-token window and 4 full; one KV head of 256 per layer, bf16.
"""

from __future__ import annotations

from memplan.engines import vllm
from memplan.estimator import estimate
from memplan.memory.context import Context
from memplan.search import largest_fitting

LAYER_TOKEN_BYTES = 2 * 1 * 256 * 2  # K and V, one KV head of 256, bf16
BIG_SEQS = {"max_num_seqs": 1024}
"""Above the sequences that fit (235 at 20k tokens), so memory, not max_num_seqs, bounds the capacity; not far above,
as the current sampler holds int32 penalty counts of max_num_seqs × V (vllm_profile_now.penalty_state_bytes)."""


def _pool(**serve: object) -> tuple[object, vllm.Pool]:
    est = estimate("gemma-3-1b", "l40s", job="infer", engine="vllm", infer={"context": 32768},
                   serve={"max_model_len": 32768, **serve})
    return est, vllm.pool(Context(est.arch, est.config, est.gpu, est.host))


def test_gemma3_groups_blocks_and_tokens() -> None:
    _, p = _pool()
    # 4 full and 22 sliding layers: group size min(4, 22) = 4 (22 >= 1.5 × 4); 1 full group, cdiv(22, 4) = 6 sliding.
    assert (p.groups.size, p.groups.full, p.groups.sliding) == (4, 1, 6)
    assert p.blocks == p.kv_bytes // (16 * LAYER_TOKEN_BYTES * 4)
    assert p.tokens == p.blocks // 7 * 16
    # L40S: vllm serve's 2048 batched tokens; a sliding group keeps cdiv(min(512 - 1 + 2048, S), 16) + 1 blocks.
    per_seq = -(-32768 // 16) + 6 * (-(-(512 - 1 + 2048) // 16) + 1)
    assert p.blocks_per_sequence(32768) == per_seq
    assert p.concurrency(32768) == min(p.blocks // per_seq, p.max_num_seqs)


def test_releases_before_the_hybrid_manager_page_sliding_layers_fully() -> None:
    _, now = _pool()
    _, old = _pool(vllm_release="0.9.0")
    assert old.token_bytes == 26 * LAYER_TOKEN_BYTES and old.blocks_per_sequence(32768) == 32768 // 16
    assert now.concurrency(32768) > 4 * old.concurrency(32768)


def test_short_sequences_take_window_blocks_plus_one() -> None:
    _, p = _pool()
    # below the window every group holds the whole sequence; the sliding groups one block more
    assert p.blocks_per_sequence(100) == 7 + 6 * (7 + 1)  # cdiv(100, 16) = 7 in the full group and each sliding one


def test_exact_capacity_with_sliding_groups() -> None:
    est = estimate("gemma-3-1b", "l40s", job="infer", engine="vllm", infer={"context": 20000}, serve=BIG_SEQS)
    c = largest_fitting(est, "micro_batch")
    assert c > 0
    assert estimate("gemma-3-1b", "l40s", est.config, micro_batch=c).fits
    assert not estimate("gemma-3-1b", "l40s", est.config, micro_batch=c + 1).fits
    est2 = estimate("gemma-3-1b", "l40s", est.config, micro_batch=300, infer={"context": 16})
    s = largest_fitting(est2, "context")
    assert 16 < s < 32768
    assert estimate("gemma-3-1b", "l40s", est2.config, infer={"context": s}).fits
    assert not estimate("gemma-3-1b", "l40s", est2.config, infer={"context": s + 1}).fits
