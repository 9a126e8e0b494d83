"""No option silently ignored (issue 14 part 4): every option of every command, under every job, is either
used (the JSON answer changes) or rejected (exit 2, one sentence).

The options are found by introspecting the typer app (``typer.main.get_command``), so the test follows the
CLI wherever its modules move and covers a new option without an edit here; only an option whose value is
free text needs an entry in ALTERNATIVES (the test says so when one is missing). A second test holds the
memory model to the same rule below the CLI: each JobConfig field, set to another value, changes the rows
or is rejected by the job's declaration (``memplan.config.NOT_READ``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import click
import pytest
import typer
from typer.testing import CliRunner

from memplan import estimate
from memplan.cli.app import app
from memplan.config import Job
from memplan.engines import rules
from memplan.errors import MemplanError

RUNNER = CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1", "HF_HUB_OFFLINE": "1"})
ROOT = Path(__file__).resolve().parents[1]
JOBS = [j.value for j in Job]

BASE: dict[str, list[str]] = {
    "estimate": ["gpt2", "--format", "json"],
    "plan": ["gpt2", "--format", "json", "--top", "1", "--zero", "0", "--tp", "1", "--pp", "1", "--batch", "1",
             "--recompute", "none", "--offload-optimizer", "none", "--offload-params", "none", "--optimizer", "adamw",
             "--no-per-layer-offload"],
    "sweep": ["--model", "gpt2", "--gpu", "l4", "--gpu-count", "1", "--format", "json", "--workers", "1"],
    "check": [str(ROOT / "recipes" / "llama-3.1-8b-qlora-rtx4090.yaml"), "--format", "json"],
    "models": ["--format", "json"],
    "gpus": ["--format", "json"],
    "explain": ["kv_cache"],
}
"""A quick valid run of each command (a small model, a pinned plan space); the option under test replaces
its own value here. JSON output, so 'used' means the answer's JSON changed."""
JOB_BASE: dict[tuple[str, str], list[str]] = {
    ("plan", "infer"): ["gpt2", "--format", "json", "--top", "1", "--tp", "1", "--pp", "1", "--batch", "1",
                        "--context", "2048", "--offload-params", "none", "--no-per-layer-offload"],
}
"""A job's own quick run where the command's BASE pins choices that job does not read."""
SKIPPED = {"measure": "runs a real model with torch (minutes); its job options are estimate's declarations, "
                      "covered through estimate",
           "calibrate": "measures the CUDA context of a real GPU"}
JOBLESS = {"models", "gpus", "check", "explain"}
"""Commands with no --job: each option is checked once."""

