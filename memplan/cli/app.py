"""memplan's command line. Each command parses, calls pure logic, renders, and returns an exit code."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer

from memplan.cli import options as o
from memplan.errors import MemplanError

app = typer.Typer(
    name="memplan",
    help="Will this model fit on this hardware, and what is the fastest configuration that does?",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
)

EXIT_INPUT = 2
F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str) -> typer.Exit:
    """Print one sentence on stderr and return the exit for bad input (code 2)."""
    sys.stderr.write(f"memplan: {message}\n")
    return typer.Exit(code=EXIT_INPUT)


def handled(func: F) -> F:
    """Turn user-fixable errors into one line on stderr and exit code 2; never a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except MemplanError as exc:
            raise fail(str(exc)) from None
        except RecursionError:
            raise fail("the input is nested too deeply to read.") from None

    return wrapper  # type: ignore[return-value]


def console() -> Any:
    from rich.console import Console

    return Console(soft_wrap=False)


def version_callback(value: bool) -> None:
    if value:
        from memplan import __version__

        typer.echo(f"memplan {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: Annotated[bool, typer.Option("--version", callback=version_callback, is_eager=True,
                                          help="Show the version and exit.")] = False,
) -> None:
    """Analytic memory planner for LLM training and inference."""


@app.command()
@handled
def estimate(
    model: o.Model,
    gpu: o.Gpu = "h100-sxm-80gb",
    gpus: o.Gpus = 1,
    nodes: o.Nodes = 1,
    cpu_ram: o.CpuRam = None,
    nvme: o.Nvme = None,
    job: o.Job = "full",
    dtype: o.Dtype = "bf16",
    quant: o.Quant = None,
    optimizer: o.Optimizer = "adamw",
    master_weights: o.Master = None,
    grad_dtype: o.GradDtype = None,
    batch: o.Batch = 1,
    seq_len: o.SeqLen = 2048,
    accounting: o.Accounting = "deepspeed",
    zero: o.Zero = 0,
    offload_optimizer: o.OffOpt = "none",
    offload_params: o.OffParams = "none",
    tp: o.Tp = 1,
    pp: o.Pp = 1,
    ep: o.Ep = 1,
    sequence_parallel: o.Sp = False,
    recompute: o.Recompute = "none",
    recompute_layers: o.RecomputeLayers = None,
    flash_attention: o.Flash = True,
    cuda_context: o.CudaContext = None,
    allocator_reserve: o.AllocReserve = None,
    lora_rank: o.LoraRank = 16,
    lora_alpha: o.LoraAlpha = 32.0,
    lora_targets: o.LoraTargets = "q,k,v,o",
    dora: o.Dora = False,
    galore_rank: o.GaloreRank = 128,
    galore_8bit: o.Galore8 = False,
    context: o.Context = 4096,
    kv_dtype: o.KvDtype = None,
    paged: o.Paged = False,
    block_size: o.BlockSize = 16,
    max_context: Annotated[bool, typer.Option("--max-context", help="Report the largest context that fits (infer).",
                                              rich_help_panel=o.I)] = False,
    max_batch: Annotated[bool, typer.Option("--max-batch", help="Report the largest batch that fits.",
                                            rich_help_panel=o.I)] = False,
    fmt: o.Format = "table",
) -> None:
    """Memory of one fixed configuration, per component and per device, and whether it fits."""
    from memplan.estimate import estimate as run_estimate

    o.check_format(fmt)
    kw = dict(locals())
    overrides = o.job_overrides(**kw)
    host = o.host_from(cpu_ram, nvme)
    est = run_estimate(model, gpu, host=host, **overrides)
    extra: dict[str, Any] = {}
    if max_context or max_batch:
        from memplan.search import largest_fitting

        if max_context:
            extra["max_context"] = largest_fitting(est, "context")
        if max_batch:
            extra["max_batch"] = largest_fitting(est, "micro_batch")
    emit_estimate(est, fmt, extra)


def emit_estimate(est: Any, fmt: str, extra: dict[str, Any]) -> None:
    if fmt == "json":
        from memplan.report.json_out import dumps, estimate_dict

        typer.echo(dumps({**estimate_dict(est), **extra}))
    elif fmt == "csv":
        from memplan.report.csv_out import estimate_record, records_to_csv

        typer.echo(records_to_csv([{**estimate_record(est), **extra}]), nl=False)
    else:
        from memplan.report.table import render_estimate

        con = console()
        render_estimate(est, con)
        for key, value in extra.items():
            con.print(f"{key.replace('_', ' ')}: {value:,}")


@app.command()
@handled
def models(
    family: Annotated[str | None, typer.Option("--family", help="Only this family (llama, mixtral, ...).")] = None,
    contains: Annotated[str | None, typer.Argument(help="Only names containing this text.")] = None,
    fmt: o.Format = "table",
) -> None:
    """List the built-in model catalog."""
    from memplan.catalog.listing import model_rows

    rows = model_rows(family=family, contains=contains)
    emit_rows(rows, fmt, title="models")


@app.command()
@handled
def gpus(
    contains: Annotated[str | None, typer.Argument(help="Only names containing this text.")] = None,
    min_memory: Annotated[
        str | None, typer.Option("--min-memory", help="Only GPUs with at least this memory, e.g. 40GiB.")
    ] = None,
    vendor: Annotated[str | None, typer.Option("--vendor", help="nvidia or amd.")] = None,
    fmt: o.Format = "table",
) -> None:
    """List the built-in GPU catalog."""
    from memplan.catalog.listing import gpu_rows

    rows = gpu_rows(contains=contains, min_memory=o.size_or_none(min_memory, "--min-memory"), vendor=vendor)
    emit_rows(rows, fmt, title="GPUs")


def emit_rows(rows: list[dict[str, Any]], fmt: str, *, title: str) -> None:
    o.check_format(fmt)
    if fmt == "json":
        from memplan.report.json_out import dumps

        typer.echo(dumps(rows))
    elif fmt == "csv":
        from memplan.report.csv_out import records_to_csv

        typer.echo(records_to_csv(rows), nl=False)
    else:
        from rich.table import Table

        table = Table(title=f"{len(rows)} {title}", title_justify="left")
        for key in rows[0] if rows else []:
            table.add_column(key, justify="right" if isinstance(rows[0][key], int | float) else "left")
        for row in rows:
            table.add_row(*(f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v) for v in row.values()))
        console().print(table)


def main() -> None:
    """Console-script entry point."""
    app()
