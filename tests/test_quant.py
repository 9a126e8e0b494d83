"""Quantization formats: byte counts by hand, QLoRA's published bits, llama.cpp's mix rules."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest

from memplan.arch.tensors import Role, Tensor
from memplan.dtypes import Dtype
from memplan.errors import MemplanError
from memplan.memory import quant as q

OUT, IN = 256, 512  # a tiny (out, in) linear weight: 131,072 elements


def lin(out: int = OUT, inp: int = IN, proj: str = "q", name: str = "self_attn.q_proj.weight", **kw) -> Tensor:
    return Tensor(name, (out, inp), Role.LINEAR, frozenset(proj.split(",")), **kw)


HAND_BYTES = {
    # LLM.int8: CB int8 [256, 512] + SCB fp32 [256]
    "int8": 256 * 512 + 4 * 256,  # 132,096
    # 4-bit: packed 131,072 / 2 + fp32 absmax per 64-block (2,048 blocks) + 16-entry fp32 code
    "nf4": 65_536 + 4 * 2_048 + 16 * 4,  # 73,792
    "fp4": 65_536 + 4 * 2_048 + 16 * 4,
    # double quant: packed + uint8 absmax (2,048) + fp32 nested absmax per 256 (8) + fp32 offset
    # + 16-entry code + 256-entry fp32 nested code
    "nf4-dq": 65_536 + 2_048 + 4 * 8 + 4 + 64 + 1_024,  # 68,708
    "fp4-dq": 65_536 + 2_048 + 4 * 8 + 4 + 64 + 1_024,
    # GPTQ: qweight int32 [512/8, 256] + qzeros int32 [512/128, 256/8] + scales fp16 [4, 256] + g_idx int32 [512]
    "gptq-4bit": 4 * 64 * 256 + 4 * 4 * 32 + 2 * 4 * 256 + 4 * 512,  # 70,144
    # AWQ GEMM: qweight int32 [512, 256/8] + qzeros int32 [4, 32] + scales fp16 [4, 256]
    "awq-4bit": 4 * 512 * 32 + 4 * 4 * 32 + 2 * 4 * 256,  # 68,096
    # GGUF, an attn_q tensor (no mix rule applies): rows of 512 = 16 blocks of 32 or 2 blocks of 256
    "q8_0": 256 * 16 * 34,  # 139,264
    "q4_0": 256 * 16 * 18,  # 73,728
    "q6_k": 256 * 2 * 210,  # 107,520
    "q5_k_m": 256 * 2 * 176,  # 90,112
    "q4_k_m": 256 * 2 * 144,  # 73,728
    "q3_k_m": 256 * 2 * 110,  # 56,320
    "q2_k": 256 * 2 * 84,  # 43,008
}


def test_every_format_has_a_hand_count() -> None:
    assert set(HAND_BYTES) == set(q.FORMATS)


@pytest.mark.parametrize("fmt", sorted(HAND_BYTES))
def test_tiny_matrix_exact_bytes(fmt: str) -> None:
    assert q.tensor_bytes(fmt, lin(), layer_index=5, num_layers=32) == HAND_BYTES[fmt]
    three = lin(copies=3, routed=False)
    assert q.tensor_bytes(fmt, three, layer_index=5, num_layers=32) == 3 * HAND_BYTES[fmt]


@pytest.mark.parametrize(
    ("shape", "dq", "no_dq"),
    [((4097, 3), 7_435, 6_982), ((33, 97), 2_748, 1_869), ((1000, 1000), 516_965, 562_564)],
)
def test_bnb4_odd_shapes_match_bitsandbytes(shape: tuple[int, int], dq: int, no_dq: int) -> None:
    """Sizes measured with bitsandbytes 0.50.2 ``functional.quantize_4bit(W, blocksize=64)`` on CPU
    (packed + absmax + code [+ offset + state2.absmax + state2.code]): partial blocks keep one absmax."""
    t = lin(*shape)
    assert q.tensor_bytes("nf4-dq", t, layer_index=0, num_layers=1) == dq
    assert q.tensor_bytes("nf4", t, layer_index=0, num_layers=1) == no_dq


def test_qlora_bits_per_param() -> None:
    """published_cases.yaml ``qlora-nf4-double-quant-bits`` (QLoRA, Dettmers et al. 2023, Sec. 3):
    NF4 at blocksize 64 with fp32 constants costs 4.5 bits/param, double quantization 4.127
    (4 + 8/64 + 32/(64·256)), saving 0.373 bits/param, "about 3 GB" for a 65B model."""
    no_dq, dq = q.bits_per_param("nf4"), q.bits_per_param("nf4-dq")
    assert no_dq == Fraction(9, 2)
    assert float(dq) == pytest.approx(4.127, rel=1e-4)
    assert float(no_dq - dq) == pytest.approx(0.373, rel=1e-3)
    saved_bytes = 65_000_000_000 * (no_dq - dq) / 8
    assert round(float(saved_bytes) / 1e9, 1) == 3.0
    # A real 8192 x 8192 matrix pays the per-tensor constants (1,092 B) on top: still 4.127 to 0.01%.
    assert float(q.bits_per_param("nf4-dq", shape=(8192, 8192))) == pytest.approx(4.127, rel=1e-4)
    assert q.bits_per_param("nf4-dq", shape=(8192, 8192)) > dq


def test_nominal_bits_of_other_formats() -> None:
    assert q.bits_per_param("int8") == 8
    assert q.bits_per_param("gptq-4bit") == Fraction(4) + Fraction(16 + 4, 128)  # 4.15625
    assert q.bits_per_param("q4_k_m") == Fraction(144 * 8, 256)  # 4.5
    assert q.bits_per_param("q6_k") == Fraction(210 * 8, 256)  # 6.5625
    assert q.bits_per_param("q8_0") == Fraction(34 * 8, 32)  # 8.5
    # int8 pays 32 bits per output row: 8 + 32/512 on the tiny matrix
    assert q.bits_per_param("int8", shape=(OUT, IN)) == 8 + Fraction(32, 512)


def test_unknown_format_lists_known_ones_with_a_suggestion() -> None:
    with pytest.raises(MemplanError, match=r"Did you mean nf4-dq") as err:
        q.get_format("nf4dq")
    assert "gptq-4bit" in str(err.value) and "q4_k_m" in str(err.value)
    with pytest.raises(MemplanError, match=r"Did you mean .*q4_k_m"):
        q.tensor_bytes("q4_k", lin(), layer_index=0, num_layers=1)


def test_params_only_model_counts_at_nominal_bits() -> None:
    """A paper's bare parameter count (one 1-D LINEAR pseudo-tensor) costs P · bits / 8, rounded up."""
    params = Tensor("params", (65_285_660_672,), Role.LINEAR)
    nbytes = q.tensor_bytes("nf4-dq", params, layer_index=None, num_layers=0)
    assert nbytes == math.ceil(65_285_660_672 * Fraction(4 * 64 * 256 + 8 * 256 + 32, 64 * 256) / 8)
    assert nbytes / 1e9 == pytest.approx(33.7, rel=0.01)


