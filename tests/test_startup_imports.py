"""Commands import only what they use: ``--help``, ``models``, ``gpus`` and ``estimate`` never import the
solver stack, dataframes, plotting or torch (checked through ``sys.modules`` of a fresh process), and
``--help`` does not even import rich or pydantic."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("pulp", "highspy", "pandas", "numpy", "matplotlib", "torch", "transformers")
WRAPPER = """
import json, sys
out, args = sys.argv[1], sys.argv[2:]
sys.argv = ["memplan", *args]
from memplan.cli.app import main
try:
    main()
except SystemExit as exc:
    code = exc.code
else:
    code = 0
with open(out, "w") as fh:
    json.dump({"code": code, "modules": sorted(sys.modules)}, fh)
"""


def loaded_modules(tmp_path: Path, *args: str) -> set[str]:
    """Top-level packages in ``sys.modules`` after ``memplan ARGS`` ran in a fresh interpreter."""
    out = tmp_path / "modules.json"
    proc = subprocess.run([sys.executable, "-c", WRAPPER, str(out), *args], capture_output=True, text=True,
                          timeout=120, check=False)
    assert out.is_file(), proc.stderr
    data = json.loads(out.read_text())
    assert data["code"] in (0, None), proc.stderr
    return {name.split(".")[0] for name in data["modules"]}


@pytest.mark.parametrize("args", [
    ("--help",),
    ("estimate", "--help"),
    ("models",),
    ("models", "--format", "csv"),
    ("gpus", "--format", "json"),
    ("estimate", "llama-3.1-8b", "--gpu", "h100-sxm-80gb", "--job", "full"),
    ("estimate", "mixtral-8x7b", "--job", "infer", "--format", "json"),
    ("estimate", "llama-3.1-8b", "--job", "qlora", "--format", "csv"),
], ids=lambda a: " ".join(a))
def test_light_commands_do_not_import_heavy_packages(tmp_path: Path, args: tuple[str, ...]) -> None:
    heavy = loaded_modules(tmp_path, *args) & set(HEAVY)
    assert not heavy, f"memplan {' '.join(args)} imported {sorted(heavy)}"


def test_help_imports_neither_rich_nor_pydantic(tmp_path: Path) -> None:
    loaded = loaded_modules(tmp_path, "--help")
    assert not loaded & {"rich", "pydantic", "yaml", "markdown_it", "pygments"}, sorted(loaded)


def test_json_output_does_not_import_rich(tmp_path: Path) -> None:
    assert "rich" not in loaded_modules(tmp_path, "estimate", "gpt2", "--format", "json")


def test_the_check_finds_a_heavy_import(tmp_path: Path) -> None:
    """The probe itself works: a serving ``plan`` does load the solver stack (a small training plan may not: rows
    whose layers all fit in their fastest modes need no solver, ``planner.ilp_fast``)."""
    loaded = loaded_modules(tmp_path, "plan", "gpt2", "--job", "infer", "--format", "json")
    assert {"pulp", "highspy"} <= loaded
