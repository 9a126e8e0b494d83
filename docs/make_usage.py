"""Regenerate docs/usage.md: every output excerpt in it is produced here by running memplan.

Run from the repository root:  python docs/make_usage.py
The prose lives in this file; the blocks marked ``$ memplan ...`` are real runs (stdout, then stderr),
so the documentation cannot drift from the code. The check reports are made with ``--no-timings`` (their
wall-clock fields written as 0) so that regenerating them changes nothing.
"""

from __future__ import annotations

import os
import shlex
import sys
import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # document this checkout's memplan, not an installed one

from typer.testing import CliRunner  # noqa: E402

import memplan.cli.ci  # noqa: E402,F401  (registers check, sweep and explain on the app)
from memplan.cli.app import app  # noqa: E402

warnings.simplefilter("ignore")
OUT = ROOT / "docs" / "usage.md"
RUNNER = CliRunner(env={"COLUMNS": "100", "NO_COLOR": "1", "TERM": "dumb"})


def run(command: str, *, head: int | None = None, tail: int | None = None) -> str:
    """A fenced block: the command line, its output (stdout then stderr), and its exit code when not 0."""
    args = shlex.split(command)
    assert args[0] == "memplan"
    result = RUNNER.invoke(app, args[1:])
    lines = (result.stdout + result.stderr).rstrip("\n").splitlines()
    if head is not None and len(lines) > head:
        lines = [*lines[:head], "..."]
    if tail is not None and len(lines) > tail:
        lines = ["...", *lines[-tail:]]
    code = "" if result.exit_code == 0 else f"\n$ echo $?\n{result.exit_code}"
    return f"```console\n$ {command}\n" + "\n".join(lines) + f"{code}\n```"


def file_head(path: Path, lines: int) -> str:
    text = path.read_text().splitlines()[:lines]
    return "```text\n" + "\n".join(text) + "\n...\n```"


def csv_excerpt(path: Path) -> str:
    import pandas as pd

    df = pd.read_csv(path)
    cols = ["model", "gpu", "job", "micro_batch", "seq_len", "infer_context", "max_batch", "ok",
            "gpu_total_bytes", "gpu_total_gib", "gpu:weights/params_bytes", "gpu:kv_cache_bytes"]
    cols = [c for c in cols if c in df.columns]
    return "```text\n" + df[cols].head(6).to_csv(index=False) + "...\n```"


def bad_recipe(tmp: Path) -> Path:
    path = tmp / "serve-70b.yaml"
    path.write_text("model: llama-3.1-70b\nhardware:\n  gpu: h100\n  gpus_per_node: 4\n  cpu_ram: 512G\n"
                    "job: {type: infer, context: 32768}\nfixed: {tp: 4}\n")
    return path


def document(tmp: Path) -> str:
    csv_path = tmp / "capacity.csv"
    junit_path = tmp / "memplan-check.xml"
    sweep = run("memplan sweep --model llama-3.1-8b,mistral-7b,qwen2.5-14b,qwen2.5-32b,llama-3.1-70b "
                f"--gpu l4,a100-sxm-80gb,h100,h200 --job qlora,infer --workers 1 --out {csv_path}")
    check_all = run("memplan check recipes/")
    run(f"memplan check recipes/ --junit {junit_path} --no-timings")
    parts = [INTRO,
             "## 1. Interactive planning", PLANNING,
             run("memplan estimate llama-3.1-8b --gpu rtx-4090 --job qlora --recompute full --lora-targets all-linear"),
             PLANNING_2,
             run("memplan plan llama-3.1-70b --gpu a100 --gpus 8 --job lora --seq-len 4096 --global-batch 64 "
                 "--tp 2,4,8 --pp 1,2 --zero 0,3 --batch 1,2", head=22),
             PLANNING_3,
             run("memplan plan llama-3.1-8b --gpu t4 --job lora --zero 0 --offload-optimizer none "
                 "--offload-params none"),
             PLANNING_4,
             run("memplan explain optimizer/adam_m --brief"),
             PLANNING_5,
             "## 2. CSV capacity reports", REPORTS,
             sweep.replace(str(csv_path), "capacity.csv"),
             REPORTS_2, csv_excerpt(csv_path),
             REPORTS_3,
             run("memplan sweep --recipe recipes/qwen2.5-72b-serve-32k.yaml --context 32768 --gpu h100,h200,mi300x"),
             REPORTS_4,
             "## 3. CI capacity gates", GATES,
             check_all, GATES_2,
             run("memplan check recipes/mistral-7b-lora-a10g.yaml --set job.seq_len=8192"),
             run(f"memplan check {bad_recipe(tmp)}").replace(str(tmp) + "/", ""),
             GATES_3,
             run("memplan check recipes/phi-3-mini-gguf-t4.yaml --format json --no-timings", head=32),
             GATES_4, file_head(junit_path, 12).replace(str(ROOT) + "/", ""),
             GATES_5, RECIPES]
    return "\n\n".join(parts).rstrip() + "\n"


