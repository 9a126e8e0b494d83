"""The training-activation model: Korthikanti et al. 2022 Table 2 exactly, and the modern terms.

Table 2 (per layer, bytes, 16-bit activations, 1-byte dropout masks, GPT-3 block):
no parallelism sbh(34 + 5as/h); tensor parallel sbh(10 + 24/t + 5as/(ht)); tensor + sequence
parallel sbh/t(34 + 5as/h); selective recompute sbh(10 + 24/t), with sequence parallelism 34sbh/t;
full recompute 2sbh. The expected values below are written out from those formulas, not from
memplan's own closed form.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from memplan.arch.build import build_architecture
from memplan.catalog.schema import Family, HostSpec, ModelSpec
from memplan.catalog.store import catalog_gpu
from memplan.config import Job, JobConfig, LoraConfig, Recompute
from memplan.dtypes import Dtype
from memplan.memory import activations as act
from memplan.memory import activations_block as blk
from memplan.memory import activations_paper as paper
from memplan.memory.breakdown import Tier
from memplan.memory.context import Context

GPU = catalog_gpu("h100-sxm-80gb")
# GPT-3 175B, the paper's largest model (Table 3): a=96, h=12288, s=2048, L=96, v=51200.
A, H, S, L, V = 96, 12288, 2048, 96, 51200


def gpt3(layers: int = L) -> ModelSpec:
    """A GPT-3 style block in memplan's vocabulary: LayerNorm, 4h GeLU MLP, no gating."""
    return ModelSpec(name="gpt3-175b", source="Brown et al. 2020 Table 2.1", family=Family.GPT2, hidden_size=H,
                     intermediate_size=4 * H, num_hidden_layers=layers, num_attention_heads=A, vocab_size=V,
                     max_position_embeddings=S, hidden_act="gelu", mlp_gated=False, norm="layernorm")


def paper_ctx(*, b: int = 1, t: int = 1, sp: bool = False, recompute: Recompute = Recompute.NONE,
              pp: int = 1, layers: int = L, accounting: str = "paper", grad_accum: int = 1) -> Context:
    cfg = JobConfig(job=Job.PRETRAIN, dtype=Dtype.FP16, micro_batch=b, seq_len=S, tp=t, pp=pp, gpus_per_node=t * pp,
                    grad_accum=grad_accum,
                    sequence_parallel=sp, recompute=recompute, attention="eager", dropout=True,
                    activation_accounting=accounting)
    return Context(build_architecture(gpt3(layers)), cfg, GPU, HostSpec())


@pytest.mark.parametrize("b", [1, 4])
def test_table2_no_parallelism(b: int) -> None:
    expected = S * b * H * 34 + 5 * A * S * S * b  # sbh(34 + 5as/h)
    assert act.layer_micro_bytes(paper_ctx(b=b), 0, Recompute.NONE) == expected


@pytest.mark.parametrize("t", [2, 8])
def test_table2_tensor_parallel(t: int) -> None:
    expected = S * H * 10 + S * H * 24 // t + 5 * A * S * S // t  # sbh(10 + 24/t + 5as/(ht)), b = 1
    assert act.layer_micro_bytes(paper_ctx(t=t), 0, Recompute.NONE) == expected


@pytest.mark.parametrize("t", [2, 8])
def test_table2_tensor_and_sequence_parallel(t: int) -> None:
    expected = (S * H * 34 + 5 * A * S * S) // t  # sbh/t (34 + 5as/h)
    assert act.layer_micro_bytes(paper_ctx(t=t, sp=True), 0, Recompute.NONE) == expected


def test_table2_selective_recompute() -> None:
    t = 8
    assert act.layer_micro_bytes(paper_ctx(t=t, recompute=Recompute.SELECTIVE), 0,
                                 Recompute.SELECTIVE) == S * H * 10 + S * H * 24 // t
    assert act.layer_micro_bytes(paper_ctx(t=t, sp=True, recompute=Recompute.SELECTIVE), 0,
                                 Recompute.SELECTIVE) == 34 * S * H // t


