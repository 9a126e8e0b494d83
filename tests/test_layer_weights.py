"""Per-layer weight decisions: ``quant_map`` (a format per layer) and ``infer.offload_map`` (CPU layers).

A uniform map must give the bytes of the plain setting exactly; a mixed map the sum of its layers;
offloading moves whole layers from the GPU rows to one CPU row and adds the largest hooked module
as a transient GPU buffer (accelerate ``AlignDevicesHook(offload=True)``).
"""

from __future__ import annotations

from typing import Any

import pytest

from memplan.arch.build import build_architecture
from memplan.catalog.schema import HostSpec
from memplan.catalog.store import catalog_gpu, catalog_model
from memplan.config import InferConfig, JobConfig
from memplan.errors import MemplanError
from memplan.estimator import Estimate, estimate
from memplan.memory import weight_offload as inf
from memplan.memory import weights as w
from memplan.memory.breakdown import Tier, components
from memplan.memory.context import Context

SMALL = "llama-3.2-1b"  # 16 identical layers, D = 2048, F = 8192, tied embeddings
SMALL_LAYERS = 16
BF16_LAYER = 2 * (2 * 2048 * 2048 + 2 * 512 * 2048 + 3 * 2048 * 8192 + 2 * 2048)
"""One Llama-3.2-1B block in bf16: q, o (D×D), k, v (512×D), gate, up, down (F×D), two norms."""
BF16_MLP_PROJ = 2 * 2048 * 8192
"""Its largest module (gate_proj, up_proj or down_proj) in bf16."""
ARCHS = {name: build_architecture(catalog_model(name)) for name in (SMALL, "llama-2-7b", "mixtral-8x7b")}


def ctx(model: str, **cfg: Any) -> Context:
    return Context(ARCHS[model], JobConfig(**cfg), catalog_gpu("h100"), HostSpec())


def est(model: str = SMALL, **cfg: Any) -> Estimate:
    return estimate(model, "h100", **cfg)


def weight_rows(e: Estimate) -> dict[tuple[str, Tier], int]:
    return {(r.component, r.tier): r.bytes for r in e.rows if r.component.startswith("weights")}


def gpu_weights(e: Estimate) -> int:
    return sum(b for (_, tier), b in weight_rows(e).items() if tier is Tier.GPU)


def modelled_gpu(e: Estimate) -> int:
    """GPU bytes without the runtime rows (the allocator reserve is a share of the rest)."""
    return sum(r.bytes for r in e.rows if r.tier is Tier.GPU and not r.component.startswith("runtime"))


def test_all_none_map_equals_no_quantization() -> None:
    for job in ("infer", "full", "lora"):
        plain, mapped = est(job=job), est(job=job, quant_map=(None,) * SMALL_LAYERS)
        assert weight_rows(mapped) == weight_rows(plain)
        assert list(weight_rows(mapped)) == [("weights/params", Tier.GPU)] + (
            [("weights/lora_adapters", Tier.GPU)] if job == "lora" else []) + (
            [("weights/autocast_copies", Tier.GPU)] if job == "full" else [])  # default engine pytorch: AMP
        assert mapped.rows == plain.rows


@pytest.mark.parametrize(("model", "fmt", "quant"), [
    (SMALL, "nf4", None), (SMALL, "nf4", "nf4"), (SMALL, "int8", None), (SMALL, "gptq-4bit", None),
    ("llama-2-7b", "q4_k_m", "q4_k_m"), ("llama-2-7b", "q3_k_m", "q3_k_m"),
    ("mixtral-8x7b", "nf4-dq", None), ("mixtral-8x7b", "awq-4bit", None), ("mixtral-8x7b", "q4_k_m", "q4_k_m"),
])
def test_uniform_map_equals_quant_byte_for_byte(model: str, fmt: str, quant: str | None) -> None:
    """bitsandbytes/GPTQ/AWQ quantize only inside the blocks, so quant=None outside changes nothing;
    GGUF also quantizes token_embd and output, so there the map needs quant for the outside tensors.
    q4_k_m/q3_k_m apply their use_more_bits and first-layers rules per layer index."""
    layers = len(ARCHS[model].layers)
    plain = est(model, job="infer", quant=fmt)
    mapped = est(model, job="infer", quant=quant, quant_map=(fmt,) * layers)
    assert weight_rows(mapped) == weight_rows(plain)
    assert components(mapped.rows, Tier.GPU) == components(plain.rows, Tier.GPU)
    assert mapped.total(Tier.CPU) == plain.total(Tier.CPU)  # GGUF's host input layer included


