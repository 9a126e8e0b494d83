"""memplan's command line: the root group. Each command lives in its own module under ``memplan.cli`` and is
imported only when it runs (or its ``--help`` is asked for); this module knows commands by name alone.

A command parses (typer), calls memplan's logic, renders (``memplan.report``) and exits: 0 answered (for
``estimate`` even when the job does not fit: read the verdict), 1 no plan or a failed gate, 2 bad input or
unwritable output, 3 an internal error.
"""

from __future__ import annotations

import importlib
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from memplan.cli.core import install_fast_values, run_group

COMMANDS: dict[str, tuple[str, str]] = {
    "estimate": ("estimate", "Memory of one fixed configuration, per component and per device, and whether it fits "
                             "(exit 0 either way)."),
    "plan": ("plan", "The fastest (or smallest, cheapest...) configuration that fits, chosen by an ILP; exit 1 when "
                     "none fits."),
    "models": ("models", "List the built-in model catalog."),
    "gpus": ("gpus", "List the built-in GPU catalog."),
    "check": ("ci", "Gate CI on capacity: exit 0 if every recipe fits with its headroom, 1 if any does not, 2 on "
                    "invalid input."),
    "sweep": ("sweep", "Estimate a grid of models × GPUs × jobs × sizes, print fit matrices, and write one CSV row per "
                       "point."),
    "explain": ("explain", "How a memory component is computed: formula, source and assumptions, from the code's own "
                           "docstrings."),
    "measure": ("measure_cmd", "Build the model with random weights, run the job, and put memplan's prediction next to "
                               "the measurement."),
    "calibrate": ("calibrate", "Measure the CUDA context, cuBLAS workspace and allocator reserve of this GPU and store "
                               "them as its profile."),
}
"""Command name -> (module under memplan.cli, one-line help for the command list)."""


def load_command(name: str) -> Any:
    """The click command of ``name``, built from the module's one-command typer app."""
    module = importlib.import_module(f"memplan.cli.{COMMANDS[name][0]}")
    command = typer.main.get_command(module.app)
    command.name = name
    return command


class LazyGroup(TyperGroup):
    """The root group: commands listed from ``COMMANDS`` and imported only when one is called; parser and output
    errors are one sentence on stderr."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        install_fast_values(self.get_params(ctx))
        return super().parse_args(ctx, args)

    def list_commands(self, ctx: Any) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        return load_command(cmd_name) if cmd_name in COMMANDS else None

    def format_commands(self, ctx: Any, formatter: Any) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, help) for name, (_, help) in COMMANDS.items()])

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        main: Any = super().main
        if not standalone_mode:
            return main(*args, standalone_mode=False, **kwargs)
        run_group(self, main, *args, **kwargs)


app = typer.Typer(
    name="memplan",
    help="Will this model fit on this hardware, and what is the fastest configuration that does?",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    cls=LazyGroup,
    rich_markup_mode=None,  # plain help: --help does not import rich
)


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


def main() -> None:
    """Console-script entry point. Pydantic's plugin discovery (a scan of every installed package's entry
    points, about 20 ms) is skipped unless the environment asks for it. OpenBLAS runs one thread unless the
    environment asks for more: memplan does no linear algebra (its sweeps are int64 element-wise arithmetic),
    and a process with a single OS thread may fork its sweep workers (``grid.start_method``) instead of
    spawning them (about 0.4 s of a core importing memplan again)."""
    import os

    os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "1")
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    app()


if __name__ == "__main__":
    main()
