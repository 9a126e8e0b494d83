"""Regenerate the command outputs embedded in README.md and docs/examples.md from the code itself.

Each example is a fenced block preceded by ``<!-- example: memplan ARGS -->``; the block holds the
command and its output, run in-process with a fixed terminal width. ``--check`` exits 1 when a
document is out of date (tests/test_readme.py runs it), so the docs never drift from the code.
A section between ``<!-- generated: NAME -->`` and ``<!-- end generated -->`` is the output of the
generator ``GENERATED[NAME]`` (the published-runs table of tools/published_runs.py).

    python tools/readme_examples.py          # rewrite in place
    python tools/readme_examples.py --check  # verify
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "docs" / "examples.md"]
INCLUDE = re.compile(r"(<!-- include: ([^ ]+) -->\n).*?(<!-- end include -->\n)", re.S)
GENERATED_SECTION = re.compile(r"(<!-- generated: ([a-z-]+) -->\n).*?(<!-- end generated -->\n)", re.S)
PATTERN = re.compile(r"(<!-- example: (memplan [^\n]*?) -->\n)```text\n.*?```\n", re.S)
WIDTH = "100"


def run(command: str) -> str:
    from typer.testing import CliRunner

    from memplan.cli.app import app

    args = shlex.split(command)[1:]
    result = CliRunner(env={"COLUMNS": WIDTH, "NO_COLOR": "1", "TERM": "dumb"}).invoke(app, args)
    out = result.stdout.rstrip()
    return f"$ {command}\n{out}\n"


def table_of(path: str) -> str:
    """The markdown table of a generated document (e.g. docs/accuracy.md from benchmarks/accuracy.py)."""
    lines = (ROOT / path).read_text(encoding="utf-8").splitlines()
    rows = [line for line in lines if line.startswith("|")]
    return "\n".join(rows) + "\n"


def published_runs() -> str:
    """Published training runs against memplan's prediction (tools/published_runs.py)."""
    sys.path.insert(0, str(ROOT / "tools"))
    import published_runs as runs

    return runs.markdown()


GENERATED = {"published-runs": published_runs}


def generated(name: str) -> str:
    if name not in GENERATED:
        raise SystemExit(f"unknown generated section {name!r}; known: {', '.join(sorted(GENERATED))}")
    return GENERATED[name]()


def render(text: str) -> str:
    text = GENERATED_SECTION.sub(lambda m: f"{m.group(1)}{generated(m.group(2))}{m.group(3)}", text)
    text = INCLUDE.sub(lambda m: f"{m.group(1)}{table_of(m.group(2))}{m.group(3)}", text)
    return PATTERN.sub(lambda m: f"{m.group(1)}```text\n{run(m.group(2))}```\n", text)


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for doc in DOCS:
        if not doc.is_file():
            continue
        old = doc.read_text(encoding="utf-8")
        new = render(old)
        if new != old:
            stale.append(str(doc.relative_to(ROOT)))
            if not check:
                doc.write_text(new, encoding="utf-8")
    if check and stale:
        print(f"out of date: {', '.join(stale)}; run python tools/readme_examples.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