ALTERNATIVES: dict[str, str | dict[str, str]] = {
    "--gpu": "a100-sxm-40gb", "--cpu-ram": "64GiB", "--nvme": "2TB", "--dtype": "fp32", "--optimizer": "sgd",
    "--grad-dtype": "fp32", "--accounting": "paper", "--offload-optimizer": "cpu", "--offload-params": "cpu",
    "--recompute": "full", "--quant-map": "0-5=int8,6-11=nf4", "--offload-layers": "0-5", "--attention": "eager",
    "--activation-accounting": "paper", "--cuda-context": "1GiB", "--lora-targets": "q,v",
    "--kv-dtype": "fp8", "--objective": "min-memory", "--solver": "cbc", "--context": "1024", "--plot-axis": "batch",
    "--quant": {"infer": "int8", "lora": "int8", "qlora": "fp4", "*": "nf4"},
    "--model": "gpt2,qwen2.5-0.5b", "--metric": "fits", "--min-headroom": "10%", "--gpu-count": "1,2",
    "--seq-len": "1024", "--batch": "2", "--tp": "2", "--family": "llama", "--vendor": "amd",
    "--min-memory": "40GiB", "--set": "job.seq_len=1024", "--global-batch": "16", "--zero": "1",
    "--recompute-layers": "2", "--optimizer-gpu-layers": "2", "--allocator-reserve": "7", "--gpus-per-node": "2",
    "--pp": "2", "--lora-rank": "8", "--top": "2", "--recipe": str(ROOT / "recipes" / "qwen2.5-72b-serve-32k.yaml"),
    "--engine": {"infer": "llamacpp", "*": "deepspeed"}, "--lora-dtype": {"qlora": "fp32", "*": "fp16"},
    "--optimizer-impl": "for-loop", "--kept-output": "logits", "--bnb-integration": "lightning",
    "--transformers-version": "4.38", "--n-batch": "256", "--bnb-version": "0.42.0", "--module-layout": "litgpt",
    "--previous-seq-len": "0",
    "--bucket-cap-mb": "100", "--fsdp-prefetch": "2", "--sharding-strategy": "SHARD_GRAD_OP", "--reduce-bucket-size": "50000000",
    "--allgather-bucket-size": "50000000", "--stage3-max-live-parameters": "10000000",
    "--stage3-prefetch-bucket-size": "5000000", "--stage3-param-persistence-threshold": "10000000",
    "--gpu-memory-utilization": "0.5", "--max-num-batched-tokens": "4096", "--max-num-seqs": "64",
    "--mem-fraction-static": "0.8", "--chunked-prefill-size": "4096", "--max-running-requests": "1",
    "--page-size": "16", "--cuda-graph-max-bs": "8", "--tensor-split": "3,1", "--ggml-sched-max-copies": "2",
    "--kv-block-size": "32", "--max-model-len": "512", "--n-gpu-layers": "6", "--n-ctx": "512",
    "--n-ubatch": "256", "--cache-type-k": "q8_0", "--cache-type-v": "q8_0", "--cache-implementation": "static",
    "--prompt-tokens": "128", "--hbm-efficiency": "0.5", "--compute-efficiency": "0.3",
    "--cluster": "pcie-ethernet", "--mfu": "0.3", "--comm-overlap": "0.5", "--ep": "2", "--cp": "2", "--cp-comm": "ulysses",
    "--intra-node-gbps": "10", "--inter-node-gbps": "1", "--intra-node-latency-us": "500",
    "--inter-node-latency-us": "500", "--virtual-stages": "2", "--global-batch-tokens": "65536",
    "--train-tokens": "1000000000", "--hsdp-shard-size": "2", "--mics-shard-size": "2",
    "--zero-hpz-partition-size": "2", "--cpu-offloading-num-layers": "4", "--shard-group": "full",
    "--usd-per-hour": "3.5", "--recompute-modules": "layernorm", "--exp-avg-dtype": "bf16", "--exp-avg-sq-dtype": "bf16",
    "--fp8-recipe": "tensorwise", "--pp-schedule": "ZBVZeroBubble", "--grad-accum": "4",
    "--microbatch-group-size-per-virtual-pipeline-stage": "4",
    "--nccl-buffsize": "1MiB", "--nccl-max-nchannels": "16", "--nccl-nvls-enable": "0", "--nccl-nvls-chunksize": "512KiB",
}
"""Another valid value for each option that takes free text (numbers and flags are derived)."""
DEFAULT_ON: dict[str, tuple[str, ...]] = {
    **{flag: tuple(JOBS) for flag in ("--reshard-after-forward", "--contiguous-gradients", "--flash-attn", "--op-offload",
                                      "--llama-set-rows", "--use-orig-params", "--fsdp-no-sync", "--limit-all-gathers",
                                      "--pp-return-outputs")},
    "--master-weights": ("pretrain", "full"),
    "--store-param-remainders": tuple(JOBS),
}
"""Flags whose unset value (None) means a default that is on (for these jobs): the other value is the --no- form
(16-bit full-weight training keeps fp32 masters by default; LoRA adapters only when asked)."""
FILE_OPTIONS = {"--plot", "--junit", "--debug-lp", "--out"}
"""Options that write a file: used when the file appears (or rejected with exit 2)."""
RESULT_NEUTRAL = {
    "--time-limit": "bounds the solver's time; the same optimum within the limit",
    "--solver": "HiGHS or CBC find the same optimum",
    "--workers": "worker processes; the same cells",
    "--format": "the output format itself (the comparison is made in JSON)",
    "--help": "prints help",
    "--quiet": "silences progress lines on stderr; the answer is the same",
    "--timings": "writes or zeroes only the wall-clock fields, which this comparison drops",
}
"""Options that are read but, by design, leave a correct answer unchanged."""
CONTEXT: dict[tuple[str, ...], list[str]] = {
    ("plan", "--top"): ["--batch", "1,2"],
    ("estimate", "--recompute-layers"): ["--recompute", "full"],
    ("estimate", "--recompute-layers", "infer"): [],
    ("sweep", "--gpus-per-node"): ["--gpu-count", "4"],
    ("plan", "--intra-node-gbps"): ["--gpus", "2"],
    ("plan", "--intra-node-latency-us"): ["--gpus", "2"],
    ("plan", "--comm-overlap"): ["--gpus", "2"],
    ("plan", "--inter-node-gbps"): ["--nodes", "2"],
    ("plan", "--inter-node-latency-us"): ["--nodes", "2"],
    ("plan", "--virtual-stages"): ["--gpus", "2", "--pp", "2"],
    **{("plan", flag, "galore"): [] for flag in ("--intra-node-gbps", "--intra-node-latency-us", "--comm-overlap",
                                                  "--inter-node-gbps", "--inter-node-latency-us", "--virtual-stages")},
}
"""Arguments under which an option can act, added to both runs (``--top`` needs more than one plan; the
fabric's links and overlap need several GPUs or nodes, an interleaved pipeline pp > 1; GaLore plans run on one
GPU, where those step-time knobs are rejected)."""
DP2, FSDP2 = ["--gpus", "2"], ["--engine", "fsdp2", "--gpus", "2"]
ZERO2, ZERO3 = ["--engine", "deepspeed", "--zero", "2", "--gpus", "2"], ["--engine", "deepspeed", "--zero", "3", "--gpus", "2"]
ENGINE_SETTINGS: dict[str, list[str]] = {
    "--gradient-as-bucket-view": DP2, "--reshard-after-forward": FSDP2, "--fsdp-prefetch": FSDP2,
    "--pp-return-outputs": [*FSDP2, "--pp", "2"], "--pp-schedule": [*FSDP2, "--pp", "2", "--virtual-stages", "2"],
    "--grad-accum": [*FSDP2, "--pp", "2"],
    "--reduce-bucket-size": ZERO2, "--contiguous-gradients": ZERO2, "--overlap-comm": ZERO2,
    "--stage3-max-live-parameters": ZERO3, "--stage3-prefetch-bucket-size": ZERO3,
    "--stage3-param-persistence-threshold": ZERO3, "--use-distributed-optimizer": ["--engine", "megatron", *DP2],
    "--sequence-parallel": ["--engine", "megatron", "--tp", "2", *DP2],
    "--hsdp-shard-size": ["--engine", "fsdp2", "--gpus", "4"], "--mics-shard-size": [*ZERO3[:-1], "4"],
    "--zero-hpz-partition-size": [*ZERO3[:-1], "4"],
    "--cpu-offloading-num-layers": ["--engine", "megatron", "--offload-activations"],
    "--recompute-modules": ["--engine", "megatron", "--recompute", "selective"],
    "--use-precision-aware-optimizer": ["--engine", "megatron"],
    "--fp8-recipe": ["--engine", "megatron", "--dtype", "fp8"],
    "--activation-func-fp8-input-store": ["--engine", "megatron"],
    "--microbatch-group-size-per-virtual-pipeline-stage": ["--engine", "megatron", "--gpus", "2", "--pp", "2",
                                                           "--virtual-stages", "2", "--grad-accum", "8"],
    **{flag: ["--engine", "megatron", "--use-precision-aware-optimizer"]
       for flag in ("--exp-avg-dtype", "--exp-avg-sq-dtype", "--store-param-remainders")},
}
"""Where a training-engine knob acts (pretrain and full jobs; elsewhere it is rejected): DDP buckets and FSDP2
gathers need data parallelism, DeepSpeed's reduce bucket ZeRO-1/2 (overlap_comm doubles it), the stage3_*
knobs ZeRO-3, Megatron's distributed optimizer dp > 1, sequence parallelism --tp 2."""
VLLM, LLAMACPP = ["--engine", "vllm", "--context", "1024"], ["--engine", "llamacpp", "--quant", "q4_k_m"]
SGLANG = ["--engine", "sglang", "--context", "1000"]
SERVING_SETTINGS: dict[str, list[str]] = {
    "--gpu-memory-utilization": VLLM, "--max-num-batched-tokens": VLLM, "--max-num-seqs": VLLM,
    "--kv-block-size": ["--engine", "vllm", "--context", "1000"], "--enforce-eager": VLLM, "--max-model-len": VLLM,
    "--n-gpu-layers": LLAMACPP, "--n-ctx": LLAMACPP, "--n-batch": LLAMACPP, "--n-ubatch": LLAMACPP,
    "--cache-type-k": LLAMACPP, "--cache-type-v": LLAMACPP, "--flash-attn": [*LLAMACPP, "--context", "4096"],
    "--cache-implementation": ["--engine", "transformers"],
    "--op-offload": [*LLAMACPP, "--n-gpu-layers", "6"], "--llama-set-rows": LLAMACPP,
    "--swa-full": LLAMACPP,
    "--mem-fraction-static": SGLANG, "--chunked-prefill-size": SGLANG, "--max-running-requests": SGLANG,
    "--page-size": SGLANG, "--cuda-graph-max-bs": SGLANG, "--tensor-split": [*LLAMACPP, "--gpus", "2", "--pp", "2"],
    "--ggml-sched-max-copies": [*LLAMACPP, "--gpus", "2", "--pp", "2"],
    "--paged": ["--context", "1000"], "--block-size": ["--paged", "--context", "1000"],
}
"""Where a serving knob acts (infer jobs; elsewhere it is rejected): its engine (vLLM within gpt2's 1024
positions; llama.cpp on a GGUF quant, at a context where attention, not the logits, sizes its compute buffer), a
paged cache whose blocks do not divide the context."""
for _command in ("estimate", "plan"):
    CONTEXT.update({(_command, flag, job): extra for flag, extra in ENGINE_SETTINGS.items() for job in ("pretrain", "full")})
    CONTEXT.update({(_command, flag, "infer"): extra for flag, extra in SERVING_SETTINGS.items()})
# plan derives the micro-batches from the global batch (--grad-accum is estimate's)
CONTEXT.update({("plan", "--microbatch-group-size-per-virtual-pipeline-stage", job): [
    *ENGINE_SETTINGS["--microbatch-group-size-per-virtual-pipeline-stage"][:-2], "--global-batch", "8"]
    for job in ("pretrain", "full")})
# the request table only moves bytes where the reserved share overflows: a 0.999 static fraction leaves ~80 MB
CONTEXT[("plan", "--max-running-requests", "infer")] = [*SGLANG, "--mem-fraction-static", "0.999"]
for _job in ("pretrain", "full"):  # a slow fabric across 2 nodes: sharding within a node wins, so "full" changes it
    CONTEXT[("plan", "--shard-group", _job)] = ["--engine", "fsdp2", "--gpus", "2", "--nodes", "2", "--inter-node-gbps",
                                               "1"]
for _job in ("lora", "qlora"):
    CONTEXT[("estimate", "--sequence-parallel", _job)] = ["--engine", "deepspeed", "--tp", "2", *DP2]
for _command in ("estimate", "plan"):  # fp32 adapters need no master copy
    CONTEXT[(_command, "--master-weights", "lora")] = ["--lora-dtype", "bf16"]
FSDP1 = ["--engine", "fsdp1", "--gpus", "2"]
FSDP1_LORA = {"estimate": ["--lora-dtype", "bf16"], "plan": ["--dtype", "fp32"]}
"""FSDP1 flattens a unit into one dtype: adapters sharing their block need the block's dtype (bf16 adapters in
estimate; plan's LoRA runs here are fp32 throughout)."""
FSDP1_SETTINGS: dict[str, tuple[str, ...]] = {
    "--sharding-strategy": ("pretrain", "full", "lora", "qlora"),
    "--limit-all-gathers": ("pretrain", "full", "lora", "qlora"),
    "--use-orig-params": ("lora", "qlora"),
}
"""Where an FSDP1 knob acts (memory/engine_fsdp1.py): across 2+ ranks; use_orig_params with frozen parameters.
no_sync acts over accumulation micro-batches: plan's --global-batch (estimate has no accumulation, so it is
rejected there)."""
for _command in ("estimate", "plan"):
    for _flag, _jobs in FSDP1_SETTINGS.items():
        CONTEXT.update({(_command, _flag, job): FSDP1 + (FSDP1_LORA[_command] if job == "lora" else [])
                        for job in _jobs})