# --- which tensors each library quantizes --------------------------------------------------------------

NORM = Tensor("input_layernorm.weight", (4096,), Role.NORM)
BIAS = Tensor("self_attn.q_proj.bias", (4096,), Role.BIAS)
EMBED = Tensor("model.embed_tokens.weight", (32000, 4096), Role.EMBEDDING)
HEAD = Tensor("lm_head.weight", (32000, 4096), Role.LM_HEAD)
ROUTER = Tensor("block_sparse_moe.gate.weight", (8, 4096), Role.ROUTER)
EXPERTS = lin(14336, 4096, "gate", "block_sparse_moe.experts.*.w1.weight", copies=8, routed=True)
SHARED = lin(2816, 4096, "gate", "mlp.shared_experts.gate_proj.weight")


@pytest.mark.parametrize(
    ("fmt", "tensor", "layer", "quantized"),
    [
        ("nf4", lin(), 0, True), ("nf4", NORM, 0, False), ("nf4", BIAS, 0, False), ("nf4", EMBED, None, False),
        ("nf4", HEAD, None, False), ("nf4", ROUTER, 0, False), ("nf4", SHARED, 0, True),
        ("nf4", EXPERTS, 0, False),  # transformers >= 5: fused 3-D experts are not nn.Linear
        ("int8", EXPERTS, 0, False), ("nf4", lin(), None, True),  # e.g. an MTP projection: still nn.Linear
        ("gptq-4bit", EXPERTS, 0, True), ("gptq-4bit", ROUTER, 0, False), ("gptq-4bit", HEAD, None, False),
        ("gptq-4bit", lin(), None, False), ("awq-4bit", EXPERTS, 0, True), ("awq-4bit", EMBED, None, False),
        ("q4_k_m", EMBED, None, True), ("q4_k_m", HEAD, None, True), ("q4_k_m", ROUTER, 0, False),
        ("q4_k_m", NORM, 0, False), ("q4_k_m", EXPERTS, 0, True),
    ],
)
def test_which_tensors_are_quantized(fmt: str, tensor: Tensor, layer: int | None, quantized: bool) -> None:
    st = q.storage(fmt, tensor, layer_index=layer, num_layers=32, dtype=Dtype.BF16)
    assert st.quantized is quantized