def test_qlora_map_equals_default_nf4_dq() -> None:
    plain, mapped = est(job="qlora"), est(job="qlora", quant_map=("nf4-dq",) * SMALL_LAYERS)
    assert weight_rows(mapped) == weight_rows(plain)


def _layer_total(fmt: str | None) -> int:
    """Bytes of one block in ``fmt``, from whole-model totals of uniform maps (the layers are identical)."""
    c = ctx(SMALL, job="infer", quant_map=(fmt,) * SMALL_LAYERS)
    total = w.total_weight_bytes(c) - w.non_layer_weight_bytes(c)
    assert total % SMALL_LAYERS == 0
    return total // SMALL_LAYERS


def test_mixed_map_is_the_sum_of_its_layers() -> None:
    qmap = ("int8",) * 4 + ("nf4",) * 6 + (None,) * 3 + ("nf4-dq",) * 3
    e = est(job="infer", quant_map=qmap)
    c = ctx(SMALL, job="infer", quant_map=qmap)
    by_layer = sum(w.layer_weight_bytes(c, i, qmap[i]) for i in range(SMALL_LAYERS))
    assert gpu_weights(e) == by_layer + w.non_layer_weight_bytes(c) == w.total_weight_bytes(c)
    # independently: counts × one layer's bytes from uniform whole-model estimates
    assert by_layer == 4 * _layer_total("int8") + 6 * _layer_total("nf4") + 3 * BF16_LAYER + 3 * _layer_total("nf4-dq")
    assert _layer_total(None) == BF16_LAYER
    assert w.layer_weight_bytes(c, 0, None) == BF16_LAYER
    quantized = next(r for r in e.rows if r.component == "weights/quantized")
    assert "per-layer formats: int8 ×4, nf4 ×6, bf16 ×3, nf4-dq ×3" in quantized.note


def test_gguf_layers_follow_their_index_and_sum_exactly() -> None:
    """q4_k_m gives attn_v/ffn_down Q6_K on llama.cpp's use_more_bits layers: layer 0 (more bits) is
    bigger than layer 5 (not), and a q4_k_m/q8_0 mix adds up per layer."""
    c = ctx("llama-2-7b", job="infer", quant="q8_0", quant_map=("q4_k_m",) * 16 + ("q8_0",) * 16)
    assert w.layer_weight_bytes(c, 0, "q4_k_m") > w.layer_weight_bytes(c, 5, "q4_k_m")
    by_layer = sum(w.layer_weight_bytes(c, i, c.cfg.quant_map[i]) for i in range(32))
    assert w.total_weight_bytes(c) == by_layer + w.non_layer_weight_bytes(c)


def test_tp_pp_ep_stage_sums() -> None:
    qmap = ("awq-4bit", None) * 16
    for cfg in ({"tp": 2, "gpus_per_node": 2}, {"pp": 2, "gpus_per_node": 2}, {"ep": 2, "gpus_per_node": 2}):
        for stage in range(cfg.get("pp", 1)):
            c = ctx("mixtral-8x7b", job="infer", quant_map=qmap, **cfg).at_stage(stage)
            by_layer = sum(w.layer_weight_bytes(c, i, qmap[i]) for i, _ in c.layers)
            assert w.total_weight_bytes(c) == by_layer + w.non_layer_weight_bytes(c), (cfg, stage)
    whole = ctx("mixtral-8x7b", job="infer")
    split = ctx("mixtral-8x7b", job="infer", ep=2, gpus_per_node=2)
    assert w.layer_weight_bytes(split, 0, None) < w.layer_weight_bytes(whole, 0, None)


