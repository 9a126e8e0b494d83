"""``memplan measure`` on real (tiny) models: fails when a prediction leaves its bound.

Bounds (issue 6): weights, gradients, master copies, optimizer states and the KV cache exact;
activations saved for backward within 3%; the CPU peak of a training step within 10% of memplan's
phase model. Each case builds a tiny random-initialized transformers model with its family's real
layout (``memplan.measure.tiny``) and runs one step on CPU. The rest checks the command's contract:
truncation is stated and checked, unsupported jobs are refused, the extra is optional, the CPU peak
method is exact on a known allocation pattern, and calibration profiles round-trip.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
from conftest import run_cli

torch = pytest.importorskip("torch", reason="measure needs torch (pip install memplan[measure])")
pytest.importorskip("transformers", reason="measure needs transformers (pip install memplan[measure])")

from memplan.catalog.store import catalog_gpu  # noqa: E402
from memplan.estimator import estimate, make_config  # noqa: E402
from memplan.measure import calibrate as cal  # noqa: E402
from memplan.measure.compare import EXACT, Line  # noqa: E402
from memplan.measure.job import measure_job  # noqa: E402
from memplan.measure.peak import PeakMeter  # noqa: E402
from memplan.measure.tiny import CONFIGS, tiny_spec  # noqa: E402

pytestmark = pytest.mark.measure

GPU = catalog_gpu("h100-sxm-80gb")
SAVED_PCT, PEAK_PCT = 3.0, 10.0


def assert_within_bounds(lines: list[Any]) -> None:
    """The acceptance bounds, checked here independently of the report's own verdict."""
    for line in (item if isinstance(item, dict) else item.as_dict() for item in lines):
        name, error, pct = line["component"], line["error_bytes"], line["error_pct"]
        if name.split("/")[0] in ("weights", "gradients", "optimizer", "kv_cache") and line["predicted_bytes"] is not None \
                and line["bound"]:  # transients (step temporaries) are part of the peak, not measured alone
            assert error == 0, f"{name}: predicted − measured = {error} bytes, must be exact"
        elif name == "activations/saved":
            assert abs(pct) <= SAVED_PCT, f"{name}: {pct:+.2f}% (bound {SAVED_PCT}%)"
        elif name == "peak/step (phase model)":
            assert abs(pct) <= PEAK_PCT, f"{name}: {pct:+.2f}% (bound {PEAK_PCT}%)"


def test_cli_measures_a_llama_training_step_within_bounds(runner: Any, tmp_path: Any) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps(CONFIGS["llama"]))
    out = json.loads(run_cli(runner, "measure", str(config), "--batch", "2", "--seq-len", "128",
                             "--format", "json").stdout)
    names = [line["component"] for line in out["lines"]]
    for name in ("weights/params", "gradients", "optimizer/master_fp32", "gradients/fp32_partition",
                 "optimizer/adam_m", "optimizer/adam_v", "activations/saved", "peak/step (phase model)"):
        assert name in names
    assert_within_bounds(out["lines"])
    assert out["ok"] and out["device"] == "cpu" and out["attention"] == "sdpa"


CASES = [
    ("gpt2", dict(attention="eager", dropout=True, recompute="full", seq_len=128)),  # dropout, checkpointing
    ("mixtral", dict(job="lora", attention="sdpa", seq_len=64)),  # MoE + peft
    ("gemma2", dict(dtype="fp32", attention="eager", seq_len=128)),  # sliding/full layers, fp32, no master
    ("gemma3_text", dict(attention="sdpa", recompute="full", seq_len=128)),  # window 64 < S: explicit SDPA mask
    ("falcon", dict(dtype="fp32", attention="eager", seq_len=64)),  # new decoder architecture, fp32
    ("cohere", dict(attention="eager", recompute="full", seq_len=64)),  # fp32 LayerNorm, parallel block
    ("bloom", dict(dtype="fp32", attention="eager", seq_len=64)),  # ALiBi, embedding LayerNorm
]


