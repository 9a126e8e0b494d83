"""``memplan plan``: the best configuration that fits, chosen by an ILP over the comma-list choices."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from memplan.cli.convert import host, job_config, search_space
from memplan.cli.core import Command, command_app, handled
from memplan.cli.opts import Model, Opts, options
from memplan.options import OUTPUT, PLAN_DECIDES

app = command_app()
DIMENSIONS = ("engine", "quant", "optimizer", "batch", "zero", "offload_optimizer", "offload_params", "tp", "pp", "ep",
              "cp", "cp_comm", "recompute", "context", "kv_dtype", "shard_group", "pp_schedule")
CUSTOM = {"ep": {"help": "Expert-parallel degrees to choose among (MoE on --engine megatron or deepspeed), "
                        "comma-separated (default: powers of two dividing the experts)."},
          "cp": {"help": "Context-parallel degrees to choose among (--engine megatron, fsdp2 or deepspeed with "
                        "--cp-comm), comma-separated (default: 1)."},
          "cp_comm": {"help": "Context-parallel exchanges to choose among for cp > 1: ring, ulysses, allgather "
                             "(Megatron's p2p, a2a also accepted), comma-separated (default: ring)."},
          "batch": {"help": "Micro-batch (training) or concurrent sequences (inference) choices, comma-separated."},
          "recompute": {"help": "Per-layer recompute modes allowed (none,selective,full), comma-separated."},
          "fmt": {"help": "table, json or csv."},
          "plot": {"help": "Draw the best plan's breakdown and memory vs context or batch (.png, .svg or .pdf; needs "
                           "memplan[plot])."}}
Objective = Annotated[str, typer.Option("--objective", help="throughput, min-gpus, max-batch, max-concurrency "
                                        "(serving), max-context, min-memory, min-cost, max-quality (least weight "
                                        "quantization error).", rich_help_panel=OUTPUT)]
Top = Annotated[int, typer.Option("--top", help="Ranked alternatives to show.", rich_help_panel=OUTPUT)]
TimeLimit = Annotated[float, typer.Option("--time-limit", help="Seconds the whole command may spend solving (every "
                                          "solve together).", rich_help_panel=OUTPUT)]
Solver = Annotated[str | None, typer.Option("--solver", help="highs or cbc (default: highs, else cbc).", rich_help_panel=OUTPUT)]
DebugLp = Annotated[str | None, typer.Option("--debug-lp", help="Write the ILP to this .lp file (a second part of the space, "
                                             "plans that split optimizer states by layer, to NAME.part1.lp).",
                                             rich_help_panel=OUTPUT)]
PlotAxis = Annotated[str, typer.Option("--plot-axis", help="x axis of the --plot curve: context or batch.",
                                      rich_help_panel=OUTPUT)]


@app.command(cls=Command)
@handled
@options("hardware", "job", "quant_integration", "zero", "offload_optimizer", "offload_params", "tp", "pp", "ep", "cp", "cp_comm",
         "recompute", "offload_activations", "shard_group",
         "per_layer_offload", "per_layer_quant", "flash_attention", "attention", "dropout", "loss_fp32",
         "activation_accounting", "cuda_context", "allocator_reserve", "safety_margin", "finetune", "context",
         "kv_dtype", "paged", "block_size", "engine_knobs", "serving", "serving_time", "perf", "usd_per_hour", "output",
         lists=DIMENSIONS, exclude=("quant_map", "grad_accum"), custom=CUSTOM, refused=PLAN_DECIDES)
def plan(model: Model, opts: Opts, objective: Objective = "throughput", top: Top = 3, time_limit: TimeLimit = 30.0,
         solver: Solver = None, debug_lp: DebugLp = None, plot_axis: PlotAxis = "context") -> None:
    """The fastest (or smallest, cheapest...) configuration that fits, chosen by an ILP; exit 1 when none fits."""
    from memplan.catalog.resolve import load_model
    from memplan.catalog.store import catalog_gpu
    from memplan.planner.plan import PlanRequest
    from memplan.planner.plan import plan as run_plan
    from memplan.planner.solvers import deadline
    from memplan.report import emit

    emit.check_format(opts.fmt)
    emit.check_plot(opts.plot)
    req = PlanRequest(model=load_model(model), gpu=priced_gpu(catalog_gpu(opts.gpu), opts.usd_per_hour),
                      host=host(opts), base=job_config(opts),
                      space=search_space(opts), objective=objective_of(objective, top, time_limit), top_k=top,
                      time_limit_s=time_limit, solver=solver, debug_lp=debug_lp, train_tokens=opts.train_tokens)
    with deadline(time_limit):
        result = run_plan(req)
    emit.plan(result, opts.fmt)
    emit.plot(result, opts.plot if result.best is not None else None, axis=plot_axis)
    if opts.plot is not None and result.best is None:
        emit.note("--plot skipped: no plan fits.")
    raise typer.Exit(code=0 if result.best is not None else 1)


def objective_of(text: str, top: int, time_limit: float) -> Any:
    """The Objective named ``text``, after checking ``--top`` and ``--time-limit``."""
    from memplan.errors import MemplanError, did_you_mean
    from memplan.planner.space import Objective

    if top < 1:
        raise MemplanError("--top must be at least 1.")
    if not time_limit > 0:
        raise MemplanError("--time-limit must be positive.")
    try:
        return Objective(text)
    except ValueError:
        raise MemplanError(f"unknown objective {text!r}.{did_you_mean(text, [x.value for x in Objective])}") from None


def priced_gpu(gpu: Any, usd_per_hour: float | None) -> Any:
    """``gpu`` with ``--usd-per-hour`` as its price per hour (what min-cost ranks and the cost columns read)."""
    if usd_per_hour is None:
        return gpu
    from memplan.report.cost import checked_usd_per_hour

    return gpu.model_copy(update={"price_per_hour_usd": checked_usd_per_hour(usd_per_hour, "--usd-per-hour")})