def test_unquantized_tensors_keep_the_compute_dtype_or_f32_in_gguf() -> None:
    assert q.tensor_bytes("nf4", NORM, layer_index=0, num_layers=1, dtype=Dtype.BF16) == 2 * 4096
    assert q.tensor_bytes("nf4", NORM, layer_index=0, num_layers=1, dtype=Dtype.FP32) == 4 * 4096
    assert q.tensor_bytes("nf4", EXPERTS, layer_index=0, num_layers=1) == 8 * 14336 * 4096 * 2
    assert q.tensor_bytes("gptq-4bit", HEAD, layer_index=None, num_layers=1, dtype=Dtype.FP16) == 2 * 32000 * 4096
    assert q.tensor_bytes("q4_k_m", BIAS, layer_index=0, num_layers=1, dtype=Dtype.BF16) == 4 * 4096
    assert q.tensor_bytes("q4_k_m", ROUTER, layer_index=0, num_layers=1) == 4 * 8 * 4096


# --- llama.cpp mix rules ---------------------------------------------------------------------------------


def gtype(fmt: str, tensor: Tensor, layer: int | None = 10, n: int = 32, **traits: object) -> str:
    return q.gguf_tensor_type(fmt, tensor, layer_index=layer, num_layers=n, traits=q.MixTraits(**traits))


V = lin(1024, 4096, "v", "self_attn.v_proj.weight")
K = lin(1024, 4096, "k", "self_attn.k_proj.weight")
OUT_PROJ = lin(4096, 4096, "o", "self_attn.o_proj.weight")
DOWN = lin(4096, 11008, "down", "mlp.down_proj.weight")  # 11,008 = 43 blocks of 256


def test_use_more_bits_layers() -> None:
    """First and last eighth plus every third layer in between (llama-quant.cpp ``use_more_bits``)."""
    assert {i for i in range(32) if q.use_more_bits(i, 32)} == {0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27,
                                                                 28, 29, 30, 31}


def test_q4_k_m_mix() -> None:
    assert [gtype("q4_k_m", V, i) for i in (0, 4, 6, 31)] == ["Q6_K", "Q4_K", "Q6_K", "Q6_K"]
    assert [gtype("q4_k_m", DOWN, i) for i in (3, 5, 9)] == ["Q6_K", "Q4_K", "Q6_K"]
    assert {gtype("q4_k_m", t, 0) for t in (lin(), K, OUT_PROJ, SHARED)} == {"Q4_K"}
    assert gtype("q4_k_m", HEAD, None) == "Q6_K"
    assert gtype("q4_k_m", EMBED, None) == "Q4_K"
    assert gtype("q4_k_m", EMBED, None, tied=True) == "Q6_K"  # no output tensor: token_embd takes its rule
    assert gtype("q4_k_m", V, 10, n=80, gqa=8, is_70b=True) == "Q5_K"  # 70B bumps Q4_K attn_v
    assert gtype("q4_k_m", HEAD, None, falcon=True) == "Q8_0"
    assert gtype("q4_k_m", DOWN, 0, falcon=True) == "Q6_K"  # Falcon: i < n/16
    assert gtype("q4_k_m", DOWN, 5, falcon=True) == "Q4_K"


def test_q3_k_m_q5_k_m_q2_k_mixes() -> None:
    assert [gtype("q3_k_m", V, i) for i in (0, 1, 2)] == ["Q5_K", "Q5_K", "Q4_K"]
    assert [gtype("q3_k_m", DOWN, i) for i in (1, 2, 10)] == ["Q5_K", "Q4_K", "Q4_K"]  # n/16 = 2
    assert gtype("q3_k_m", DOWN, 10, falcon=True) == "Q3_K"
    assert gtype("q3_k_m", OUT_PROJ) == "Q4_K"
    assert gtype("q3_k_m", lin()) == "Q3_K"
    assert [gtype("q5_k_m", V, i) for i in (0, 4)] == ["Q6_K", "Q5_K"]
    assert gtype("q2_k", V, gqa=8) == "Q4_K"
    assert gtype("q2_k", V, gqa=1) == "Q3_K"
    assert gtype("q2_k", DOWN) == gtype("q2_k", OUT_PROJ) == "Q3_K"
    assert gtype("q2_k", EMBED, None) == "Q2_K"
    assert gtype("q2_k", HEAD, None) == "Q6_K"


