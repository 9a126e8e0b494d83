"""The README's command outputs are generated from the code and must be current; the API example runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_starts_with_the_two_commands():
    lines = (ROOT / "README.md").read_text().splitlines()
    block = lines[lines.index("```bash") + 1: lines.index("```bash") + 3]
    assert block[0].startswith("pip install . && memplan plan ")
    assert "pytest" in block[1] and ".[test" in block[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip install --quiet torch==2.13.0 ".[test,measure,hub,plot]"' in ci
    assert "python -m pytest -q -p no:cacheprovider" in ci


def test_readme_examples_are_generated_from_the_code():
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "readme_examples.py"), "--check"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr


def test_python_api_example_runs():
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "estimate_api.py")],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "KV cache 16.00 GiB" in result.stdout
