"""Cold-process start-up: the median wall time of fresh ``memplan`` processes, and of two peer tools.

Run:  python benchmarks/startup.py [--runs 10] [--peer-python PATH] [--json]

memplan's modules are byte-compiled first (``compileall``), as ``pip install`` does: with
``PYTHONDONTWRITEBYTECODE`` set (as in some dev containers) every process would otherwise recompile
them from source. Each command runs once untimed (to warm the OS file cache, not the interpreter),
then ``--runs`` times, each a new process; the median and the fastest run are printed in seconds and as a
ratio to ``python -c pass`` measured in the same run (the ratio travels between machines better than
seconds). Targets (issue 14, on a 2-core machine): ``--help`` at most 0.10 s, ``estimate`` at most 0.15 s,
``plan`` under 0.6 s on a typical job. The floor rows time each import memplan cannot avoid (``floor:``),
so a missed target can be read against what the interpreter and the design card's libraries cost alone.
No assertions: the numbers go into docs/performance.md.

Peers, measured the same way when installed (``--peer-python`` names another interpreter to look in,
for a peer whose pins clash with memplan's environment); an absent peer is skipped with a note:
- ``llm-analysis`` (pip install llm-analysis): ``python -m llm_analysis.analysis train ...``;
- ``accelerate estimate-memory`` (pip install accelerate transformers torch): its ``--help``, and the
  work of an estimate done offline (``estimate-memory`` itself asks the Hugging Face Hub first):
  a meta-device model built from a local config.json, then ``calculate_maximum_sizes``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "llama-3.1-8b-full-8xh100-zero2.yaml"
LLAMA_CONFIG = ROOT / "tests" / "fixtures" / "hf_configs" / "llama-3.1-8b.json"
TARGETS_S = {"memplan --help": 0.10, "memplan estimate": 0.15, "memplan plan": 0.6}
ACCELERATE_OFFLINE = """
import sys
from accelerate import init_empty_weights
from accelerate.utils import calculate_maximum_sizes
from transformers import AutoConfig, AutoModelForCausalLM
config = AutoConfig.from_pretrained(sys.argv[1])
with init_empty_weights():
    model = AutoModelForCausalLM.from_config(config)
