"""memplan's answer next to published real-GPU measurements (``shared/reference/gpu_published_public.json``).

Each published case names the metric it reports, and the answer is compared with the matching one:
- ``torch.cuda.max_memory_allocated``: tensors only, so the CUDA context and the allocator reserve are set to 0;
- ``max_memory_reserved``: the allocator's segments, so the reserve row stays (memplan's default 10%), no context;
- allocated plus non-torch memory (NVML): tensors and the CUDA context (memplan's default), no reserve.
A case memplan cannot express is kept with the missing knob (``express`` returns a reason), never dropped.
Pure module: no torch; the reference file is read by the caller.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, TypedDict

from memplan.catalog.schema import Family, ModelSpec

ALLOCATED, RESERVED, WITH_CONTEXT = "max allocated", "max reserved", "allocated + non-torch"
MODELS = {"llama-2-7b": "llama-2-7b", "llama-2-13b": "llama-2-13b", "llama-2-70b": "llama-2-70b",
          "meta-llama-3-8b": "llama-3.1-8b", "llama-3.1-8b": "llama-3.1-8b", "mistral-7b": "mistral-7b", "falcon-7b": "falcon-7b",
          "llama-3.2-1b": "llama-3.2-1b"}
"""Published model -> catalog model of the same tensor shapes (Llama-3-8B and Llama-3.1-8B share every shape;
Mistral-7B v0.2 drops v0.1's sliding window, which changes no training activation of memplan's model)."""


class _InlineConfig(TypedDict):
    """The config.json values an inline Llama-layout model gives ``ModelSpec``."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    max_position_embeddings: int


