"""``memplan check``: gate CI on capacity, one recipe file per job (exit 0 all fit, 1 any does not, 2 invalid)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from memplan.cli.core import Command, command_app, handled
from memplan.errors import MemplanError
from memplan.options import OUTPUT

app = command_app()
RECIPE_SUFFIXES = (".yaml", ".yml")
Recipes = Annotated[list[Path], typer.Argument(help="Recipe files (or directories of *.yaml recipes).", show_default=False)]
Format = Annotated[str, typer.Option("--format", "-f", help="table (a line per recipe, folded to 80 columns in a "
                                     "pipe) or json (only JSON on stdout).", rich_help_panel=OUTPUT)]
Junit = Annotated[Path | None, typer.Option("--junit", help="Also write a JUnit XML report here (one testcase per recipe).",
                                            rich_help_panel=OUTPUT)]
Sets = Annotated[list[str] | None, typer.Option("--set", help="Override a recipe field for a what-if, e.g. "
                                                "job.context=131072 (repeatable; applies to every recipe).")]
TimeLimit = Annotated[float, typer.Option("--time-limit", help="Seconds the whole check may spend solving (planned "
                                          "recipes, every solve together).")]
Timings = Annotated[bool, typer.Option("--timings/--no-timings", help="Wall-clock fields in the JSON ('seconds') "
                                       "and JUnit ('time', 'timestamp') reports; --no-timings writes 0 and no "
                                       "timestamp so that two reports can be diffed.", rich_help_panel=OUTPUT)]


@app.command(cls=Command)
@handled
def check(recipes: Recipes, fmt: Format = "table", junit: Junit = None, sets: Sets = None, time_limit: TimeLimit = 30.0,
          timings: Timings = True) -> None:
    """Gate CI on capacity: exit 0 if every recipe fits with its headroom, 1 if any does not, 2 on invalid input."""
    from memplan.check import check_recipe, exit_code
    from memplan.planner.solvers import deadline
    from memplan.recipe_load import parse_set
    from memplan.report import emit
    from memplan.report.check_out import render_outcome, render_outcomes

    emit.check_format(fmt, ("table", "json"))
    if not time_limit > 0:
        raise MemplanError("--time-limit must be positive.")
    overrides, outcomes = parse_set(sets or []), []
    with deadline(time_limit):
        for path in recipe_paths(recipes):
            outcomes.append(check_recipe(path, overrides=overrides, time_limit_s=time_limit))
            render_outcome(outcomes[-1], fmt)
    if not timings:
        for o in outcomes:
            o.seconds = 0.0
    render_outcomes(outcomes, fmt, junit, timings=timings)
    raise typer.Exit(code=exit_code(outcomes))


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