@pytest.mark.parametrize(("family", "fields"), CASES, ids=[c[0] for c in CASES])
def test_training_within_bounds(family: str, fields: dict[str, Any]) -> None:
    cfg = make_config(None, **{"job": "full", "dtype": "bf16", "micro_batch": 2, **fields})
    report = measure_job(tiny_spec(family), cfg, GPU)
    assert_within_bounds(report.lines)
    assert report.ok, [(f.component, f.error_bytes, f.error_pct) for f in report.failures]


NEW_FAMILIES = ["gemma", "gemma3_text", "phi", "qwen2_moe", "gpt_neox", "gptj", "gpt_bigcode", "bloom", "falcon",
                "stablelm", "olmo2", "granite", "cohere"]
"""Model types added in issue 14: one training step each (weights, gradients, optimizer exact; saved
activations within 3%; the step's CPU peak within 10%). GPT-J and BLOOM run eagerly (no SDPA in transformers)."""


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # GPT-BigCode's import
@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_new_model_types_training_step_within_bounds(family: str) -> None:
    cfg = make_config(None, job="full", dtype="bf16", micro_batch=2, seq_len=64, attention="sdpa")
    report = measure_job(tiny_spec(family), cfg, GPU)
    assert_within_bounds(report.lines)
    saved = next(line for line in report.lines if line.component == "activations/saved")
    assert saved.measured and saved.predicted, family
    assert report.ok, [(f.component, f.error_bytes, f.error_pct) for f in report.failures]


ISSUE_11_WITHIN_PCT, ISSUE_11_UNDER_PCT = 3.0, 1.0
"""Issue 11 part 5: each answer (the phase peak) within 3% of the measured peak and never more than 1% under it."""


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # GPT-BigCode's import
@pytest.mark.parametrize("family", ["gpt_bigcode", "gptj"])
def test_model_buffers_exact_and_peak_within_issue_11_bound(family: str) -> None:
    """GPT-BigCode's (M, M) bool causal ``bias`` and GPT-J's fp32 ``embed_positions`` tables are non-persistent
    buffers, resident for the whole step (memory.hf_buffers): without them memplan's answer was 1.9% (GPT-BigCode,
    M = 512: 262,144 bytes) under the measured step."""
    config = CONFIGS[family]
    positions = config["n_positions"]
    expected = positions * positions if family == "gpt_bigcode" \
        else config["n_layer"] * positions * config["rotary_dim"] * 4  # bools; fp32 sin/cos per layer
    cfg = make_config(None, job="full", dtype="bf16", micro_batch=2, seq_len=64, attention="sdpa")
    report = measure_job(tiny_spec(family), cfg, GPU)
    lines = {line.component: line for line in report.lines}
    assert lines["weights/model_buffers"].predicted == lines["weights/model_buffers"].measured == expected
    peak = lines["peak/step (phase model)"]
    assert -ISSUE_11_UNDER_PCT <= peak.error_pct <= ISSUE_11_WITHIN_PCT, (family, peak.error_pct)
    assert report.ok, [(f.component, f.error_bytes, f.error_pct) for f in report.failures]


@pytest.mark.parametrize("family", ["mistral", "deepseek_v2"])
def test_inference_kv_cache_exact(family: str) -> None:
    cfg = make_config(None, job="infer", micro_batch=2, attention="eager", infer={"context": 80})
    report = measure_job(tiny_spec(family), cfg, GPU, decode_steps=3)
    kv = {line.component: line for line in report.lines if line.component.startswith("kv_cache")}
    assert set(kv) == {"kv_cache/after_prefill", "kv_cache"}
    assert all(line.error_bytes == 0 and line.measured for line in kv.values())
    assert report.ok


def test_deepseek_v3_gradients_exact() -> None:
    """DeepSeek-V3's e_score_correction_bias is a buffer: resident, but with no gradient or optimizer state."""
    cfg = make_config(None, job="full", micro_batch=2, seq_len=64, attention="eager")
    report = measure_job(tiny_spec("deepseek_v3"), cfg, GPU)
    assert report.ok, [(f.component, f.error_bytes) for f in report.failures]


