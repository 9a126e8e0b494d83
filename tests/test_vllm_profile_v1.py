"""vLLM 0.8.4/0.8.5's profile run (memplan.engines.vllm_profile_v1), against arithmetic written out from their source.

Expectations are counted here from the tensors the source allocates (vllm/v1/worker/gpu_model_runner.py,
vllm/v1/sample/sampler.py, vllm/v1/sample/ops/topk_topp_sampler.py, PyTorch's SortStable.cu), not from memplan.
"""

from __future__ import annotations

from memplan.engines import vllm, vllm_profile_v1
from memplan.estimator import estimate
from memplan.memory.context import Context

VOCAB = 128256  # Llama-3.1 vocabulary
HIDDEN = 4096


def _pool(release: str | None, **serve: object) -> vllm.Pool:
    est = estimate("llama-3.1-8b", "l40s", job="infer", engine="vllm", infer={"context": 4096},
                   serve={"max_model_len": 4096, "vllm_release": release, **serve})
    return vllm.pool(Context(est.arch, est.config, est.gpu, est.host))


def test_sampler_over_256_rows_sorts_with_cub_segmented_sort() -> None:
    n = 256 * VOCAB
    logits_bf16, logits_fp32 = 2 * n, 4 * n  # compute_logits (no upcast); Sampler.forward .to(float32)
    sort_values, sort_indices = 4 * n, 8 * n  # logits.sort(): fp32 values, int64 indices
    reverse_indices, cub_keys, cub_values = 8 * n, 4 * n, 8 * n  # segmented_sort_pairs + SortPairs temp storage
    want = logits_bf16 + logits_fp32 + sort_values + sort_indices + reverse_indices + cub_keys + cub_values
    assert want == 1_247_674_368
    assert vllm_profile_v1.sampler_bytes(rows=256, vocab=VOCAB, bits=16) == want


def test_sampler_below_128_rows_sorts_pairs_by_full_sort() -> None:
    n = 64 * VOCAB
    kept = 2 + 4 + 4 + 8  # bf16 logits, fp32 copy, sorted values, int64 indices
    workspace = 8 + 8 + 4 + 4 + 8  # two int2 (index, segment) arrays, keys out, cub's fp32 keys and int2 values
    assert vllm_profile_v1.sampler_bytes(rows=64, vocab=VOCAB, bits=16) == n * (kept + workspace)
    assert vllm_profile_v1.sampler_bytes(rows=1, vocab=VOCAB, bits=16) == VOCAB * (kept + 4 + 8)


def test_runner_buffers() -> None:
    # input_ids int32 + positions int64 of 8192 tokens, inputs_embeds [8192, 4096] bf16, block table [256, 2048] int32.
    want = 8192 * 4 + 8192 * 8 + 8192 * HIDDEN * 2 + 256 * (32768 // 16) * 4
    got = vllm_profile_v1.runner_buffer_bytes(max_num_tokens=8192, hidden=HIDDEN, bits=16, max_num_seqs=256,
                                              blocks_per_request=32768 // 16)
    assert got == want == 69_304_320


def test_forward_and_sampler_do_not_add_up_at_0_8_4() -> None:
    # _dummy_run returns hidden_states[logit_indices], a copy of 256 rows: the forward is freed before the sampler
    # runs. For Llama-3.1-8B the sampler (1.16 GiB) outweighs the forward of 2,048 or 4,096 tokens, so the peak
    # grows with max_num_batched_tokens only by the runner's buffers of the extra tokens.
    small = _pool("0.8.4", max_num_batched_tokens=2048)
    large = _pool("0.8.4", max_num_batched_tokens=4096)
    extra = 2048 * (4 + 8 + HIDDEN * 2)  # input_ids, positions, inputs_embeds rows
    assert large.activation_peak - small.activation_peak == extra
    # The current profiler (vLLM 0.34, engines.vllm_profile_now) also takes the max; its _dummy_run keeps the whole
    # [T, D] hidden states beside the sampler, so its peak grows by the 2,048 extra bf16 rows of hidden states.
    now_small = _pool(None, max_num_batched_tokens=2048)
    now_large = _pool(None, max_num_batched_tokens=4096)
    assert now_large.activation_peak - now_small.activation_peak == 2048 * HIDDEN * 2


def test_release_window() -> None:
    assert vllm_profile_v1.applies((0, 8, 4)) and vllm_profile_v1.applies((0, 8, 5))
    assert not vllm_profile_v1.applies((0, 8, 3)) and not vllm_profile_v1.applies((0, 9, 0))
    assert not vllm_profile_v1.applies(None)