def test_table2_full_recompute() -> None:
    assert act.layer_micro_bytes(paper_ctx(recompute=Recompute.FULL), 0, Recompute.FULL) == 2 * S * H
    assert act.layer_micro_bytes(paper_ctx(t=8, recompute=Recompute.FULL), 0, Recompute.FULL) == 2 * S * H


def test_table2_closed_form_agrees_with_the_terms() -> None:
    for t, sp, mode in [(1, False, Recompute.NONE), (8, False, Recompute.NONE), (8, True, Recompute.NONE),
                        (8, False, Recompute.SELECTIVE), (8, True, Recompute.SELECTIVE), (1, False, Recompute.FULL)]:
        ctx = paper_ctx(t=t, sp=sp, recompute=mode)
        assert act.layer_micro_bytes(ctx, 0, mode) == paper.korthikanti_layer_bytes(
            s=S, b=1, h=H, a=A, t=t, sequence_parallel=sp, recompute=mode)


def test_table2_gpt3_175b_magnitude() -> None:
    # Sec. 4.1 with s=2048, b=1: 34·sbh + 5·as²b = 0.856 GB + 2.013 GB = 2.869 GB per layer (GB = 10^9 bytes).
    assert act.layer_micro_bytes(paper_ctx(), 0, Recompute.NONE) == 855_638_016 + 2_013_265_920


def test_paper_output_layer_and_embeddings() -> None:
    # Sec. 4.3 with sequence parallelism: 4sbh/t (1 + v/h) on the last stage, sbhp/t dropout masks on the first.
    t = 8
    rows = act.breakdown(paper_ctx(t=t, sp=True))
    assert rows["activations/final_norm"] + rows["activations/loss"] == 4 * S * H // t + 4 * S * V // t
    assert rows["activations/embeddings"] == S * H // t
    assert "activations/logits" not in rows and "activations/rotary" not in rows


@pytest.mark.parametrize(("grad_accum", "held"), [(1, 1), (3, 3), (4, 4), (16, 4)])
def test_pipeline_holds_no_more_micro_batches_than_the_step_runs(grad_accum: int, held: int) -> None:
    """Megatron's 1F1B caps its warm-up at the step's micro-batches (schedules.py ``min(num_warmup_microbatches,
    num_microbatches)``): with m < p, stage 0 holds m micro-batches, not p."""
    ctx = paper_ctx(pp=4, layers=8, sp=True, t=2, grad_accum=grad_accum).at_stage(0)
    assert act.micro_batches_in_flight(ctx) == held


def test_pipeline_first_stage_holds_pp_micro_batches() -> None:
    # Narayanan et al. 2021 1F1B: stage 0 keeps pp micro-batches of its L/pp layers: L layers' worth.
    ctx = paper_ctx(pp=4, layers=8, sp=True, t=2, grad_accum=8)
    per_layer = act.layer_micro_bytes(ctx, 0, Recompute.NONE)
    stage = ctx.stage
    assert act.micro_batches_in_flight(ctx) == 4 - stage
    assert act.breakdown(ctx)["activations/layers"] == (4 - stage) * 2 * per_layer
    assert act.layer_bytes(ctx, ctx.layers[0][0], Recompute.NONE) == (4 - stage) * per_layer


# ---- modern architectures (autograd accounting, CUDA kernels) -----------------------------------

def llama_spec(kv_heads: int = 8, **extra: object) -> ModelSpec:
    """Llama-3.1-8B's shape."""
    base = dict(name="llama-3.1-8b", source="test", family=Family.LLAMA, hidden_size=4096, intermediate_size=14336,
                num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=kv_heads, vocab_size=128256)
    return ModelSpec(**{**base, **extra})


def ctx_for(spec: ModelSpec, **cfg: object) -> Context:
    """A pure-bf16 model (the layout the written-out terms describe); ``master_weights=None`` gives the pytorch
    engine's AMP (fp32 parameters under autocast) for full jobs."""
    base = dict(job=Job.FULL, dtype=Dtype.BF16, micro_batch=1, **({} if cfg.get("job") is Job.INFER else {"seq_len": 4096}))
    if cfg.get("job", Job.FULL) in (Job.FULL, Job.PRETRAIN):
        base["master_weights"] = False
    return Context(build_architecture(spec), JobConfig(**{**base, **cfg}), GPU, HostSpec())


