"""memplan's KV cache prediction against the cache transformers actually builds, byte for byte.

Tiny random-initialized models with the real layouts (GQA, sliding windows, Gemma-2's head_dim that
is not D/N, GPT-2's fused attention, Mixtral, DeepSeek-V3's MLA) run one forward on CPU with
``use_cache=True``. Two sizes are compared:

- ``nbytes``: what the cache's key/value tensors show. Sliding-window layers keep a *view* of the last
  W − 1 tokens (transformers ``DynamicSlidingWindowLayer``), i.e. memplan's ``cached_tokens`` with T = 0;
- storage: the bytes those views keep alive, ``min(S, W − 1 + T)`` after a step of T tokens, which is
  what memplan's ``kv_cache`` rows report (the memory actually held).
"""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch", reason="measuring real caches needs torch (pip install memplan[measure])")
transformers = pytest.importorskip("transformers", reason="measuring real caches needs transformers")

from memplan.arch.build import build_architecture  # noqa: E402
from memplan.catalog.hf import spec_from_hf_config  # noqa: E402
from memplan.catalog.schema import GpuSpec, HostSpec, ModelSpec  # noqa: E402
from memplan.config import InferConfig, Job, JobConfig  # noqa: E402
from memplan.dtypes import Dtype  # noqa: E402
from memplan.memory import kv_cache as kv  # noqa: E402
from memplan.memory.breakdown import Tier, tier_total  # noqa: E402
from memplan.memory.context import Context  # noqa: E402

pytestmark = [pytest.mark.measure,
              pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")]  # GPT-BigCode

GPU = GpuSpec(name="cpu-test", vendor="nvidia", source="test", memory_mib=81559, marketed_memory_gb=80,
              bf16_dense_tflops=989.0, hbm_bandwidth_gbps=3350.0, interconnect_gbps=450.0, pcie_gen=5)
BATCH, PROMPT, WINDOW, VOCAB = 2, 20, 8, 128
_BASE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": VOCAB, "max_position_embeddings": 256,
         "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {"model_type": "llama", **_BASE},
    "qwen2": {"model_type": "qwen2", **_BASE},
    "mistral": {"model_type": "mistral", **_BASE, "sliding_window": WINDOW},
    "gemma2": {"model_type": "gemma2", **_BASE, "num_hidden_layers": 4, "head_dim": 32, "sliding_window": WINDOW},
    "gpt2": {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": VOCAB, "n_positions": 256,
             "bos_token_id": 0, "eos_token_id": 0},
    "phi3": {"model_type": "phi3", **_BASE, "sliding_window": WINDOW},
    "mixtral": {"model_type": "mixtral", **_BASE, "num_local_experts": 4, "num_experts_per_tok": 2},
    "gemma": {"model_type": "gemma", **_BASE, "head_dim": 32},
    "gemma3_text": {"model_type": "gemma3_text", **_BASE, "num_hidden_layers": 3, "head_dim": 32,
                    "sliding_window": WINDOW, "sliding_window_pattern": 2},
    "phi": {"model_type": "phi", **_BASE},
    "qwen2_moe": {"model_type": "qwen2_moe", **_BASE, "num_experts": 4, "num_experts_per_tok": 2,
                  "moe_intermediate_size": 32, "shared_expert_intermediate_size": 48},
    "gpt_neox": {"model_type": "gpt_neox", **_BASE, "num_key_value_heads": None},
    "gptj": {"model_type": "gptj", "n_embd": 64, "n_layer": 2, "n_head": 4, "rotary_dim": 8, "vocab_size": VOCAB,
             "n_positions": 256, "bos_token_id": 0, "eos_token_id": 0},
    "gpt_bigcode": {"model_type": "gpt_bigcode", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": VOCAB,
                    "n_positions": 256, "bos_token_id": 0, "eos_token_id": 0},
    "bloom": {"model_type": "bloom", "hidden_size": 64, "n_layer": 2, "n_head": 4, "vocab_size": VOCAB,
              "bos_token_id": 0, "eos_token_id": 0},
    "falcon": {"model_type": "falcon", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
               "vocab_size": VOCAB, "bos_token_id": 0, "eos_token_id": 0},
    "falcon_new": {"model_type": "falcon", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                   "num_kv_heads": 2, "new_decoder_architecture": True, "vocab_size": VOCAB, "bos_token_id": 0,
                   "eos_token_id": 0},
    "falcon_alibi": {"model_type": "falcon", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "multi_query": False, "parallel_attn": False, "alibi": True, "vocab_size": VOCAB,
                     "bos_token_id": 0, "eos_token_id": 0},
    "stablelm": {"model_type": "stablelm", **_BASE, "qk_layernorm": True},
    "olmo2": {"model_type": "olmo2", **_BASE},
    "granite": {"model_type": "granite", **_BASE},
    "cohere": {"model_type": "cohere", **_BASE, "use_qk_norm": True},
    "deepseek_v3": {"model_type": "deepseek_v3", **_BASE, "num_key_value_heads": 4, "moe_intermediate_size": 32,
                    "n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1,
                    "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1, "q_lora_rank": 48,
                    "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16},
}


def _model_and_spec(name: str) -> tuple[Any, ModelSpec]:
    fields = dict(CONFIGS[name])
    model_type = fields.pop("model_type")
    if model_type not in transformers.models.auto.configuration_auto.CONFIG_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} has no {model_type}")
    config = transformers.AutoConfig.for_model(model_type, **fields)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    spec = spec_from_hf_config(config.to_dict(), name=f"tiny-{name}", source="test")
    return model, spec


