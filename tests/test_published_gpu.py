"""memplan's answer against published real-GPU measurements (``gpu_published_public.json``), in the metric each
reports. Every case is either expressed or names the knob memplan lacks; the cases within 10% stay there (the
issue's band), and every other expressed case is a listed, explained gap, so a regression or a new case shows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memplan.measure import published_gpu as pg

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "gpu_published_public.json"
FILE = SHARED if SHARED.is_file() else Path(__file__).parent / "fixtures" / "gpu_published_public.json"
CASES = {c["id"]: c for c in json.loads(FILE.read_text(encoding="utf-8"))["cases"]}
BAND_PCT = 10.0
WITHIN_BAND = (
    "litgpt-rt-llama2-7b-lora-mb1", "litgpt-rt-llama2-7b-lora-mb2", "litgpt-rt-llama2-13b-lora-mb1",
    "litgpt-rt-infer-llama2-7b-bf16", "litgpt-rt-infer-llama2-7b-nf4", "litgpt-rt-infer-llama2-13b-bf16",
    "litgpt-rt-infer-codellama34b-nf4", "litgpt-rt-infer-llama2-70b-nf4dq", "litgpt-quant-falcon7b-fp32",
    "litgpt-quant-falcon7b-bf16", "litgpt-tp-llama2-70b-chat-4gpu", "litgpt-tp-llama2-70b-chat-8gpu",
    "litgpt-seq-llama2-70b-chat-4gpu", "litgpt-tp-llama2-70b-chat-nf4dq-2gpu", "litgpt-hub-llama2-7b-lora",
    "litgpt-hub-llama3-8b-lora", "litgpt-hub-mistral7b-lora", "litgpt-hub-tinyllama-full",
    "fsdpqlora-llama2-7b-lora-ddp-bs4", "optimum-llama2-13b-fp16-gen-bs1", "optimum-llama2-13b-fp16-prefill-bs1",
    "optimum-llama2-13b-fp16-prefill-bs16",
)
GAPS = {
    "litgpt-rt-llama2-7b-qlora": "litgpt quantizes on the GPU at load; the load peak stays in max_memory_allocated",
    "litgpt-rt-llama2-13b-qlora": "litgpt quantizes on the GPU at load",
    "litgpt-hub-llama2-7b-qlora": "litgpt quantizes on the GPU at load",
    "litgpt-hub-llama3-8b-qlora": "litgpt quantizes on the GPU at load",
    "litgpt-quant-falcon7b-nf4": "litgpt quantizes on the GPU at load",
    "litgpt-quant-falcon7b-int8": "litgpt quantizes on the GPU at load",
    "litgpt-rt-llama2-": "litgpt FSDP needs the fsdp2 engine profile (ZeRO-3 stand-in)",
    "fsdpqlora-": "FSDP1 (fsdp_qlora) needs the fsdp2 engine profile: buffers, CPU offload of parameters",
    "optimum-llama2-13b-": "HF generate's legacy tuple KV cache: two caches alive while torch.cat builds the new one",
}


def gap_reason(case_id: str) -> str | None:
    return next((why for prefix, why in GAPS.items() if case_id.startswith(prefix)), None)


@pytest.mark.parametrize("case_id", sorted(CASES))
def test_every_published_case_is_expressed_or_names_the_missing_knob(case_id: str) -> None:
    row = pg.compare(CASES[case_id])
    if "reason" in row:
        assert row["reason"] and case_id not in WITHIN_BAND
        return
    assert row["answer_bytes"] > 0 and row["measured_bytes"] > 0
    if case_id in WITHIN_BAND:
        assert abs(row["error_pct"]) <= BAND_PCT, f"{case_id}: {row['error_pct']:+.1f}% (band {BAND_PCT}%)"
    else:
        assert gap_reason(case_id), f"{case_id}: {row['error_pct']:+.1f}% is neither within the band nor a listed gap"


def test_metrics_follow_what_each_case_reports() -> None:
    assert pg.runtime_fields(pg.ALLOCATED) == {"cuda_context_bytes": 0, "allocator_reserve_pct": 0}
    assert pg.runtime_fields(pg.RESERVED) == {"cuda_context_bytes": 0}
    assert pg.metric_of(CASES["fsdpqlora-llama2-7b-qlora-ctx512-bs1"]) == pg.RESERVED
    assert pg.metric_of(CASES["optimum-llama2-13b-fp16-gen-bs1"]) == pg.WITH_CONTEXT
    assert pg.measured_bytes(CASES["litgpt-rt-llama2-7b-lora-mb1"]) == 21_300_000_000
