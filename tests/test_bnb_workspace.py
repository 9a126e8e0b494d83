"""bitsandbytes' whole-weight transients (memory.bnb_workspace) and Lightning Fabric's integration (litgpt).

Expectations are written from the engines' source: MatMul4Bit.forward's ``F.dequantize_4bit(B, state).to(A.dtype)``
(one 16-bit copy in the state's dtype, a second when cast), Lightning's ``_quantize_weight`` (fp16 state,
``double_quant`` making CB and CBt), and Lightning replacing every ``nn.Linear`` (lm_head included)."""

from __future__ import annotations

import pytest

from memplan import estimate
from memplan.errors import MemplanError
from memplan.memory.breakdown import Phase, Tier
from memplan.memory.quant import bnb4_bytes

LLAMA2_7B = dict(hidden=4096, ffn=11008, vocab=32000)
FALCON_7B = dict(hidden=4544, vocab=65024)
SIXTEEN = 2  # bytes of a 16-bit element


def rows(est: object) -> dict[str, object]:
    return {r.component: r for r in est.rows if r.tier is Tier.GPU}  # type: ignore[attr-defined]


def qlora(model: str = "llama-2-7b", **kw: object) -> object:
    return estimate(model, "a100-sxm-40gb", job="qlora", quant="nf4", seq_len=512, **kw)


def test_transformers_qlora_dequantizes_the_largest_block_linear_once() -> None:
    row = rows(qlora())["activations/dequant_workspace"]
    assert row.bytes == LLAMA2_7B["ffn"] * LLAMA2_7B["hidden"] * SIXTEEN  # gate/up/down; lm_head stays bf16
    assert row.phases == frozenset({Phase.FORWARD})


def test_lightning_qlora_dequantizes_the_quantized_lm_head_in_fp16_then_bf16() -> None:
    row = rows(qlora(bnb_integration="lightning"))["activations/dequant_workspace"]
    assert row.bytes == 2 * LLAMA2_7B["vocab"] * LLAMA2_7B["hidden"] * SIXTEEN
    assert row.phases == frozenset({Phase.FORWARD, Phase.BACKWARD_START})
    fp16 = rows(qlora(bnb_integration="lightning", dtype="fp16"))["activations/dequant_workspace"]
    assert fp16.bytes == LLAMA2_7B["vocab"] * LLAMA2_7B["hidden"] * SIXTEEN  # state dtype = compute dtype


def test_lightning_quantizes_the_output_layer_and_keeps_the_embedding() -> None:
    plain, lit = rows(qlora()), rows(qlora(bnb_integration="lightning"))
    head = LLAMA2_7B["vocab"] * LLAMA2_7B["hidden"]
    assert plain["weights/unquantized"].bytes - lit["weights/unquantized"].bytes == head * SIXTEEN
    assert lit["weights/quantized"].bytes - plain["weights/quantized"].bytes == bnb4_bytes(numel=head, double_quant=False)


def falcon_infer(quant: str, **kw: object) -> object:
    from memplan.measure.published_gpu import litgpt_model

    return estimate(litgpt_model("falcon-7b"), "a100-sxm-40gb", job="infer", quant=quant, micro_batch=1,
                    infer={"context": 262}, bnb_integration="lightning", cuda_context_bytes=0,
                    allocator_reserve_pct=0, **kw)


def test_lightning_int8_load_holds_the_fp16_copy_and_both_int8_matrices() -> None:
    est = falcon_infer("int8", dtype="fp16")
    head = FALCON_7B["vocab"] * FALCON_7B["hidden"]
    got = rows(est)
    assert got["runtime/quantize_workspace"].bytes == head * (SIXTEEN + 1 + 1)  # B (fp16), CB, CBt
    assert "activations/dequant_workspace" not in got  # LLM.int8 forward runs int8 kernels
    assert est.peak_phase(Tier.GPU) is Phase.LOAD


def test_lightning_nf4_prefill_dequantizes_the_head_twice_and_load_quantizes_it_once() -> None:
    est = falcon_infer("nf4")
    head = FALCON_7B["vocab"] * FALCON_7B["hidden"]
    got = rows(est)
    assert got["activations/dequant_workspace"].bytes == 2 * head * SIXTEEN
    assert got["activations/dequant_workspace"].phases == frozenset({Phase.PREFILL})  # one sequence decodes by gemv
    assert got["runtime/quantize_workspace"].bytes == head * SIXTEEN + bnb4_bytes(numel=head, double_quant=False)
    assert est.peak_phase(Tier.GPU) is Phase.PREFILL


def test_batched_decode_dequantizes_too() -> None:
    est = estimate("llama-2-7b", "a100-sxm-40gb", job="infer", quant="nf4", micro_batch=2, infer={"context": 512})
    assert rows(est)["activations/dequant_workspace"].phases == frozenset({Phase.PREFILL, Phase.DECODE})


@pytest.mark.parametrize(("job", "quant"), [("lora", None), ("infer", "gptq-4bit"), ("infer", None)])
def test_lightning_without_a_bitsandbytes_format_is_an_error(job: str, quant: str | None) -> None:
    with pytest.raises(MemplanError, match="bnb_integration"):
        estimate("llama-2-7b", "a100-sxm-40gb", job=job, quant=quant, bnb_integration="lightning")


def test_gptq_exllama_keeps_an_fp16_buffer_of_the_largest_linear() -> None:
    """auto_gptq autogptq_post_init: temp_dq = zeros(max qweight.numel() * 8, fp16); Llama-2-7B's MLP is 11008 x 4096."""
    est = estimate("llama-2-7b", "a100-sxm-40gb", job="infer", quant="gptq-4bit", dtype="fp16", infer={"context": 512})
    assert rows(est)["runtime/exllama_temp_dq"].bytes == LLAMA2_7B["ffn"] * LLAMA2_7B["hidden"] * SIXTEEN