def test_memo_tells_maps_apart() -> None:
    a = ("nf4",) * 8 + (None,) * 8
    b = (None,) * 8 + ("nf4",) * 8
    c = ("nf4",) * 9 + (None,) * 7
    ta, tb, tc = (w.total_weight_bytes(ctx(SMALL, job="infer", quant_map=m)) for m in (a, b, c))
    assert ta == tb  # identical layers
    assert tc < ta


def test_full_weight_training_rejects_quantized_weights_as_a_map_too() -> None:
    """Quantized base weights are frozen (bitsandbytes/GPTQ/AWQ storage): full-weight jobs reject a format,
    whether given once or per layer, and point to QLoRA (issue 14: --job full --quant nf4 used to be accepted)."""
    for job in ("full", "pretrain", "galore"):
        for kw in ({"quant": "nf4"}, {"quant_map": ("nf4",) * SMALL_LAYERS}):
            with pytest.raises(MemplanError, match="qlora"):
                est(job=job, **kw)


@pytest.mark.parametrize(("kw", "match"), [
    ({"quant_map": ("nf4", "gptq-4bit") * 8}, "one library"),
    ({"quant": "q4_k_m", "quant_map": ("nf4",) * SMALL_LAYERS}, "one library"),
    ({"job": "qlora", "quant_map": ("awq-4bit",) * SMALL_LAYERS}, r"nf4-dq \(bitsandbytes\)"),
    ({"quant_map": ("nf4",) * 15}, "quant_map has 15 entries but the model has 16 layers"),
    ({"quant_map": ("nf4",) * 15 + ("gptq",)}, "Did you mean gptq-4bit"),
])
def test_quant_map_rejections(kw: dict[str, Any], match: str) -> None:
    with pytest.raises(MemplanError, match=match):
        est(**{"job": "infer", **kw})


def test_dora_dequantizes_only_quantized_layers() -> None:
    lora = {"dora": True, "targets": ("q", "v")}

    def dora(qmap: tuple[str | None, ...] | None, quant: str | None = None) -> int:
        rows = components(est(job="lora", lora=lora, quant=quant, quant_map=qmap).rows, Tier.GPU)
        return rows["runtime/dora_workspace"]

    plain, quantized = dora(None), dora(None, "nf4")
    assert quantized - plain == 2 * 2048 * 2048  # q_proj (D×D) dequantized to bf16
    assert dora((None,) * SMALL_LAYERS) == plain
    assert dora((None,) * 15 + ("nf4",)) == quantized == dora(("nf4",) * SMALL_LAYERS)


def offload(k: int, layers: int = SMALL_LAYERS) -> dict[str, Any]:
    return {"offload_map": (True,) * k + (False,) * (layers - k)}


def test_offload_all_false_equals_no_map() -> None:
    assert est(job="infer", infer=offload(0)).rows == est(job="infer").rows
    assert est(job="infer", quant="q4_k_m", infer=offload(0)).rows == est(job="infer", quant="q4_k_m").rows


@pytest.mark.parametrize("k", [1, 5, 16])
def test_offload_moves_k_layers_to_cpu(k: int) -> None:
    plain, off = est(job="infer"), est(job="infer", infer=offload(k))
    rows = weight_rows(off)
    assert rows[("weights/params", Tier.GPU)] == weight_rows(plain)[("weights/params", Tier.GPU)] - k * BF16_LAYER
    assert rows[("weights/cpu_offloaded", Tier.CPU)] == k * BF16_LAYER
    assert rows[("weights/offload_buffer", Tier.GPU)] == BF16_MLP_PROJ  # one module at a time
    assert modelled_gpu(off) == modelled_gpu(plain) - k * BF16_LAYER + BF16_MLP_PROJ
    assert components(off.rows, Tier.GPU)["kv_cache"] == components(plain.rows, Tier.GPU)["kv_cache"]
    c = ctx(SMALL, job="infer", infer=InferConfig(**offload(k)))
    assert inf.offloaded_layer_bytes(c) == k * BF16_LAYER


