"""``memplan check`` (CI capacity gates), ``memplan sweep`` (grids and fit matrices) and
``memplan explain`` (how a component is computed), registered on the main ``app``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from memplan.cli import options as o
from memplan.cli.app import app, console, handled, int_list, str_list
from memplan.errors import MemplanError

RECIPE_SUFFIXES = (".yaml", ".yml")


def recipe_paths(items: list[Path]) -> list[Path]:
    """Files as given; a directory stands for its *.yaml / *.yml files, sorted."""
    out: list[Path] = []
    for item in items:
        try:
            is_dir = item.is_dir()
        except OSError:  # a name too long to look up: load_recipe reports it for that file
            is_dir = False
        if is_dir:
            found = sorted(p for p in item.iterdir() if p.suffix in RECIPE_SUFFIXES)
            if not found:
                raise MemplanError(f"{item}: no *.yaml recipes in this directory.")
            out += found
        else:
            out.append(item)
    return out


@app.command()
@handled
def check(
    recipes: Annotated[list[Path], typer.Argument(help="Recipe files (or directories of *.yaml recipes).",
                                                  show_default=False)],
    fmt: Annotated[str, typer.Option("--format", "-f", help="table (one line per recipe) or json (only JSON on stdout).",
                                     rich_help_panel=o.O)] = "table",
    junit: Annotated[Path | None, typer.Option("--junit", help="Also write a JUnit XML report here (one testcase per recipe).",
                                               rich_help_panel=o.O)] = None,
    sets: Annotated[list[str] | None, typer.Option("--set", help="Override a recipe field for a what-if, e.g. job.context=131072 "
                                                   "(repeatable; applies to every recipe).")] = None,
    time_limit: Annotated[float, typer.Option("--time-limit",
                                              help="Solver time limit per solve (planned recipes), seconds.")] = 30.0,
) -> None:
    """Gate CI on capacity: exit 0 if every recipe fits with its headroom, 1 if any does not, 2 on invalid input."""
    from memplan.check import check_recipe, exit_code
    from memplan.recipe_load import parse_set
    from memplan.report.check_out import check_dict, outcome_line, summary_line

    o.check_format(fmt, ("table", "json"))
    if time_limit <= 0:
        raise MemplanError("--time-limit must be positive.")
    overrides = parse_set(sets or [])
    outcomes = []
    for path in recipe_paths(recipes):
        outcome = check_recipe(path, overrides=overrides, time_limit_s=time_limit)
        outcomes.append(outcome)
        if outcome.status == "error":
            sys.stderr.write(f"memplan: {outcome.reason}\n")
        if fmt == "table":
            typer.echo(outcome_line(outcome))
    if fmt == "json":
        from memplan.report.json_out import dumps

        typer.echo(dumps(check_dict(outcomes)))
    else:
        typer.echo(summary_line(outcomes))
    if junit is not None:
        write_junit_file(outcomes, junit)
    raise typer.Exit(code=exit_code(outcomes))


def write_junit_file(outcomes: list[Any], path: Path) -> None:
    from memplan.report.junit import write_junit

    try:
        write_junit(outcomes, path)
    except OSError as exc:
        raise MemplanError(f"--junit: cannot write {path}: {exc.strerror or exc}.") from None


def names_or_all(text: str | None, flag: str, everything: list[str]) -> tuple[str, ...] | None:
    """A comma list of catalog names; ``all`` for the whole catalog; None when the flag is not given."""
    values = str_list(text)
    if values is None:
        return None
    if not values:
        raise MemplanError(f"{flag}: give at least one name, or 'all'.")
    return tuple(everything) if values == ("all",) else values


def job_list(text: str | None) -> tuple[Any, ...] | None:
    """``--job full,lora``: Job values, with a suggestion for a misspelt one."""
    from memplan.config import Job
    from memplan.errors import did_you_mean

    if text is None:
        return None
    names = str_list(text) or ()
    for name in names:
        if name not in {j.value for j in Job}:
            raise MemplanError(f"--job: unknown job {name!r}.{did_you_mean(name, [j.value for j in Job])}")
    if not names:
        raise MemplanError("--job: give at least one of pretrain, full, lora, qlora, galore, infer.")
    return tuple(Job(n) for n in names)


def tp_choice(text: str | None) -> int | str | None:
    """``--tp``: a positive degree or ``node``."""
    if text is None:
        return None
    if text.strip().lower() == "node":
        return "node"
    values = int_list(text, "--tp")
    if values is None or len(values) != 1:
        raise MemplanError(f"--tp: give one degree such as 8, or 'node', got {text!r}.")
    return values[0]


def sweep_base(recipe: Path | None, fixed: dict[str, Any]) -> Any:
    """The SweepSpec of ``--recipe`` (its ``sweep:`` block), or an empty one, with fixed choices applied."""
    from dataclasses import replace

    from memplan.estimator import make_config
    from memplan.grid import SweepSpec, spec_from_recipe
    from memplan.recipe_load import load_recipe

    spec = spec_from_recipe(load_recipe(recipe)) if recipe is not None else SweepSpec(models=(), gpus=(), jobs=())
    fields = {k: v for k, v in fixed.items() if v is not None}
    if "lora_rank" in fields:
        fields["lora"] = {**spec.base.lora.model_dump(), "rank": fields.pop("lora_rank")}
    if "kv_dtype" in fields:
        fields["infer"] = {**spec.base.infer.model_dump(), "kv_dtype": fields.pop("kv_dtype")}
    return replace(spec, base=make_config(spec.base, **fields))


@app.command()
@handled
def sweep(
    recipe: Annotated[Path | None, typer.Option("--recipe", "-r", help="Take the grid from this recipe's sweep: block "
                                                "(flags below override its axes).")] = None,
    models: Annotated[str | None, typer.Option("--model", "-m", help="Models, comma-separated catalog names or paths, or 'all'.",
                                               rich_help_panel="Grid")] = None,
    gpus: Annotated[str | None, typer.Option("--gpu", "-g", help="GPUs, comma-separated catalog names, or 'all'.",
                                             rich_help_panel="Grid")] = None,
    jobs: Annotated[str | None, typer.Option("--job", "-j", help="Jobs, e.g. full,lora,qlora,infer (default: full).",
                                             rich_help_panel="Grid")] = None,
    seq_lens: Annotated[str | None, typer.Option("--seq-len", "-s", help="Training sequence lengths, e.g. 2048,8192.",
                                                 rich_help_panel="Grid")] = None,
    contexts: Annotated[str | None, typer.Option("--context", "-c", help="Inference contexts, e.g. 4096,32768.",
                                                 rich_help_panel="Grid")] = None,
    batches: Annotated[str | None, typer.Option("--batch", "-b", help="Micro-batches (inference: concurrent sequences).",
                                                rich_help_panel="Grid")] = None,
    gpu_counts: Annotated[str | None, typer.Option("--gpu-count", help="GPU counts, e.g. 1,8,64 (split into nodes of "
                                                   "--gpus-per-node).", rich_help_panel="Grid")] = None,
    gpus_per_node: Annotated[int | None, typer.Option("--gpus-per-node", help="GPUs per node (default 8).",
                                                      rich_help_panel="Grid")] = None,
    metric: Annotated[str | None, typer.Option("--metric", help="Fit-matrix cell: max-batch (largest batch that fits, exact), "
                                               "max-context (longest sequence/context), or fits (largest swept batch).",
                                               rich_help_panel="Grid")] = None,
    min_headroom: Annotated[str | None, typer.Option("--min-headroom", help="GPU memory that must stay free, e.g. 10% or 2GiB.",
                                                     rich_help_panel="Grid")] = None,
    dtype: Annotated[str | None, typer.Option("--dtype", help="Weight/compute dtype.", rich_help_panel=o.J)] = None,
    quant: Annotated[str | None, typer.Option("--quant", help="Weight quantization.", rich_help_panel=o.J)] = None,
    optimizer: Annotated[str | None, typer.Option("--optimizer", help="Optimizer.", rich_help_panel=o.J)] = None,
    zero: Annotated[int | None, typer.Option("--zero", help="ZeRO stage 0-3.", rich_help_panel=o.P)] = None,
    offload_optimizer: Annotated[str | None, typer.Option("--offload-optimizer", help="none, cpu or nvme.",
                                                          rich_help_panel=o.P)] = None,
    offload_params: Annotated[str | None, typer.Option("--offload-params", help="none, cpu or nvme.",
                                                       rich_help_panel=o.P)] = None,
    tp: Annotated[str | None, typer.Option("--tp", help="Tensor-parallel degree, or 'node' for all GPUs of a node.",
                                           rich_help_panel=o.P)] = None,
    pp: Annotated[int | None, typer.Option("--pp", help="Pipeline-parallel degree.", rich_help_panel=o.P)] = None,
    recompute: Annotated[str | None, typer.Option("--recompute", help="none, selective or full.", rich_help_panel=o.M)] = None,
    lora_rank: Annotated[int | None, typer.Option("--lora-rank", help="LoRA rank r.", rich_help_panel=o.F)] = None,
    kv_dtype: Annotated[str | None, typer.Option("--kv-dtype", help="KV-cache dtype.", rich_help_panel=o.I)] = None,
    cpu_ram: o.CpuRam = None,
    nvme: o.Nvme = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write the CSV (one row per grid point) here.",
                                             rich_help_panel=o.O)] = None,
    fmt: Annotated[str, typer.Option("--format", "-f", help="table (fit matrices), csv or json, on stdout.",
                                     rich_help_panel=o.O)] = "table",
    plot: Annotated[Path | None, typer.Option("--plot", help="Draw the fit matrices as a heat-map (.png, .svg, .pdf).",
                                              rich_help_panel=o.O)] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.", rich_help_panel=o.O)] = False,
    workers: Annotated[int | None, typer.Option("--workers", help="Worker processes (default: one per CPU; 1: none).",
                                                rich_help_panel=o.O)] = None,
) -> None:
    """Estimate a grid of models × GPUs × jobs × sizes, print fit matrices, and write one CSV row per point."""
    from dataclasses import replace

    from memplan.catalog.store import gpu_names, model_names
    from memplan.grid import cells, run, validate

    o.check_format(fmt)
    if metric is not None and metric not in ("max-batch", "max-context", "fits"):
        raise MemplanError(f"--metric must be max-batch, max-context or fits, got {metric!r}.")
    if workers is not None and workers < 1:
        raise MemplanError("--workers must be at least 1.")
    if plot is not None:
        from memplan.report.plots import check_path

        check_path(plot)
    spec = sweep_base(recipe, dict(dtype=dtype, quant=quant, optimizer=optimizer, zero=zero,
                                   offload_optimizer=offload_optimizer, offload_params=offload_params, pp=pp,
                                   recompute=recompute, lora_rank=lora_rank, kv_dtype=kv_dtype))
    given = {
        "models": names_or_all(models, "--model", model_names()), "gpus": names_or_all(gpus, "--gpu", gpu_names()),
        "jobs": job_list(jobs),
        "seq_lens": int_list(seq_lens, "--seq-len"), "contexts": int_list(contexts, "--context"),
        "batches": int_list(batches, "--batch"), "gpu_counts": int_list(gpu_counts, "--gpu-count"),
        "gpus_per_node": gpus_per_node, "metric": metric, "min_headroom": min_headroom, "tp": tp_choice(tp),
    }
    if cpu_ram is not None or nvme is not None:
        given["host"] = o.host_from(cpu_ram, nvme)
    spec = replace(spec, **{k: v for k, v in given.items() if v is not None})
    if not spec.jobs:
        spec = replace(spec, jobs=(spec.base.job,))
    if not spec.models or not spec.gpus:
        raise MemplanError("give --model and --gpu (comma-separated catalog names, or 'all'), or --recipe.")
    validate(spec)
    if out is not None:
        from memplan.report.sweep_stream import check_out

        check_out(out)
    if fmt != "json":  # rows streamed to --out / stdout: bounded memory, Ctrl-C keeps the rows so far
        from memplan.report.sweep_stream import streamed_run

        run = streamed_run(fmt=fmt, out=out)
    result = run_with_progress(spec, len(cells(spec)), quiet=quiet, workers=workers, run=run)
    emit_sweep(result, fmt, out, plot)
    if result.partial:
        raise KeyboardInterrupt


def run_with_progress(spec: Any, total: int, *, quiet: bool, workers: int | None, run: Any) -> Any:
    """Run the sweep with a rich progress bar on stderr when it is a terminal (and not --quiet)."""
    from rich.console import Console

    err = Console(stderr=True)
    if quiet or not err.is_terminal:
        return run(spec, workers=workers)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("sweep"), BarColumn(), MofNCompleteColumn(), TextColumn("cells"), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task("sweep", total=total)
        return run(spec, workers=workers, progress=lambda n: bar.advance(task, n))


def emit_sweep(result: Any, fmt: str, out: Path | None, plot: Path | None) -> None:
    from memplan.report.csv_out import records_to_csv
    from memplan.report.sweep_out import matrices, render_matrices, sweep_dict

    streamed = result.streamed_rows is not None  # rows already written by report.sweep_stream
    csv_text = records_to_csv(result.records) if (out is not None or fmt == "csv") and not streamed else ""
    if out is not None and not streamed:
        try:
            out.write_text(csv_text, encoding="utf-8")
        except OSError as exc:
            raise MemplanError(f"--out: cannot write {out}: {exc.strerror or exc}.") from None
        sys.stderr.write(f"memplan: wrote {len(result.records):,} rows to {out}\n")
    if fmt == "csv":
        if not streamed:
            typer.echo(csv_text, nl=False)
    elif fmt == "json":
        from memplan.report.json_out import dumps
        from memplan.report.schemas import validated

        typer.echo(dumps(validated("sweep", sweep_dict(result))))
    else:
        render_matrices(matrices(result), console())
    report_invalid(result.cells)
    if plot is not None:
        from memplan.report.plots import maybe_plot

        maybe_plot(result, plot)


def report_invalid(cells: list[Any], *, most: int = 5) -> None:
    """Why cells are n/a, one line per distinct reason on stderr (the CSV has it per row)."""
    from collections import Counter

    reasons = Counter(c.error for c in cells if c.error)
    for reason, n in reasons.most_common(most):
        sys.stderr.write(f"memplan: {n} cell{'s' if n > 1 else ''} n/a: {reason}\n")
    if len(reasons) > most:
        sys.stderr.write(f"memplan: ... and {len(reasons) - most} more reasons (see the CSV's error column).\n")


@app.command()
@handled
def explain(
    component: Annotated[str | None, typer.Argument(help="A component (optimizer/adam_m, kv_cache, runtime/cuda_context) "
                                                    "or a topic (optimizer, activations, zero, inference).")] = None,
    list_names: Annotated[bool, typer.Option("--list", help="List every component and topic.")] = False,
    brief: Annotated[bool, typer.Option("--brief", help="Only the functions and constants, not the module notes.")] = False,
) -> None:
    """How a memory component is computed: formula, source and assumptions, from the code's own docstrings."""
    from memplan.explain import COMPONENTS, TOPICS, render
    from memplan.explain import explain as run_explain

    if list_names or component is None:
        typer.echo("Components:\n" + "\n".join(f"  {c}" for c in COMPONENTS))
        typer.echo("Topics:\n" + "\n".join(f"  {t}" for t in TOPICS))
        return
    typer.echo(render(run_explain(component), with_modules=not brief), nl=False)
