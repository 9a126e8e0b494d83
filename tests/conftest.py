"""Shared test helpers: run the CLI in-process with a pinned terminal width."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from memplan.cli.app import app

SHARED_CASES = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "published_cases.yaml"
PUBLISHED = SHARED_CASES if SHARED_CASES.is_file() else Path(__file__).parent / "fixtures" / "published_cases.yaml"
"""../shared/reference/published_cases.yaml beside the checkout, else the copy vendored in tests/fixtures."""


@pytest.fixture(autouse=True, scope="session")
def _no_user_profiles(tmp_path_factory):
    """A developer's own ``memplan calibrate`` profiles must not change what the tests compute."""
    old = os.environ.get("XDG_CONFIG_HOME")
    os.environ["XDG_CONFIG_HOME"] = str(tmp_path_factory.mktemp("xdg-config"))
    yield
    if old is None:
        os.environ.pop("XDG_CONFIG_HOME", None)
    else:
        os.environ["XDG_CONFIG_HOME"] = old


@pytest.fixture(scope="session")
def runner() -> CliRunner:
    return CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1"})


def run_cli(runner: CliRunner, *args: str, code: int = 0) -> Any:
    result = runner.invoke(app, list(args))
    assert result.exit_code == code, f"exit {result.exit_code}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


def cli_json(runner: CliRunner, *args: str, code: int = 0) -> dict[str, Any]:
    result = run_cli(runner, *args, "--format", "json", code=code)
    return json.loads(result.stdout)


TRANSIENTS = ("optimizer/step_temporaries",)
"""Rows alive in one phase only that papers do not count as model states (AdamW's step temporaries)."""


def prefix_sum(components: dict[str, int], *prefixes: str) -> int:
    """Sum components whose top-level name is one of ``prefixes`` (the optimizer step's temporaries left out:
    published model-state figures count states, not the step's transients)."""
    return sum(v for k, v in components.items() if k.split("/", 1)[0] in prefixes and k not in TRANSIENTS)


def published_case(case_id: str) -> dict[str, Any]:
    """A case of ../shared/reference/published_cases.yaml (skipped when shared/ is absent)."""
    if not PUBLISHED.is_file():
        pytest.skip(f"published cases file not found at {PUBLISHED}")
    cases = yaml.safe_load(PUBLISHED.read_text())["cases"]
    return next(c for c in cases if c["id"] == case_id)


@pytest.fixture
def estimate_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Every exact estimate a sweep makes, counted: ``memplan.estimator.estimate_validated``, which
    ``estimator.estimate`` (``grid._Evaluator``'s estimates) calls after validating and the vector path's probes call
    on a configuration validated once (``vector_probe.Prober.exact``), wrapped to record its arguments; clear the
    list (``calls[:] = []``) between the paths a test compares."""
    import memplan.estimator as estimator

    calls: list[tuple] = []
    real = estimator.estimate_validated

    def counting(*args: object, **kwargs: object) -> object:
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(estimator, "estimate_validated", counting)
    return calls


RANK_ZERO_REPORT = """

def report(out):
    # every rank's result, printed by rank 0 alone: two ranks printing at once can interleave their lines
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, out)
    if dist.get_rank() == 0:
        for o in every:
            print(json.dumps(o), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
    import torch.multiprocessing as mp
    mp.spawn(main, nprocs=P)
"""
"""The tail of a gloo worker script for ``gloo_ranks``: ``report(out)`` (which its ``main(rank)`` calls last) and the
launcher of P ranks."""


def gloo_ranks(directory: Path, script: str) -> dict[int, dict]:
    """Each rank's JSON result of a torch.distributed worker ``script`` (module-level P, ``main(rank)`` ending in
    ``report(out)`` with ``out["rank"]``), run with ``RANK_ZERO_REPORT`` appended."""
    import json

    stdout = run_two_process_worker(directory, script + RANK_ZERO_REPORT)
    lines = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    return {o["rank"]: o for o in lines}


def run_two_process_worker(directory: Path, script: str, timeout: float = 300) -> str:
    """Writes ``script`` (a torch.distributed worker that reads its MASTER_PORT from argv[1]) to ``directory`` and
    runs it on a free local port; its stdout, after asserting it exited 0 (its stderr's tail otherwise)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = directory / "worker.py"
    path.write_text(script, encoding="utf-8")
    done = subprocess.run([sys.executable, str(path), str(port)], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout
