"""Weight rows: published model sizes (QLoRA 65B, llama.cpp GGUF files), sharding, row names."""

from __future__ import annotations

import pytest

from memplan.arch.tensors import Architecture, Layer, Role, Tensor
from memplan.catalog.schema import Family, HostSpec, ModelSpec
from memplan.catalog.store import catalog_gpu
from memplan.config import JobConfig
from memplan.dtypes import Dtype
from memplan.errors import MemplanError
from memplan.memory import weights as w
from memplan.memory.breakdown import Tier
from memplan.memory.context import Context
from memplan.memory.quant import get_format, is_quantized


def llama(*, d: int, f: int, layers: int, heads: int, kv: int, vocab: int, tied: bool = False) -> Architecture:
    """A Llama-family architecture built by hand, one Tensor per HF parameter (shape (out, in))."""
    spec = ModelSpec(name="test-llama", source="test", family=Family.LLAMA, hidden_size=d, intermediate_size=f,
                     num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                     vocab_size=vocab, tie_word_embeddings=tied)
    hd = d // heads

    def lin(name: str, out: int, inp: int, proj: str) -> Tensor:
        return Tensor(f"{name}.weight", (out, inp), Role.LINEAR, frozenset({proj}))

    block = Layer((
        lin("self_attn.q_proj", heads * hd, d, "q"), lin("self_attn.k_proj", kv * hd, d, "k"),
        lin("self_attn.v_proj", kv * hd, d, "v"), lin("self_attn.o_proj", d, heads * hd, "o"),
        lin("mlp.gate_proj", f, d, "gate"), lin("mlp.up_proj", f, d, "up"), lin("mlp.down_proj", d, f, "down"),
        Tensor("input_layernorm.weight", (d,), Role.NORM), Tensor("post_attention_layernorm.weight", (d,), Role.NORM),
    ))
    post = [Tensor("model.norm.weight", (d,), Role.NORM)]
    if not tied:
        post.append(Tensor("lm_head.weight", (vocab, d), Role.LM_HEAD))
    pre = (Tensor("model.embed_tokens.weight", (vocab, d), Role.EMBEDDING),)
    return Architecture(spec, pre, (block,) * layers, tuple(post))


LLAMA2_7B = llama(d=4096, f=11008, layers=32, heads=32, kv=32, vocab=32000)
LLAMA_65B = llama(d=8192, f=22016, layers=80, heads=64, kv=64, vocab=32000)
TINY = llama(d=256, f=512, layers=2, heads=4, kv=2, vocab=1000)


def ctx(arch: Architecture, **cfg: object) -> Context:
    return Context(arch, JobConfig(**cfg), catalog_gpu("h100"), HostSpec())


def test_hand_built_shapes_match_published_counts() -> None:
    assert LLAMA2_7B.params == 6_738_415_616  # Llama-2-7b-hf model card
    assert LLAMA_65B.params == 65_285_660_672  # published_cases.yaml: 65.29B


THEBLOKE_LLAMA2_7B_GB = {"q8_0": 7.16, "q6_k": 5.53, "q5_k_m": 4.78, "q4_k_m": 4.08, "q4_0": 3.83, "q3_k_m": 3.30}


@pytest.mark.parametrize(("fmt", "file_gb"), sorted(THEBLOKE_LLAMA2_7B_GB.items()))
def test_gguf_llama2_7b_matches_published_file_sizes(fmt: str, file_gb: float) -> None:
    """File sizes (GB = 1e9 B, two decimals) from the "Provided files" table of TheBloke/Llama-2-7B-GGUF
    on Hugging Face (llama-2-7b.Q4_K_M.gguf: 4.08 GB). The file adds metadata (vocabulary, ~1 MB) to
    the tensors, so 0.5% is ample. Not checked: Q2_K (2.83 GB there), made in Sept. 2023 under an
    older Q2_K mix; today's llama-quant.cpp rules give 2.53 GB."""
    wb = w.context_weight_bytes(ctx(LLAMA2_7B, job="infer", quant=fmt))
    assert (wb.gpu + wb.host_quantized + wb.host_unquantized) / 1e9 == pytest.approx(file_gb, rel=0.005)


def test_gguf_llama2_7b_q4_k_m_exact() -> None:
    """By hand: token_embd Q4_K 73,728,000 (host); output Q6_K 107,520,000; per layer q,k,o,gate,up
    Q4_K 79,036,416 + norms 32,768; attn_v and ffn_down Q6_K (50,749,440) on the 16 use_more_bits
    layers, else Q4_K (34,799,616); final norm 16,384."""
    wb = w.context_weight_bytes(ctx(LLAMA2_7B, job="infer", quant="q4_k_m"))
    layers = 32 * (79_036_416 + 32_768) + 16 * 50_749_440 + 16 * 34_799_616
    assert wb.host_quantized == 73_728_000
    assert wb.gpu == 107_520_000 + layers + 16_384
    assert wb.gpu + wb.host_quantized == 4_080_263_168


def test_gguf_host_input_layer_and_tied_duplicate() -> None:
    """llama.cpp keeps token_embd on the CPU; a tied model also loads it as the output layer on GPU."""
    c = ctx(TINY, job="infer", quant="q8_0")
    assert all(r.tier is Tier.GPU for r in w.rows(c))
    host = w.host_rows(c)
    assert [(r.component, r.tier, r.bytes) for r in host] == [("weights/quantized", Tier.CPU, 1000 * 8 * 34)]
    tied = llama(d=256, f=512, layers=2, heads=4, kv=2, vocab=1000, tied=True)
    untied_gpu, tied_gpu = w.total_weight_bytes(c), w.total_weight_bytes(ctx(tied, job="infer", quant="q8_0"))
    assert tied_gpu == untied_gpu  # Q8_0 file: output rule keeps Q8_0, duplicate replaces lm_head
    assert w.host_rows(ctx(tied, job="infer", quant="q4_k_m"))[0].bytes == 1000 * 1 * 210  # tied: Q6_K


def test_llama_65b_nf4_dq() -> None:
    """published_cases.yaml ``qlora-65b-single-48gb``: QLoRA's 33.7 GB counts all 65.29e9 parameters
    at 4.127 bits. bitsandbytes (via transformers) quantizes only the nn.Linear layers inside the
    blocks; embed_tokens and lm_head (2 x 32000 x 8192) and the norms stay in bf16, which adds
    524,288,000 x (16 - 4.127) / 8 ≈ 0.78 GB: memplan's figure is 34.46 GB. By hand per layer:
    4 x 34,620,484 (8192 x 8192) + 3 x 93,040,708 (22016 x 8192) bytes."""
    c = ctx(LLAMA_65B, job="qlora")
    rows = {r.component: r.bytes for r in w.rows(c)}
    assert rows["weights/quantized"] == 80 * (4 * 34_620_484 + 3 * 93_040_708)
    assert rows["weights/unquantized"] == 2 * (2 * 32000 * 8192 + 161 * 8192)
    assert w.total_weight_bytes(c) == 34_459_538_624
    paper_bits = 4.127
    assert 65_285_660_672 * paper_bits / 8 / 1e9 == pytest.approx(33.7, rel=0.01)
    kept = 2 * 32000 * 8192 + 161 * 8192
    as_paper = rows["weights/quantized"] + kept * paper_bits / 8
    assert as_paper / 1e9 == pytest.approx(33.7, rel=0.01)
    assert w.total_weight_bytes(c) < 48e9  # fits the paper's 48 GB GPU, as weights


def test_row_names_and_dtypes() -> None:
    plain = w.rows(ctx(TINY, job="full"))
    assert [(r.component, r.tier, r.bytes) for r in plain] == [("weights/params", Tier.GPU, 2 * TINY.params)]
    assert w.total_weight_bytes(ctx(TINY, job="full", dtype=Dtype.FP32)) == 4 * TINY.params
    assert all(r.source for r in plain)
    qrows = w.rows(ctx(TINY, job="qlora"))
    assert [r.component for r in qrows] == ["weights/quantized", "weights/unquantized"]
    assert all(r.source and r.tier is Tier.GPU for r in qrows)
    assert "nf4-dq" in qrows[0].note
    assert w.effective_quant(JobConfig(job="qlora", quant="int8")) == "int8"
    assert w.effective_quant(JobConfig(job="lora")) is None


def test_unknown_quant_in_config() -> None:
    with pytest.raises(MemplanError, match="Did you mean awq-4bit"):
        w.rows(ctx(TINY, job="infer", quant="awq"))