total, largest = calculate_maximum_sizes(model)
print(total, largest)
"""


@dataclass
class Timing:
    name: str
    median_s: float | None
    min_s: float | None
    note: str = ""


def memplan_exe() -> list[str]:
    """The installed console script next to this interpreter, else the one on PATH, else this checkout run the
    way the console script runs it."""
    beside = Path(sys.executable).with_name("memplan")
    found = str(beside) if beside.is_file() else shutil.which("memplan")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; from memplan.cli.app import main; sys.argv[0] = 'memplan'; main()"]


def time_command(name: str, argv: list[str], runs: int, env: dict[str, str]) -> Timing:
    """Median and fastest wall time of ``runs`` fresh processes (after one untimed run)."""
    first = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    if first.returncode not in (0, 1):
        tail = (first.stderr or first.stdout).strip().splitlines()[-1:] or ["no output"]
        return Timing(name, None, None, f"failed (exit {first.returncode}): {tail[0][:120]}")
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, capture_output=True, env=env, check=False)
        times.append(time.perf_counter() - start)
    return Timing(name, statistics.median(times), min(times))


def byte_compile_memplan() -> None:
    """Write memplan's .pyc files, as ``pip install`` does (an editable install in a tree where the
    interpreter may not write them would otherwise compile every module in every process)."""
    import compileall

    sys.path.insert(0, str(ROOT))
    import memplan

    compileall.compile_dir(str(Path(memplan.__file__).parent), quiet=1)


FLOORS = {
    "floor: import typer": "import typer",
    "floor: import typer+pydantic": "import typer, pydantic",
    "floor: --help's imports": "import typer, memplan.cli.app",
    "floor: estimate's imports": "import typer, memplan.cli.estimate, memplan.estimator, memplan.report.table",
    "floor: import rich.table": "import rich.console, rich.table",
}
"""Imports timed alone: what a typer CLI pays before any code runs, and what ``--help`` and ``estimate`` import."""


def memplan_commands(exe: list[str]) -> list[tuple[str, list[str]]]:
    cmds = [
        ("python -c pass", [sys.executable, "-c", "pass"]),
        *((name, [sys.executable, "-c", code]) for name, code in FLOORS.items()),
        ("memplan --help", [*exe, "--help"]),
        ("memplan estimate", [*exe, "estimate", "llama-3.1-8b", "--gpu", "h100-sxm-80gb", "--job", "full"]),
        ("memplan plan", [*exe, "plan", "llama-3.1-8b", "--gpu", "h100-sxm-80gb", "--gpus", "8"]),
    ]
    has_check = subprocess.run([*exe, "check", "--help"], capture_output=True, check=False).returncode == 0
    if has_check and RECIPE.is_file():
        cmds.append(("memplan check", [*exe, "check", str(RECIPE)]))
    return cmds


def has_module(python: str, module: str) -> bool:
    code = f"import importlib.util, sys; sys.exit(0 if importlib.util.find_spec({module!r}) else 1)"
    return subprocess.run([python, "-c", code], capture_output=True, check=False).returncode == 0


def first_with(pythons: list[str], *modules: str) -> str | None:
    return next((py for py in pythons if all(has_module(py, m) for m in modules)), None)


def peer_commands(pythons: list[str], config_dir: Path) -> tuple[list[tuple[str, list[str]]], list[Timing]]:
    cmds, skipped = [], []
    python = first_with(pythons, "llm_analysis")
    if python:
        cmds += [
            ("llm-analysis --help", [python, "-m", "llm_analysis.analysis", "--help"]),
            ("llm-analysis train", [python, "-m", "llm_analysis.analysis", "train", "--model_name",
                                    "NousResearch_Llama-2-7b-hf", "--gpu_name", "a100-sxm-80gb", "--total_num_gpus", "8",
                                    "--ds_zero", "3", "--batch_size_per_gpu", "1", "--seq_len", "2048",
                                    "--activation_recomputation", "2", "--total_num_tokens", "100000"]),
        ]
    else:
        skipped.append(Timing("llm-analysis", None, None, "skipped: not installed (pip install llm-analysis)"))
    python = first_with(pythons, "accelerate", "transformers", "torch")
    accelerate = Path(python or sys.executable).with_name("accelerate")
    if python and accelerate.is_file():
        cmds += [
            ("accelerate estimate-memory --help", [str(accelerate), "estimate-memory", "--help"]),
            ("accelerate estimate (offline work)", [python, "-c", ACCELERATE_OFFLINE, str(config_dir)]),
        ]
    else:
        skipped.append(Timing("accelerate estimate-memory", None, None,
                              "skipped: not installed (pip install accelerate transformers torch)"))
    return cmds, skipped


def report(timings: list[Timing], runs: int) -> str:
    base = next((t.median_s for t in timings if t.name == "python -c pass"), None)
    lines = [f"cold-process wall time, {runs} runs each, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}",
             f"{'command':<40} {'median s':>9} {'min s':>7} {'× pass':>7}  note"]
    for t in timings:
        target = TARGETS_S.get(t.name)
        note = t.note or (f"target ≤ {target} s: {'met' if t.median_s <= target else 'MISSED'}" if target else "")
        med = f"{t.median_s:9.3f}" if t.median_s is not None else f"{'-':>9}"
        low = f"{t.min_s:7.3f}" if t.min_s is not None else f"{'-':>7}"
        ratio = f"{t.median_s / base:7.1f}" if base and t.median_s is not None else f"{'-':>7}"
        lines.append(f"{t.name:<40} {med} {low} {ratio}  {note}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--peer-python", action="append", default=[sys.executable],
                        help="another interpreter to look for peers in (repeatable; this one is always searched)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PAGER": "cat", "NO_COLOR": "1", "COLUMNS": "100",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    byte_compile_memplan()
    with tempfile.TemporaryDirectory() as tmp:
        config_dir = Path(tmp)
        (config_dir / "config.json").write_text(LLAMA_CONFIG.read_text())
        peers, timings = peer_commands(args.peer_python, config_dir)
        commands = memplan_commands(memplan_exe()) + peers
        timings = [time_command(name, argv, args.runs, env) for name, argv in commands] + timings
    if args.json:
        print(json.dumps([t.__dict__ for t in timings], indent=2))
    else:
        print(report(timings, args.runs))


if __name__ == "__main__":
    main()