INTRO = """# Using memplan

memplan is used three ways: interactively at the command line, as a source of CSV capacity
reports, and as a CI gate that fails when a change no longer fits. Every output below was produced
by running the commands (`python docs/make_usage.py` regenerates this file). Memory is shown in
GiB (2^30 bytes) and GB (10^9 bytes) only where the unit is written out; JSON and CSV carry exact
integer `*_bytes`."""

PLANNING = """`memplan estimate` evaluates one fixed configuration: every component on every tier
(GPU per GPU, CPU RAM and NVMe per node) against capacity."""

PLANNING_2 = """`memplan plan` lets an ILP choose the configuration: tensor/pipeline degrees, ZeRO stage and
offload, micro-batch and per-layer recomputation, here for the best throughput. Every plan is
re-checked with exact integer bytes before it is shown."""

PLANNING_3 = """When nothing fits, `plan` exits 1, names the binding constraint and lists the smallest changes
that do fit, each verified by a re-solve:"""

PLANNING_4 = """`memplan explain COMPONENT` prints how a row is computed: the function's own docstring
(formula, source, assumptions) and the named constants it uses, so documentation and code cannot
drift. `memplan explain --list` lists every component; `explain optimizer` (a topic) prints the
module's notes."""

PLANNING_5 = """Add `--plot breakdown.png` (or `.svg`, `.pdf`; needs `pip install 'memplan[plot]'`) to draw the
breakdown per tier against capacity; on `plan` the figure also shows GPU memory against context (or
batch, `--plot-axis batch`) with the capacity line. `--format json` and `--format csv` give the same
numbers for scripts. Shell completion: `memplan --install-completion`."""

REPORTS = """`memplan sweep` estimates a grid of models × GPUs × jobs × sizes (sequence lengths, contexts,
batches, GPU counts). It prints one fit matrix per job and shape (rows models, columns GPUs; a
cell is the largest micro-batch, or concurrency for serving, that fits, found by exact
re-estimation; ✗ when not even one fits) and writes one CSV row per grid point. A progress bar is
shown on a terminal (not with `--quiet` or when stderr is not a terminal); large grids run in
worker processes (`--workers`)."""

REPORTS_2 = """The CSV holds the configuration, the verdict (`ok`, with `--min-headroom` applied), the metric
(`max_batch`), and exact integer byte columns per tier (`gpu_total_bytes`) and per component and
tier (`gpu:kv_cache_bytes`), plus GiB columns for people. A few of its columns:"""

REPORTS_3 = """`--metric max-context` finds the longest sequence (context) instead, `--metric fits` only reports
which swept batches fit. A recipe's `sweep:` block describes a grid once (flags override its axes);
`tp: node` spreads each cell over the GPUs of a node, as a serving engine would:"""

REPORTS_4 = """`--format csv` prints the CSV on stdout, `--format json` the matrices and records, and
`--plot matrix.png` draws the matrices as heat-maps. `estimate` and `plan` take `--format csv` too
(one row per configuration; `plan` writes one per ranked plan)."""

GATES = """A recipe (`recipes/*.yaml`) is one scenario: model, hardware, job shape, fixed choices, an
optional search space for the planner, the objective, and the headroom that must stay free.
`memplan check` evaluates each one: a recipe without `search:` is estimated as written; one with
`search:` is planned on capacities reduced by the headroom (so the planner keeps it free) and the
chosen plan is re-checked on the real capacities. Exit codes: **0** every recipe fits with its
headroom, **1** at least one does not, **2** invalid input (the field is named)."""

GATES_2 = """A change that no longer fits fails with the reason: here the same recipe with 4× the sequence
length (`--set` overrides any recipe field for a what-if, without editing the file), and a recipe
with an ambiguous size:"""

