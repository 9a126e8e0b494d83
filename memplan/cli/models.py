"""``memplan models``: the built-in model catalog."""

from __future__ import annotations

from typing import Annotated

import typer

from memplan.cli.core import Command, command_app, handled
from memplan.cli.opts import Contains, Opts, options

app = command_app()


@app.command(cls=Command)
@handled
@options("fmt")
def models(contains: Contains = None, *, opts: Opts,
           family: Annotated[str | None, typer.Option("--family", help="Only this family (llama, mixtral, ...).")] = None
           ) -> None:
    """List the built-in model catalog."""
    from memplan.catalog.listing import model_rows
    from memplan.report import emit

    emit.check_format(opts.fmt)
    emit.rows(model_rows(family=family, contains=contains), opts.fmt, title="models")
