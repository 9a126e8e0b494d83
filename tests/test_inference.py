"""Inference activations/workspace and the max-context / max-batch search."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from memplan.arch.build import build_architecture
from memplan.catalog.schema import Family, GpuSpec, HostSpec, ModelSpec
from memplan.config import Engine, InferConfig, Job, JobConfig
from memplan.errors import MemplanError
from memplan.memory import inference as inf
from memplan.memory import kv_cache as kv
from memplan.memory.breakdown import Tier, components, tier_total
from memplan.memory.context import Context
from memplan.units import GiB, MiB

GPU = GpuSpec(name="test-80gb", vendor="nvidia", source="test", memory_mib=81559, marketed_memory_gb=80,
              bf16_dense_tflops=989.0, hbm_bandwidth_gbps=3350.0, interconnect_gbps=450.0, pcie_gen=5)
LLAMA_31_8B = ModelSpec(name="llama-3.1-8b", source="https://huggingface.co/meta-llama/Llama-3.1-8B",
                        family=Family.LLAMA, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)
MIXTRAL_8X7B = LLAMA_31_8B.model_copy(update={"name": "mixtral-8x7b", "family": Family.MIXTRAL, "vocab_size": 32000,
                                              "num_experts": 8, "num_experts_per_tok": 2})
GEMMA2_9B = ModelSpec(name="gemma-2-9b", source="https://huggingface.co/google/gemma-2-9b", family=Family.GEMMA2,
                      hidden_size=3584, intermediate_size=14336, num_hidden_layers=42, num_attention_heads=16,
                      num_key_value_heads=8, head_dim=256, vocab_size=256000, tie_word_embeddings=True,
                      sliding_window=4096)
DEEPSEEK_V3 = ModelSpec(name="deepseek-v3", source="https://huggingface.co/deepseek-ai/DeepSeek-V3",
                        family=Family.DEEPSEEK, hidden_size=7168, intermediate_size=18432, num_hidden_layers=61,
                        num_attention_heads=128, num_key_value_heads=128, vocab_size=129280, num_experts=256,
                        num_experts_per_tok=8, moe_intermediate_size=2048, n_shared_experts=1,
                        first_k_dense_replace=3, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                        qk_rope_head_dim=64, v_head_dim=128, num_nextn_predict_layers=1)


def ctx_for(spec: ModelSpec, *, batch: int = 1, context: int = 8192, tp: int = 1, pp: int = 1,
            flash: bool = True, engine: Engine | None = None, **infer: object) -> Context:
    cfg = JobConfig(job=Job.INFER, micro_batch=batch, tp=tp, pp=pp, gpus_per_node=tp * pp, flash_attention=flash,
                    engine=engine, infer=InferConfig(context=context, **infer))
    return Context(build_architecture(spec), cfg, GPU, HostSpec())


def act_rows(spec: ModelSpec, **kw: object) -> dict[str, int]:
    return components(inf.rows(ctx_for(spec, **kw)), Tier.GPU)


def test_llama_prefill_8k_flash() -> None:
    """transformers (the default inference engine): the layer's input and the kept inputs_embeds across the layer;
    the MLP stage adds the normed input, gate/up/product and the residual it adds to."""
    rows = act_rows(LLAMA_31_8B)
    # layer input + kept inputs_embeds (2 × 8192 × 4096 × 2 bytes) + rotary cos and sin (2 × 8192 × 128 × 2 bytes)
    assert rows["activations/hidden_states"] == 128 * MiB + 4 * MiB
    # MLP stage: 8192 × (4096 + 3 × 14336 + 4096) × 2 = 838,860,800 > attention's 8192 × 14336 × 2.
    assert rows["activations/prefill_workspace"] == 838_860_800
    assert rows["activations/logits"] == 128256 * (2 + 4)


def test_fused_engine_prefill_8k_flash() -> None:
    """A fused serving engine (vLLM) keeps the residual and hidden states only."""
    rows = act_rows(LLAMA_31_8B, engine=Engine.VLLM)
    assert rows["activations/hidden_states"] == 128 * MiB  # 2 × 8192 × 4096 × 2 bytes
    # MLP stage: 8192 × (4096 + 3 × 14336) × 2 = 771,751,936 > attention's 8192 × 14336 × 2.
    assert rows["activations/prefill_workspace"] == 771_751_936


def test_eager_attention_materializes_scores() -> None:
    rows = act_rows(LLAMA_31_8B, flash=False, engine=Engine.VLLM)
    qkv = 8192 * (4096 + 2 * 32 * 128 + 2 * 8 * 128) * 2
    repeat_kv = 2 * 32 * 8192 * 128 * 2
    scores = 32 * 8192 * 8192 * (2 * 2 + 4)
    assert scores == 16 * GiB
    assert rows["activations/prefill_workspace"] == qkv + repeat_kv + scores


def test_transformers_eager_attention_at_its_softmax() -> None:
    """transformers' eager attention at softmax(dtype=float32): normed input and q, repeat_kv's copies, the masked
    bf16 scores with their fp32 copy and fp32 output, and the (1, 1, T, S) bf16 causal mask."""
    rows = act_rows(LLAMA_31_8B, flash=False)
    normed_q = 8192 * (4096 + 32 * 128) * 2
    repeat_kv = 2 * 32 * 8192 * 128 * 2
    scores = 32 * 8192 * 8192 * (2 + 4 + 4)
    mask = 8192 * 8192 * 2
    assert rows["activations/prefill_workspace"] == normed_q + repeat_kv + scores + mask


def test_chunked_prefill_shrinks_workspace_and_counts_hf_concat() -> None:
    rows = act_rows(LLAMA_31_8B, prefill_chunk=512)
    mlp = 512 * (4096 + 3 * 14336 + 4096) * 2
    assert rows["activations/prefill_workspace"] == mlp == 52_428_800
    attention = inf.attention_workspace_bytes(batch=1, tokens=512, kv_tokens=8192, heads=32, kv_heads=8,
                                              head_dim=128, hidden=4096, bits=16, flash=True)
    concat = inf.kv_concat_bytes(batch=1, old_tokens=8192 - 512, elements=2 * 8 * 128, bits=16)
    assert concat == 7680 * 4096
    # the same attention with and without the contiguous cache's concat (a paged cache is a serving engine's)
    eager = act_rows(LLAMA_31_8B, prefill_chunk=512, flash=False, engine=Engine.VLLM)["activations/prefill_workspace"]
    eager_paged = act_rows(LLAMA_31_8B, prefill_chunk=512, flash=False, paged=True,
                           engine=Engine.VLLM)["activations/prefill_workspace"]
    assert eager - eager_paged == concat
    assert attention + concat < mlp


def test_all_logits_in_fp32_and_compute_dtype() -> None:
    rows = act_rows(LLAMA_31_8B, batch=2, context=1024, all_logits=True)
    assert rows["activations/logits"] == 2 * 1024 * 128256 * 6


def test_tensor_parallel_divides_heads_and_ffn() -> None:
    rows = act_rows(LLAMA_31_8B, tp=2)
    assert rows["activations/prefill_workspace"] == 8192 * (4096 + 3 * 7168 + 4096) * 2
    assert rows["activations/hidden_states"] == 128 * MiB + 2 * 8192 * 128 * 2  # + rotary cos/sin, whole per rank


def test_moe_workspace_follows_vllm_fused_moe() -> None:
    per_token = (2 * 4096 + 2 * (max(2 * 14336, 4096) + 14336)) * 2 + 8 * 4
    assert per_token == 188_448
    assert act_rows(MIXTRAL_8X7B, context=1024, engine=Engine.VLLM)["activations/prefill_workspace"] \
        == 1024 * per_token


def test_moe_workspace_follows_transformers_grouped_mm() -> None:
    """transformers' grouped_mm experts: the normed input, k permuted copies, then per copy gate_up (2F), act(gate)
    and the product (F each); router logits (bf16) and their fp32 softmax over E; top-k and sort indices (int64);
    the MLP stage's residual."""
    per_token = (4096 + 2 * (4096 + 4 * 14336)) * 2 + 8 * (2 + 4) + 4 * 2 * 8 + 4096 * 2
    assert act_rows(MIXTRAL_8X7B, context=1024)["activations/prefill_workspace"] == 1024 * per_token


