"""Suggestions are request changes; the report writes them as flags through the option declarations, and those
flags, given to ``memplan plan``, make the same request: every kind of suggestion (``suggest.KINDS``), for every
job it is tried for, round-trips through the CLI's own parsing (the solver is never run)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from memplan.catalog.store import catalog_gpu
from memplan.cli.app import app
from memplan.config import Job
from memplan.options import size_text
from memplan.planner import suggest
from memplan.planner.change import apply
from memplan.report.flags import flag_options, option_index, render_flags
from memplan.units import GiB, parse_size

MODEL = "llama-3.1-8b"
JOB_ARGS = {job: (MODEL, "--gpu", "t4", "--job", job.value) for job in Job}
SAMPLES = {"more_gpus": (8, 2), "smaller_shape": 1024, "more_cpu_ram": (512 * GiB, 300 * GiB),
           "bigger_gpu": catalog_gpu("b200-sxm-180gb")}
"""A value for each kind whose value a search finds (what the search would return); other kinds take None."""


class Captured(Exception):
    """Raised in place of the solver once the CLI has built its request."""


def cli_request(monkeypatch: pytest.MonkeyPatch, *args: str):
    """The PlanRequest ``memplan plan ARGS`` builds, captured where the solver would run."""
    seen = []

    def capture(req):
        seen.append(req)
        raise Captured

    monkeypatch.setattr("memplan.planner.plan.plan", capture)
    result = CliRunner().invoke(app, ["plan", *args])
    assert seen, f"exit {result.exit_code}: {result.output}"
    return seen[0]


def request_fields(req) -> dict:
    """What a suggestion can change: the configuration, the search space, the GPU and the host."""
    return {"base": req.base.model_dump(), "space": req.space.model_dump(), "gpu": req.gpu.name,
            "host": req.host.model_dump()}


def tried(job: Job) -> list[suggest.Kind]:
    """The kinds of suggestion tried for a plain request of ``job`` (no option but the job given)."""
    from memplan.catalog.resolve import load_model
    from memplan.catalog.schema import HostSpec
    from memplan.config import JobConfig
    from memplan.planner.request import PlanRequest

    req = PlanRequest(model=load_model(MODEL), gpu=catalog_gpu("t4"), host=HostSpec(), base=JobConfig(job=job))
    return [kind for kind in suggest.KINDS if kind.applies(req)]


def cases():
    return [pytest.param(job, kind, id=f"{job.value}-{kind.name}") for job in Job for kind in tried(job)]


@pytest.mark.parametrize(("job", "kind"), cases())
def test_each_suggestion_renders_to_flags_that_make_the_same_request(monkeypatch, job, kind):
    req = cli_request(monkeypatch, *JOB_ARGS[job])
    assert kind.applies(req)
    changes = kind.changes(req, SAMPLES.get(kind.name))
    shown = {k: suggest.json_value(v) for k, v in changes.items()}  # what the planner hands the report (JSON values)
    flags = render_flags(shown)
    expected = request_fields(apply(req, changes))
    assert expected != request_fields(req), f"{kind.name}: the change changes nothing"
    parsed = request_fields(cli_request(monkeypatch, *JOB_ARGS[job], *flags.split()))
    assert parsed == expected, (flags, {k: (parsed[k], expected[k]) for k in parsed if parsed[k] != expected[k]})


def test_every_kind_is_tried_for_some_job_and_has_a_sample():
    """A new kind of suggestion is covered by the round trip above (a searched kind needs a sample value here)."""
    covered = {kind.name for job in Job for kind in tried(job)}
    for kind in suggest.KINDS:
        assert kind.name in covered, kind.name
        assert (kind.find is None) == (kind.name not in SAMPLES), kind.name


def test_the_zero_offload_flags_give_the_ranges_the_re_solve_searched():
    """The suggestion verified ZeRO 1-3 with optimizer states and parameters each on or off the CPU; its flags say
    so, rather than one setting the re-solve did not pin."""
    kind = next(k for k in suggest.KINDS if k.name == "zero_offload")
    changes = {k: suggest.json_value(v) for k, v in kind.changes(None, None).items()}
    assert flag_options(changes) == ["--zero 1,2,3", "--offload-optimizer none,cpu", "--offload-params none,cpu"]


def test_paths_map_to_the_declared_options():
    index = option_index()
    assert index["config.micro_batch"] == index["space.micro_batch"] == index["space.batch"] == "batch"
    assert index["hardware.gpus_per_node"] == index["config.gpus_per_node"] == "gpus"
    assert index["config.infer.context"] == "context" and index["hardware.gpu"] == "gpu"
    with pytest.raises(ValueError, match="no option sets"):
        render_flags({"config.no_such_field": 1})
    with pytest.raises(ValueError, match="disagrees"):
        render_flags({"config.micro_batch": 1, "space.micro_batch": [2]})


@pytest.mark.parametrize(("changes", "flags"), [
    ({"config.galore.eight_bit": True}, "--galore-8bit"),
    ({"config.galore": {"eight_bit": False}}, "--no-galore-8bit"),
    ({"config.quant": None}, "--quant none"),
    ({"space.per_layer_offload": True}, "--per-layer-offload"),
    ({"hardware.cpu_ram_bytes": 3 * 2**39}, "--cpu-ram 1536GiB"),
])
def test_values_are_written_as_the_options_read_them(changes, flags):
    assert render_flags(changes) == flags


@pytest.mark.parametrize("nbytes", [0, 1000, 3 * 2**39, 512 * GiB, 2**40, 1536 * 2**20 + 1])
def test_size_text_reads_back_exactly(nbytes):
    assert parse_size(size_text(nbytes)) == nbytes


@pytest.mark.parametrize("args", [
    ("llama-3.1-8b", "--gpu", "t4", "--job", "full", "--zero", "0", "--offload-optimizer", "none",
     "--offload-params", "none", "--top", "1"),
    ("qwen2.5-0.5b", "--gpu", "t4", "--job", "infer", "--context", "131072", "--batch", "64", "--top", "1"),
], ids=["full-8b-t4", "infer-0.5b-t4"])
def test_each_suggestion_s_flags_make_the_plan_it_verified(runner, args):
    """End to end: an infeasible plan's suggestions, their flags added to the same command, each give a plan that
    fits, the very plan the suggestion's re-solve found (same GPU memory and speed)."""
    from conftest import cli_json

    doc = cli_json(runner, "plan", *args, code=1)
    assert doc["suggestions"]
    for s in doc["suggestions"]:
        fixed = cli_json(runner, "plan", *args, *s["flags"].split())
        assert fixed["status"] == "optimal", s["flags"]
        assert fixed["best"]["memory"]["gpu"]["peak_bytes"] == s["gpu_total_bytes"], s["flags"]
        assert fixed["best"]["tokens_per_s"] == pytest.approx(s["tokens_per_s"], rel=1e-6), s["flags"]