def test_offloaded_bitsandbytes_layers_stay_unquantized() -> None:
    """transformers leaves device_map "cpu" modules out of bnb conversion: they are stored in bf16."""
    k = 4
    plain, off = est(job="infer", quant="nf4"), est(job="infer", quant="nf4", infer=offload(k))
    nf4_layer = _layer_total("nf4")
    rows = weight_rows(off)
    assert rows[("weights/quantized", Tier.GPU)] + k * (nf4_layer - 2 * 2 * 2048) == weight_rows(plain)[
        ("weights/quantized", Tier.GPU)]
    assert rows[("weights/cpu_offloaded", Tier.CPU)] == k * BF16_LAYER
    assert rows[("weights/offload_buffer", Tier.GPU)] == BF16_MLP_PROJ


def test_offloaded_gptq_layers_keep_their_format() -> None:
    c = ctx(SMALL, job="infer", quant="gptq-4bit", infer=InferConfig(**offload(3)))
    rows = {(r.component, r.tier): r.bytes for r in inf.offload_rows(c)}
    assert rows[("weights/cpu_offloaded", Tier.CPU)] == 3 * w.layer_weight_bytes(c, 0, "gptq-4bit")
    from memplan.memory.quant import gptq_bytes

    down = gptq_bytes(out_features=2048, in_features=8192)  # g_idx (4·in) makes down_proj the largest
    assert down > gptq_bytes(out_features=8192, in_features=2048)
    assert rows[("weights/offload_buffer", Tier.GPU)] == down


def test_offloaded_moe_layer_loads_the_fused_experts_module() -> None:
    """transformers 5 keeps a layer's routed experts in one module (3-D parameters): that module is
    the largest a hook loads; GPTQ makes one module per expert and projection instead."""
    e = est("mixtral-8x7b", job="infer", infer=offload(2, 32))
    assert weight_rows(e)[("weights/offload_buffer", Tier.GPU)] == 2 * 8 * 3 * 14336 * 4096
    c = ctx("mixtral-8x7b", job="infer", quant="gptq-4bit", infer=InferConfig(**offload(2, 32)))
    from memplan.memory.quant import gptq_bytes

    assert inf.staging_bytes(c, 0, "gptq-4bit") == gptq_bytes(out_features=4096, in_features=14336)


def test_offload_pipeline_stages_and_replicas() -> None:
    """pp = 2 on 8 GPUs: 4 replicas per node; layers 8-15 offloaded sit on stage 1."""
    omap = (False,) * 8 + (True,) * 8
    c = ctx(SMALL, job="infer", pp=2, gpus_per_node=8, infer=InferConfig(offload_map=omap))
    first, second = ({(r.component, r.tier): r.bytes for r in inf.offload_rows(c.at_stage(s))} for s in (0, 1))
    assert first[("weights/offload_buffer", Tier.GPU)] == 0
    assert second[("weights/offload_buffer", Tier.GPU)] == BF16_MLP_PROJ
    assert first[("weights/cpu_offloaded", Tier.CPU)] == second[("weights/cpu_offloaded", Tier.CPU)] == 4 * 8 * BF16_LAYER
    assert inf.offloaded_layer_bytes(c.at_stage(0)) == 0
    assert inf.offloaded_layer_bytes(c.at_stage(1)) == 8 * BF16_LAYER
    assert w.total_weight_bytes(c.at_stage(1)) == w.non_layer_weight_bytes(c.at_stage(1))
    e = est(job="infer", pp=2, gpus_per_node=8, infer={"offload_map": omap})
    assert e.stage == 0  # stage 1's layers are on the CPU: stage 0 is the most loaded GPU
    assert weight_rows(e)[("weights/cpu_offloaded", Tier.CPU)] == 4 * 8 * BF16_LAYER


