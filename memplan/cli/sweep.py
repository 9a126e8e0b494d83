"""``memplan sweep``: estimate a grid (models × GPUs × jobs × sizes), print fit matrices, write one CSV row per point."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from memplan.cli.convert import host, job_config, sweep_report
from memplan.cli.core import Command, command_app, handled
from memplan.cli.opts import Opts, options
from memplan.errors import MemplanError
from memplan.options import OUTPUT, PARALLEL

app = command_app()
G = "Grid"
MAX_WORKERS = 1024
"""The most worker processes --workers accepts: far past any host's cores (a larger count cannot even be
started: the OS refuses the processes, or the integer overflows a C long)."""
FIXED = ("engine", "dtype", "quant", "bnb_integration", "bnb_version", "optimizer", "zero", "offload_optimizer",
         "offload_params", "pp", "cp", "cp_comm", "recompute",
         "lora_rank", "kv_dtype", "cpu_ram", "nvme", "offload_activations", "pp_schedule")
"""Job options that hold one value for the whole grid (default: the recipe's, else memplan's)."""


Recipe = Annotated[Path | None, typer.Option("--recipe", "-r", help="Take the grid from this recipe's sweep: block "
                                             "(flags below override its axes).")]
Models = Annotated[str | None, typer.Option("--model", "-m", rich_help_panel=G,
                                           help="Models, comma-separated catalog names or paths, or 'all'.")]
Gpus = Annotated[str | None, typer.Option("--gpu", "-g", rich_help_panel=G,
                                         help="GPUs, comma-separated catalog names, or 'all'.")]
Jobs = Annotated[str | None, typer.Option("--job", "-j", rich_help_panel=G,
                                         help="Jobs, e.g. full,lora,qlora,infer (default: full).")]
SeqLens = Annotated[str | None, typer.Option("--seq-len", "-s", rich_help_panel=G,
                                            help="Training sequence lengths, e.g. 2048,8192.")]
Contexts = Annotated[str | None, typer.Option("--context", "-c", rich_help_panel=G,
                                             help="Inference contexts, e.g. 4096,32768.")]
Batches = Annotated[str | None, typer.Option("--batch", "-b", rich_help_panel=G,
                                            help="Micro-batches (inference: concurrent sequences).")]
GpuCounts = Annotated[str | None, typer.Option("--gpu-count", rich_help_panel=G,
                                              help="GPU counts, e.g. 1,8,64 (split into nodes of --gpus-per-node).")]
GpusPerNode = Annotated[int | None, typer.Option("--gpus-per-node", rich_help_panel=G, help="GPUs per node (default 8).")]
Metric = Annotated[str | None, typer.Option("--metric", rich_help_panel=G,
                                           help="Fit-matrix cell: max-batch (largest batch that fits, exact), max-context "
                                                "(longest sequence/context), or fits (largest swept batch).")]
MinHeadroom = Annotated[str | None, typer.Option("--min-headroom", rich_help_panel=G,
                                                help="GPU memory that must stay free, e.g. 10% or 2GiB.")]
Tp = Annotated[str | None, typer.Option("--tp", help="Tensor-parallel degree, or 'node' for all GPUs of a node.",
                                        rich_help_panel=PARALLEL)]
CsvOut = Annotated[Path | None, typer.Option("--out", "-o", help="Write the CSV (one row per grid point) here.",
                                             rich_help_panel=OUTPUT)]
Format = Annotated[str, typer.Option("--format", "-f", help="table (fit matrices), csv or json, on stdout.",
                                     rich_help_panel=OUTPUT)]
Plot = Annotated[Path | None, typer.Option("--plot", help="Draw the fit matrices as a heat-map (.png, .svg, .pdf).",
                                           rich_help_panel=OUTPUT)]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.", rich_help_panel=OUTPUT)]
Workers = Annotated[int | None, typer.Option("--workers", help="Worker processes (default: one per CPU; 1: none).",
                                             rich_help_panel=OUTPUT)]


ENGINE_HELP = {"engine": {"help": "Engine of every cell (default: each job's usual one); a cell whose job it does not "
                                  "run is n/a with the engine's rule, a grid none of whose jobs it runs is an error. "
                                  "llama.cpp cells take the exact scalar path (its buffers do not fit the vectorized "
                                  "form)."}}


@app.command(cls=Command)
@handled
@options(*FIXED, "sweep_report", unset=FIXED, custom=ENGINE_HELP)
def sweep(recipe: Recipe = None, models: Models = None, gpus: Gpus = None, jobs: Jobs = None, seq_lens: SeqLens = None,
          contexts: Contexts = None, batches: Batches = None, gpu_counts: GpuCounts = None,
          gpus_per_node: GpusPerNode = None, metric: Metric = None, min_headroom: MinHeadroom = None, tp: Tp = None,
          out: CsvOut = None, fmt: Format = "table", plot: Plot = None, quiet: Quiet = False, workers: Workers = None,
          *, opts: Opts) -> None:
    """Estimate a grid of models × GPUs × jobs × sizes, print fit matrices, and write one CSV row per point."""
    from memplan.grid import cells, run, validate
    from memplan.report import emit

    emit.check_format(fmt)
    emit.check_plot(plot)
    if opts.pivot and fmt == "json":
        raise MemplanError("--pivot lays the fit matrices out for a table or a CSV; the JSON already holds them "
                           "('matrices'): drop --pivot or use --format table or csv.")
    for flag, given in (("--speed", opts.speed), ("--usd-per-hour", opts.usd_per_hour is not None)):
        if given and (fmt == "table" or opts.pivot) and out is None:
            raise MemplanError(f"{flag} adds columns to the rows, which the fit matrices do not show: give --out "
                               "FILE.csv, or --format csv or json.")
    if workers is not None and not 1 <= workers <= MAX_WORKERS:
        raise MemplanError(f"--workers must be between 1 and {MAX_WORKERS} (more processes than that only queue "
                           f"on the CPUs), not {workers}.")
    axes = {"models": models, "gpus": gpus, "jobs": jobs, "seq_lens": seq_lens, "contexts": contexts, "batches": batches,
            "gpu_counts": gpu_counts, "gpus_per_node": gpus_per_node, "metric": metric, "min_headroom": min_headroom,
            "tp": tp}
    spec = grid_spec(recipe, opts, axes)
    validate(spec)
    if out is not None:
        from memplan.report.sweep_stream import check_out

        check_out(out)
    if fmt != "json":  # rows streamed to --out / stdout: bounded memory, Ctrl-C keeps the rows so far
        from memplan.report.sweep_stream import streamed_run

        run = streamed_run(fmt=fmt, out=out, pivot=opts.pivot)
    result = run_with_progress(spec, len(cells(spec)), quiet=quiet, workers=workers, run=run)
    emit.sweep(result, fmt, out, pivot=opts.pivot)
    emit.plot(result, plot)
    if result.partial:
        raise KeyboardInterrupt


def grid_spec(recipe: Path | None, opts: Opts, axes: dict[str, Any]) -> Any:
    """The SweepSpec: the recipe's ``sweep:`` block (or an empty one), its base job changed by the options, and
    the axes given on the command line."""
    from dataclasses import replace

    from memplan.catalog.store import gpu_names, model_names
    from memplan.cli.convert import int_list
    from memplan.grid import SweepSpec, base_at_counts, spec_from_recipe
    from memplan.recipe_load import load_recipe

    if axes["metric"] is not None and axes["metric"] not in ("max-batch", "max-context", "fits"):
        raise MemplanError(f"--metric must be max-batch, max-context or fits, got {axes['metric']!r}.")
    spec = spec_from_recipe(load_recipe(recipe)) if recipe is not None else SweepSpec(models=(), gpus=(), jobs=())
    given = {**axes, "models": names_or_all(axes["models"], "--model", model_names()),
             "gpus": names_or_all(axes["gpus"], "--gpu", gpu_names()),
             "jobs": job_list(axes["jobs"]) or spec.jobs or (spec.base.job,), "tp": tp_choice(axes["tp"])}
    for key, flag in (("seq_lens", "--seq-len"), ("contexts", "--context"), ("batches", "--batch"),
                      ("gpu_counts", "--gpu-count")):
        given[key] = int_list(axes[key], flag)
    if opts.get("cpu_ram") is not None or opts.get("nvme") is not None:
        given["host"] = host(opts)
    spec = replace(spec, **{k: v for k, v in given.items() if v is not None}, **sweep_report(opts))
    # the options' base job, validated at the grid's GPU counts (a --pp/--cp needs more than one GPU)
    recipe_base = spec.base
    spec = replace(spec, base=base_at_counts(lambda **world: job_config(opts, base=recipe_base, **world),
                                             spec.gpu_counts, spec.gpus_per_node))
    if not spec.models or not spec.gpus:
        raise MemplanError("give --model and --gpu (comma-separated catalog names, or 'all'), or --recipe.")
    return spec


def names_or_all(text: str | None, flag: str, everything: list[str]) -> tuple[str, ...] | None:
    """A comma list of catalog names; ``all`` for the whole catalog; None when the flag is not given."""
    if text is None:
        return None
    values = tuple(v.strip() for v in text.split(",") if v.strip())
    if not values:
        raise MemplanError(f"{flag}: give at least one name, or 'all'.")
    return tuple(everything) if values == ("all",) else values


def job_list(text: str | None) -> tuple[Any, ...] | None:
    """``--job full,lora``: Job values, with a suggestion for a misspelt one."""
    from memplan.config import Job
    from memplan.errors import did_you_mean

    if text is None:
        return None
    names = tuple(v.strip() for v in text.split(",") if v.strip())
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
    try:
        value = int(text)
    except ValueError:
        raise MemplanError(f"--tp: give one degree such as 8, or 'node', got {text!r}.") from None
    if value < 1:
        raise MemplanError(f"--tp: values must be positive integers, got {text!r}.")
    return value


def run_with_progress(spec: Any, total: int, *, quiet: bool, workers: int | None, run: Any) -> Any:
    """Run the sweep with a rich progress bar on stderr when it is a terminal (and not --quiet).

    The bar is redrawn from the progress callback (at most ten times a second, rich's default rate), not by rich's
    refresh thread: a process with one OS thread forks its sweep workers instead of spawning them
    (``grid.start_method``)."""
    from rich.console import Console

    err = Console(stderr=True)
    if quiet or not err.is_terminal:
        return run(spec, workers=workers)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("sweep"), BarColumn(), MofNCompleteColumn(), TextColumn("cells"), TimeElapsedColumn())
    import time

    with Progress(*columns, console=err, transient=True, auto_refresh=False) as bar:
        task = bar.add_task("sweep", total=total)
        drawn = [time.monotonic()]

        def advance(n: int) -> None:
            bar.advance(task, n)
            if time.monotonic() - drawn[0] >= REDRAW_S:
                bar.refresh()
                drawn[0] = time.monotonic()

        bar.refresh()
        return run(spec, workers=workers, progress=advance)


REDRAW_S = 1 / 10
"""Seconds between two redraws of the progress bar: rich's default ``refresh_per_second`` (10)."""