def test_deepseek_v3_mla_expansion_dominates() -> None:
    rows = act_rows(DEEPSEEK_V3, context=1024, engine=Engine.VLLM)
    attention = 1024 * ((7168 + 128 * 192 + 128 * 128) + 128 * (2 * 128 + 64 + 128)) * 2
    assert attention == 216_006_656
    moe = 1024 * (2 * 7168 + 8 * (7168 + 2048)) * 2 + 1024 * 256 * 4
    assert moe < attention
    assert rows["activations/prefill_workspace"] == attention


def test_deepseek_v3_transformers_experts_dominate() -> None:
    """Under transformers the routed experts' down stage holds four M·k·D copies (grouped_mm_experts_forward), more
    than MLA's expansion; the shared expert's output and the residual ride along."""
    rows = act_rows(DEEPSEEK_V3, context=1024)
    routed = (7168 + 8 * max(7168 + 4 * 2048, 4 * 7168)) * 2 + 256 * (2 + 4) + 4 * 8 * 8
    per_token = routed + 7168 * 2 + 7168 * 2
    assert rows["activations/prefill_workspace"] == 1024 * per_token > 216_006_656


def test_logits_only_on_the_last_pipeline_stage() -> None:
    # Gemma-2 ties its embeddings: stage 0 (embedding) is the heaviest, and it does not compute logits.
    ctx = ctx_for(GEMMA2_9B, pp=2)
    assert ctx.stage == 0
    assert "activations/logits" not in components(inf.rows(ctx), Tier.GPU)
    assert "activations/logits" in act_rows(GEMMA2_9B)


