"""Commands take the options declared in ``memplan.options`` by group: :func:`options` adds them to a typer
command; ``lists=`` makes options comma lists of choices (``plan``), ``unset=`` makes them default to "not given"
(``sweep``, whose recipe fills them).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Annotated, Any

import typer

from memplan.errors import MemplanError
from memplan.options import GROUPS, OPTS, Opt

Model = Annotated[str, typer.Argument(help="Catalog name, path to config.json (or its directory), hf:org/name, or params:7B.")]
Contains = Annotated[str | None, typer.Argument(help="Only names containing this text.")]


class Opts(dict[str, Any]):
    """The values of a command's options by name, with the names given as comma lists in ``lists``."""

    lists: frozenset[str] = frozenset()

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _expand(names: tuple[str, ...]) -> list[str]:
    return [n for name in names for n in GROUPS.get(name, (name,))]


def _parameter(name: str, opt: Opt, *, many: bool, unset: bool, extra: dict[str, Any]) -> inspect.Parameter:
    kind, default = (str, None) if many else (opt.kind, None if unset else opt.default)
    text = extra.get("help") or (f"{opt.help} Comma-separated choices." if many else opt.help)
    info = typer.Option(*opt.flags, help=text, rich_help_panel=extra.get("panel", opt.panel))
    if extra.get("default", ...) is not ...:
        default = extra["default"]
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=Annotated[kind | None if default is None else kind, info])


def _refused(name: str, opt: Opt) -> inspect.Parameter:
    """A hidden option that the command reads only to refuse (:func:`options`' ``refused``)."""
    info = typer.Option(*opt.flags, hidden=True)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                             annotation=Annotated[opt.kind | None, info])


def options(*names: str, lists: tuple[str, ...] = (), unset: tuple[str, ...] = (), exclude: tuple[str, ...] = (),
            custom: dict[str, dict[str, Any]] | None = None,
            refused: dict[str, str] | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Add the options of these groups (or single option names) to a command, which receives them as ``opts``.

    ``custom`` changes an option's help, panel or default for this command only. ``refused`` names options the
    command does not take, each with the sentence that says why (or what to give instead): they parse, hidden
    from ``--help``, and a given one is a MemplanError (exit 2) rather than click's bare "no such option"."""
    chosen = [n for n in _expand(names) if n not in exclude]
    custom, refused = custom or {}, refused or {}

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        own = [p for p in inspect.signature(func, eval_str=True).parameters.values() if p.name != "opts"]
        added = [_parameter(n, OPTS[n], many=n in lists, unset=n in unset, extra=custom.get(n, {})) for n in chosen]
        added += [_refused(n, OPTS[n]) for n in refused if n not in chosen]

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            for name in refused:
                if name not in chosen and kwargs.pop(name, None) is not None:
                    flag = OPTS[name].flags[0].split("/")[0]
                    raise MemplanError(f"{func.__name__} does not take {flag}: {refused[name]}.")
            opts = Opts({n: kwargs.pop(n) for n in chosen if n in kwargs})
            opts.lists = frozenset(n for n in lists if n in opts)
            return func(*args, opts=opts, **kwargs)

        params = own + added
        wrapper.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        return wrapper

    return decorate