def _measured(cache: Any) -> tuple[int, int]:
    """(nbytes, storage bytes) summed over every layer's key and value tensors."""
    nbytes, storages = 0, {}
    for layer in cache.layers:
        for tensor in (layer.keys, layer.values):
            nbytes += tensor.nbytes
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return nbytes, sum(storages.values())


def _predicted_rows(spec: ModelSpec, *, context: int, chunk: int | None = None, **infer: Any) -> int:
    cfg = JobConfig(job=Job.INFER, dtype=Dtype.BF16, micro_batch=BATCH,
                    infer=InferConfig(context=context, prefill_chunk=chunk, **infer))
    return tier_total(kv.rows(Context(build_architecture(spec), cfg, GPU, HostSpec())), Tier.GPU)


def _predicted_views(spec: ModelSpec, *, context: int) -> int:
    """What the cached views show: sliding layers W − 1 tokens (step T = 0)."""
    elements = kv.elements_per_token(kv.cached_shapes(spec, mla_cache="latent", tp=1, hf=True))
    total = 0
    for index, layer in enumerate(build_architecture(spec).layers):
        tokens = kv.cached_tokens(seq=context, window=kv.layer_window(spec, index, layer), step_tokens=0)
        total += kv.layer_bytes(batch=BATCH, tokens=tokens, elements=elements, bits=16, scale_bits=0)[0]
    return total


def _forward(model: Any, ids: Any, cache: Any = None) -> Any:
    with torch.no_grad():
        return model(ids, past_key_values=cache, use_cache=True).past_key_values


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_prefill_then_decode_matches_hf_cache(name: str) -> None:
    model, spec = _model_and_spec(name)
    ids = torch.randint(0, VOCAB, (BATCH, PROMPT + 1))
    cache = _forward(model, ids[:, :PROMPT])
    nbytes, storage = _measured(cache)
    assert storage == _predicted_rows(spec, context=PROMPT), f"{name}: storage after prefill"
    assert nbytes == _predicted_views(spec, context=PROMPT), f"{name}: nbytes after prefill"
    cache = _forward(model, ids[:, PROMPT:], cache)
    _, storage = _measured(cache)
    assert storage == _predicted_rows(spec, context=PROMPT + 1, chunk=1), f"{name}: storage after one decode step"


def test_falcon_new_architecture_caches_all_heads_in_transformers_and_k_heads_in_vllm() -> None:
    """transformers' ``FalconAttention._split_heads`` broadcasts K and V to all N query heads before the cache
    update (the new decoder architecture); vLLM's KV spec keeps the K heads (``num_kv_heads``)."""
    model, spec = _model_and_spec("falcon_new")
    cache = _forward(model, torch.randint(0, VOCAB, (BATCH, PROMPT)))
    _, storage = _measured(cache)
    heads, kv_heads = spec.num_attention_heads or 1, spec.kv_heads
    assert 1 < kv_heads < heads
    assert storage == _predicted_rows(spec, context=PROMPT)
    k_heads = kv.elements_per_token(kv.cached_shapes(spec, mla_cache="latent", tp=1))
    assert kv.elements_per_token(kv.cached_shapes(spec, mla_cache="latent", tp=1, hf=True)) * kv_heads == k_heads * heads


@pytest.mark.parametrize("name", ["mistral", "gemma2", "gemma3_text"])
def test_chunked_prefill_keeps_window_plus_chunk(name: str) -> None:
    model, spec = _model_and_spec(name)
    ids = torch.randint(0, VOCAB, (BATCH, PROMPT))
    chunk = 6
    cache = _forward(model, ids[:, : PROMPT - chunk])
    cache = _forward(model, ids[:, PROMPT - chunk :], cache)
    _, storage = _measured(cache)
    assert storage == _predicted_rows(spec, context=PROMPT, chunk=chunk)
    assert storage < _predicted_rows(spec, context=PROMPT)


def test_deepseek_v3_caches_the_latent_not_decompressed_heads() -> None:
    model, spec = _model_and_spec("deepseek_v3")
    cache = _forward(model, torch.randint(0, VOCAB, (BATCH, PROMPT)))
    _, storage = _measured(cache)
    latent = BATCH * PROMPT * 2 * (32 + 8) * 2
    assert storage == latent == _predicted_rows(spec, context=PROMPT)
    assert storage < _predicted_rows(spec, context=PROMPT, mla_cache="decompressed")