def test_llama_layer_terms_written_out() -> None:
    b, s, d, n, k, h, f = 1, 4096, 4096, 32, 8, 128, 14336
    tok = b * s
    norms = 2 * tok * (4 * d + 4 + 2 * d) + 2 * tok * 2 * d  # fp32 input, rstd, cast; + linear input
    attention = tok * 2 * (n * h + 2 * k * h + n * h) + 4 * tok * n  # q, k, v, out + fp32 logsumexp
    mlp = 4 * tok * 2 * f  # gate out, up out, act out, product
    ctx = ctx_for(llama_spec(), attention="flash")
    assert act.layer_micro_bytes(ctx, 0, Recompute.NONE) == norms + attention + mlp


def test_amp_adds_the_fp32_residual_stream_written_out() -> None:
    """torch.autocast over fp32 parameters: each RMSNorm saves its normalized tensor in fp32 (+2 bytes per element),
    q, k, v each save their own bf16 cast of the fp32 norm output (two more than one shared input), gate and up one
    more; the final norm +2 bytes per element, the rotary cos/sin in fp32."""
    s, d, hd = 4096, 4096, 128
    pure, amp = ctx_for(llama_spec(), attention="flash"), ctx_for(llama_spec(), attention="flash", master_weights=None)
    per_layer = s * (2 * 2 * d + 2 * 2 * d + 1 * 2 * d)
    assert act.layer_micro_bytes(amp, 0, Recompute.NONE) - act.layer_micro_bytes(pure, 0, Recompute.NONE) == per_layer
    pure_rows, amp_rows = act.breakdown(pure), act.breakdown(amp)
    assert amp_rows["activations/final_norm"] - pure_rows["activations/final_norm"] == s * 2 * d
    assert amp_rows["activations/rotary"] - pure_rows["activations/rotary"] == 2 * s * hd * 2  # cos, sin: 4 - 2 bytes


def test_gqa_saves_less_than_mha_and_flash_less_than_eager() -> None:
    gqa = act.layer_micro_bytes(ctx_for(llama_spec(kv_heads=8), attention="flash"), 0, Recompute.NONE)
    mha = act.layer_micro_bytes(ctx_for(llama_spec(kv_heads=32), attention="flash"), 0, Recompute.NONE)
    eager = act.layer_micro_bytes(ctx_for(llama_spec(kv_heads=8), attention="eager"), 0, Recompute.NONE)
    assert gqa < mha < eager
    # eager adds the S×S scores: fp32 softmax + bf16 probabilities, 6·B·N·S² bytes, and repeats k, v to N heads
    n, s, h, k = 32, 4096, 128, 8
    assert eager - gqa == 6 * n * s * s + 2 * s * 2 * (n - k) * h - 4 * s * n  # no logsumexp in eager


def test_sdpa_equals_flash_without_a_mask_and_pays_for_a_short_window() -> None:
    full = llama_spec()
    flash = act.layer_micro_bytes(ctx_for(full, attention="flash"), 0, Recompute.NONE)
    assert act.layer_micro_bytes(ctx_for(full, attention="sdpa"), 0, Recompute.NONE) == flash
    windowed = llama_spec(sliding_window=1024)
    sdpa = act.layer_micro_bytes(ctx_for(windowed, attention="sdpa"), 0, Recompute.NONE)
    # explicit (B,1,S,S) additive mask per layer, k and v repeated to N heads (no enable_gqa with a mask)
    assert sdpa - flash == 2 * 4096 * 4096 + 4096 * 2 * 2 * (32 - 8) * 128


def test_logits_and_loss_terms() -> None:
    b, s, v, d = 2, 4096, 128256, 4096
    rows = act.breakdown(ctx_for(llama_spec(), micro_batch=b))
    assert rows["activations/loss"] == 4 * b * s * v + 8 * b * s  # fp32 log-softmax + int64 targets
    assert rows["activations/logits"] == 8 * b * s * v  # two fp32 gradients > bf16 logits + fp32 copy (6·BSV)
    assert rows["activations/final_norm"] == b * s * (4 * d + 4 + 2 * d) + b * s * 2 * d
    fp32 = act.breakdown(ctx_for(llama_spec(), micro_batch=b, dtype=Dtype.FP32))
    assert fp32["activations/logits"] == 8 * b * s * v