def test_layers_truncates_visibly_and_checks_linear_scaling(runner: Any, tmp_path: Any) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**CONFIGS["llama"], "num_hidden_layers": 4}))
    out = run_cli(runner, "measure", str(config), "--layers", "2", "--batch", "1", "--seq-len", "64").stdout
    assert "first 2 of 4 layers are built, measured and predicted" in out
    assert "linear: exact" in out
    report = measure_job(tiny_spec("llama", num_hidden_layers=4), make_config(None, micro_batch=1, seq_len=64), GPU,
                         layers=2)
    # what was built is predicted, on the engine layout measure runs (16-bit model + fp32 masters: deepspeed)
    two_layers = estimate(tiny_spec("llama"), GPU, micro_batch=1, seq_len=64, engine="deepspeed").rows
    weights = next(line for line in report.lines if line.component == "weights/params")
    assert weights.predicted == weights.measured == next(r.bytes for r in two_layers if r.component == "weights/params")
    assert report.scaling["linear"] is True and report.scaling["of"] == 4 and report.scaling["period"] == 1


@pytest.mark.parametrize(("args", "message"), [
    (["--tp", "2", "--gpus", "2"], "one device"),
    (["--job", "qlora"], "--job qlora is not measured"),
    (["--zero", "2"], "ZeRO"),
    (["--recompute", "selective"], "whole layers"),
    (["--attention", "flash"], "flash attention needs CUDA"),
    (["--layers", "99"], "--layers must be between 1"),
    (["--device", "tpu"], "--device must be cpu or cuda"),
])
def test_unmeasurable_jobs_are_refused(runner: Any, args: list[str], message: str) -> None:
    result = run_cli(runner, "measure", "llama-3.2-1b", *args, code=2)
    assert message in result.stderr


def test_missing_extra_exits_2(runner: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    result = run_cli(runner, "measure", "llama-3.2-1b", code=2)
    assert "install memplan[measure]" in result.stderr


def test_measure_command_does_not_import_torch() -> None:
    code = "import sys, memplan, memplan.cli.measure_cmd, memplan.measure; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_cpu_peak_method_on_a_known_pattern() -> None:
    """Resident 4 KiB; allocate 1 MiB, free it, then 2 MiB + 1 MiB: peaks 1 MiB and 3 MiB above resident."""
    resident = torch.zeros(1024)
    with PeakMeter("cpu", [resident]) as meter:
        with meter.phase("first"):
            a = torch.ones(2**18)
            del a
        with meter.phase("second"):
            b, c = torch.ones(2**19), torch.ones(2**18)
            del b, c
    assert meter.baseline == 4096
    assert meter.phases == {"first": 4096 + 2**20, "second": 4096 + 3 * 2**20}


def test_line_bounds() -> None:
    assert Line("weights/params", 10, 10, EXACT).ok is True
    assert Line("weights/params", 11, 10, EXACT).ok is False
    assert Line("activations/saved", 103, 100, "3%").ok is True
    assert Line("activations/saved", 104, 100, "3%").ok is False
    assert Line("optimizer/step", None, 84).ok is None
    assert Line("activations/saved", None, 100, "3%").ok is False


def test_calibration_profile_round_trip(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from memplan.catalog.profiles import load_profile
    from memplan.estimator import estimate

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert load_profile("h100-sxm-80gb") is None
    path = cal.save_profile("h100-sxm-80gb", {"cuda_context_bytes": 123 * 2**20, "allocator_reserve_pct": 4.5})
    assert path == tmp_path / "memplan" / "profiles" / "h100-sxm-80gb.json"
    profile = load_profile("h100-sxm-80gb")
    assert profile is not None and profile["cuda_context_bytes"] == 123 * 2**20 and profile["path"] == str(path)
    rows = {r.component: r for r in estimate("llama-3.2-1b", "h100-sxm-80gb", job="infer").rows}
    assert rows["runtime/cuda_context"].bytes == 123 * 2**20
    assert rows["runtime/cuda_context"].source.startswith("memplan calibrate profile")
    assert "4.5%" in rows["runtime/allocator_reserve"].note
    path.write_text('{"cuda_context_bytes": -1, "allocator_reserve_pct": 4.5}')
    with pytest.raises(Exception, match="rerun 'memplan calibrate'"):
        load_profile("h100-sxm-80gb")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_calibrate_needs_cuda(runner: Any) -> None:
    result = run_cli(runner, "calibrate", "--gpu", "h100-sxm-80gb", "--dry-run", code=2)
    assert "needs a CUDA GPU" in result.stderr
