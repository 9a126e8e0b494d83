"""memplan's command line. Each command parses, calls pure logic, renders, and returns an exit code."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from typer.core import TyperCommand, TyperGroup

try:  # typer >= 0.25 vendors click
    from typer._click.exceptions import ClickException
except ImportError:  # pragma: no cover - older typer depends on click
    from click.exceptions import ClickException

from memplan.cli import options as o
from memplan.errors import MemplanError


class OneLineErrors(TyperGroup):
    """The command group, with the parser's own errors (a value it cannot read, an unknown option, a
    missing argument) printed as one sentence on stderr with exit code 2, like every other bad input."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except ClickException as exc:
            sys.stderr.write(usage_sentence(exc))
            sys.exit(exc.exit_code)
        except (typer.Abort, EOFError):
            sys.stderr.write("memplan: aborted.\n")
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


def usage_sentence(exc: Any) -> str:
    """``memplan: <click's message, lower-cased first letter> (see 'memplan CMD --help').`` plus a newline."""
    message = exc.format_message().strip()
    if type(exc).__name__ == "NoArgsIsHelpError":  # the help text itself (already printed by rich help)
        return f"{message}\n" if message else ""
    path = exc.ctx.command_path if getattr(exc, "ctx", None) is not None else "memplan"
    message = (message[:1].lower() + message[1:]).rstrip(".") or "invalid command line"
    return f"memplan: {message} (see '{path} --help').\n"


app = typer.Typer(
    name="memplan",
    help="Will this model fit on this hardware, and what is the fastest configuration that does?",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    cls=OneLineErrors,
    rich_markup_mode=None,  # plain help (PanelHelp below keeps the panels): --help does not import rich
)


class PanelHelp(TyperCommand):
    """A command whose ``--help`` lists options under their panels (Hardware, Job, ...), as typer's rich
    help does, but in click's plain text, so ``--help`` does not import rich (or markdown-it, pygments)."""

    def format_options(self, ctx: Any, formatter: Any) -> None:
        panels: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is not None:
                title = "Arguments" if param.param_type_name == "argument" else (
                    getattr(param, "rich_help_panel", None) or "Options")
                panels.setdefault(title, []).append(record)
        for title in sorted(panels, key=lambda t: (t != "Arguments", t == "Options")):
            with formatter.section(title):
                formatter.write_dl(panels[title])

EXIT_INPUT = 2
EXIT_INTERNAL = 3
F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str) -> typer.Exit:
    """Print one sentence on stderr and return the exit for bad input (code 2)."""
    message = " ".join(message.split())  # one line, whatever the message carried
    if not message.endswith((".", "?", "!")):
        message += "."
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
        except (typer.Exit, typer.Abort, SystemExit, KeyboardInterrupt):
            raise
        except Exception as exc:  # a bug in memplan: one line, not a traceback, unless asked for
            if os.environ.get("MEMPLAN_DEBUG"):
                raise
            sys.stderr.write(f"memplan: internal error ({type(exc).__name__}: {exc}); "
                             "set MEMPLAN_DEBUG=1 for the traceback and please report it.\n")
            raise typer.Exit(code=EXIT_INTERNAL) from None

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
    optimizer_gpu_layers: o.OptGpuLayers = None,
    quant_map: o.QuantMap = None,
    offload_layers: o.OffloadLayers = None,
    flash_attention: o.Flash = True,
    attention: o.Attention = None,
    dropout: o.Dropout = False,
    loss_fp32: o.LossFp32 = True,
    activation_accounting: o.ActAccounting = "autograd",
    cuda_context: o.CudaContext = None,
    allocator_reserve: o.AllocReserve = None,
    safety_margin: o.SafetyMargin = 0.0,
    lora_rank: o.LoraRank = 16,
    lora_alpha: o.LoraAlpha = 32.0,
    lora_targets: o.LoraTargets = "q,k,v,o",
    lora_dtype: o.LoraDtype = None,
    dora: o.Dora = False,
    paged_optimizer: o.PagedOptimizer = False,
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
    plot: Annotated[Path | None, typer.Option("--plot", help="Draw the breakdown per tier against capacity "
                                              "(.png, .svg or .pdf; needs memplan[plot]).", rich_help_panel=o.O)] = None,
) -> None:
    """Memory of one fixed configuration, per component and per device, and whether it fits."""
    from memplan.estimator import estimate as run_estimate

    o.check_format(fmt)
    kw = dict(locals())
    overrides = o.job_overrides(**kw)
    host = o.host_from(cpu_ram, nvme)
    spec: Any = model
    if quant_map is not None or offload_layers is not None:
        from memplan.catalog.resolve import load_model

        spec = load_model(model)
    overrides = o.layer_overrides(spec, overrides, quant_map_text=quant_map, offload_text=offload_layers,
                                  optimizer_gpu_layers=optimizer_gpu_layers)
    est = run_estimate(spec, gpu, host=host, **overrides)
    extra: dict[str, Any] = {}
    if max_context or max_batch:
        from memplan.search import largest_fitting

        if max_context:
            extra["max_context"] = largest_fitting(est, "context")
        if max_batch:
            extra["max_batch"] = largest_fitting(est, "micro_batch")
    emit_estimate(est, fmt, extra)
    if plot is not None:
        from memplan.report.plots import maybe_plot

        maybe_plot(est, plot)


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


