"""Output that survives a pipe and odd environments: no name is ever cut at 80 columns, the catalog index is
current, and encoding or write errors end in one line on stderr with exit 2 (never a traceback)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from memplan.catalog import index
from memplan.cli.app import app

ROOT = Path(__file__).resolve().parents[1]
RUNNER = CliRunner(env={"COLUMNS": "80", "NO_COLOR": "1"})
CATALOG = ROOT / "memplan" / "catalog"


def memplan(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """A real ``memplan`` process, stdout a pipe, 80 columns."""
    code = "import sys; from memplan.cli.app import main; sys.argv = ['memplan', *sys.argv[1:]]; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120, check=False,
                          cwd=ROOT, env={**os.environ, "COLUMNS": "80", "PYTHONPATH": str(ROOT), **env})


@pytest.mark.parametrize("command,folder", [("models", "models"), ("gpus", "gpus")])
def test_catalog_listings_show_every_full_name_when_piped(command: str, folder: str) -> None:
    result = memplan(command)
    assert result.returncode == 0, result.stderr
    assert "…" not in result.stdout
    names = [p.stem for p in (CATALOG / folder).glob("*.yaml")]
    first_words = {line.split()[0] for line in result.stdout.splitlines() if line.strip()}
    assert names and set(names) <= first_words, sorted(set(names) - first_words)


def test_estimate_rows_are_not_cut_at_80_columns() -> None:
    result = RUNNER.invoke(app, ["estimate", "llama-3.1-8b", "--gpu", "h100", "--job", "full", "--cpu-ram", "64GiB",
                                 "--zero", "2", "--offload-optimizer", "cpu"])
    assert result.exit_code == 0, result.stderr
    assert "…" not in result.stdout
    for component in ("runtime/allocator_reserve", "runtime/cuda_context", "optimizer/adam_m"):
        assert component in result.stdout


def test_the_catalog_index_is_current() -> None:
    """Regenerate with: python -m memplan.catalog.index"""
    assert index.INDEX.read_text(encoding="utf-8") == index.text(index.build())


def test_every_gpu_alias_in_the_files_resolves_through_the_index() -> None:
    from memplan.catalog.store import catalog_gpu

    for path in (CATALOG / "gpus").glob("*.yaml"):
        for alias in yaml.safe_load(path.read_text())["aliases"] if "aliases" in path.read_text() else ():
            assert catalog_gpu(alias).name == path.stem


def test_an_ascii_stdout_is_one_line_and_exit_2() -> None:
    result = memplan("estimate", "gpt2", "--gpu", "t4", PYTHONIOENCODING="ascii")
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "encoding" in result.stderr, result.stderr


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="/dev/full exists only on Linux-like systems")
def test_a_full_disk_is_one_line_and_exit_2() -> None:
    code = "import sys; from memplan.cli.app import main; sys.argv = ['memplan', 'models']; main()"
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "-c", code], stdout=full, stderr=subprocess.PIPE, text=True, timeout=120,
                              check=False, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "cannot write" in proc.stderr, proc.stderr


def test_a_closed_pipe_ends_quietly_without_a_traceback() -> None:
    code = "import sys; from memplan.cli.app import main; sys.argv = ['memplan', 'models', '--format', 'csv']; main()"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.read(1)
    proc.stdout.close()  # the reader goes away, as with `| head -c 1`
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) in (0, 2), err
    assert "Traceback" not in err and err.count("\n") <= 1, err


def test_a_bad_plot_name_fails_before_the_work() -> None:
    result = RUNNER.invoke(app, ["estimate", "gpt2", "--plot", "out.jpg"])
    assert result.exit_code == 2 and "--plot" in result.stderr and result.stdout == ""


def test_estimate_help_says_it_exits_0_when_the_job_does_not_fit() -> None:
    result = RUNNER.invoke(app, ["estimate", "--help"])
    assert "Exit code 0 whether or not the job fits" in " ".join(result.stdout.split())


def test_no_timings_makes_check_reports_diffable(tmp_path: Path) -> None:
    import json

    recipe = str(ROOT / "recipes" / "llama-3.1-8b-full-8xh100-zero2.yaml")
    reports = []
    for i in range(2):
        result = RUNNER.invoke(app, ["check", recipe, "--format", "json", "--no-timings", "--junit", str(tmp_path / f"{i}.xml")])
        assert result.exit_code == 0, result.stderr
        reports.append(result.stdout)
        assert all(r["seconds"] == 0 for r in json.loads(result.stdout)["recipes"])
    assert reports[0] == reports[1]
    assert (tmp_path / "0.xml").read_text() == (tmp_path / "1.xml").read_text()
    assert "timestamp" not in (tmp_path / "0.xml").read_text()


def test_time_limit_bounds_every_solve_together() -> None:
    """Inside ``deadline(s)`` each solve gets what is left of s, never its own full limit again."""
    import time

    from memplan.planner.solvers import deadline, remaining

    assert remaining(30.0) == 30.0
    with deadline(0.2):
        assert remaining(30.0) <= 0.2
        time.sleep(0.25)
        assert remaining(30.0) == pytest.approx(1e-3)
    assert remaining(None) is None


def test_a_terminal_table_folds_long_names_at_80_columns() -> None:
    import io

    from rich.console import Console

    from memplan.estimator import estimate
    from memplan.report.table import Out, render_estimate

    out = Out(terminal=True)
    buffer = io.StringIO()
    out._console = Console(file=buffer, width=80, force_terminal=True, color_system=None)
    render_estimate(estimate("llama-3.1-8b", "h100", job="full", zero=2, offload_optimizer="cpu"), out)
    text = buffer.getvalue()
    assert "…" not in text and "allocator_reserve" in text.replace("\n", "").replace("│", "").replace(" ", "")
    assert max(len(line) for line in text.splitlines()) <= 80


def test_every_option_maps_to_a_real_field() -> None:
    """Each declared option's JobConfig field and SearchSpace dimension exists (the one mapping is not stale)."""
    from memplan.config import JobConfig
    from memplan.options import GROUPS, OPTS
    from memplan.planner.space import SearchSpace

    for name, opt in OPTS.items():
        if opt.field:
            head, _, tail = opt.field.partition(".")
            assert head in JobConfig.model_fields, name
            if tail:
                assert tail in JobConfig.model_fields[head].annotation.model_fields, name  # type: ignore[union-attr]
        if opt.dim:
            assert opt.dim in SearchSpace.model_fields, name
    grouped = [n for names in GROUPS.values() for n in names]
    assert sorted(grouped) == sorted(OPTS) and len(set(grouped)) == len(grouped)


