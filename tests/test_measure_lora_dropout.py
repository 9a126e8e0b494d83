"""peft ``lora_dropout`` > 0: each adapted module runs its own ``nn.Dropout`` before lora_A (peft
``lora.Linear.forward``: ``lora_A(dropout(x))``), so it saves that output and the dropout its mask, where
``lora_dropout=0`` (an ``nn.Identity``) lets lora_A save the base input itself. Measured on a tiny Llama on CPU
(the CPU dropout saves a noise tensor of the dtype, ``activations_block.cpu_counting``). Compared layer by layer on a
layer whose input requires grad (layer 1): layer 0 reads the frozen embedding, so its dropout saves no noise."""

from __future__ import annotations

import warnings
from typing import Any

import pytest

torch = pytest.importorskip("torch", reason="measuring saved tensors needs torch (the measure extra)")
transformers = pytest.importorskip("transformers", reason="measuring HF models needs transformers (the measure extra)")
peft = pytest.importorskip("peft", reason="LoRA measurements need peft (the measure extra)")

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
BATCH, SEQ = 2, 128
CONFIG = dict(hidden_size=128, intermediate_size=344, num_attention_heads=8, num_key_value_heads=2, vocab_size=2048,
              num_hidden_layers=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
HF_NAMES = {"q": "q_proj", "v": "v_proj", "gate": "gate_proj", "down": "down_proj"}


LAYER = 1


def _measure(targets: tuple[str, ...], dropout: float, adapter_dtype: Dtype) -> tuple[int, dict[str, Any]]:
    """Bytes saved inside decoder layer ``LAYER`` (attributed by module), and the config."""
    config = transformers.LlamaConfig(**CONFIG)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.bfloat16)
        lora = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=[HF_NAMES[t] for t in targets])
        wrapped = peft.get_peft_model(model, lora, autocast_adapter_dtype=adapter_dtype is Dtype.FP32)
    wrapped.train()
    ids = torch.randint(3, config.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": False}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        by_module = saved_bytes(wrapped, inputs, labels=ids)["by_module"]
    return sum(b for name, b in by_module.items() if f"layers.{LAYER}." in name), config.to_dict()


def _predict(config: dict[str, Any], targets: tuple[str, ...], dropout: float, adapter_dtype: Dtype) -> int:
    spec = spec_from_hf_config(config, name="tiny-llama", source="test")
    cfg = JobConfig(job=Job.LORA, dtype=Dtype.BF16, micro_batch=BATCH, seq_len=SEQ, attention="sdpa",
                    lora=LoraConfig(rank=8, targets=targets, dtype=adapter_dtype, dropout=dropout))
    ctx = Context(build_architecture(spec), cfg, catalog_gpu("h100-sxm-80gb"), HostSpec())
    return act.layer_micro_bytes(ctx, LAYER, Recompute.NONE, blk.cpu_counting(16))


@pytest.mark.parametrize(("targets", "adapter_dtype"), [(("q", "v"), Dtype.BF16), (("q", "v"), Dtype.FP32),
                                                        (("gate", "down"), Dtype.BF16), (("gate", "down"), Dtype.FP32)])
def test_lora_dropout_adds_each_modules_output_and_mask(targets: tuple[str, ...], adapter_dtype: Dtype) -> None:
    with_dropout, config = _measure(targets, 0.05, adapter_dtype)
    without, _ = _measure(targets, 0.0, adapter_dtype)
    grown = _predict(config, targets, 0.05, adapter_dtype) - _predict(config, targets, 0.0, adapter_dtype)
    print(f"{targets} {adapter_dtype.value}: measured +{with_dropout - without}, predicted +{grown}")
    assert with_dropout > without
    assert abs(grown - (with_dropout - without)) <= TOLERANCE * with_dropout