def int_list(text: str | None, flag: str, *, minimum: int = 1) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise MemplanError(f"{flag}: expected comma-separated integers such as 1,2,4, got {text!r}.") from None
    if not values or any(v < minimum for v in values):
        kind = "positive integers" if minimum == 1 else f"integers of at least {minimum}"
        raise MemplanError(f"{flag}: values must be {kind}, got {text!r}.")
    return values


def str_list(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    return tuple(v.strip() for v in text.split(",") if v.strip())


@app.command()
@handled
def plan(
    model: o.Model,
    gpu: o.Gpu = "h100-sxm-80gb",
    gpus: o.Gpus = 1,
    nodes: o.Nodes = 1,
    cpu_ram: o.CpuRam = None,
    nvme: o.Nvme = None,
    job: o.Job = "full",
    dtype: o.Dtype = "bf16",
    quant: Annotated[str | None, typer.Option("--quant", help="Weight quantization choices, comma-separated (none = 16-bit).",
                                              rich_help_panel=o.J)] = None,
    optimizer: Annotated[str | None, typer.Option("--optimizer", help="Optimizer choices, comma-separated.",
                                                  rich_help_panel=o.J)] = None,
    batch: Annotated[str | None, typer.Option("--batch", "-b", help="Micro-batch (training) or concurrent sequences (inference) choices.",
                                              rich_help_panel=o.J)] = None,
    global_batch: Annotated[int | None, typer.Option("--global-batch", help="Sequences per optimizer step.",
                                                     rich_help_panel=o.J)] = None,
    seq_len: o.SeqLen = 2048,
    accounting: o.Accounting = "deepspeed",
    zero: Annotated[str | None, typer.Option("--zero", help="ZeRO stage choices, e.g. 2,3.", rich_help_panel=o.P)] = None,
    offload_optimizer: Annotated[str | None, typer.Option("--offload-optimizer", help="Choices among none,cpu,nvme.",
                                                          rich_help_panel=o.P)] = None,
    offload_params: Annotated[str | None, typer.Option("--offload-params", help="Choices among none,cpu,nvme.",
                                                       rich_help_panel=o.P)] = None,
    tp: Annotated[str | None, typer.Option("--tp", help="Tensor-parallel choices, e.g. 1,2,4.", rich_help_panel=o.P)] = None,
    pp: Annotated[str | None, typer.Option("--pp", help="Pipeline-parallel choices.", rich_help_panel=o.P)] = None,
    recompute: Annotated[str | None, typer.Option("--recompute", help="Per-layer recompute modes allowed (none,selective,full).",
                                                  rich_help_panel=o.M)] = None,
    per_layer_offload: Annotated[bool, typer.Option("--per-layer-offload/--no-per-layer-offload",
                                                    help="Choose per layer where weights (inference) or optimizer states "
                                                         "(training, ZeRO-3 partial offload) live: GPU or CPU.",
                                                    rich_help_panel=o.M)] = True,
    per_layer_quant: Annotated[bool, typer.Option("--per-layer-quant", help="Choose each layer's weight format among the "
                                                  "--quant choices (LQ-LoRA-style; inference, or lora/qlora with "
                                                  "--objective max-quality).",
                                                  rich_help_panel=o.M)] = False,
    flash_attention: o.Flash = True,
    cuda_context: o.CudaContext = None,
    allocator_reserve: o.AllocReserve = None,
    safety_margin: o.SafetyMargin = 0.0,
    lora_rank: o.LoraRank = 16,
    lora_targets: o.LoraTargets = "q,k,v,o",
    galore_rank: o.GaloreRank = 128,
    galore_8bit: o.Galore8 = False,
    context: Annotated[str | None, typer.Option("--context", "-c", help="Context choices (inference).", rich_help_panel=o.I)] = None,
    kv_dtype: Annotated[str | None, typer.Option("--kv-dtype", help="KV dtype choices (inference).", rich_help_panel=o.I)] = None,
    objective: Annotated[str, typer.Option("--objective", help="throughput, min-gpus, max-batch, max-context, min-memory, "
                                                               "min-cost, max-quality (least weight quantization error).",
                                           rich_help_panel=o.O)] = "throughput",
    top: Annotated[int, typer.Option("--top", help="Ranked alternatives to show.", rich_help_panel=o.O)] = 3,
    time_limit: Annotated[float, typer.Option("--time-limit", help="Solver time limit per solve, seconds.", rich_help_panel=o.O)] = 30.0,
    solver: Annotated[str | None, typer.Option("--solver", help="highs or cbc (default: highs, else cbc).", rich_help_panel=o.O)] = None,
    debug_lp: Annotated[str | None, typer.Option("--debug-lp", help="Write the ILP to this .lp file (a second part of the space, plans that split "
                                                   "optimizer states by layer, to NAME.part1.lp).", rich_help_panel=o.O)] = None,
    fmt: o.Format = "table",
    plot: Annotated[Path | None, typer.Option("--plot", help="Draw the best plan's breakdown and memory vs context or batch "
                                              "(.png, .svg or .pdf; needs memplan[plot]).", rich_help_panel=o.O)] = None,
    plot_axis: Annotated[str, typer.Option("--plot-axis", help="x axis of the --plot curve: context or batch.",
                                           rich_help_panel=o.O)] = "context",
) -> None:
    """The fastest (or smallest, cheapest...) configuration that fits, chosen by an ILP; exit 1 when none fits."""
    from memplan.planner.plan import PlanRequest
    from memplan.planner.plan import plan as run_plan
    from memplan.planner.space import Objective

    o.check_format(fmt, ("table", "json", "csv"))
    if top < 1:
        raise MemplanError("--top must be at least 1.")
    if time_limit <= 0:
        raise MemplanError("--time-limit must be positive.")
    try:
        obj = Objective(objective)
    except ValueError:
        from memplan.errors import did_you_mean

        raise MemplanError(f"unknown objective {objective!r}.{did_you_mean(objective, [x.value for x in Objective])}") from None
    quants = str_list(quant)
    base = make_base(job=job, dtype=dtype, quant=None if quants is None or len(quants) != 1 else _none(quants[0]),
                     optimizer=(str_list(optimizer) or ("adamw",))[0], accounting=accounting, gpus=gpus, nodes=nodes,
                     seq_len=seq_len, flash_attention=flash_attention, cuda_context=cuda_context,
                     allocator_reserve=allocator_reserve, safety_margin=safety_margin, lora_rank=lora_rank,
                     lora_targets=lora_targets,
                     galore_rank=galore_rank, galore_8bit=galore_8bit, batch=(int_list(batch, "--batch") or (1,))[0],
                     context=(int_list(context, "--context") or (4096,))[0], kv_dtype=(str_list(kv_dtype) or (None,))[0])
    space = search_space({
        "tp": int_list(tp, "--tp"), "pp": int_list(pp, "--pp"), "zero": int_list(zero, "--zero", minimum=0),
        "offload_optimizer": str_list(offload_optimizer), "offload_params": str_list(offload_params),
        "micro_batch": int_list(batch, "--batch") if job != "infer" else None,
        "batch": int_list(batch, "--batch") if job == "infer" else None,
        "optimizer": str_list(optimizer), "quant": tuple(_none(q) for q in quants) if quants else None,
        "kv_dtype": str_list(kv_dtype), "recompute": str_list(recompute),
        "context": int_list(context, "--context") if job == "infer" else None,
        "global_batch": global_batch, "per_layer_offload": per_layer_offload, "per_layer_quant": per_layer_quant,
    })
    from memplan.catalog.resolve import load_model
    from memplan.catalog.store import catalog_gpu

    req = PlanRequest(model=load_model(model), gpu=catalog_gpu(gpu), host=o.host_from(cpu_ram, nvme), base=base,
                      space=space, objective=obj, top_k=top, time_limit_s=time_limit, solver=solver, debug_lp=debug_lp)
    result = run_plan(req)
    emit_plan(result, fmt)
    if plot is not None and result.best is None:
        sys.stderr.write("memplan: --plot skipped: no plan fits.\n")
    elif plot is not None:
        from memplan.report.plots import maybe_plot

        maybe_plot(result, plot, axis=plot_axis)
    if result.best is None:
        raise typer.Exit(code=1)


def _none(text: str) -> str | None:
    return None if text.lower() in ("none", "bf16", "fp16", "16bit") else text


def search_space(data: dict[str, Any]) -> Any:
    """A validated SearchSpace from the plan options; an error names the field (ZeRO stages above 3 too)."""
    from pydantic import ValidationError

    from memplan.catalog.store import format_validation_error
    from memplan.planner.space import SearchSpace

    if any(z > 3 for z in data.get("zero") or ()):
        raise MemplanError(f"--zero: ZeRO stages are 0, 1, 2 and 3, got {','.join(map(str, data['zero']))}.")
    try:
        return SearchSpace.model_validate(data)
    except ValidationError as exc:
        raise MemplanError(f"invalid search space: {format_validation_error(exc)}.") from None


def make_base(**kw: Any) -> Any:
    from pydantic import ValidationError

    from memplan.catalog.store import format_validation_error
    from memplan.config import JobConfig

    data = {
        "job": kw["job"], "dtype": kw["dtype"], "quant": kw["quant"], "optimizer": kw["optimizer"],
        "accounting": kw["accounting"], "gpus_per_node": kw["gpus"], "nodes": kw["nodes"], "seq_len": kw["seq_len"],
        "micro_batch": kw["batch"], "flash_attention": kw["flash_attention"],
        "cuda_context_bytes": o.size_or_none(kw["cuda_context"], "--cuda-context"),
        "allocator_reserve_pct": kw["allocator_reserve"], "safety_margin_pct": kw["safety_margin"],
        "lora": {"rank": kw["lora_rank"], "targets": o.lora_targets(kw["lora_targets"])},
        "galore": {"rank": kw["galore_rank"], "eight_bit": kw["galore_8bit"]},
        "infer": {"context": kw["context"], "kv_dtype": kw["kv_dtype"]},
    }
    try:
        return JobConfig.model_validate(data)
    except ValidationError as exc:
        raise MemplanError(f"invalid configuration: {format_validation_error(exc)}.") from None


def emit_plan(result: Any, fmt: str) -> None:
    if fmt == "json":
        from memplan.report.json_out import dumps
        from memplan.report.plan_out import plan_dict

        typer.echo(dumps(plan_dict(result)))
    elif fmt == "csv":
        from memplan.report.csv_out import estimate_record, records_to_csv

        records = [{"rank": i + 1, **estimate_record(c.estimate), "step_time_s": c.step_time_s,
                    "tokens_per_s": c.tokens_per_s} for i, c in enumerate(result.candidates)]
        typer.echo(records_to_csv(records) if records else "status\ninfeasible\n", nl=False)
    else:
        from memplan.report.plan_out import render_plan

        render_plan(result, console())


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


from memplan.cli import ci as _ci  # noqa: E402,F401  (registers check, sweep and explain on the app)
from memplan.cli import measure_cmd as _measure  # noqa: E402,F401  (registers measure and calibrate on the app)

for _info in app.registered_commands:  # every command's --help groups its options by panel
    if _info.cls in (None, TyperCommand):
        _info.cls = PanelHelp