CONTEXT.update({("plan", "--fsdp-no-sync", job): [*FSDP1, "--global-batch", "16",
                                                  *(FSDP1_LORA["plan"] if job == "lora" else [])]
                for job in ("pretrain", "full", "lora", "qlora")})
NEUTRAL_IN: dict[tuple[str, str], str] = {
    ("--lora-alpha", "lora"): "scales the adapters' output (alpha/rank): no byte or step time depends on it",
    ("--lora-alpha", "qlora"): "scales the adapters' output (alpha/rank): no byte or step time depends on it",
}
"""(option, job) pairs read by design with no effect on the answer (the value is passed on to the engine)."""
SCENARIO: dict[tuple[str, ...], list[str]] = {
    ("plan", "--per-layer-offload", "infer"): ["llama-3.1-8b", "--gpu", "t4", "--format", "json", "--top", "1",
                                               "--context", "1024", "--batch", "1"],
    ("plan", "--per-layer-offload", "full"): ["llama-3.2-1b", "--gpu", "rtx-4060-ti-16gb", "--format", "json",
                                              "--top", "1", "--zero", "3", "--offload-params", "none", "--batch", "1",
                                              "--recompute", "full", "--optimizer", "adamw"],
}
"""A whole run (replacing BASE) where an option can act: per-layer placement matters only when the
model does not fit whole (8B weights on a 15 GiB T4; a 1B model's Adam states on a 16 GB card)."""
KNOWN_IGNORED = {
    ("plan", "--comm-overlap"): "gpt2 on 2 GPUs: its gradient all-reduce hides entirely behind backward at the engine's "
                                "default overlap and at 0.5 alike, so the step time does not move; not yet rejected there",
    ("plan", "--intra-node-gbps"): "lora/qlora on 2 GPUs all-reduce only the adapters' gradients, latency-bound: the "
                                   "bandwidth does not move the step time; not yet rejected there",
    ("plan", "--inter-node-gbps"): "as --intra-node-gbps, for the adapters' all-reduce across nodes",
    ("plan", "--plot-axis"): "cli helper: --plot-axis without --plot is not rejected yet",
    ("plan", "--per-layer-offload"): "per-layer placement covers inference weights and the AdamW states of "
                                     "full-weight jobs; for other jobs --no-per-layer-offload is moot, and below "
                                     "the CLI the default-on value cannot be told from a given one",
}
"""Options still ignored in some context, each with the helper that owns the fix; reported, not hidden."""


