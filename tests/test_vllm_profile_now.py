"""The current vLLM profile peak (memplan.engines.vllm_profile_now), checked against arithmetic written here from
vLLM 0.34.0's source: ``profile_run`` keeps ``hidden_states`` [T, D] and its ``logits_indices`` rows [R, D]
through ``_dummy_sampler_run``, whose warmup pass holds the bf16 logits, their fp32 copy, FlashInfer's fp32
``top_k_mask_logits`` output and its fp32 softmax; the forward's other activations are gone by then. The sampler's
``PenaltiesState`` holds int32 [max_num_seqs, V] bin counts and a [max_num_seqs, cdiv(V, 32)] int32 bit mask.
"""

from __future__ import annotations

from memplan.engines import vllm, vllm_profile_now
from memplan.estimator import estimate
from memplan.memory import inference
from memplan.memory.context import Context

LLAMA31_8B = {"hidden": 4096, "vocab": 128256}
"""Llama-3.1-8B's config.json: hidden_size 4096, vocab_size 128256."""
BF16, FP32, INT32 = 2, 4, 4


def _penalties(seqs: int) -> int:
    v = LLAMA31_8B["vocab"]
    return seqs * v * INT32 + seqs * ((v + 31) // 32) * INT32


def _ctx(stage: int | None = None, **kw: object) -> Context:
    est = estimate("llama-3.1-8b", "h100-sxm-80gb", job="infer", engine="vllm", infer={"context": 8192}, **kw)
    return Context(est.arch, est.config, est.gpu, est.host, stage_override=stage)


def _forward(ctx: Context, tokens: int) -> int:
    return inference.forward_peak_bytes(ctx, batch=1, tokens=tokens, kv_tokens=tokens)


def test_sampler_bytes_are_bf16_logits_and_three_fp32_tensors() -> None:
    rows, v = 1024, LLAMA31_8B["vocab"]
    want = rows * v * BF16 + rows * v * FP32 * 3  # logits, processed copy, masked logits, probabilities
    assert vllm_profile_now.sampler_bytes(rows=rows, vocab=v, bits=16) == want
    assert want == 1024 * 128256 * 14


def test_h100_defaults_peak_is_the_max_not_the_sum() -> None:
    # H100 (>= 70 GiB, not an A100): vllm serve's 8192 batched tokens and 1024 sequences.
    ctx = _ctx()
    p = vllm.pool(ctx)
    assert (p.max_num_batched_tokens, p.max_num_seqs) == (8192, 1024)
    t, r, d, v = 8192, 1024, LLAMA31_8B["hidden"], LLAMA31_8B["vocab"]
    after_forward = (t + r) * d * BF16 + r * v * (BF16 + 3 * FP32)
    forward = _forward(ctx, t)
    assert p.activation_peak == max(forward, after_forward) + _penalties(r)
    assert p.activation_peak < forward + after_forward + _penalties(r)
    # At these defaults the sampler side is the peak: 1024 rows of 128,256 logits outweigh one 8k-token layer.
    assert p.activation_peak == after_forward + 1024 * (128256 + 4008) * 4


def test_forward_is_the_peak_when_few_rows_are_sampled() -> None:
    ctx = _ctx(serve={"max_num_seqs": 8})
    t, r, d, v = 8192, 8, LLAMA31_8B["hidden"], LLAMA31_8B["vocab"]
    after_forward = (t + r) * d * BF16 + r * v * (BF16 + 3 * FP32)
    forward = _forward(ctx, t)
    assert forward > after_forward
    assert vllm.pool(ctx).activation_peak == forward + _penalties(8)


def test_rows_are_capped_by_the_batched_tokens() -> None:
    # _dummy_run: num_reqs = min(num_tokens, max_num_reqs).
    ctx = _ctx(serve={"max_num_batched_tokens": 512, "max_num_seqs": 1024})
    t, d, v = 512, LLAMA31_8B["hidden"], LLAMA31_8B["vocab"]
    after_forward = (t + t) * d * BF16 + t * v * (BF16 + 3 * FP32)
    # The penalty state is sized by max_num_seqs, not by the sampled rows.
    assert vllm.pool(ctx).activation_peak == max(_forward(ctx, t), after_forward) + _penalties(1024)


def test_only_the_last_pipeline_stage_samples() -> None:
    first = _ctx(stage=0, pp=2, gpus_per_node=2)
    assert vllm.pool(first).activation_peak == _forward(first, 8192)
    last = _ctx(stage=1, pp=2, gpus_per_node=2)
    assert vllm.pool(last).activation_peak > _forward(last, 8192) + _penalties(1024)


def test_penalty_state_bytes() -> None:
    # 256 requests of a 32,000-token vocabulary: 256 × 32,000 int32 counts + 256 × 1,000 int32 mask words.
    assert vllm_profile_now.penalty_state_bytes(max_num_seqs=256, vocab=32000) == 256 * 32000 * 4 + 256 * 1000 * 4
    assert vllm_profile_now.penalty_state_bytes(max_num_seqs=1, vocab=33) == 33 * 4 + 2 * 4


def test_pinned_releases_before_the_current_one_keep_the_sum() -> None:
    # Releases memplan has not read between 0.8.6 and 0.33 keep forward + sampler at bf16 + 3 fp32 copies.
    ctx = _ctx(serve={"vllm_release": "0.9.1"})
    v = LLAMA31_8B["vocab"]
    assert vllm.pool(ctx).activation_peak == _forward(ctx, 8192) + 1024 * v * (BF16 + 3 * FP32)
    assert not vllm_profile_now.applies((0, 33, 0))
    assert vllm_profile_now.applies(None) and vllm_profile_now.applies((0, 34, 0))


def test_naming_the_current_release_changes_nothing() -> None:
    now, named = vllm.pool(_ctx()), vllm.pool(_ctx(serve={"vllm_release": "0.34.0"}))
    assert (named.activation_peak, named.kv_bytes) == (now.activation_peak, now.kv_bytes)


def test_sglang_step_keeps_the_sum() -> None:
    # SGLang borrows vllm.activation_peak_bytes for its reserved step; the vLLM 0.34 profile is not SGLang's.
    est = estimate("llama-3.1-8b", "h100-sxm-80gb", job="infer", engine="sglang", infer={"context": 8192})
    ctx = Context(est.arch, est.config, est.gpu, est.host)
    v = LLAMA31_8B["vocab"]
    assert vllm.activation_peak_bytes(ctx, tokens=4096, rows=160) == _forward(ctx, 4096) + 160 * v * (BF16 + 3 * FP32)
