"""Published training runs as a regression suite: each run's own layout, forced through ``estimate`` and the
step-time model, must be called feasible and its predicted step time must fall within ±15% of the figure
the paper publishes. Where memplan cannot express a run yet, the case is an xfail naming the missing knob.

Published step times are derived in this file from each paper's own figures (achieved FLOP/s with the
paper's FLOP formula, iteration times, or GPU-hours per token), never from memplan.
``tools/published_runs.py`` prints the same table (published vs predicted) for the docs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any

import pytest

from memplan.catalog.schema import HostSpec, ModelSpec
from memplan.catalog.store import catalog_gpu, catalog_model
from memplan.config import JobConfig
from memplan.estimator import estimate
from memplan.memory.breakdown import Tier
from memplan.planner.budget import step_time

TOLERANCE = 0.15
SEQ_GPT = 2048
VOCAB_GPT = 51200
"""Narayanan et al. 2021, Sec. 5.1 and Korthikanti et al. 2022, Sec. 6: sequence 2048, vocabulary 51,200."""


def gpt(hidden: int, heads: int, layers: int, vocab: int = VOCAB_GPT, seq: int = SEQ_GPT) -> ModelSpec:
    """The GPT models of the Megatron papers: 4h MLP with GeLU, LayerNorm, biases, learned positions."""
    return ModelSpec(name=f"gpt-h{hidden}-l{layers}", source="Megatron-LM papers", family="gpt2",
                     hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                     num_attention_heads=heads, vocab_size=vocab, max_position_embeddings=seq, hidden_act="gelu",
                     mlp_gated=False, norm="layernorm", attention_bias=True, mlp_bias=True)


def narayanan_flops(batch: int, layers: int, hidden: int, seq: int = SEQ_GPT, vocab: int = VOCAB_GPT) -> float:
    """Narayanan et al. 2021, Eq. 3: FLOPs per iteration with full recomputation,
    96·B·s·l·h²·(1 + s/(6h) + V/(16·l·h))."""
    return 96 * batch * seq * layers * hidden**2 * (1 + seq / (6 * hidden) + vocab / (16 * layers * hidden))


@dataclass(frozen=True)
class Run:
    id: str
    source: str
    model: Any
    gpu: str
    cfg: dict[str, Any]
    published_step_s: float
    host: HostSpec = field(default_factory=HostSpec)
    fits_xfail: str | None = None
    time_xfail: str | None = None

    def spec(self) -> ModelSpec:
        return self.model() if callable(self.model) else catalog_model(self.model)

    def config(self) -> JobConfig:
        return JobConfig(**self.cfg)


def _megatron(gpus: int, tp: int, pp: int, batch: int, **extra: Any) -> dict[str, Any]:
    dp = gpus // (tp * pp)
    return {"job": "pretrain", "engine": "megatron", "gpus_per_node": 8, "nodes": gpus // 8, "tp": tp, "pp": pp,
            "micro_batch": 1, "grad_accum": batch // dp, "seq_len": SEQ_GPT, "activation_accounting": "paper",
            "flash_attention": False, **extra}


# Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters Using Megatron-LM",
# Table 1: (params, heads, hidden, layers, tp, pp, GPUs, batch, achieved TFLOP/s per GPU); A100 80GB (Selene),
# full activation recomputation (Sec. 5.1), micro-batch not in the table: 1 assumed.
NARAYANAN_TABLE_1 = [
    ("1.7B", 24, 2304, 24, 1, 1, 32, 512, 137),
    ("3.6B", 32, 3072, 30, 2, 1, 64, 512, 138),
    ("7.5B", 32, 4096, 36, 4, 1, 128, 512, 142),
    ("18.4B", 48, 6144, 40, 8, 1, 256, 1024, 135),
    ("39.1B", 64, 8192, 48, 8, 2, 512, 1536, 138),
    ("76.1B", 80, 10240, 60, 8, 4, 1024, 1792, 140),
    ("145.6B", 96, 12288, 80, 8, 8, 1536, 2304, 148),
    ("310.1B", 128, 16384, 96, 8, 16, 1920, 2160, 155),
    ("529.6B", 128, 20480, 105, 8, 35, 2520, 2520, 163),
    ("1008B", 160, 25600, 128, 8, 64, 3072, 3072, 163),
]

# Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models": Table 3
# (heads, hidden, layers, tp, pp, GPUs, global batch; micro-batch 1) and Table 4 (seconds per iteration:
# full recompute, then selective recompute + sequence parallelism, "present work").
KORTHIKANTI = [
    ("22B", 64, 6144, 48, 8, 1, 8, 4, 1.42, 1.10),
    ("175B", 96, 12288, 96, 8, 8, 64, 64, 18.13, 13.75),
    ("530B", 128, 20480, 105, 8, 35, 280, 280, 49.05, 37.83),
    ("1T", 160, 25600, 128, 8, 64, 512, 512, 94.42, 71.49),
]

LLAMA3_TOKENS_PER_BATCH = 2048 * 8192
"""Llama 3 (Dubey et al. 2024), Table 4: 16M tokens per batch at sequence 8192, i.e. 2048 sequences."""
LLAMA3_PARAMS = 405e9
LLAMA3_FLOPS_PER_TOKEN = 6 * LLAMA3_PARAMS + 6 * 126 * 8192 * 16384
"""6N plus the causal attention products (12·L·S·d halved): the usual MFU count (PaLM, App. B)."""
LLAMA3_VIRTUAL_STAGES = 8
"""Llama 3, Sec. 3.3.2: "we use an interleaved schedule (Narayanan et al., 2021) with V pipeline stages on one pipeline
rank" (V not printed), and "we reduce one Transformer layer each from the first and the last stages, respectively.
This means that the first model chunk on the first stage has only the embedding, and the last model chunk on the last
stage has only output projection and loss calculation". A chunk left with no layer after losing one held one: 126 + 2
= 128 one-layer chunks on 16 ranks, V = 8 (derived, not printed). Quotes checked against a transcript of arXiv
2407.21783 (the paper is not in the search corpora; a public markdown copy of Sec. 3.3.2 was read)."""
LLAMA3_FSDP = {"reshard_after_forward": False, "deallocate_pipeline_outputs": True}
"""Llama 3, Sec. 3.3.2: "Our use of FSDP for Llama 3 shards optimizer states and gradients, but for model shards we do
not reshard after forward computation to avoid an extra all-gather communication during backward passes"; "we use FP32
gradients accumulation during backward computation over multiple micro-batches and also reduce-scatter gradients in
FP32 across data parallel workers in FSDP". memplan's fsdp2 profile under a pipeline (torch.distributed.pipelining)
runs that: bf16 units kept gathered, fp32 gradients accumulated unsharded until the last backward, then
reduce-scattered (``memory.engine_buffers.fsdp2_pipeline_rows``). Also Sec. 3.3.2: "we proactively deallocate tensors
that will not be used for future computation, including the input and output tensors of each pipeline stage": memplan
sets deallocate_pipeline_outputs: no kept stage outputs nor per-micro-batch receive buffers
(``memory.pp_stage_buffers``; torch.distributed.pipelining's default keeps both)."""
LLAMA3_MEMORY = ("at 8,192 GPUs (m = 32 micro-batches per replica) the interleaved schedule reaches its steady phase on "
                 "stage 1: it holds 141 one-layer chunk micro-batches (29 on chunk 0, 16 on each other chunk: 69.9 GiB) "
                 "while all 8 chunks' fp32 gradients accumulate (11.9 GiB), next to 5.9 GiB of gathered bf16 weights, "
                 "the 10% allocator reserve and 2.05 GiB of NCCL communicator buffers (runtime/nccl_communicators, "
                 "the world group's included): 100.5 GiB; Meta's own schedule (N tunable, Fig. 6) is not Megatron's "
                 "or torch's, and its in-flight count at m = 32 is not published")
LLAMA3_MEMORY_16K = ("at 16,384 GPUs (m = 16 micro-batches per replica: stage 1's warm-up of (16 - 2)*2 + 7*16 = 140 chunk "
                     "forwards covers the step's 128, so every forward runs first) stage 1 holds 63.5 GiB of activations "
                     "(8 one-layer chunks x 16 micro-batches, exact per chunk), 5.9 GiB of gathered bf16 weights, the "
                     "running layer's bf16 gradients and fp32 copy for the backward right after the peak (2.2 GiB) and "
                     "the 10% allocator reserve (79.64 GiB) and 2.05 GiB of NCCL communicator buffers "
                     "(runtime/nccl_communicators): 81.7 GiB, 2.5 GiB over the H100's CUDA-runtime total (79.18 GiB, "
                     "catalog cuda_memory_mib). Counted by hand from the source, that first backward holds about 2.06 "
                     "GiB beyond the activations, not 2.2 (FSDP2 copies gradients to fp32 one parameter at a time and "
                     "autograd releases the layer's saved tensors, but the gate/up projection's backward re-gathers its "
                     "sequence-parallel input and holds its output and input gradients), about 81.5 GiB: still over; "
                     "memplan has no per-block backward working set to count it exactly")
LLAMA3_128K_SEQ = 131072
LLAMA3_128K_TOKENS_PER_BATCH = 16 * 2**20
"""Llama 3 (Dubey et al. 2024), Table 4, the 128K-context row: 16,384 GPUs, TP 8, CP 16, PP 16, DP 8, batch size per
DP group 16 (128 sequences of 131,072 tokens: 16M tokens), 380 TFLOP/s per GPU, 38% BF16 MFU."""
LLAMA3_128K_FLOPS_PER_TOKEN = 6 * LLAMA3_PARAMS + 6 * 126 * LLAMA3_128K_SEQ * 16384
"""The same count as at 8k (6N plus the causal attention products, 12·L·S·d halved) at S = 131,072."""
LLAMA3_128K_RECOMPUTE_LAYERS = 16
"""Llama 3 does not publish its activation-memory settings at 128k; full recomputation of 16 of the 126 layers (one of
each stage's eight) is assumed: the smallest share, in whole layers per stage, with which memplan fits the 80 GiB at
this layout under the paper's FSDP (LLAMA3_FSDP; with none, stage 1 holds 82.2 GiB, NCCL's 2.4 GiB included, against
the H100's 79.2)."""
DEEPSEEK_MEMORY = ("with Megatron-Core's knobs for what DeepSeek-V3 publishes (DEEPSEEK_MEGATRON: RMSNorm and MLA "
                   "up-projection recompute, the SwiGLU inputs stored in fp8, blockwise fp8 GEMMs whose Linear inputs "
                   "TransformerEngine saves in fp8; BF16 AdamW moments) stage 1 still holds 4 MoE layers x 23 "
                   "micro-batches (v = 2 standing for DualPipe) x 1.32 GiB of saved tensors (of which the routed "
                   "experts' 0.85), 121.0 GiB, beside 3.0 GiB of bf16 weights, 6.1 GiB of fp32 main grads, 2.0 GiB of "
                   "distributed-optimizer shards (the routed experts' over the expert data-parallel group of 2), 3.0 GiB "
                   "of TransformerEngine's cached blockwise fp8 weights (row- and column-wise, weights/fp8_copies) and "
                   "the 10% allocator reserve: 149.2 GiB (175.8 with 16-bit saved tensors and moe_act in place of the "
                   "fp8 SwiGLU store), 152.5 GiB with 3.34 GiB of NCCL communicator buffers "
                   "(runtime/nccl_communicators). Not modelled: DeepSeek's fp8 SwiGLU input with its output recomputed "
                   "(Sec. 3.3.3; Megatron's moe_act checkpoint keeps the 16-bit input, so fc2 keeps an fp8 input "
                   "instead: 3F bytes per pair, not 2F), its E5M6 cache of the attention output (Sec. 3.3.2; with the "
                   "blockwise recipe linear_proj reuses the attention's 16-bit output) and DualPipe itself (Table 2: "
                   "PP + 1 = 17 stage micro-batches, two stages' parameters per rank)")
DEEPSEEK_MEGATRON = {"use_distributed_optimizer": True, "recompute_modules": ("layernorm", "mla_up_proj"),
                     "use_precision_aware_optimizer": True, "exp_avg_dtype": "bf16", "exp_avg_sq_dtype": "bf16",
                     "fp8_recipe": "blockwise", "activation_func_fp8_input_store": True}
"""DeepSeek-AI 2024 as Megatron-Core runs it (``--recompute-granularity selective``): Sec. 3.2.3 "we recompute all
RMSNorm operations and MLA up-projections during back-propagation" (``layernorm``: Megatron's input_layernorm and
pre_mlp_layernorm; ``mla_up_proj``); Sec. 3.3.2 fine-grained quantization, 1x128 activation tiles and 128x128 weight
blocks (``--fp8-recipe blockwise``; TransformerEngine saves the Linear inputs in fp8, ``memory.te_fp8``); Sec. 3.3.3
"we cache the inputs of the SwiGLU operator and recompute its output ... also stored in FP8"
(``--activation-func-fp8-input-store``: Megatron-Core's fused SwiGLU keeps its input in float8_e4m3fn. Megatron cannot
also recompute the output in fp8: ``moe_act``'s CheckpointWithoutOutput saves the 16-bit SwiGLU input, moe/experts.py,
which keeps 4F bytes per (token, expert) pair against the fp8 store's 2F plus fc2's fp8 input F, so ``moe_act`` is
left out); "We adopt BF16 for tracking the first and second moments in AdamW ... master weights
(stored by the optimizer) and gradients (used for batch size accumulation) are still retained in FP32"
(``--use-precision-aware-optimizer --exp-avg-dtype bf16 --exp-avg-sq-dtype bf16``, fp32 main grads; the main params
as Megatron's default 16-bit remainders of the bf16 params, ``store_param_remainders``, exact fp32). Sec. 3.2.3's EMA
in CPU memory is not a GPU byte memplan counts; its shared embedding/output head lives on the first and last stages,
not stage 1."""


def _runs() -> list[Run]:
    runs = []
    for name, heads, h, layers, tp, pp, gpus, batch, tflops in NARAYANAN_TABLE_1:
        published = narayanan_flops(batch, layers, h) / (gpus * tflops * 1e12)
        runs.append(Run(f"narayanan-{name}", f"Narayanan et al. 2021, Table 1 ({tflops} TFLOP/s per GPU)",
                        partial(gpt, h, heads, layers), "a100-sxm-80gb",
                        _megatron(gpus, tp, pp, batch, recompute="full"), published))
    for name, heads, h, layers, tp, pp, gpus, batch, full_s, present_s in KORTHIKANTI:
        model = partial(gpt, h, heads, layers)
        runs.append(Run(f"korthikanti-{name}-selective-sp", "Korthikanti et al. 2022, Tables 3-4 (present work)",
                        model, "a100-sxm-80gb",
                        _megatron(gpus, tp, pp, batch, recompute="selective", sequence_parallel=True), present_s))
        runs.append(Run(f"korthikanti-{name}-full", "Korthikanti et al. 2022, Tables 3-4 (full recompute)",
                        model, "a100-sxm-80gb", _megatron(gpus, tp, pp, batch, recompute="full"), full_s))
    for gpus, dp, tflops in ((8192, 64, 430), (16384, 128, 400)):
        runs.append(Run(
            f"llama3-405b-{gpus}", f"Dubey et al. 2024 (Llama 3), Table 4 ({tflops} TFLOP/s per GPU, tp8 pp16)",
            "llama-3.1-405b", "h100-sxm-80gb",
            {"job": "pretrain", "gpus_per_node": 8, "nodes": gpus // 8, "tp": 8, "pp": 16,
             "micro_batch": 1, "grad_accum": 2048 // dp, "seq_len": 8192, "sequence_parallel": True,
             # Sec. 3.3.2: FSDP without resharding after forward (LLAMA3_FSDP); no activation checkpointing at 8K;
             # interleaved, V = 8 derived; DP traffic overlapped. Assumed: Megatron-Core's TP/SP layer layout
             # (activation_accounting "paper") stands for Meta's own layers.
             "engine": "fsdp2", "activation_accounting": "paper", "engine_config": LLAMA3_FSDP,
             "recompute": "none", "perf": {"virtual_stages": LLAMA3_VIRTUAL_STAGES, "comm_overlap": 1.0}},
            LLAMA3_TOKENS_PER_BATCH * LLAMA3_FLOPS_PER_TOKEN / (gpus * tflops * 1e12),
            fits_xfail=LLAMA3_MEMORY if dp == 64 else LLAMA3_MEMORY_16K))
    # Llama 3 at 128K context: context parallelism 16, all-gather based (Sec. 3.3.2: K and V all-gathered, attention
    # of the local Q chunk; load-balanced over 2·CP chunks), states sharded by FSDP as at 8k.
    runs.append(Run(
        "llama3-405b-128k-cp16", "Dubey et al. 2024 (Llama 3), Table 4 (128K: 380 TFLOP/s per GPU, tp8 cp16 pp16)",
        "llama-3.1-405b", "h100-sxm-80gb",
        {"job": "pretrain", "gpus_per_node": 8, "nodes": 16384 // 8, "tp": 8, "pp": 16, "cp": 16,
         "cp_comm": "allgather", "micro_batch": 1, "grad_accum": 16, "seq_len": LLAMA3_128K_SEQ, "sequence_parallel": True,
         "engine": "fsdp2", "activation_accounting": "paper", "engine_config": LLAMA3_FSDP,
         "recompute": "full", "recompute_layers": LLAMA3_128K_RECOMPUTE_LAYERS,
         "perf": {"virtual_stages": LLAMA3_VIRTUAL_STAGES, "comm_overlap": 1.0}},
        LLAMA3_128K_TOKENS_PER_BATCH * LLAMA3_128K_FLOPS_PER_TOKEN / (16384 * 380e12)))
    # DeepSeek-AI 2024, "DeepSeek-V3 Technical Report": 180K H800 GPU-hours per trillion tokens on 2,048 GPUs
    # (Sec. 1, Table 1); PP16, EP64 over 8 nodes, ZeRO-1 DP (Sec. 3.2); batch 15,360 × 4,096 tokens (Sec. 4.2);
    # FP8 GEMMs (Sec. 3.3); DualPipe (two chunks per stage, communication overlapped, 20 of 132 SMs for it).
    tokens_per_s = 1e12 / (180e3 * 3600 / 2048)
    runs.append(Run(
        "deepseek-v3", "DeepSeek-AI 2024, Sec. 1 / Table 1 (180K H800 GPU-hours per trillion tokens)",
        "deepseek-v3", "h800-sxm-80gb",
        {"job": "pretrain", "engine": "megatron", "gpus_per_node": 8, "nodes": 256, "tp": 1, "pp": 16, "ep": 64,
         "micro_batch": 1, "grad_accum": 15360 // 128, "seq_len": 4096, "activation_accounting": "paper",
         "recompute": "selective", "engine_config": DEEPSEEK_MEGATRON,
         "perf": {"fp8": True, "virtual_stages": 2, "comm_overlap": 1.0, "comm_sm_fraction": 20 / 132}},
        15360 * 4096 / tokens_per_s, fits_xfail=DEEPSEEK_MEMORY))
    # Ren et al. 2021, "ZeRO-Offload", Sec. 6.2: 40 TFLOP/s on one V100 for a 10B model (DGX-2 host, 1.5 TB).
    # 10B = 50 layers × 4096 hidden; batch and sequence not in memplan's reference data: 16 × 512 assumed.
    offload_cfg = {"job": "pretrain", "engine": "deepspeed", "dtype": "fp16", "micro_batch": 16, "seq_len": 512,
                   "recompute": "full", "zero": 2, "offload_optimizer": "cpu"}
    offload_flops = 4 * 2 * 16 * 512 * (12 * 50 * 4096**2)  # forward, backward (2x) and recompute: 8·N·tokens
    runs.append(Run(
        "zero-offload-10b-v100", "Ren et al. 2021 (ZeRO-Offload), Sec. 6.2 (40 TFLOP/s on one V100)",
        partial(gpt, 4096, 32, 50, vocab=50257, seq=512), "v100-sxm2-32gb", offload_cfg, offload_flops / 40e12,
        host=HostSpec(cpu_ram_bytes=1536 * 2**30),
        time_xfail=("the run's batch size, sequence length and CPU-Adam rate (ZeRO-Offload Table 3, Fig. 6) are not "
                    "in memplan's reference data, and the CPU-Adam throughput is not a knob yet")))
    return runs


RUNS = _runs()


def predicted(run: Run) -> float:
    return step_time(run.spec(), catalog_gpu(run.gpu), run.config(), run.host).step_s


def _param(run: Run, reason: str | None, *, strict: bool) -> Any:
    """An xfail only for the failed assertion it documents (``raises=AssertionError``): an error raised on the way
    (a rule rejecting the run's configuration, a crash) fails the test instead of hiding behind the xfail."""
    marks = [pytest.mark.xfail(reason=reason, raises=AssertionError, strict=strict)] if reason else []
    return pytest.param(run, id=run.id, marks=marks)


@pytest.mark.parametrize("run", [_param(r, r.fits_xfail, strict=True) for r in RUNS])
def test_published_layout_fits(run: Run) -> None:
    """Strict: a run memplan comes to fit must drop its ``fits_xfail``."""
    est = estimate(run.spec(), catalog_gpu(run.gpu), run.config(), host=run.host)
    assert est.fits, f"{run.id}: memplan says the published layout does not fit"


@pytest.mark.parametrize("run", [pytest.param(r, id=r.id) for r in RUNS if r.fits_xfail])
def test_fits_xfail_is_the_activation_memory(run: Run) -> None:
    """Each ``fits_xfail`` is about saved activations (settings memplan cannot express, or a layout it counts larger
    than the run held): the run's configuration is valid, the GPU would hold everything but the activations, and
    the same layout with full recomputation (one layer input per layer) fits."""
    gpu = catalog_gpu(run.gpu)
    est = estimate(run.spec(), gpu, run.config(), host=run.host)
    activations = sum(r.bytes for r in est.rows if r.component.startswith("activations/"))
    assert not est.fits and est.peak(Tier.GPU) - activations < est.capacity(Tier.GPU)
    knobs = {k: v for k, v in run.cfg.get("engine_config", {}).items() if k != "recompute_modules"}  # selective's
    recomputed = JobConfig(**{**run.cfg, "recompute": "full", "engine_config": knobs})
    assert estimate(run.spec(), gpu, recomputed, host=run.host).fits


def test_llama3_8k_saved_tensors_are_megatron_cores() -> None:
    """The bytes behind Llama 3's 8K ``fits_xfail``, from Megatron-Core's saved tensors with tp 8 and sequence
    parallelism (S/t = 1,024 rows of 16-bit values per rank): two RMSNorm inputs and outputs (4h), q (h), k and v
    (2·8 heads·128), the attention output (h), the fused SwiGLU input (2F) and fc2's input (F); stage 1 holds 141
    one-layer chunk micro-batches (m = 32: Megatron's warm-up (16 − 2)·2 + 7·16 = 140 chunk forwards, plus the first
    steady one): forwards 0-127 give each of the 8 chunks 16, forwards 128-140 give chunk 0 13 more."""
    h, kv, f, rows = 16384, 8 * 128, 53248, 8192 // 8
    per_layer = 2 * rows * (4 * h + h + 2 * kv + h + 3 * f)
    run = next(r for r in RUNS if r.id == "llama3-405b-8192")
    est = estimate(run.spec(), catalog_gpu(run.gpu), run.config())
    rows_by_name = {r.component: r.bytes for r in est.rows}
    assert est.stage == 1 and rows_by_name["activations/layers"] == (16 * 8 + 13) * per_layer


@pytest.mark.parametrize("run", [_param(r, r.time_xfail, strict=False) for r in RUNS])
def test_published_step_time_within_tolerance(run: Run) -> None:
    """Not strict: a ``time_xfail`` names inputs the paper does not publish, so the run may land inside the
    tolerance on memplan's assumed values (ZeRO-Offload 10B does) without that confirming the model."""
    got = predicted(run)
    error = got / run.published_step_s - 1.0
    assert abs(error) <= TOLERANCE, (f"{run.id}: predicted {got:.3f} s vs published {run.published_step_s:.3f} s "
                                     f"({error:+.1%}; {run.source})")


def test_llama3_405b_stages_are_uneven_as_published() -> None:
    """Llama 3 (Dubey et al. 2024, Sec. 3.3.2): with 126 layers on 16 stages, the first and last stages each
    take one layer fewer (7), the embedding and the output layer making up for it; the others take 8."""
    from memplan.arch.build import build_architecture
    from memplan.arch.parallel import arch_stage_ranges

    arch = build_architecture(catalog_model("llama-3.1-405b"))
    sizes = [len(r) for r in arch_stage_ranges(arch, 16)]
    assert sizes == [7] + [8] * 14 + [7]


def test_interleaved_in_flight_memory_on_the_first_stage() -> None:
    """Korthikanti et al. 2022, Sec. 4.2.3: the interleaved schedule holds p·(1 + (p−1)/(p·v)) micro-batches'
    activations on the first stage (rounded up here): p = 8, v = 2 → 8 + 7/2 = 11.5 → 12."""
    from memplan.arch.parallel import in_flight_micro_batches

    assert in_flight_micro_batches(8, 0, 2) == 12
    assert in_flight_micro_batches(8, 0, 1) == 8


def test_interleaved_warm_up_is_capped_at_the_step() -> None:
    """Megatron's interleaved schedule caps the warm-up at the step's m·v chunk forwards (schedules.py
    ``min(num_warmup_microbatches, total_num_microbatches)``): with p = 16, v = 8 and m = 16 (Llama 3 on 16,384
    GPUs), stage 1 would warm up (16 − 2)·2 + 7·16 = 140 chunks, more than the 128 the step has: every forward
    runs first, and the stage holds all m = 16 micro-batches; with m = 32 it holds ⌈141/8⌉ = 18."""
    from memplan.arch.parallel import in_flight_micro_batches

    assert in_flight_micro_batches(16, 1, 8, micro_batches=16) == 16
    assert in_flight_micro_batches(16, 1, 8, micro_batches=32) == 18


def test_interleaving_shrinks_the_bubble_as_published() -> None:
    """Narayanan et al. 2021, Sec. 2.2.2: the bubble is (p − 1)/(v·m) of the ideal time; with p = 8, m = 16,
    the pipelined time is 16 + 7/v micro-batch slots."""
    from memplan.planner.cost import pipeline_seconds

    assert pipeline_seconds(stage_micro_s=1.0, micro_batches=16, pp=8, virtual_stages=1) == pytest.approx(23.0)
    assert pipeline_seconds(stage_micro_s=1.0, micro_batches=16, pp=8, virtual_stages=4) == pytest.approx(17.75)


def test_deepseek_v3_routed_experts_are_megatron_cores() -> None:
    """The routed experts of a DeepSeek-V3 layer under the megatron layout, per micro-batch of 4,096 tokens: 8 experts
    per token, 32,768 (token, expert) pairs, each saving 3 int64 permutation indices, the permuted input and the
    un-permuted output (2 × 7,168 bf16), the fused SwiGLU's 2F input and fc2's F input (Megatron-Core
    fusions/fused_bias_swiglu.py saves the input only; F = 2,048) and an fp32 routing weight; plus int32 offsets of the
    256 experts."""
    from memplan.arch.build import build_architecture
    from memplan.memory import activations as act
    from memplan.memory.context import Context

    run = next(r for r in RUNS if r.id == "deepseek-v3")
    pairs, h, f = 4096 * 8, 7168, 2048
    expected = pairs * (3 * 8 + 2 * h * 2 + 3 * f * 2 + 4) + 256 * 4
    ctx = Context(build_architecture(run.spec()), run.config(), catalog_gpu(run.gpu), run.host).at_stage(1)
    terms = {term.name: term.bytes for term in act.block_terms(ctx, ctx.layers[-1][0], act.counting_for(run.config()))}
    assert terms["moe/experts"] == expected