def test_engine_reaches_the_config_and_the_search_space() -> None:
    import json

    from memplan.cli.convert import search_space
    from memplan.cli.opts import Opts

    result = RUNNER.invoke(app, ["estimate", "gpt2", "--gpu", "t4", "--job", "infer", "--engine", "vllm", "--context", "512",
                                 "-f", "json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["config"]["engine"] == "vllm"
    opts = Opts({"engine": "vllm,llamacpp", "job": None})
    opts.lists = frozenset({"engine"})
    assert [e.value for e in search_space(opts).engines] == ["vllm", "llamacpp"]
    bad = RUNNER.invoke(app, ["plan", "gpt2", "--engine", "vllm,vlm"])
    assert bad.exit_code == 2 and "did you mean vllm" in bad.stderr.lower(), bad.stderr


def test_options_parse_without_a_pydantic_adapter_per_option() -> None:
    """memplan.cli.core.FastValue replaces typer's per-option TypeAdapter (45 of them cost 0.18 s); if a typer
    upgrade changes the hook it uses, this fails rather than the CLI silently slowing down."""
    code = ("import sys; from memplan.cli.app import main; sys.argv = ['memplan', 'estimate', 'gpt2', '--gpu', 't4', "
            "'--format', 'json']\ntry:\n    main()\nexcept SystemExit:\n    pass\n"
            "sys.stderr.write(str('typer._adapters' in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stderr.strip().endswith("False"), proc.stderr


@pytest.mark.parametrize("flag,value,message", [("--gpus", "1.5", "not a valid integer"),
                                                ("--safety-margin", "nan", "not a finite number"),
                                                ("--job", "fine", "not one of pretrain"),
                                                ("--flash-attention", None, None)])
def test_fast_option_values(flag: str, value: str | None, message: str | None) -> None:
    args = ["estimate", "gpt2", "--gpu", "t4", "--format", "json", flag, *([value] if value else [])]
    result = RUNNER.invoke(app, args)
    if message is None:
        assert result.exit_code == 0, result.stderr
    else:
        assert result.exit_code == 2 and message in result.stderr and result.stderr.count("\n") == 1, result.stderr


@pytest.mark.parametrize("text,message", [("1-", "is an open range"),
                                          ("5-3", "runs backwards; write the lower layer first (3-5)"),
                                          ("0-99", "outside the model's 12 layers"), ("x", "expected layer ranges")])
def test_layer_ranges_are_read_strictly(text: str, message: str) -> None:
    result = RUNNER.invoke(app, ["estimate", "gpt2", "--gpu", "t4", "--job", "infer", "--offload-layers", text])
    assert result.exit_code == 2 and message in result.stderr, result.stderr


def test_an_unknown_vendor_is_an_error_like_an_unknown_family() -> None:
    result = RUNNER.invoke(app, ["gpus", "--vendor", "intel"])
    assert result.exit_code == 2 and "vendor 'intel'" in result.stderr and "nvidia" in result.stderr, result.stderr
    assert RUNNER.invoke(app, ["gpus", "--vendor", "AMD"]).exit_code == 0


def test_qlora_without_quantization_is_refused_by_plan_as_by_estimate() -> None:
    result = RUNNER.invoke(app, ["plan", "llama-3.1-8b", "--job", "qlora", "--quant", "none"])
    assert result.exit_code == 2 and "QLoRA" in result.stderr, result.stderr
    assert RUNNER.invoke(app, ["estimate", "llama-3.1-8b", "--job", "qlora", "--quant", "none"]).exit_code == 2


def test_assumed_host_capacities_are_printed_with_the_answer() -> None:
    from memplan.catalog.schema import HostSpec

    default_gib = f"{HostSpec().cpu_ram_bytes / 2**30:,.2f} GiB"
    result = RUNNER.invoke(app, ["estimate", "llama-3.1-8b", "--gpu", "rtx-4090", "--job", "full", "--zero", "2",
                                 "--offload-optimizer", "cpu"])
    assert (f"Assumed (memplan's defaults; set --cpu-ram / --nvme / --dtype): {default_gib} of CPU RAM per node, "
            "no NVMe") in " ".join(result.stdout.split())  # folded to 80 columns in a pipe
    given = RUNNER.invoke(app, ["estimate", "llama-3.1-8b", "--gpu", "rtx-4090", "--job", "full", "--cpu-ram", "64GiB",
                                "--nvme", "1TB"])
    assert "Assumed" not in given.stdout