GATES_3 = """`--format json` prints only JSON on stdout (validated against
`memplan/schema/check.schema.json`; the solver's native output is kept off stdout). Each recipe
carries its tiers with exact bytes and its full estimate. The report's wall-clock fields (`seconds` per
recipe here, `time` and `timestamp` in JUnit) differ from run to run; `--no-timings` writes them as 0
(and no timestamp) so that two reports can be diffed:"""

GATES_4 = """`--junit memplan-check.xml` writes one testcase per recipe (a `<failure>` when it does not fit,
an `<error>` when it is invalid), which GitHub, GitLab, Jenkins and Azure DevOps display:"""

GATES_5 = """### GitHub Actions

`examples/github-actions/memplan-check.yml` installs memplan and gates every pull request on
`memplan check recipes/*.yaml`: the verdicts go to the job summary, the JUnit report to the checks
tab, and both reports are kept as artifacts. Copy it to `.github/workflows/` and set
`MEMPLAN_PACKAGE` to a pinned release outside memplan's own repository.

### pre-commit

memplan ships a hook (`.pre-commit-hooks.yaml`) that checks the recipes a commit changes:

```yaml
# .pre-commit-config.yaml
repos:
  - repo: https://github.com/OWNER/memplan   # where you get memplan from
    rev: v0.1.0
    hooks:
      - id: memplan-check
```

With memplan already installed in the environment, a local hook does the same without a clone:

```yaml
repos:
  - repo: local
    hooks:
      - id: memplan-check
        name: memplan check
        entry: memplan check
        language: system
        files: ^recipes/.*\\.ya?ml$
```

### JSON Schemas

`memplan/schema/{estimate,plan,check,sweep}.schema.json` (draft 2020-12) describe the JSON output
(`schema_version` 1). They are generated from the pydantic output models
(`python -m memplan.report.schemas`) and tests validate real output against them."""

RECIPES = """## Recipe reference

```yaml
name: my-scenario            # optional; default: the file name
description: one line shown nowhere but in your review
model: llama-3.1-8b          # catalog name, config.json path (relative to the recipe) or hf:org/name
hardware:
  gpu: h100                  # catalog name or alias (memplan gpus)
  gpus_per_node: 8
  nodes: 1
  cpu_ram: 1TiB              # per node; sizes need a unit: GiB/TiB (2^30, 2^40) or GB/TB (10^9, 10^12)
  nvme: 30TB                 # per node, for ZeRO-Infinity offload (0 allowed without a unit)
job:
  type: lora                 # pretrain, full, lora, qlora, galore or infer
  seq_len: 4096              # training
  micro_batch: 1             # training
  global_batch: 64           # training: sets gradient accumulation (or the planner's global batch)
  # context: 32768           # inference: tokens per sequence in the KV cache
  # concurrency: 16          # inference: sequences served at once
fixed:                       # any JobConfig field: dtype, quant, optimizer, zero, offload_*, tp, pp, ep,
  zero: 3                    # recompute, lora: {...}, galore: {...}, infer: {kv_dtype, paged, prefill_chunk}
  cuda_context: 512MiB
search:                      # optional: plan instead of estimate; lists of candidate values
  tp: [2, 4, 8]
  micro_batch: [1, 2]
  recompute: [none, selective, full]
objective: throughput        # with search: throughput, min-gpus, max-batch, max-context, min-memory, min-cost
min_headroom: 10%            # or 2GiB; per tier: {gpu: 10%, cpu: 64GiB}
sweep:                       # optional: the grid of `memplan sweep --recipe`
  models: [llama-3.1-8b, mistral-7b]
  gpus: [l4, a10g, rtx-4090]
  jobs: [lora, qlora]
  seq_lens: [2048, 4096]     # also: contexts, batches, gpu_counts, gpus_per_node, tp (an int or node)
  metric: max-batch          # or max-context, fits
```

Unknown fields are errors (a typo never passes silently), a bare `80G` is rejected as ambiguous,
and JobConfig fields that belong to the job or hardware blocks are refused under `fixed`."""


def main() -> None:
    os.chdir(ROOT)
    with tempfile.TemporaryDirectory() as tmp:
        OUT.write_text(document(Path(tmp)), encoding="utf-8")
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