def invoke(args: list[str]) -> Any:
    return RUNNER.invoke(app, args)


def commands() -> dict[str, Any]:
    """The app's commands by name (the group loads them lazily, so ``.commands`` alone is empty)."""

    group = typer.main.get_command(app)
    ctx = click.Context(group)
    return {name: group.get_command(ctx, name) for name in group.list_commands(ctx)}  # type: ignore[attr-defined]


def options_of(command: str) -> list[Any]:
    cmd = commands()[command]
    return [p for p in cmd.params if p.param_type_name == "option" and p.opts[0] != "--help"]


def variant(param: Any, job: str | None, base: list[str]) -> list[str] | None:
    """Arguments that give ``param`` a value other than it has in ``base`` (its default when absent there);
    None when it needs an ALTERNATIVES entry."""
    flag = param.opts[0]
    if getattr(param, "is_flag", False):
        off = param.secondary_opts[0] if param.secondary_opts else None
        if job in DEFAULT_ON.get(flag, ()) and flag not in base:
            return [off]
        given = flag in base or (off is not None and off in base)
        on = flag in base if given else param.default is True
        if on and off is None:  # an on-only flag already given: nothing else to give it
            return None
        return [off] if on else [flag]
    alt = ALTERNATIVES.get(flag)
    if isinstance(alt, dict):
        alt = alt.get(job or "*", alt["*"])
    if alt is None and not isinstance(param.default, bool) and isinstance(param.default, int | float):
        alt = str(param.default * 2 if param.default else 2)
    return None if alt is None else [flag, str(alt)]


def with_option(base: list[str], extra: list[str]) -> list[str]:
    """``base`` with the option in ``extra`` replacing any value it already had there."""
    args = list(base)
    flag = extra[0]
    names = {flag, re.sub(r"^--no-", "--", flag), "--no-" + flag.removeprefix("--")}
    for name in names & set(args):
        i = args.index(name)
        takes_value = i + 1 < len(args) and not args[i + 1].startswith("--")
        del args[i:i + (2 if takes_value and len(extra) == 2 else 1)]
    return args + extra


ECHO = ("seconds", "elapsed_s", "wall_s", "path", "config")
"""Keys left out of the comparison: wall-clock fields, and the echo of the input configuration (a field read
nowhere still shows there, so only the answer itself counts as use)."""