def test_eight_expert_rules_and_plain_types() -> None:
    assert gtype("q4_k_m", V, experts=8) == gtype("q4_k_m", K, experts=8) == "Q8_0"
    assert gtype("q4_k_m", OUT_PROJ, experts=8) == "Q5_K"
    assert gtype("q4_0", V, experts=8) == "Q8_0"
    assert gtype("q4_0", HEAD, None) == "Q6_K"
    assert gtype("q8_0", HEAD, None) == "Q8_0"
    assert gtype("q6_k", DOWN, 0) == "Q6_K"


def test_gguf_categories() -> None:
    assert q.gguf_category(lin(3072, 1024, "q,k,v", "self_attn.qkv_proj.weight")) == "attn_qkv"
    assert q.gguf_category(lin(4096, 1024, "gate,up", "mlp.gate_up_proj.weight")) == "ffn_up"
    assert q.gguf_category(lin(4096, 512, "k,v", "self_attn.kv_b_proj.weight")) == "attn_kv_b"
    assert q.gguf_category(lin(576, 1024, "k,v", "self_attn.kv_a_proj_with_mqa.weight")) == "other"
    assert gtype("q4_k_m", lin(3072, 1024, "q,k,v", "self_attn.qkv_proj.weight"), 0) == "Q6_K"


def test_gguf_row_fallbacks() -> None:
    """Rows not a multiple of the block fall back (llama-quant.cpp ``tensor_type_fallback``):
    Q4_K -> Q5_0, Q6_K -> Q8_0, Q2_K/Q3_K -> Q4_0; then F16 when rows are not a multiple of 32;
    a 32-block type has no fallback and llama-quantize stops."""
    odd = lin(64, 4000)  # 4000 = 125 blocks of 32, not a multiple of 256
    assert gtype("q4_k_m", odd) == "Q5_0"
    assert q.tensor_bytes("q4_k_m", odd, layer_index=10, num_layers=32) == 64 * 125 * 22
    assert gtype("q4_k_m", lin(4096, 4000, "v", "self_attn.v_proj.weight"), 0) == "Q8_0"
    assert gtype("q2_k", odd) == "Q4_0"
    assert gtype("q4_k_m", lin(64, 100)) == "F16"
    assert q.tensor_bytes("q4_k_m", lin(64, 100), layer_index=1, num_layers=32) == 2 * 64 * 100
    with pytest.raises(MemplanError, match="no tensor type fallback"):
        gtype("q8_0", lin(64, 100))


def test_ggml_block_sizes_match_gguf_package() -> None:
    gguf = pytest.importorskip("gguf.constants", reason="the gguf package (llama.cpp's gguf-py) is not installed")
    for name, (blck, size) in q.GGML_TYPES.items():
        assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]] == (blck, size)


def test_bitsandbytes_real_quantization_matches() -> None:
    """Where bitsandbytes is importable, its quantized tensors have exactly memplan's byte counts."""
    torch = pytest.importorskip("torch", reason="needs torch")
    functional = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is not installed")

    def nbytes(*tensors: object) -> int:
        return sum(t.numel() * t.element_size() for t in tensors)  # type: ignore[attr-defined]

    w = torch.randn(OUT, IN, dtype=torch.bfloat16)
    for fmt in ("nf4", "fp4", "nf4-dq", "fp4-dq"):
        packed, st = functional.quantize_4bit(w, blocksize=64, quant_type=fmt[:3], compress_statistics="dq" in fmt)
        total = nbytes(packed, st.absmax, st.code)
        if st.nested:
            total += nbytes(st.offset, st.state2.absmax, st.state2.code)
        assert total == q.tensor_bytes(fmt, lin(), layer_index=0, num_layers=1)
    cb, scb, _ = functional.int8_vectorwise_quant(w.half())
    assert nbytes(cb, scb) == q.tensor_bytes("int8", lin(), layer_index=0, num_layers=1)


def test_transformers_moe_routers_and_experts_are_not_linear() -> None:
    """Why bnb leaves routers and routed experts unquantized: in transformers >= 5 they are not
    ``nn.Linear`` modules, and ``replace_with_bnb_linear`` converts only ``type(m) is nn.Linear``."""
    torch = pytest.importorskip("torch", reason="needs torch")
    transformers = pytest.importorskip("transformers", reason="needs transformers")
    cfg = transformers.MixtralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2, vocab_size=64)
    model = transformers.MixtralForCausalLM(cfg)
    moe = model.model.layers[0].mlp if hasattr(model.model.layers[0], "mlp") else None
    moe = moe or model.model.layers[0].block_sparse_moe
    assert type(moe.gate) is not torch.nn.Linear
    linear_params = {f"{n}.weight" for n, m in model.named_modules() if type(m) is torch.nn.Linear}
    expert_params = [n for n, _ in model.named_parameters() if ".experts." in n]
    assert expert_params and not set(expert_params) & linear_params
