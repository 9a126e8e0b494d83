"""memplan's training activations against the bytes real Hugging Face models save for backward.

Each case builds a tiny random-initialized transformers model from a config with its family's
real layout (GQA ratios, head_dim ≠ hidden/heads, tied embeddings, fused projections, sliding
windows, experts, dropout), runs one training forward pass on CPU under
``memplan.measure.saved_bytes`` and requires memplan's estimate of the same configuration to be
within 3%. The estimate uses PyTorch's CPU kernel widths (``activations_block.cpu_counting``:
dropout saves a noise tensor of the dtype and LayerNorm its statistics in the dtype, where CUDA
saves a 1-byte mask and fp32 statistics); everything else is the CUDA model memplan reports.

Checkpointing is HF's ``activation_checkpointing_enable`` (non-reentrant ``torch.utils.checkpoint``
by default, every decoder layer, or every n-th with ``every_n_layers``), which memplan calls full
recompute with ``recompute_layers`` = the number of checkpointed layers.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest

torch = pytest.importorskip("torch", reason="measuring saved tensors needs torch (the measure extra)")
transformers = pytest.importorskip("transformers", reason="measuring HF models needs transformers (the measure extra)")

from memplan.arch.build import build_architecture  # noqa: E402
from memplan.catalog.hf import spec_from_hf_config  # noqa: E402
from memplan.catalog.schema import HostSpec  # noqa: E402
from memplan.catalog.store import catalog_gpu  # noqa: E402
from memplan.config import Job, JobConfig, LoraConfig, Recompute  # noqa: E402
from memplan.dtypes import Dtype  # noqa: E402
from memplan.measure import saved_bytes  # noqa: E402
from memplan.memory import activations as act  # noqa: E402
from memplan.memory import activations_block as blk  # noqa: E402
from memplan.memory.context import Context  # noqa: E402

pytestmark = pytest.mark.measure

TOLERANCE = 0.03
"""The acceptance bound: |estimate - measured| / measured."""
BATCH = 2
GPU = catalog_gpu("h100-sxm-80gb")
TOKENS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
LLAMA_LIKE = {"num_hidden_layers": 2, **TOKENS}

# family -> (config class, config kwargs, sequence length, memplan dropout flag)
CASES: dict[str, tuple[str, dict[str, Any], int, bool]] = {
    # Llama-3 70B's 8:1 query/kv grouping, untied head
    "llama": ("LlamaConfig", dict(hidden_size=128, intermediate_size=344, num_attention_heads=8, num_key_value_heads=1,
                                  vocab_size=2048, **LLAMA_LIKE), 128, False),
    # Qwen2.5-0.5B: q/k/v biases, tied embeddings
    "qwen2": ("Qwen2Config", dict(hidden_size=128, intermediate_size=352, num_attention_heads=4,
                                  num_key_value_heads=2, vocab_size=1536, tie_word_embeddings=True, **LLAMA_LIKE),
              96, False),
    # Mistral-7B v0.1: sliding window shorter than the sequence (SDPA then gets an explicit mask)
    "mistral": ("MistralConfig", dict(hidden_size=128, intermediate_size=448, num_attention_heads=8,
                                      num_key_value_heads=2, vocab_size=2048, sliding_window=64, **LLAMA_LIKE), 128,
                False),
    # Gemma-2: head_dim·heads ≠ hidden, four norms, soft-capping, alternating sliding layers, tied embeddings
    "gemma2": ("Gemma2Config", dict(hidden_size=128, intermediate_size=512, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=64, vocab_size=2048, sliding_window=64,
                                    **LLAMA_LIKE), 128, False),
    # GPT-2: fused c_attn, gelu_new, LayerNorm, learned positions, dropout 0.1 everywhere
    "gpt2": ("GPT2Config", dict(n_embd=128, n_layer=2, n_head=4, vocab_size=2000, n_positions=256,
                                resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1, bos_token_id=1, eos_token_id=2),
             128, True),
    # Phi-3-medium: fused qkv_proj and gate_up_proj, 4:1 grouping
    "phi3": ("Phi3Config", dict(hidden_size=128, intermediate_size=320, num_attention_heads=8, num_key_value_heads=2,
                                vocab_size=2048, **LLAMA_LIKE), 128, False),
    # Mixtral-8x7B: 8 experts, top-2, 4:1 grouping
    "mixtral": ("MixtralConfig", dict(hidden_size=64, intermediate_size=160, num_attention_heads=4,
                                      num_key_value_heads=1, vocab_size=1000, num_local_experts=8,
                                      num_experts_per_tok=2, **LLAMA_LIKE), 64, False),
    # beyond the required families
    "opt": ("OPTConfig", dict(hidden_size=64, ffn_dim=256, num_hidden_layers=2, num_attention_heads=4,
                              vocab_size=1000, word_embed_proj_dim=64, dropout=0.1, attention_dropout=0.1), 64, True),
    "falcon": ("FalconConfig", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=1000), 64,
               False),
    "qwen3_moe": ("Qwen3MoeConfig", dict(hidden_size=64, intermediate_size=160, moe_intermediate_size=48,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=1000,
                                         num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, **LLAMA_LIKE),
                  64, False),
    # DeepSeek-V3: MLA (q/kv low rank, rope split), first layer dense, sigmoid router with groups, shared expert
    "deepseek_v3": ("DeepseekV3Config", dict(hidden_size=64, intermediate_size=160, moe_intermediate_size=48,
                                             num_attention_heads=4, num_key_value_heads=4, vocab_size=1000,
                                             n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                                             first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=24,
                                             qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_group=2,
                                             topk_group=1, **LLAMA_LIKE), 64, False),
}

RUNS = [
    *[(family, attn, ckpt, "bf16") for family in ("llama", "qwen2", "mistral", "gpt2", "phi3", "mixtral")
      for attn in ("sdpa", "eager") for ckpt in (0, 2)],
    *[("gemma2", "eager", ckpt, "bf16") for ckpt in (0, 2)],  # transformers refuses SDPA with soft-capping
    ("llama", "sdpa", 0, "fp32"), ("gpt2", "eager", 0, "fp32"), ("gemma2", "eager", 0, "fp32"),
    ("mistral", "sdpa", 2, "fp32"),
    ("opt", "eager", 0, "bf16"), ("opt", "sdpa", 2, "bf16"), ("falcon", "sdpa", 0, "bf16"),
    ("falcon", "eager", 2, "bf16"), ("qwen3_moe", "sdpa", 0, "bf16"), ("qwen3_moe", "eager", 2, "bf16"),
    ("deepseek_v3", "eager", 0, "bf16"), ("deepseek_v3", "eager", 2, "bf16"),
]
"""(family, attention, checkpointed layers of 2, dtype)."""

DTYPES = {"bf16": (Dtype.BF16, "bfloat16"), "fp32": (Dtype.FP32, "float32")}


def _model(family: str, attn: str, dtype: str) -> tuple[Any, dict[str, Any]]:
    cls_name, kwargs, _, _ = CASES[family]
    kwargs = dict(kwargs)
    if family == "gpt2" and attn == "sdpa":
        kwargs["attn_pdrop"] = 0.0  # CPU SDPA with dropout falls back to ATen's fp32 math path; CUDA's flash does not
    if family == "opt" and attn == "sdpa":
        kwargs["attention_dropout"] = 0.0
    config = getattr(transformers, cls_name)(**kwargs)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_config(
            config, attn_implementation=attn, dtype=getattr(torch, DTYPES[dtype][1]))
    model.train()
    return model, config.to_dict()


def measure(model: Any, seq: int, vocab: int) -> int:
    ids = torch.randint(3, vocab, (BATCH, seq), generator=torch.Generator().manual_seed(1))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": False}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return saved_bytes(model, inputs, labels=ids)["total_bytes"]


def predict(config: dict[str, Any], family: str, attn: str, checkpointed: int, dtype: str, seq: int,
            **job: Any) -> int:
    if "num_local_experts" in config:  # transformers 5 writes Qwen3-MoE's num_experts under this name
        config.setdefault("num_experts", config["num_local_experts"])
    spec = spec_from_hf_config(config, name=f"tiny-{family}", source="test")
    if dtype == "bf16" and job.get("job", Job.FULL) in (Job.FULL, Job.PRETRAIN):
        job.setdefault("master_weights", False)  # the measured model is pure bf16 (no AMP: tests/test_measure_amp.py)
    cfg = JobConfig(**{"job": Job.FULL, **job}, dtype=DTYPES[dtype][0], micro_batch=BATCH, seq_len=seq,
                    attention=attn, dropout=CASES[family][3],
                    recompute=Recompute.FULL if checkpointed else Recompute.NONE, recompute_layers=checkpointed or None)
    ctx = Context(build_architecture(spec), cfg, GPU, HostSpec())
    return act.saved_bytes_estimate(ctx, blk.cpu_counting(blk.activation_bits(cfg)))


@pytest.mark.parametrize(("family", "attn", "checkpointed", "dtype"), RUNS,
                         ids=[f"{f}-{a}-ckpt{c}-{d}" for f, a, c, d in RUNS])
def test_estimate_within_tolerance_of_measured_saved_bytes(family: str, attn: str, checkpointed: int,
                                                           dtype: str) -> None:
    model, config = _model(family, attn, dtype)
    if checkpointed:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.gradient_checkpointing_enable()
    seq = CASES[family][2]
    measured = measure(model, seq, config["vocab_size"])
    predicted = predict(config, family, attn, checkpointed, dtype, seq)
    error = (predicted - measured) / measured
    print(f"{family:10s} {attn:5s} ckpt={checkpointed} {dtype}: measured {measured} predicted {predicted} "
          f"({error:+.2%})")
    assert abs(error) < TOLERANCE, f"{family} {attn}: measured {measured}, predicted {predicted} ({error:+.2%})"


LORA_RUNS = [("llama", "sdpa", ("q", "v"), 0), ("llama", "eager", ("q", "k", "v", "o"), 0),
             ("llama", "sdpa", ("gate", "down"), 0), ("llama", "sdpa", ("q", "v"), 2),
             ("phi3", "sdpa", ("all-linear",), 0), ("gemma2", "eager", ("all-linear",), 0),
             ("mixtral", "sdpa", ("q", "v"), 0), ("mixtral", "sdpa", ("all-linear",), 0),
             ("qwen3_moe", "sdpa", ("all-linear",), 0)]
"""(family, attention, memplan LoRA targets, checkpointed layers of 2)."""
HF_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
            "down": "down_proj"}


@pytest.mark.parametrize(("family", "attn", "targets", "checkpointed"), LORA_RUNS,
                         ids=[f"{f}-{a}-{'+'.join(t)}-ckpt{c}" for f, a, t, c in LORA_RUNS])
def test_lora_estimate_within_tolerance(family: str, attn: str, targets: tuple[str, ...], checkpointed: int) -> None:
    """Frozen base weights save no inputs; peft's fp32 adapters (``autocast_adapter_dtype``) save an fp32
    copy of their input and their r-wide output; adapted MoE parameters save the merged weight."""
    peft_lib = pytest.importorskip("peft", reason="LoRA measurement needs peft (the measure extra)")
    model, config = _model(family, attn, "bf16")
    modules = "all-linear" if targets == ("all-linear",) else [HF_NAMES[name] for name in targets]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = peft_lib.get_peft_model(model, peft_lib.LoraConfig(r=8, lora_alpha=16, target_modules=modules))
        if checkpointed:
            wrapped.gradient_checkpointing_enable()
    model.enable_input_require_grads()  # as peft does with checkpointing: the block input requires grad
    wrapped.train()
    seq = CASES[family][2]
    measured = measure(wrapped, seq, config["vocab_size"])
    predicted = predict(config, family, attn, checkpointed, "bf16", seq, job=Job.LORA,
                        lora=LoraConfig(rank=8, targets=targets, dtype=Dtype.FP32))
    error = (predicted - measured) / measured
    print(f"{family:10s} {attn:5s} lora {'+'.join(targets)} ckpt={checkpointed}: measured {measured} "
          f"predicted {predicted} ({error:+.2%})")
    assert abs(error) < TOLERANCE, f"{family} LoRA {targets}: measured {measured}, predicted {predicted}"


def test_partial_checkpointing_every_other_layer() -> None:
    """4 layers, HF checkpoints layers 0 and 2 (every_n_layers=2); memplan: 2 of 4 layers recompute."""
    cls_name, kwargs, seq, _ = CASES["llama"]
    config = getattr(transformers, cls_name)(**{**kwargs, "num_hidden_layers": 4})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.bfloat16)
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # transformers 5.20 names it gradient_checkpointing_enable; later 5.x activation_checkpointing_enable.
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable(every_n_layers=2)
    measured = measure(model, seq, config.vocab_size)
    predicted = predict(config.to_dict(), "llama", "sdpa", 2, "bf16", seq)
    none = predict(config.to_dict(), "llama", "sdpa", 0, "bf16", seq)
    full = predict(config.to_dict(), "llama", "sdpa", 4, "bf16", seq)
    assert full < predicted < none
    assert abs(predicted - measured) / measured < TOLERANCE


def test_reentrant_checkpointing_saves_the_same_layer_inputs() -> None:
    model, config = _model("llama", "sdpa", "bf16")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    seq = CASES["llama"][2]
    measured = measure(model, seq, config["vocab_size"])
    predicted = predict(config, "llama", "sdpa", 2, "bf16", seq)
    assert abs(predicted - measured) / measured < TOLERANCE


def test_saved_bytes_dedupes_storages_and_excludes_weights() -> None:
    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Linear(8, 8, bias=False)
            self.b = torch.nn.Linear(8, 8, bias=False)

        def forward(self, x: Any, labels: Any = None) -> Any:
            return self.a(x) * self.b(x)  # x saved by a and b once; both outputs saved by the product

    x = torch.randn(16, 8, requires_grad=True)
    result = saved_bytes(Tiny(), {"x": x}, records=True)
    assert result["total_bytes"] == 3 * 16 * 8 * 4
    assert result["excluded_weight_bytes"] == 2 * 8 * 8 * 4
    assert sum(result["by_module"].values()) == result["total_bytes"]
    assert {rec["module"] for rec in result["tensors"]} == {"a", "(model)"}