def scrub(text: str) -> str:
    """JSON without the wall-clock fields, so two runs of one input compare equal."""
    try:
        doc = json.loads(text)
    except ValueError:
        return text
    return json.dumps(_drop(doc), sort_keys=True)


def _drop(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _drop(v) for k, v in node.items() if k not in ECHO}
    if isinstance(node, list):
        return [_drop(v) for v in node]
    return node


def cases() -> list[tuple[str, str | None, str]]:
    out = []
    for command in commands():
        if command in SKIPPED:
            continue
        jobs = [None] if command in JOBLESS else JOBS
        out += [(command, job, p.opts[0]) for job in jobs for p in options_of(command) if p.opts[0] != "--job"]
    return out


@pytest.fixture(scope="module")
def baselines(tmp_path_factory) -> dict[tuple[str, str | None], tuple[int, str]]:
    return {}


def job_args(command: str, job: str | None, flag: str = "") -> list[str]:
    """The quick run of ``command`` for ``job``, in the scenario and context where ``flag`` can act."""
    scenario = SCENARIO.get((command, flag, job or "")) or SCENARIO.get((command, flag, "full")) if job != "infer" \
        else SCENARIO.get((command, flag, "infer"))
    base = scenario or JOB_BASE.get((command, job or ""), BASE[command])
    args = [command, *base, *(["--job", job] if job else [])]
    return args + CONTEXT.get((command, flag, job or ""), CONTEXT.get((command, flag), []))


@pytest.mark.parametrize("command, job, flag", cases(), ids=lambda v: str(v))
def test_every_option_is_used_or_rejected(command, job, flag, baselines, tmp_path, monkeypatch):
    if flag in RESULT_NEUTRAL:
        pytest.skip(f"read, result-neutral by design: {RESULT_NEUTRAL[flag]}")
    monkeypatch.chdir(tmp_path)
    assert command in BASE, f"a new command {command!r}: give it a quick BASE entry"
    param = next(p for p in options_of(command) if p.opts[0] == flag)
    args = job_args(command, job, flag)
    if flag in FILE_OPTIONS:
        target = tmp_path / {"--plot": "out.png", "--junit": "out.xml", "--debug-lp": "out.lp"}.get(flag, "out.csv")
        extra: list[str] | None = [flag, str(target)]
    else:
        extra = variant(param, job, args)
    assert extra is not None, f"{command} {flag}: add another valid value to ALTERNATIVES"
    key = tuple(args)
    if key not in baselines:
        first = invoke(args)
        baselines[key] = (first.exit_code, scrub(first.stdout) if first.exit_code != 2 else first.stderr)
    base_code, base_out = baselines[key]
    assert base_code in (0, 1), f"baseline {' '.join(args)} exits {base_code}: {base_out[:300]}"
    result = invoke(with_option(args, extra))
    if result.exit_code == 2:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, result.stderr
        return
    assert result.exit_code in (0, 1), f"exit {result.exit_code}: {result.stderr}"
    if flag in FILE_OPTIONS:
        assert any(tmp_path.iterdir()), f"{flag} wrote nothing"
        return
    if flag == "--timings":  # acts on the wall-clock fields the comparison leaves out: --no-timings zeroes them
        assert extra == ["--no-timings"] and re.findall(r'"seconds": (\S+?),?\n', result.stdout), result.stdout[:300]
        assert all(float(v) == 0 for v in re.findall(r'"seconds": (\S+?),?\n', result.stdout)), result.stdout[:300]
        return
    if (flag, job) in NEUTRAL_IN and scrub(result.stdout) == base_out:
        return
    if (command, flag) in KNOWN_IGNORED and scrub(result.stdout) == base_out:
        pytest.xfail(KNOWN_IGNORED[(command, flag)])
    assert scrub(result.stdout) != base_out, f"{command} --job {job} {' '.join(extra)}: silently ignored"


# -- below the CLI: each JobConfig field changes the memory rows or is rejected ------------------------

