"""memplan's adapter count against peft's trainable parameters on tiny random-initialized HF models.

Each case builds a transformers model from a real-layout config (tiny dimensions, the family's
real structure: GQA, biases, tied embeddings, fused projections, experts, MLA) and the same shape
as a memplan ModelSpec, applies ``peft.LoraConfig`` with HF module names mapped from memplan's
abstract projections, and requires the counts to be EXACTLY equal.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest

torch = pytest.importorskip("torch", reason="measurement tests need torch (the measure extra)")
transformers = pytest.importorskip("transformers", reason="measurement tests need transformers (the measure extra)")
peft_lib = pytest.importorskip("peft", reason="measurement tests need peft (the measure extra)")

from memplan.arch.build import build_architecture  # noqa: E402
from memplan.catalog.schema import Family, HostSpec, ModelSpec  # noqa: E402
from memplan.catalog.store import catalog_gpu  # noqa: E402
from memplan.config import Job, JobConfig, LoraConfig  # noqa: E402
from memplan.dtypes import Dtype  # noqa: E402
from memplan.errors import MemplanError  # noqa: E402
from memplan.memory import peft  # noqa: E402
from memplan.memory.context import Context  # noqa: E402

pytestmark = pytest.mark.measure

D, F, N, K, V, L, R = 64, 96, 4, 2, 128, 2, 4
GPU = catalog_gpu("h100-sxm-80gb")
TOKENS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
"""Token ids inside the tiny vocabulary (Phi-3's default pad id 32000 would not fit)."""
LLAMA_NAMES = {"q": ["q_proj"], "k": ["k_proj"], "v": ["v_proj"], "o": ["o_proj"],
               "gate": ["gate_proj"], "up": ["up_proj"], "down": ["down_proj"]}


def _spec(family: Family, **extra: Any) -> ModelSpec:
    base = {"name": f"tiny-{family.value}", "source": "test", "family": family, "hidden_size": D,
            "intermediate_size": F, "num_hidden_layers": L, "num_attention_heads": N, "num_key_value_heads": K,
            "vocab_size": V}
    return ModelSpec(**{**base, **extra})


def _llama_like(config_cls: str, **extra: Any) -> Callable[[], Any]:
    def make() -> Any:
        cls = getattr(transformers, config_cls)
        return cls(hidden_size=D, intermediate_size=F, num_hidden_layers=L, num_attention_heads=N,
                   num_key_value_heads=K, vocab_size=V, **TOKENS, **extra)
    return make


CASES: dict[str, tuple[Callable[[], Any], ModelSpec, dict[str, list[str]]]] = {
    "llama": (_llama_like("LlamaConfig"), _spec(Family.LLAMA), LLAMA_NAMES),
    "qwen2": (_llama_like("Qwen2Config"), _spec(Family.LLAMA, attention_bias=True), LLAMA_NAMES),
    "mistral": (_llama_like("MistralConfig", sliding_window=16), _spec(Family.LLAMA, sliding_window=16), LLAMA_NAMES),
    "gemma2": (_llama_like("Gemma2Config", head_dim=32),
               _spec(Family.GEMMA2, head_dim=32, tie_word_embeddings=True), LLAMA_NAMES),
    "phi3": (_llama_like("Phi3Config"), _spec(Family.PHI3),
             {"q": ["qkv_proj"], "k": ["qkv_proj"], "v": ["qkv_proj"], "o": ["o_proj"],
              "gate": ["gate_up_proj"], "up": ["gate_up_proj"], "down": ["down_proj"]}),
    "gpt2": (lambda: transformers.GPT2Config(n_embd=D, n_layer=L, n_head=N, vocab_size=V, n_positions=32, **TOKENS),
             _spec(Family.GPT2, intermediate_size=None, num_key_value_heads=None, tie_word_embeddings=True,
                   max_position_embeddings=32, mlp_gated=False, norm="layernorm"),
             {"q": ["c_attn"], "k": ["c_attn"], "v": ["c_attn"], "o": ["attn.c_proj"], "up": ["c_fc"],
              "down": ["mlp.c_proj"]}),
    "mixtral": (_llama_like("MixtralConfig", num_local_experts=4, num_experts_per_tok=2),
                _spec(Family.MIXTRAL, num_experts=4, num_experts_per_tok=2),
                {**LLAMA_NAMES, "gate": ["w1"], "up": ["w3"], "down": ["w2"]}),
    "qwen3_moe": (_llama_like("Qwen3MoeConfig", head_dim=16, moe_intermediate_size=32, num_experts=4,
                              num_experts_per_tok=2),
                  _spec(Family.QWEN3_MOE, head_dim=16, qk_norm=True, moe_intermediate_size=32, num_experts=4,
                        num_experts_per_tok=2), LLAMA_NAMES),
    "deepseek_v3": (
        lambda: transformers.DeepseekV3Config(
            hidden_size=D, intermediate_size=F, moe_intermediate_size=32, num_hidden_layers=L,
            num_attention_heads=N, num_key_value_heads=N, vocab_size=V, n_routed_experts=4, num_experts_per_tok=2,
            n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8,
            qk_rope_head_dim=8, v_head_dim=8, n_group=1, topk_group=1, **TOKENS),
        _spec(Family.DEEPSEEK, num_key_value_heads=N, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
              n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8,
              qk_rope_head_dim=8, v_head_dim=8),  # no topk_method: HF keeps e_score_correction_bias as a buffer
        {"q": ["q_a_proj", "q_b_proj"], "k": ["kv_a_proj_with_mqa", "kv_b_proj"],
         "v": ["kv_a_proj_with_mqa", "kv_b_proj"], "o": ["o_proj"], "gate": ["gate_proj"], "up": ["up_proj"],
         "down": ["down_proj"]}),
}
TARGETS = [("q", "v"), ("all-linear",), ("q", "k", "v", "o", "gate", "up", "down")]


def _peft_trainable(make_config: Callable[[], Any], targets: tuple[str, ...], names: dict[str, list[str]],
                    dora: bool) -> tuple[int, int]:
    """(base parameters, peft's trainable parameters) for a fresh tiny model."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_config(make_config())
        base = sum(p.numel() for p in model.parameters())
        hf = "all-linear" if targets == ("all-linear",) else sorted({n for t in targets for n in names.get(t, [])})
        config = peft_lib.LoraConfig(r=R, lora_alpha=2 * R, target_modules=hf, use_dora=dora)
        model = peft_lib.get_peft_model(model, config)
    return base, sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("targets", TARGETS, ids=["q_v", "all_linear", "all_named"])
@pytest.mark.parametrize("family", list(CASES))
def test_adapter_count_equals_peft(family: str, targets: tuple[str, ...], dora: bool) -> None:
    make_config, spec, names = CASES[family]
    arch = build_architecture(spec)
    lora = LoraConfig(rank=R, targets=targets, dora=dora)
    try:
        predicted = peft.lora_params(arch, lora)
    except MemplanError as exc:
        # memplan refuses exactly what peft refuses (DoRA on MoE experts / router).
        with pytest.raises(ValueError, match="use_dora"):
            _peft_trainable(make_config, targets, names, dora)
        assert "ParamWrapper" in str(exc)
        return
    base, measured = _peft_trainable(make_config, targets, names, dora)
    assert arch.params == base, f"{family}: memplan's base model has {arch.params} params, HF {base}"
    assert predicted == measured


@pytest.mark.parametrize("adapter_dtype", [Dtype.FP32, Dtype.BF16], ids=["peft_default_fp32", "bf16"])
def test_adapter_bytes_equal_torch_after_one_adamw_step(adapter_dtype: Dtype) -> None:
    """A bf16 Llama with LoRA on q, v after one backward and one ``torch.optim.AdamW`` step. peft's default
    (``autocast_adapter_dtype=True``) upcasts the adapters to fp32; with it off they stay bf16, and AdamW's
    ``zeros_like`` states follow. memplan's adapter weights, gradients and m, v bytes must equal what torch
    allocated (AdamW's per-tensor ``step`` scalar is not counted)."""
    make_config, spec, _ = CASES["llama"]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_config(make_config()).to(torch.bfloat16)
        model = peft_lib.get_peft_model(model, peft_lib.LoraConfig(r=R, target_modules=["q_proj", "v_proj"]),
                                        autocast_adapter_dtype=adapter_dtype is Dtype.FP32)
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params)
    ids = torch.randint(0, V, (1, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    optim.step()
    states = [s[k] for s in optim.state.values() for k in ("exp_avg", "exp_avg_sq")]
    measured = {"weights/lora_adapters": sum(p.numel() * p.element_size() for p in params),
                "gradients/lora_adapters": sum(p.grad.numel() * p.grad.element_size() for p in params),
                "optimizer/adam_m+v": sum(s.numel() * s.element_size() for s in states)}
    cfg = JobConfig(job=Job.LORA, lora=LoraConfig(rank=R, targets=("q", "v"), dtype=adapter_dtype))
    ctx = Context(build_architecture(spec), cfg, GPU, HostSpec())
    bufs = {b.component: b.nbytes for b in peft.adapter_buffers(ctx)}
    predicted = {"weights/lora_adapters": bufs["weights/lora_adapters"],
                 "gradients/lora_adapters": bufs["gradients/lora_adapters"],
                 "optimizer/adam_m+v": bufs["optimizer/adam_m"] + bufs["optimizer/adam_v"]}
    assert predicted == measured