def test_sharded_bytes_round_up() -> None:
    t = Tensor("q.weight", (256, 512), Role.LINEAR, frozenset({"q"}))
    # nf4-dq 68,708 B over tp=3: a rank holds ceil(131,072/3) = 43,691 elements -> ceil(68,708 x 43,691 / 131,072)
    assert w.sharded_bytes(t, bytes_each=68_708, tp=3) == 22_903
    experts = Tensor("e.weight", (256, 512), Role.LINEAR, frozenset({"gate"}), copies=8, routed=True)
    assert w.sharded_bytes(experts, bytes_each=68_708, tp=2, ep=4) == 2 * 34_354
    norm = Tensor("n.weight", (4096,), Role.NORM)
    assert w.sharded_bytes(norm, bytes_each=8192, tp=4) == 8192  # replicated


def test_tensor_parallel_rows() -> None:
    c = ctx(TINY, job="infer", quant="nf4-dq", tp=2, gpus_per_node=2)
    rows = {r.component: r.bytes for r in w.rows(c)}
    # per layer, whole -> per rank: q, o (256x256) 32,768 + 1,024 + 16 + 1,092 = 34,900 -> 17,450;
    # k, v (128x256) 16,384 + 512 + 8 + 1,092 = 17,996 -> 8,998; gate, up, down (131,072) 68,708 -> 34,354
    per_layer = 2 * 17_450 + 2 * 8_998 + 3 * 34_354
    assert rows["weights/quantized"] == 2 * per_layer
    # bf16: embed_tokens and lm_head split (1000x256 -> 128,000 elements each), 5 norms replicated
    assert rows["weights/unquantized"] == 2 * (2 * 128_000 + 5 * 256)


def test_pipeline_stage_and_pure_function_agree() -> None:
    c = ctx(TINY, job="full", pp=2, gpus_per_node=2)
    placed = w.placed_tensors(c)
    assert len(placed) == len(c.tensors)
    expect = w.weight_bytes_per_gpu(placed, dtype=Dtype.BF16, quant=None, tp=1, ep=1, num_layers=2)
    assert w.total_weight_bytes(c) == expect == 2 * sum(t.numel for t in c.tensors)


def test_build_architecture_agrees_when_available() -> None:
    """The family builder (another module) and the hand-built Llama-2-7B give the same GGUF size."""
    build = pytest.importorskip("memplan.arch.build", reason="family builders not available")
    from memplan.catalog.store import catalog_model

    arch = build.build_architecture(catalog_model("llama-2-7b"))
    built = w.context_weight_bytes(ctx(arch, job="infer", quant="q4_k_m"))
    assert built.gpu + built.host_quantized == 4_080_263_168


def test_bnb_policy_matches_transformers_linear_modules() -> None:
    """The tensors memplan quantizes with bitsandbytes are exactly the modules transformers would
    convert: ``type(m) is nn.Linear`` and not in ``get_keys_to_not_convert`` (lm_head)."""
    torch = pytest.importorskip("torch", reason="needs torch")
    transformers = pytest.importorskip("transformers", reason="needs transformers")
    from transformers.quantizers.base import get_keys_to_not_convert

    model = transformers.LlamaForCausalLM(_tiny_hf_config(transformers))
    skip = set(get_keys_to_not_convert(model))
    converted = sum(m.weight.numel() for n, m in model.named_modules() if type(m) is torch.nn.Linear and n not in skip)
    fmt = get_format("nf4")
    ours = sum(t.numel for i, layer in enumerate(TINY.layers) for t in layer.tensors
               if is_quantized(fmt, t, layer_index=i)) + sum(
        t.numel for t in TINY.pre + TINY.post if is_quantized(fmt, t, layer_index=None))
    assert converted == ours
    assert sum(p.numel() for p in model.parameters()) == TINY.params


def _tiny_hf_config(transformers: object) -> object:
    return transformers.LlamaConfig(  # type: ignore[attr-defined]
        hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=False,
    )