FIELD_VALUES: dict[str, Any] = {
    "dtype": "fp32", "optimizer": "sgd", "master_weights": True, "grad_dtype": "fp32", "zero": 1,
    "offload_optimizer": "cpu", "accounting": "paper", "tp": 2, "pp": 2, "micro_batch": 2, "seq_len": 1024,
    "recompute": "full", "flash_attention": False, "sequence_parallel": True, "attention": "eager", "dropout": True,
    "loss_fp32": False, "activation_accounting": "paper", "cuda_context_bytes": 2**30, "allocator_reserve_pct": 7.0,
    "safety_margin_pct": 5.0, "lora": {"rank": 8}, "galore": {"rank": 64}, "infer": {"context": 1024},
    "offload_activations": True,
    "bnb_integration": "lightning",
}
JOB_FIELD_VALUES: dict[tuple[str, str], Any] = {("grad_dtype", "pretrain"): "bf16", ("grad_dtype", "full"): "bf16"}
"""A job whose default already is FIELD_VALUES' value gets another one: full-weight jobs keep fp32 gradients by
default (mixed precision over fp32 master parameters: torch's gradients take the parameters' dtype)."""
PREREQUISITES: dict[str, dict[str, Any]] = {
    "zero": {"gpus_per_node": 2}, "tp": {"gpus_per_node": 2}, "pp": {"gpus_per_node": 2},
    "sequence_parallel": {"gpus_per_node": 2, "tp": 2}, "offload_optimizer": {"zero": 1, "gpus_per_node": 2},
    "accounting": {"zero": 3, "gpus_per_node": 2}, "perf": {"gpus_per_node": 2, "pp": 2},
    "bnb_integration": {"quant": "nf4"},
}
"""A setting in which the field can matter (ZeRO accounting differs once states are partitioned)."""
MEMORY_NEUTRAL = {
    ("master_weights", "lora"): "LoRA adapters are fp32 already: no separate master copy either way",
    ("master_weights", "qlora"): "the QLoRA adapters' master copy follows lora.dtype",
    ("master_weights", "galore"): "GaLore's projected update keeps no master copy in memplan's model",
    ("master_weights", "pretrain"): "16-bit training already keeps the fp32 master copy by default",
    ("master_weights", "full"): "16-bit training already keeps the fp32 master copy by default",
    ("optimizer", "galore"): "GaLore's states are its own projected Adam; sgd has no state to project",
}
"""(field, job) pairs where the value is read but this particular change cannot move a byte."""


def setting(field: str, job: str) -> dict[str, Any]:
    """The job and the prerequisites under which ``field`` can matter (GaLore's per-layer updates are
    single-GPU, so a multi-GPU GaLore setting turns them off)."""
    pre = {"job": job, **PREREQUISITES.get(field, {})}
    if job == "galore" and pre.get("gpus_per_node", 1) > 1:
        pre["galore"] = {"per_layer_updates": False}
    return pre


def memory_rows(est: Any) -> list[tuple[str, str, int]]:
    return sorted((r.component, r.tier.value, r.bytes) for r in est.rows)


@pytest.mark.parametrize("job", JOBS)
@pytest.mark.parametrize("field", sorted(FIELD_VALUES))
def test_every_config_field_changes_the_memory_or_is_rejected(field, job):
    pre = setting(field, job)
    try:
        base = estimate("gpt2", "h100", **pre)
    except MemplanError:  # the prerequisites do not apply to this job: the field alone, on the defaults
        pre = {"job": job}
        base = estimate("gpt2", "h100", **pre)
    try:
        other = estimate("gpt2", "h100", **{**pre, field: JOB_FIELD_VALUES.get((field, job), FIELD_VALUES[field])})
    except MemplanError:
        return
    changed = memory_rows(base) != memory_rows(other)
    if not changed and (field, job) in MEMORY_NEUTRAL:
        return
    assert changed, f"{field}={FIELD_VALUES[field]!r} under a {job} job changes no byte and is not rejected"


def unvalidated_rows(cfg: Any) -> list[tuple[str, str, int]]:
    """The memory rows of ``cfg`` computed without JobConfig's validation (to test the declaration itself)."""
    from memplan.arch.build import build_architecture
    from memplan.catalog.resolve import load_model
    from memplan.catalog.schema import HostSpec
    from memplan.catalog.store import catalog_gpu
    from memplan.memory import components
    from memplan.memory.context import Context

    ctx = Context(arch=build_architecture(load_model("gpt2")), cfg=cfg, gpu=catalog_gpu("h100"), host=HostSpec())
    rows, _, _ = components.all_rows(ctx)
    return sorted((r.component, r.tier.value, r.bytes) for r in rows)


