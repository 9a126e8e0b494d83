"""KV cache bytes against published figures and hand-derived exact values."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from memplan.arch.build import build_architecture
from memplan.catalog.schema import Family, GpuSpec, HostSpec, ModelSpec
from memplan.config import InferConfig, Job, JobConfig
from memplan.dtypes import Dtype
from memplan.errors import MemplanError
from memplan.memory import kv_cache as kv
from memplan.memory.breakdown import Tier, components
from memplan.memory.context import Context
from memplan.units import GiB, MiB

GPU = GpuSpec(name="test-80gb", vendor="nvidia", source="test", memory_mib=81559, marketed_memory_gb=80,
              bf16_dense_tflops=989.0, hbm_bandwidth_gbps=3350.0, interconnect_gbps=450.0, pcie_gen=5)

OPT_13B = ModelSpec(name="opt-13b", source="https://huggingface.co/facebook/opt-13b", family=Family.OPT,
                    hidden_size=5120, intermediate_size=20480, num_hidden_layers=40, num_attention_heads=40,
                    vocab_size=50272, max_position_embeddings=2048, mlp_gated=False, norm="layernorm")
LLAMA_31_8B = ModelSpec(name="llama-3.1-8b", source="https://huggingface.co/meta-llama/Llama-3.1-8B",
                        family=Family.LLAMA, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)
LLAMA_3_70B = LLAMA_31_8B.model_copy(update={"name": "llama-3-70b", "hidden_size": 8192, "intermediate_size": 28672,
                                             "num_hidden_layers": 80, "num_attention_heads": 64})
FALCON_7B = ModelSpec(name="falcon-7b", source="https://huggingface.co/tiiuae/falcon-7b", family=Family.FALCON,
                      hidden_size=4544, intermediate_size=18176, num_hidden_layers=32, num_attention_heads=71,
                      num_key_value_heads=1, vocab_size=65024, mlp_gated=False, norm="layernorm")
GEMMA2_9B = ModelSpec(name="gemma-2-9b", source="https://huggingface.co/google/gemma-2-9b", family=Family.GEMMA2,
                      hidden_size=3584, intermediate_size=14336, num_hidden_layers=42, num_attention_heads=16,
                      num_key_value_heads=8, head_dim=256, vocab_size=256000, tie_word_embeddings=True,
                      sliding_window=4096)
MISTRAL_7B_V01 = LLAMA_31_8B.model_copy(update={"name": "mistral-7b-v0.1", "vocab_size": 32000,
                                                "intermediate_size": 14336, "sliding_window": 4096})
DEEPSEEK_V3 = ModelSpec(name="deepseek-v3", source="https://huggingface.co/deepseek-ai/DeepSeek-V3",
                        family=Family.DEEPSEEK, hidden_size=7168, intermediate_size=18432, num_hidden_layers=61,
                        num_attention_heads=128, num_key_value_heads=128, vocab_size=129280, num_experts=256,
                        num_experts_per_tok=8, moe_intermediate_size=2048, n_shared_experts=1,
                        first_k_dense_replace=3, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                        qk_rope_head_dim=64, v_head_dim=128, num_nextn_predict_layers=1)


def kv_rows(spec: ModelSpec, *, batch: int = 1, context: int = 1, tp: int = 1, pp: int = 1,
            dtype: Dtype = Dtype.BF16, **infer: object) -> dict[str, int]:
    cfg = JobConfig(job=Job.INFER, dtype=dtype, micro_batch=batch, tp=tp, pp=pp, gpus_per_node=tp * pp,
                    infer=InferConfig(context=context, **infer))
    return components(kv.rows(Context(build_architecture(spec), cfg, GPU, HostSpec())), Tier.GPU)


def test_opt_13b_800kb_per_token_vllm_paper() -> None:
    """vLLM paper Sec. 3: 2 (K, V) × 5120 (hidden) × 40 (layers) × 2 (fp16 bytes) = 800 KB per token."""
    assert kv.kv_cache_bytes(batch=1, seq=1, layers=40, kv_heads=40, head_dim=128, bits=16) == 819_200
    assert kv_rows(OPT_13B, dtype=Dtype.FP16) == {"kv_cache": 819_200}


def test_llama_31_8b_batch8_8k_is_8_gib() -> None:
    assert kv_rows(LLAMA_31_8B, batch=8, context=8192) == {"kv_cache": 8 * GiB}
    assert kv_rows(LLAMA_31_8B, batch=8, context=8192, kv_dtype=Dtype.FP32) == {"kv_cache": 16 * GiB}


def test_mqa_falcon_one_kv_head_replicated_over_tp() -> None:
    per_token = 2 * 32 * 1 * 64 * 2
    assert kv_rows(FALCON_7B) == {"kv_cache": per_token}
    assert kv_rows(FALCON_7B, tp=4) == {"kv_cache": per_token}


def test_gqa_divided_by_tp_then_replicated() -> None:
    per_token = 2 * 80 * 8 * 128 * 2  # 327,680 bytes
    assert kv_rows(LLAMA_3_70B) == {"kv_cache": per_token}
    assert kv_rows(LLAMA_3_70B, tp=2) == {"kv_cache": per_token // 2}
    assert kv_rows(LLAMA_3_70B, tp=8) == {"kv_cache": per_token // 8}
    assert kv_rows(LLAMA_3_70B, tp=16) == {"kv_cache": per_token // 8}
    assert kv.kv_heads_per_rank(kv_heads=8, tp=16) == 1
    assert kv.kv_heads_per_rank(kv_heads=8, tp=3) == 3


def test_pipeline_stage_holds_only_its_layers() -> None:
    per_layer = 2 * 8 * 128 * 2
    assert kv_rows(LLAMA_31_8B, pp=2) == {"kv_cache": 16 * per_layer}
    assert kv_rows(LLAMA_31_8B, pp=4) == {"kv_cache": 8 * per_layer}


def test_deepseek_v3_latent_vs_decompressed() -> None:
    latent = (512 + 64) * 61 * 2
    assert latent == 70_272
    assert kv_rows(DEEPSEEK_V3) == {"kv_cache": latent}
    decompressed = 128 * ((128 + 64) + 128) * 61 * 2
    assert kv_rows(DEEPSEEK_V3, mla_cache="decompressed") == {"kv_cache": decompressed}
    # The latent is one KV "head": replicated on every tp rank; decompressed heads are split.
    assert kv_rows(DEEPSEEK_V3, tp=8) == {"kv_cache": latent}
    assert kv_rows(DEEPSEEK_V3, tp=8, mla_cache="decompressed") == {"kv_cache": decompressed // 8}


def test_gemma2_alternate_sliding_layers() -> None:
    per_token_layer = 2 * 8 * 256 * 2  # 8 KiB: head_dim 256, not 3584 / 16 = 224
    full = 21 * 8192 * per_token_layer
    # One unchunked prefill of 8192 tokens: the window saves nothing at the peak.
    assert kv_rows(GEMMA2_9B, context=8192) == {"kv_cache/full_attention": full,
                                                "kv_cache/sliding_attention": full}
    # Chunked prefill of 512: W - 1 + T = 4607 tokens stay on sliding layers.
    chunked = kv_rows(GEMMA2_9B, context=8192, prefill_chunk=512)
    assert chunked == {"kv_cache/full_attention": full, "kv_cache/sliding_attention": 21 * 4607 * per_token_layer}
    decode = kv_rows(GEMMA2_9B, context=8192, prefill_chunk=1)
    assert decode["kv_cache/sliding_attention"] == 21 * 4096 * per_token_layer == 672 * MiB


def test_mistral_every_layer_slides() -> None:
    rows = kv_rows(MISTRAL_7B_V01, context=32768, prefill_chunk=1)
    assert rows == {"kv_cache/sliding_attention": 32 * 4096 * (2 * 8 * 128 * 2)}
    short = kv_rows(MISTRAL_7B_V01, context=1000, prefill_chunk=1)
    assert short == {"kv_cache/sliding_attention": 32 * 1000 * 4096}


def test_hf_view_keeps_w_minus_1_tokens() -> None:
    assert kv.cached_tokens(seq=20, window=8, step_tokens=0) == 7
    assert kv.cached_tokens(seq=20, window=8, step_tokens=20) == 20
    assert kv.cached_tokens(seq=20, window=8, step_tokens=1) == 8
    assert kv.cached_tokens(seq=5, window=8, step_tokens=1) == 5
    assert kv.cached_tokens(seq=20, window=None, step_tokens=1) == 20


def test_paged_rounds_up_to_whole_blocks() -> None:
    per_token = 2 * 32 * 8 * 128 * 2
    assert kv_rows(LLAMA_31_8B, context=1000, paged=True) == {"kv_cache": 1008 * per_token}
    assert kv_rows(LLAMA_31_8B, context=1024, paged=True) == {"kv_cache": 1024 * per_token}
    assert kv_rows(LLAMA_31_8B, context=1000, paged=True, block_size=32) == {"kv_cache": 1024 * per_token}
    assert kv_rows(LLAMA_31_8B, batch=3, context=17, paged=True) == {"kv_cache": 3 * 32 * per_token}


def test_paged_sliding_window_adds_one_block() -> None:
    # vLLM SlidingWindowSpec: cdiv(W - 1 + T, block) + 1 blocks once the window has moved.
    assert kv.paged_slots(seq=8192, window=4096, step_tokens=512, block_size=16) == (288 + 1) * 16
    assert kv.paged_slots(seq=8192, window=4096, step_tokens=1, block_size=16) == 257 * 16
    assert kv.paged_slots(seq=4100, window=4096, step_tokens=1, block_size=16) == 257 * 16
    assert kv.paged_slots(seq=4096, window=4096, step_tokens=1, block_size=16) == 256 * 16
    rows = kv_rows(GEMMA2_9B, context=8192, prefill_chunk=512, paged=True)
    assert rows["kv_cache/sliding_attention"] == 21 * 4624 * (2 * 8 * 256 * 2)


@given(seq=st.integers(1, 100_000), window=st.integers(2, 50_000), step=st.integers(0, 10_000),
       block=st.sampled_from([1, 8, 16, 32, 128]))
def test_paged_slots_bound_the_cached_tokens(seq: int, window: int, step: int, block: int) -> None:
    tokens = kv.cached_tokens(seq=seq, window=window, step_tokens=step)
    slots = kv.paged_slots(seq=seq, window=window, step_tokens=step, block_size=block)
    assert slots % block == 0
    assert tokens <= slots < tokens + 2 * block
    assert slots <= -(-seq // block) * block


def test_fp8_per_tensor_scales() -> None:
    rows = kv_rows(LLAMA_31_8B, batch=8, context=8192, kv_dtype=Dtype.FP8)
    assert rows == {"kv_cache": 4 * GiB, "kv_cache/scales": 32 * 2 * 4}


def test_int8_per_token_head_fp32_scales_match_vllm_page() -> None:
    rows = kv_rows(LLAMA_31_8B, batch=8, context=8192, kv_dtype=Dtype.INT8, paged=True)
    # vLLM int8_per_token_head: page adds 2 * block_size * K * 4 bytes, i.e. 64 bytes per token per layer.
    assert rows == {"kv_cache": 4 * GiB, "kv_cache/scales": 65536 * 32 * 64}
    assert rows["kv_cache/scales"] == 128 * MiB


def test_int4_scales_and_zero_points_per_group() -> None:
    per_head = kv_rows(LLAMA_31_8B, batch=8, context=8192, kv_dtype=Dtype.INT4)
    assert per_head == {"kv_cache": 2 * GiB, "kv_cache/scales": 128 * MiB}
    grouped = kv_rows(LLAMA_31_8B, batch=8, context=8192, kv_dtype=Dtype.INT4, kv_group_size=32)
    assert grouped == {"kv_cache": 2 * GiB, "kv_cache/scales": 512 * MiB}
    odd = kv.scale_bits_per_token(shapes=((1, 512), (1, 64)), dtype=Dtype.INT4, group_size=100)
    assert odd == (6 + 1) * 32


def test_weight_only_quant_dtype_caches_in_bf16() -> None:
    assert kv_rows(LLAMA_31_8B, batch=8, context=8192, dtype=Dtype.INT4) == {"kv_cache": 8 * GiB}


def test_training_jobs_have_no_kv_cache() -> None:
    cfg = JobConfig(job=Job.FULL)
    assert kv.rows(Context(build_architecture(LLAMA_31_8B), cfg, GPU, HostSpec())) == []


def test_sliding_layer_without_window_is_an_error() -> None:
    from memplan.arch.tensors import Architecture, Layer

    arch = Architecture(spec=LLAMA_31_8B, pre=(), layers=(Layer(tensors=(), sliding=True),), post=())
    cfg = JobConfig(job=Job.INFER)
    with pytest.raises(MemplanError, match="sliding_window"):
        kv.rows(Context(arch, cfg, GPU, HostSpec()))


def test_memory_modules_import_no_heavy_packages() -> None:
    code = ("import sys, memplan.memory.kv_cache, memplan.memory.inference; "
            "print(sorted(m for m in ('torch', 'numpy', 'pandas', 'pulp', 'rich', 'typer') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
