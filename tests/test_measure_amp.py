"""PyTorch AMP's saved tensors against memplan's: a tiny fp32 Hugging Face model runs its training forward under
``torch.autocast("cpu", dtype=torch.bfloat16)`` and ``memplan.measure.saved_bytes`` counts what it keeps for
backward. memplan's AMP answer for the same configuration (engine pytorch, bf16 compute over fp32 parameters) is the
activations (with the fp32 residual stream, ``memory.activations_amp``) plus autocast's bf16 weight copies, which
the matmuls save too (``weights/autocast_copies``). A pure-bf16 count of the activations is below the measurement,
the dangerous direction this file guards."""

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
from memplan.config import Job, JobConfig, Recompute  # noqa: E402
from memplan.dtypes import Dtype  # noqa: E402
from memplan.measure import saved_bytes  # noqa: E402
from memplan.memory import activations as act  # noqa: E402
from memplan.memory import activations_amp as amp  # noqa: E402
from memplan.memory import activations_block as blk  # noqa: E402
from memplan.memory import engine_states  # noqa: E402
from memplan.memory.context import Context  # noqa: E402

pytestmark = pytest.mark.measure

TOLERANCE = 0.03
BATCH, SEQ = 2, 96
TOKENS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "num_hidden_layers": 2}
CASES: dict[str, tuple[str, dict[str, Any], str]] = {
    "llama": ("LlamaConfig", dict(hidden_size=128, intermediate_size=344, num_attention_heads=8, num_key_value_heads=1,
                                  vocab_size=2048, **TOKENS), "sdpa"),
    "qwen2-tied": ("Qwen2Config", dict(hidden_size=128, intermediate_size=352, num_attention_heads=4,
                                       num_key_value_heads=2, vocab_size=1536, tie_word_embeddings=True, **TOKENS),
                   "sdpa"),
    "phi3-fused": ("Phi3Config", dict(hidden_size=128, intermediate_size=320, num_attention_heads=8,
                                      num_key_value_heads=2, vocab_size=2048, **TOKENS), "sdpa"),
    "gemma2-eager": ("Gemma2Config", dict(hidden_size=128, intermediate_size=512, num_attention_heads=4,
                                          num_key_value_heads=2, head_dim=64, vocab_size=2048, sliding_window=64,
                                          **TOKENS), "eager"),
    "falcon-layernorm": ("FalconConfig", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                              vocab_size=1000), "sdpa"),
}


def _run(name: str, *, checkpointing: bool = False) -> tuple[int, dict[str, Any]]:
    cls, kwargs, attn = CASES[name]
    config = getattr(transformers, cls)(**kwargs)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32)
        if checkpointing:
            model.gradient_checkpointing_enable()
    model.train()
    ids = torch.randint(3, config.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": False}
    with warnings.catch_warnings(), torch.autocast("cpu", dtype=torch.bfloat16):
        warnings.simplefilter("ignore")
        measured = saved_bytes(model, inputs, labels=ids)["total_bytes"]
    return measured, config.to_dict()


def _context(name: str, config: dict[str, Any], **job: Any) -> Context:
    spec = spec_from_hf_config(config, name=f"tiny-{name}", source="test")
    cfg = JobConfig(job=Job.FULL, dtype=Dtype.BF16, micro_batch=BATCH, seq_len=SEQ, attention=CASES[name][2], **job)
    return Context(build_architecture(spec), cfg, catalog_gpu("h100-sxm-80gb"), HostSpec())


@pytest.mark.parametrize("name", sorted(CASES))
def test_amp_saved_bytes_match_activations_plus_autocast_copies(name: str) -> None:
    measured, config = _run(name)
    ctx = _context(name, config)
    assert amp.autocast_amp(ctx)  # the pytorch engine's default for 16-bit full fine-tuning
    copies = sum(r.bytes for r in engine_states.autocast_rows(ctx))
    predicted = act.saved_bytes_estimate(ctx, blk.cpu_counting(16)) + copies
    error = (predicted - measured) / measured
    print(f"{name}: measured {measured} predicted {predicted} ({error:+.2%})")
    assert abs(error) < TOLERANCE, f"{name}: measured {measured}, predicted {predicted} ({error:+.2%})"


def test_amp_with_every_layer_checkpointed_keeps_fp32_block_inputs() -> None:
    """HF gradient checkpointing under autocast: each checkpointed layer keeps its input, the fp32 residual stream."""
    measured, config = _run("llama", checkpointing=True)
    ctx = _context("llama", config, recompute=Recompute.FULL)
    head_cast = 2 * config["vocab_size"] * config["hidden_size"]  # the layers' weight casts are made again in backward
    predicted = act.saved_bytes_estimate(ctx, blk.cpu_counting(16)) + head_cast
    print(f"checkpointed llama: measured {measured} predicted {predicted}")
    assert abs(predicted - measured) / measured < TOLERANCE, (measured, predicted)
    inputs_16 = 2 * blk.block_input_bytes(ctx.arch.spec, ctx.cfg)  # two layers' inputs if they were bf16
    assert predicted - inputs_16 < measured * (1 - TOLERANCE)


def test_a_pure_bf16_count_would_be_under_the_amp_measurement() -> None:
    measured, config = _run("llama")
    pure = _context("llama", config, master_weights=False)
    assert not amp.autocast_amp(pure)
    copies = sum(r.bytes for r in engine_states.autocast_rows(_context("llama", config)))
    assert act.saved_bytes_estimate(pure, blk.cpu_counting(16)) + copies < measured * (1 - TOLERANCE)