@pytest.mark.parametrize("job", JOBS)
def test_the_not_read_declaration_is_true(job):
    """Each field a job is declared not to read really moves no byte of that job (set past validation),
    so the declaration rejects nothing the memory model would use."""
    from memplan.config import NOT_READ, GaloreConfig, InferConfig, JobConfig, LoraConfig, PerfConfig

    nested = {"lora": LoraConfig(rank=8, dora=True), "galore": GaloreConfig(rank=64, eight_bit=True),
              "infer": InferConfig(context=1024, kv_dtype="fp8"),
              "perf": PerfConfig(mfu=0.5, virtual_stages=2, fp8=True, comm_overlap=0.5)}
    for field in NOT_READ[Job(job)]:
        pre = {k: v for k, v in setting(field, job).items() if k not in NOT_READ[Job(job)]}
        base = JobConfig.model_validate(pre)
        value = nested.get(field, FIELD_VALUES.get(field))
        if value is None:
            continue
        if isinstance(value, dict):
            value = type(getattr(base, field))(**value)
        try:
            same = unvalidated_rows(base) == unvalidated_rows(base.model_copy(update={field: value}))
        except (MemplanError, ValueError, TypeError, AttributeError):
            continue  # the memory model cannot even evaluate it for this job: it is not read as a choice
        assert same, f"{field} is declared not read by {job} jobs but changes their memory"


# -- step-time knobs: each PerfConfig field changes the step time (or the memory) or is rejected -------------

PERF_VALUES: dict[str, Any] = {
    "mfu": 0.3, "cluster": "pcie-ethernet", "intra_node_gbps": 10.0, "inter_node_gbps": 1.0,
    "intra_node_latency_us": 500.0, "inter_node_latency_us": 500.0, "comm_overlap": 0.0, "fp8": True,
    "comm_sm_fraction": 0.2, "virtual_stages": 2,
}
PERF_SETTING = {"gpus_per_node": 2, "nodes": 4, "tp": 2, "pp": 2, "micro_batch": 1, "grad_accum": 8,
                "engine": "deepspeed"}
"""Four nodes of two GPUs with tp 2 (in a node) × pp 2 × dp 2 (across nodes) on DeepSpeed (which overlaps its
gradient reduction by default, ``comm_overlap`` 0 undoes it): every link, collective and the pipeline bubble
is on the step, so each knob has traffic or a bubble to act on."""


def test_every_perf_field_is_declared_here():
    """A new step-time knob gets a value here, so the test below covers it."""
    from memplan.config import PerfConfig

    assert set(PerfConfig.model_fields) == set(PERF_VALUES)


@pytest.mark.parametrize("job", [j for j in JOBS if j != "infer"])
@pytest.mark.parametrize("field", sorted(PERF_VALUES))
def test_every_perf_field_changes_the_step_time_or_is_rejected(field, job):
    """``perf`` tunes time, not memory: a training job's knob, set to another value, changes the step time of
    a fixed configuration (``budget.step_time``, the planner's own terms) or its memory, or is rejected."""
    from memplan.catalog.resolve import load_model
    from memplan.catalog.store import catalog_gpu
    from memplan.config import JobConfig
    from memplan.planner.budget import step_time

    extra = {"galore": {"per_layer_updates": False}} if job == "galore" else {}
    base = JobConfig(job=job, **PERF_SETTING, **extra)
    try:
        other = JobConfig(job=job, **PERF_SETTING, **extra, perf={field: PERF_VALUES[field]})
    except ValueError:
        return
    spec, gpu = load_model("gpt2"), catalog_gpu("h100")
    try:
        rules.check(other)
    except MemplanError:  # rejected by the engine's rule (DeepSpeed's pipeline runs no virtual stages)
        return
    before, after = step_time(spec, gpu, base).step_s, step_time(spec, gpu, other).step_s
    moved = memory_rows(estimate(spec, gpu, base)) != memory_rows(estimate(spec, gpu, other))
    assert before != after or moved, f"perf.{field}={PERF_VALUES[field]!r} under a {job} job changes neither time nor memory"


def test_perf_is_not_read_by_serving():
    """Serving plans time themselves without ``perf``, so an infer job rejects it (``config.NOT_READ``)."""
    from memplan.config import JobConfig

    with pytest.raises(ValueError, match=r"perf\.mfu"):
        JobConfig(job="infer", perf={"mfu": 0.5})
