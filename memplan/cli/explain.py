"""``memplan explain``: how a memory component is computed, from the code's own docstrings."""

from __future__ import annotations

from typing import Annotated

import typer

from memplan.cli.core import Command, command_app, handled

app = command_app()
Component = Annotated[str | None, typer.Argument(help="A component (optimizer/adam_m, kv_cache, runtime/cuda_context) "
                                                 "or a topic (optimizer, activations, zero, inference).")]
ListNames = Annotated[bool, typer.Option("--list", help="List every component and topic.")]
Brief = Annotated[bool, typer.Option("--brief", help="Only the functions and constants, not the module notes.")]


@app.command(cls=Command)
@handled
def explain(component: Component = None, list_names: ListNames = False, brief: Brief = False) -> None:
    """How a memory component is computed: formula, source and assumptions, from the code's own docstrings."""
    from memplan.explain import COMPONENTS, TOPICS, render
    from memplan.explain import explain as run_explain
    from memplan.report import emit

    if list_names or component is None:
        emit.lines(["Components:", *(f"  {c}" for c in COMPONENTS), "Topics:", *(f"  {t}" for t in TOPICS)])
        return
    from memplan.report.table import piped

    # a pipe gets docstring lines over 80 columns re-flowed as paragraphs (same indentation), the words unchanged
    emit.write(piped(render(run_explain(component), with_modules=not brief), hang=0))
