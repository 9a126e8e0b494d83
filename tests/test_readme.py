"""The README's command outputs are generated from the code and must be current; the API example runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_starts_with_the_two_commands():
    lines = (ROOT / "README.md").read_text().splitlines()
    block = lines[lines.index("```bash") + 1: lines.index("```bash") + 3]
    assert block[0].startswith("pip install -c constraints.txt . && memplan plan ")
    install, _, test = block[1].partition(" && ")
    assert "pytest" in test and ".[test" in install and "-c constraints.txt" in install
    ci = (ROOT / ".ci" / "run").read_text()
    # CI installs with exactly the README's second command (pip's --quiet aside) and runs its test command.
    assert install.replace("pip install ", "python -m pip install --quiet ", 1) in ci
    assert test in ci


def test_readme_examples_are_generated_from_the_code():
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "readme_examples.py"), "--check"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr


def test_readme_is_a_front_door_and_the_gallery_lives_in_docs():
    """The README stays short (about 200 lines, plus the generated published-runs table); the generated galleries
    and the other tables are in docs/examples.md."""
    readme = (ROOT / "README.md").read_text()
    examples = (ROOT / "docs" / "examples.md").read_text()
    runs = readme.split("<!-- generated: published-runs -->")[1].split("<!-- end generated -->")[0]
    assert len(readme.splitlines()) - len(runs.splitlines()) <= 200
    assert readme.count("<!-- example: memplan") <= 2
    assert examples.count("<!-- example: memplan") >= 10 and "<!-- include: docs/accuracy.md -->" in examples
    for heading in ("## Published training runs", "## Units and exit codes",
                    "## Where the defaults come from, and how the margins stack"):
        assert heading in readme


def test_python_api_example_runs():
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "estimate_api.py")],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "KV cache 16.00 GiB" in result.stdout


def test_serving_cases_table_is_generated_from_the_code():
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "serving_cases.py"), "--check"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr


def test_readme_shows_every_published_run():
    """The README's generated table (tools/published_runs.py) has one row per run of tests/test_published_runs.py."""
    sys.path.insert(0, str(ROOT / "tools"))
    import published_runs

    ids = [run.id for run in published_runs._load_runs().RUNS]
    readme = (ROOT / "README.md").read_text()
    section = readme.split("<!-- generated: published-runs -->")[1].split("<!-- end generated -->")[0]
    assert [line.split("|")[1].strip() for line in section.splitlines() if line.startswith("| ")][1:] == ids