@pytest.mark.parametrize(("kw", "match"), [
    ({"tp": 2, "gpus_per_node": 2}, "tp = 1 and ep = 1"),
    ({"ep": 2, "gpus_per_node": 2, "model": "mixtral-8x7b"}, "tp = 1 and ep = 1"),
    ({"quant": "q4_k_m"}, "GGUF"),
    ({"quant": "q8_0", "quant_map": (None,) * SMALL_LAYERS}, "GGUF"),
    ({"offload_params": "cpu"}, "offload_params"),
    ({"pp": 2, "gpus_per_node": 1, "nodes": 2}, "one node"),
])
def test_offload_rejections(kw: dict[str, Any], match: str) -> None:
    model = kw.pop("model", SMALL)
    layers = len(ARCHS[model].layers)
    with pytest.raises(MemplanError, match=match):
        est(model, job="infer", infer=offload(1, layers), **kw)


def test_offload_map_length_and_job_checked() -> None:
    with pytest.raises(MemplanError, match="offload_map has 3 entries but the model has 16 layers"):
        est(job="infer", infer={"offload_map": (False,) * 3})
    with pytest.raises(MemplanError, match="inference jobs only"):
        est(job="full", infer=offload(1))


def test_accelerate_loads_one_module_at_a_time() -> None:
    """A tiny random Llama with layers 1 and 2 offloaded through accelerate's own hooks (CPU as the
    execution device): during the forward, the offloaded layers never hold more than their largest
    module's weights (memplan's offload buffer), and their weights_map holds the CPU row's bytes."""
    torch = pytest.importorskip("torch", reason="needs torch")
    transformers = pytest.importorskip("transformers", reason="needs transformers")
    hooks = pytest.importorskip("accelerate.hooks", reason="needs accelerate")
    from memplan.catalog.schema import Family, ModelSpec

    spec = ModelSpec(name="tiny-llama", source="test", family=Family.LLAMA, hidden_size=256, intermediate_size=512,
                     num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, vocab_size=1000)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=1000, tie_word_embeddings=False)).to(torch.bfloat16).eval()
    offloaded = ("model.layers.1", "model.layers.2")
    state = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(tuple(o + "." for o in offloaded))}
    blocks = ["model.embed_tokens", "model.norm", "lm_head", "model.rotary_emb", *(f"model.layers.{i}" for i in range(4))]
    hooks.attach_align_device_hook_on_blocks(
        model, execution_device={"": torch.device("cpu"), **{b: torch.device("cpu") for b in blocks}},
        offload={"": False, **{b: b in offloaded for b in blocks}}, weights_map=state)

    def live() -> int:
        tensors = [p for o in offloaded for p in model.get_submodule(o).parameters()]
        return sum(p.numel() * p.element_size() for p in tensors if p.device.type != "meta")

    peak = [live()]
    linear = torch.nn.functional.linear

    def watched(*args: Any, **kwargs: Any) -> Any:
        peak[0] = max(peak[0], live())
        return linear(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.nn.functional, "linear", watched)
        with torch.no_grad():
            model(torch.tensor([[1, 2, 3]]))
    c = Context(build_architecture(spec), JobConfig(job="infer", infer=InferConfig(offload_map=(False, True, True, False))),
                catalog_gpu("h100"), HostSpec())
    rows = {r.component: r.bytes for r in inf.offload_rows(c)}
    assert peak[0] == rows["weights/offload_buffer"] == 2 * 512 * 256
    assert sum(v.numel() * v.element_size() for v in state.values()) == rows["weights/cpu_offloaded"]