def test_selective_and_full_recompute_with_a_partial_layer_count() -> None:
    spec = llama_spec(num_hidden_layers=4)
    none = act.breakdown(ctx_for(spec, attention="eager"))
    full = act.breakdown(ctx_for(spec, attention="eager", recompute=Recompute.FULL, recompute_layers=2))
    one_layer = act.layer_micro_bytes(ctx_for(spec, attention="eager"), 0, Recompute.NONE)
    layer_input = 4096 * 4096 * 2
    assert full["activations/layers"] == 2 * one_layer + 2 * layer_input
    assert full["activations/recompute_workspace"] == one_layer
    assert none["activations/layers"] == 4 * one_layer and "activations/recompute_workspace" not in none
    selective = act.breakdown(ctx_for(spec, attention="eager", recompute=Recompute.SELECTIVE))
    scores = 6 * 32 * 4096 * 4096
    assert selective["activations/layers"] == 4 * (one_layer - scores)
    assert selective["activations/recompute_workspace"] == scores


def test_sequence_parallel_divides_the_replicated_parts() -> None:
    spec = llama_spec()
    tp = act.layer_micro_bytes(ctx_for(spec, tp=8, gpus_per_node=8), 0, Recompute.NONE)
    tp_sp = act.layer_micro_bytes(ctx_for(spec, tp=8, gpus_per_node=8, sequence_parallel=True), 0, Recompute.NONE)
    replicated = 2 * 4096 * (4 * 4096 + 4 + 2 * 4096) + 2 * 4096 * 2 * 4096
    assert tp - tp_sp == replicated - replicated // 8


def test_moe_counts_top_k_token_copies() -> None:
    spec = ModelSpec(name="mixtral-8x7b", source="test", family=Family.MIXTRAL, hidden_size=4096,
                     intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                     vocab_size=32000, num_experts=8, num_experts_per_tok=2)
    moe = act.layer_micro_bytes(ctx_for(spec), 0, Recompute.NONE)
    dense = act.layer_micro_bytes(ctx_for(llama_spec(vocab_size=32000)), 0, Recompute.NONE)
    tok, k, d, f, e = 4096, 2, 4096, 14336, 8
    experts = tok * k * (24 + 2 * 2 * d + 4 * 2 * f + 4) + 4 * e
    router = tok * (4 * e + 8 * k + 4 + 4 * k)
    assert moe - dense == experts + router - 4 * tok * 2 * f


def test_gemma2_soft_capping_and_four_norms() -> None:
    spec = ModelSpec(name="gemma-2-9b", source="test", family=Family.GEMMA2, hidden_size=3584, intermediate_size=14336,
                     num_hidden_layers=42, num_attention_heads=16, num_key_value_heads=8, head_dim=256,
                     vocab_size=256000, hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True)
    eager = act.breakdown(ctx_for(spec, attention="eager", seq_len=1024))
    sdpa = act.breakdown(ctx_for(spec, attention="sdpa", seq_len=1024))
    assert sdpa == eager  # transformers has no SDPA path with soft-capping: it runs eager
    flash = act.layer_micro_bytes(ctx_for(spec, attention="flash", seq_len=1024), 0, Recompute.NONE)
    s, n = 1024, 16
    scores = s * s * n * (2 + 4 + 2)  # tanh, fp32 softmax, bf16 probabilities
    assert act.layer_micro_bytes(ctx_for(spec, attention="eager", seq_len=1024), 0, Recompute.NONE) > flash + scores
    v = 256000
    assert eager["activations/loss"] == 4 * s * v + 8 * s + 2 * s * v  # + tanh of the final soft-cap