INLINE: dict[str, _InlineConfig] = {  # config.json values of Llama-layout models the catalog lacks
    "tinyllama": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                      num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048),
    "yi-34b": dict(hidden_size=7168, intermediate_size=20480, num_hidden_layers=60, num_attention_heads=56,
                   num_key_value_heads=8, vocab_size=64000, max_position_embeddings=4096),
    "codellama-34b": dict(hidden_size=8192, intermediate_size=22016, num_hidden_layers=48, num_attention_heads=64,
                          num_key_value_heads=8, vocab_size=32000, max_position_embeddings=16384),
    # Mistral-7B v0.2 base: v0.1's shapes with sliding_window null and max_position_embeddings 32768
    "mistral-7b-v0.2": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                            num_key_value_heads=8, vocab_size=32000, max_position_embeddings=32768),
}
TARGETS = {"query": "q", "key": "k", "value": "v", "q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o",
           "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
SHORT_PROMPT = 6
"""Tokens of litgpt's default short prompt ('Hello, my name is', about 6 tokens per the reference)."""
UNITS = {"GB": 10**9, "GiB": 2**30, "MB": 10**6}
FSDP_QLORA_KEPT_OUTPUT = "logits_fp32"
"""fsdp_qlora train.py holds ``output`` through backward and the optimizer step (``output = None`` after it); the
benchmarks (Feb-Mar 2024) ran transformers 4.38/4.39, whose ``LlamaForCausalLM.forward`` returns
``logits.float()``: the fp32 logits stay alive (``JobConfig.kept_output``)."""

OPTIMUM_CACHE = "legacy"
"""optimum's GPTQ benchmark (tests/benchmark/README.md, added 2023-08-19 in optimum 0b08a1f with benchmark_gptq.py)
ran transformers 4.32, whose generate passes the tuple ``past_key_values`` (``DynamicCache`` came in 4.36)."""

FSDP_QLORA_TRANSFORMERS = {False: "4.38", True: "4.37"}
"""transformers of the fsdp_qlora benchmarks (Feb-Mar 2024, train.py attn_impl = "sdpa", ``attention_mask=None``):
4.38, the release the authors then excluded (README, commit 467933f, after huggingface/transformers issue #30010,
"Llama uses significantly more memory in 4.38 & 4.39"). Keyed by whether the model is a Mistral: 4.38's
``MistralModel`` kept 4.37's mask path (``_prepare_4d_causal_attention_mask_for_sdpa`` returns None without padding,
so SDPA runs ``is_causal``) and 4.37's per-layer rotary caches, which is the 4.37 layout (``memory.hf_legacy``)."""


@dataclass(frozen=True)
class Expressed:
    """A published case as memplan inputs: the model, the JobConfig fields and the metric compared."""

    model: str | ModelSpec
    fields: dict[str, Any]
    metric: str
    caveat: str = ""


def model_of(name: str) -> str | ModelSpec | None:
    low = name.lower()
    for key, spec in INLINE.items():
        if key in low:
            return ModelSpec(name=key, source="config.json (inline)", family=Family.LLAMA, **spec)
    return next((v for k, v in MODELS.items() if k in low), None)


def metric_of(case: dict) -> str | None:
    what = case["measured"].get("what", "")
    if "non-torch" in what:
        return WITH_CONTEXT
    if "max_memory_reserved" in what:
        return RESERVED
    return ALLOCATED if "max_memory_allocated" in what else None


def measured_bytes(case: dict) -> int | None:
    m = case["measured"]
    unit = UNITS.get(str(m.get("unit", "")).split(" ")[0])
    return round(float(m["value"]) * unit) if unit and isinstance(m.get("value"), int | float) else None


def _quant(case: dict) -> str | None:
    q = case.get("quant")
    if not q:
        return None
    method = q["method"].lower()
    if "gptq" in method:
        return "gptq-4bit"
    if "int8" in method:
        return "int8"
    return "nf4-dq" if "double" in method or "dq" in method else "nf4"


def _dtype(text: str) -> str | None:
    text = text.lower()
    if "mixed" in text:
        return None
    return "fp32" if text.startswith("32") else "fp16" if text.startswith(("fp16", "16")) else "bf16"


def _train_fields(case: dict, out: dict[str, Any]) -> str | None:
    lora = case.get("lora") or {}
    if "method" in lora:
        return f"{lora['method']}: no job for it (memplan trains lora, qlora, galore, full)"
    out.update(job=case["job"], micro_batch=case["micro_batch"], seq_len=case["seq_len"]["value"],
               grad_accum=case.get("grad_accum") or 1, master_weights=False)
    if lora:
        out["lora"] = {"rank": lora["rank"], "alpha": lora["alpha"], "dtype": "bf16",
                       "targets": tuple(TARGETS[t] for t in lora["targets"]), "dropout": lora.get("dropout") or 0.0}
    if case.get("activation_checkpointing"):
        out["recompute"] = "full"
    if "fsdp_qlora" in case["framework"]:
        out.update(kept_output=FSDP_QLORA_KEPT_OUTPUT, attention="sdpa",
                   transformers_version=FSDP_QLORA_TRANSFORMERS["mistral" in case["model"].lower()])
    n = case.get("n_gpus") or 1
    if n > 1:
        out["gpus_per_node"] = n
        if "fsdp" in case["framework"].lower():
            out.update(fsdp1_fields(case))
    return None


def fsdp1_fields(case: dict) -> dict[str, Any]:
    """The FSDP1 settings each program ran (``--engine fsdp1``).

    - litgpt (Lightning Fabric ``FSDPStrategy`` of Oct 2023, lightning/fabric/strategies/fsdp.py): FULL_SHARD,
      ``use_orig_params=True`` (set by default on torch >= 2.0), ``auto_wrap_policy={Block}`` (the LoRA adapters sit
      in their block's FlatParameter), ``limit_all_gathers=True``; finetune/lora.py accumulates under
      ``fabric.no_backward_sync`` (FSDP1 ``no_sync``).
    - fsdp_qlora train.py (AnswerDotAI, Mar 2024): ``use_orig_params=False`` (each LoRA Linear its own unit),
      ``sharding_strategy`` full_shard or ddp (NO_SHARD), ``CPUOffload(offload_params=True)`` with
      ``--use_cpu_offload``, ``limit_all_gathers=True``, gradient accumulation 1.
    """
    fields: dict[str, Any] = {"engine": "fsdp1"}
    knobs: dict[str, Any] = {}
    if "fsdp_qlora" in case["framework"]:
        knobs["use_orig_params"] = False
        if case.get("quant"):  # replace_linear leaves Linear4bit's compress_statistics=True (bitsandbytes 0.42-0.43)
            fields["quant"] = "nf4-dq"
        if "NO_SHARD" in case["framework"]:
            knobs["sharding_strategy"] = "NO_SHARD"
    if "offload" in case["id"]:
        fields.update(offload_params="cpu", offload_optimizer="cpu")
    if knobs:
        fields["engine_config"] = knobs
    return fields


def _infer_fields(case: dict, out: dict[str, Any]) -> str | None:
    seq = case.get("seq_len") or {}
    if "vllm" in case["id"]:
        return "vLLM's engine (gpu_memory_utilization, KV block pool, profiler figures): the serving engine work"
    prompt = seq.get("prompt")
    prompt = prompt if isinstance(prompt, int) else SHORT_PROMPT
    new = seq.get("max_new_tokens") or 0
    out.update(job="infer", micro_batch=case.get("micro_batch") or 1, infer={"context": prompt + new})
    if new and prompt > 1:
        out["infer"]["prefill_chunk"] = prompt
    if "eager" in (case.get("other_knobs") or ""):
        out["attention"] = "eager"
    if "optimum" in case["id"]:
        out.update(engine="transformers", serve={"cache_implementation": OPTIMUM_CACHE})
    n = case.get("n_gpus") or 1
    if n > 1:
        out["gpus_per_node"] = n
        out["tp" if "-tp-" in case["id"] else "pp"] = n
    return None


def express(case: dict) -> Expressed | str:
    """The case as memplan inputs, or the reason (the missing knob) it cannot be expressed."""
    if case.get("confidence") == "low" and "SUSPICIOUS" in (case.get("notes") or ""):
        return "flagged by the reference as impossible for a whole-run peak (excluded from scoring)"
    model, metric = model_of(case["model"]), metric_of(case)
    if model is None:
        return f"model {case['model']} is not in memplan's catalog (needs its config.json)"
    if metric is None:
        return f"metric '{case['measured'].get('what')}' has no memplan counterpart"
    dtype = _dtype(case.get("dtype") or "")
    if dtype is None:
        return "bf16-mixed (fp32 parameters + autocast bf16 copies): needs the AMP precision policy (engine profiles)"
    out: dict[str, Any] = {"dtype": dtype, "quant": _quant(case)}
    litgpt = bool(LITGPT.search(case.get("framework", "")))
    if litgpt:
        model = litgpt_model(model)
        if out["quant"] in BNB_FORMATS:
            out["bnb_integration"] = "lightning"
    reason = _train_fields(case, out) if case["kind"] == "train" else _infer_fields(case, out)
    if reason:
        return reason
    if litgpt and case["kind"] == "train":
        out.update(litgpt_train_fields(case, out))
    caveats = [c for c in (_chunked(case), _framework(case)) if c]
    return Expressed(model, out, metric, "; ".join(caveats))


LITGPT = re.compile("litgpt", re.I)
BNB_FORMATS = ("nf4", "nf4-dq", "int8")
"""The bitsandbytes formats ``_quant`` names; litgpt builds them with Lightning Fabric's ``BitsandbytesPrecision``
(finetune/lora.py and generate/base.py since litgpt 982abcb, Oct 2023: ``plugins = BitsandbytesPrecision(quantize[4:],
dtype)``), hence ``JobConfig.bnb_integration="lightning"``."""


FIRST_LONGEST = "first iteration forced to longest"
"""The reference's note on lit-gpt 8641822's loop: iteration 0 runs the longest training sample."""
LITGPT_HUB_BNB = "0.42.0"
"""bitsandbytes of litgpt's config-hub benchmarks (table added at litgpt 43c44323, April 2024): pyproject.toml's
``all`` extra pins ``bitsandbytes==0.42.0``. The October-2023 resource tables name theirs (0.41.1) in their context."""


def litgpt_train_fields(case: dict, fields: dict[str, Any]) -> dict[str, Any]:
    """The JobConfig fields of a litgpt fine-tuning run (finetune/lora.py, full.py at 8641822 and 43c44323):

    - ``module_layout="litgpt"``: its model.py/lora.py modules (``memory.litgpt``);
    - ``loss_fp32=False``: ``chunked_cross_entropy`` runs ``cross_entropy`` on the bf16 logits (chunks);
    - ``kept_output="logits"``: the loop's ``logits = model(...)`` stays referenced until the next forward returns;
    - ``previous_seq_len=0`` where the first iteration is forced to the longest sample (lit-gpt 8641822
      ``get_batch(..., longest_seq_ix if iter_num == 0 else None)``): the peak micro-batch has no predecessor held.
      Assumed: no later pair of random Alpaca samples (the previous one held) outgrows it;
    - bitsandbytes runs: ``bnb_version`` (the case's context, else ``LITGPT_HUB_BNB``) and ``lora.paged_optimizer``
      (finetune/lora.py: ``bnb.optim.PagedAdamW`` when a bitsandbytes precision plugin is active; its states live in
      CUDA managed memory, outside ``torch.cuda.max_memory_allocated``).
    """
    out: dict[str, Any] = {"module_layout": "litgpt", "loss_fp32": False, "kept_output": "logits"}
    if FIRST_LONGEST in (case.get("other_knobs") or ""):
        out["previous_seq_len"] = 0
    if fields.get("quant") in BNB_FORMATS:
        found = re.search(r"bitsandbytes (\d+\.\d+(?:\.\d+)?)", case["source"].get("context", ""))
        out["bnb_version"] = found.group(1) if found else LITGPT_HUB_BNB
        if "lora" in fields:
            out["lora"] = {**fields["lora"], "paged_optimizer": True}
    return out


def litgpt_model(model: str | ModelSpec) -> ModelSpec:
    """``model`` as litgpt builds it: its own ``lm_head = nn.Linear(n_embd, padded_vocab_size)`` next to ``wte``,
    never tied (lit_gpt/model.py ``GPT.__init__`` at 8641822; convert_hf_checkpoint.py copies ``lm_head.weight``)."""
    from memplan.catalog.resolve import load_model

    spec = load_model(model) if isinstance(model, str) else model
    return spec.model_copy(update={"tie_word_embeddings": False}) if spec.tie_word_embeddings else spec


def _chunked(case: dict) -> str:
    if "chunk" not in (case.get("other_knobs") or "") or LITGPT.search(case.get("framework", "")):
        return ""  # litgpt's chunked bf16 cross-entropy: loss_fp32=False (litgpt_train_fields)
    return "chunked cross-entropy (lm_head_chunk_size) not modelled"


def _framework(case: dict) -> str:
    fw = case.get("framework", "")
    if case["kind"] != "train" and re.search("litgpt", fw, re.I):  # training runs: module_layout="litgpt"
        return "litgpt's own modules (memplan models the HF layout)"
    return ""


MISS_CAUSES: dict[str, str] = {
    "fsdpqlora-llama2-70b-qlora-offload-bs2": "FSDP1-reserved",
}
"""Case id -> the cause of its miss (``CAUSES``), for every expressed case outside the 10% band."""
CAUSES = {
    "FSDP1-reserved": "fsdp_qlora reports max_memory_reserved. Engine fsdp1 models the allocated bytes of these "
                      "steps (FlatParameter shards, the root plus two gathered blocks, 4-bit quant states kept whole, "
                      "CPUOffload), transformers 4.38's buffers and masks (memory.hf_legacy), SDPA's memory-efficient "
                      "backward workspace (memory.sdpa_workspace), and reserved memory from the allocator's rules "
                      "(c10/cuda/CUDACachingAllocator.cpp): the blocks FSDP1's streams and construction cannot share "
                      "(runtime/fsdp1_stream_pools), the sharded gradients cached on the post-backward stream, free "
                      "while forward and the start of backward run (runtime/fsdp1_grad_stream_pool), and segments the "
                      "fp32 loss chain at the start of backward cannot use, the 16-bit logits' segment and one "
                      "checkpointed block's forward working set (memory.allocator_segments, a floor under the 10% "
                      "reserve). Llama-2-70B with CPU offload (bs 2) binds at the start of backward and stays 14.9% "
                      "under: its allocated peak is 12.00 GB and it measured 16.02 GB reserved (1.335x, against "
                      "1.06-1.24x for the other fsdp_qlora runs). Candidates not modelled: fragmentation of the unshard "
                      "stream's pool, where 1,120 small LoRA units (1-10 MiB requests) are gathered between 428 MB "
                      "block units and the 1.05 GB root, and of the default stream by bitsandbytes' 448 MiB dequantized "
                      "weights next to 224 MiB MLP tensors; an allocator replay of the step's requests would be needed "
                      "to attribute them (no GPU was available to record one).",
}


def miss_cause(case_id: str) -> str | None:
    """The cause key (``CAUSES``) of a case known to miss the 10% band, or None."""
    return MISS_CAUSES.get(case_id)


def runtime_fields(metric: str) -> dict[str, Any]:
    """JobConfig runtime fields that make the answer the published metric."""
    if metric == ALLOCATED:
        return {"cuda_context_bytes": 0, "allocator_reserve_pct": 0}
    if metric == RESERVED:
        return {"cuda_context_bytes": 0}
    return {"allocator_reserve_pct": 0}


def outside_torch(est: Any, metric: str) -> int:
    """Bytes of the answer that PyTorch's allocator statistics never see: NCCL's communicator buffers (NCCL allocates
    them itself, ``memory.nccl``), alive in every training phase, so the peak less them is the tensors' peak."""
    if metric not in (ALLOCATED, RESERVED):
        return 0
    return sum(r.bytes for r in est.rows if r.component == "runtime/nccl_communicators")


def compare(case: dict) -> dict[str, Any]:
    """One row: the case id, its metric, memplan's answer and the measured bytes, the error in %, or the reason."""
    from memplan.estimator import estimate

    row: dict[str, Any] = {"id": case["id"], "kind": case["kind"], "measured_bytes": measured_bytes(case)}
    got = express(case)
    if isinstance(got, str):
        return {**row, "reason": got}
    from memplan.memory.breakdown import Tier

    est = estimate(got.model, "h100-sxm-80gb", **got.fields, **runtime_fields(got.metric))
    answer = est.peak(Tier.GPU) - outside_torch(est, got.metric)
    error = 100.0 * (answer - row["measured_bytes"]) / row["measured_bytes"]
    return {**row, "metric": got.metric, "answer_bytes": answer, "phase": est.peak_phase(Tier.GPU).value,
            "error_pct": error, "caveat": got.caveat}