@pytest.mark.parametrize("fmt", ["nf4-dq", "fp4", "int8"])
def test_bitsandbytes_model_bytes_match(fmt: str, tmp_path: object) -> None:
    """A tiny random Llama loaded by transformers with BitsAndBytesConfig (CPU backend): parameters
    plus quantization states (absmax, codes, offset, nested state, SCB) equal memplan's bytes."""
    torch = pytest.importorskip("torch", reason="needs torch")
    transformers = pytest.importorskip("transformers", reason="needs transformers")
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    pytest.importorskip("accelerate", reason="transformers' bnb integration needs accelerate")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(_tiny_hf_config(transformers)).to(torch.bfloat16).save_pretrained(tmp_path)
    kw = {"load_in_8bit": True} if fmt == "int8" else {
        "load_in_4bit": True, "bnb_4bit_quant_type": fmt[:3], "bnb_4bit_use_double_quant": fmt.endswith("-dq")}
    model = transformers.LlamaForCausalLM.from_pretrained(
        tmp_path, quantization_config=transformers.BitsAndBytesConfig(**kw), dtype=torch.bfloat16, device_map="cpu")
    total = 0
    for p in model.parameters():
        total += p.numel() * p.element_size()
        qs = getattr(p, "quant_state", None)
        parts = [getattr(p, "SCB", None)]
        if qs is not None:
            nested = qs.state2
            parts += [qs.absmax, qs.code, qs.offset, nested and nested.absmax, nested and nested.code]
        total += sum(t.numel() * t.element_size() for t in parts if t is not None)
    assert total == w.total_weight_bytes(ctx(TINY, job="infer", quant=fmt))


@pytest.mark.parametrize("model", ["deepseek-v3", "mixtral-8x7b", "gemma-2-9b", "llama-3.1-8b"])
@pytest.mark.parametrize("cfg", [{}, {"job": "qlora"}, {"tp": 2, "pp": 3, "gpus_per_node": 6},
                                 {"dtype": "fp16", "ep": 2, "tp": 2, "gpus_per_node": 4},
                                 {"job": "infer", "quant": "int8"}])
def test_alike_blocks_weighed_once_give_the_bytes_of_every_tensor(model: str, cfg: dict) -> None:
    """The stage's weights weighed once per class of alike blocks and counted are ``weight_bytes`` over every placed
    tensor (independent path: the per-tensor sum), on every pipeline stage, quantized and not."""
    from memplan.arch.build import build_architecture
    from memplan.catalog.store import catalog_model

    arch = build_architecture(catalog_model(model))
    job = JobConfig(**cfg)
    for stage in range(job.pp):
        ctx = Context(arch, job, catalog_gpu("h100"), HostSpec(), stage_override=stage)
        quant = w.effective_quant(job)
        traits = w._traits(arch) if w.job_formats(job) else w.DEFAULT_TRAITS
        every = w.weight_bytes(w.placed_tensors(ctx), dtype=job.dtype, quant=quant, tp=job.tp, ep=job.ep,
                               num_layers=len(arch.layers), traits=traits, head=w.quantized_head(job))
        assert w._gpu_weight_bytes(ctx, quant, traits) == every


@pytest.mark.parametrize("model", ["deepseek-v3", "mixtral-8x7b", "gemma-2-9b"])
@pytest.mark.parametrize("cfg", [{"job": "qlora"}, {"tp": 2, "pp": 3, "gpus_per_node": 6},
                                 {"job": "qlora", "map": True}])
def test_alike_placed_keeps_the_first_of_every_alike_tensor_in_order(model: str, cfg: dict) -> None:
    """``alike_placed`` leaves out only tensors alike to an earlier one: the distinct ``alike_key``s, in their order
    of first appearance, are those of every placed tensor (a walk that skips seen keys reads the same)."""
    from memplan.arch.build import build_architecture
    from memplan.catalog.store import catalog_model

    arch = build_architecture(catalog_model(model))
    cfg = dict(cfg)  # the parameter is shared between the models
    if cfg.pop("map", False):  # the first 4 blocks in nf4 with double quantization, the rest 16-bit
        cfg = {**cfg, "quant_map": ("nf4-dq",) * 4 + (None,) * (len(arch.layers) - 4)}
    job = JobConfig(**cfg)
    for stage in range(job.pp):
        ctx = Context(arch, job, catalog_gpu("h100"), HostSpec(), stage_override=stage)

        def keys(placed: list) -> list:
            return list(dict.fromkeys(w.alike_key(w.layer_format(job, i), t, i) for t, i in placed))

        assert keys(w.alike_placed(ctx)) == keys(w.placed_tensors(ctx))
        assert len(w.alike_placed(ctx)) < len(w.placed_tensors(ctx))