def test_lora_frozen_weights_save_no_inputs_but_4bit_ones_do() -> None:
    d, f, r, s = 4096, 14336, 16, 4096
    full = act.layer_micro_bytes(ctx_for(llama_spec()), 1, Recompute.NONE)
    lora = LoraConfig(rank=r, targets=("q", "v"), dtype=Dtype.BF16)  # bf16 adapters read the base input itself
    shared = act.layer_micro_bytes(ctx_for(llama_spec(), job=Job.LORA, lora=lora), 1, Recompute.NONE)
    # frozen norm weights: no normalized casts (2·2D); frozen gate/up/down: no MLP input (2D), no product (2F);
    # two adapters add their r-wide lora_A outputs
    assert full - shared == s * (2 * 2 * d + 2 * d + 2 * f) - s * 2 * 2 * r
    fp32 = LoraConfig(rank=r, targets=("q", "v"), dtype=Dtype.FP32)  # peft's default autocast_adapter_dtype
    cast = act.layer_micro_bytes(ctx_for(llama_spec(), job=Job.LORA, lora=fp32), 1, Recompute.NONE)
    assert cast - shared == s * 2 * (4 * (d + r)) - s * 2 * d - s * 2 * 2 * r  # fp32 copies replace the bf16 input
    qlora = act.layer_micro_bytes(ctx_for(llama_spec(), job=Job.QLORA, lora=lora), 1, Recompute.NONE)
    # bitsandbytes MatMul4Bit keeps its input when it requires grad (autograd/_functions.py, ctx.tensors = (A, B)):
    # the frozen 4-bit gate/up keep the MLP input (2D), down the product (2F); q/k/v/o's inputs are saved already
    assert qlora - shared == s * (2 * d + 2 * f)
    # layer 0 reads the frozen embedding's output (no grad): its frozen input RMSNorm saves nothing, the fp32 input
    # and the fp32 rstd (4D + 4 bytes per token) less; with recompute (peft's enable_input_require_grads) it does
    first = act.layer_micro_bytes(ctx_for(llama_spec(), job=Job.LORA, lora=lora), 0, Recompute.NONE)
    assert shared - first == s * (4 * d + 4)
    rows = act.breakdown(ctx_for(llama_spec(), job=Job.LORA, lora=lora))
    assert "activations/embeddings" not in rows  # a frozen embedding lookup saves no ids
    assert rows["activations/final_norm"] == s * (4 * d + 4)  # frozen lm_head: no input, no cast


def test_rows_names_tiers_and_sum() -> None:
    ctx = ctx_for(llama_spec(), recompute=Recompute.FULL)
    rows = act.rows(ctx)
    assert rows and all(r.component.startswith("activations/") and r.tier is Tier.GPU for r in rows)
    # the attention kernel's backward workspace (flash here) is a row of the CUDA estimate, not of the breakdown
    kernel = {"activations/flash_backward_workspace", "activations/sdpa_backward_workspace"}
    assert {r.component for r in rows} & kernel == {"activations/flash_backward_workspace"}
    assert sum(r.bytes for r in rows if r.component not in kernel) == sum(act.breakdown(ctx).values())
    assert act.saved_bytes_estimate(ctx) == sum(r.bytes for r in rows if r.component in act.SAVED_ROWS)


def test_inference_and_params_only_have_no_training_activations() -> None:
    assert act.rows(ctx_for(llama_spec(), job=Job.INFER)) == []
    params = ModelSpec(name="p", source="test", family=Family.PARAMS_ONLY, published_params=7_500_000_000)
    ctx = Context(build_architecture(params), JobConfig(), GPU, HostSpec())
    assert not act.modelled(ctx) and act.rows(ctx) == []
    assert act.modelled(ctx_for(llama_spec()))


def test_cpu_counting_widens_masks_and_statistics() -> None:
    ctx = paper_ctx(accounting="autograd")
    cuda = act.layer_micro_bytes(ctx, 0, Recompute.NONE, blk.CUDA)
    cpu = act.layer_micro_bytes(ctx, 0, Recompute.NONE, blk.cpu_counting(16))
    masks = A * S * S + 2 * S * H  # attention-probability mask and two hidden dropout masks, 1 → 2 bytes
    stats = 2 * 2 * S * (4 - 2)  # two LayerNorms' mean and rstd, fp32 → fp16
    assert cpu - cuda == masks - stats


def test_memory_import_stays_light() -> None:
    code = ("import sys, memplan.memory.activations, memplan.memory.activations_paper; "
            "bad = [m for m in ('torch', 'pulp', 'pandas', 'rich', 'typer', 'numpy') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