def test_training_jobs_have_no_inference_rows() -> None:
    cfg = JobConfig(job=Job.FULL)
    assert inf.rows(Context(build_architecture(LLAMA_31_8B), cfg, GPU, HostSpec())) == []


# ---- search -------------------------------------------------------------------------------


def counting(threshold: int) -> tuple[list[int], Callable[[int], bool]]:
    calls: list[int] = []

    def fits(n: int) -> bool:
        calls.append(n)
        return n <= threshold

    return calls, fits


def test_search_finds_threshold_in_log_calls() -> None:
    calls, fits = counting(100_000)
    assert inf.max_context(fits, lo=1, hi=2**20) == 100_000
    assert len(calls) <= 2 * 21 + 1


def test_search_edges() -> None:
    assert inf.max_context(lambda n: False, lo=1, hi=1000) == 0
    assert inf.max_context(lambda n: True, lo=1, hi=1000) == 1000
    assert inf.max_batch(lambda n: n <= 7, lo=7, hi=9) == 7
    assert inf.max_batch(lambda n: n <= 6, lo=7, hi=9) == 0
    assert inf.max_batch(lambda n: n <= 8, lo=7, hi=9) == 8
    assert inf.max_batch(lambda n: True, lo=5, hi=5) == 5
    assert inf.max_context(lambda n: n <= 1, lo=1, hi=1) == 1


def test_search_rejects_bad_ranges() -> None:
    with pytest.raises(MemplanError):
        inf.max_context(lambda n: True, lo=0, hi=10)
    with pytest.raises(MemplanError):
        inf.max_batch(lambda n: True, lo=10, hi=9)


@given(threshold=st.integers(0, 5000), lo=st.integers(1, 3000), span=st.integers(0, 3000))
def test_search_matches_linear_scan(threshold: int, lo: int, span: int) -> None:
    hi = lo + span
    expected = min(threshold, hi) if threshold >= lo else 0
    assert inf.largest_fitting(lambda n: n <= threshold, lo=lo, hi=hi) == expected


def test_max_batch_over_kv_cache_predicate() -> None:
    """Llama-3.1-8B at 8192 tokens needs exactly 1 GiB of bf16 KV cache per sequence: 40 fit in 40 GiB."""

    def fits(batch: int) -> bool:
        rows = kv.rows(ctx_for(LLAMA_31_8B, batch=batch, context=8192))
        return tier_total(rows, Tier.GPU) <= 40 * GiB

    assert inf.max_batch(fits, hi=1024) == 40

    def fits_context(context: int) -> bool:
        return tier_total(kv.rows(ctx_for(LLAMA_31_8B, context=context)), Tier.GPU) <= 40 * GiB

    assert inf.max_context(fits_context, hi=2**20) == 40 * 8192
