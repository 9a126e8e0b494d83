"""A request change written as the command-line options that make it: a plan's suggestions carry their change as
data (``changes``: ``config.*``, ``space.*`` and ``hardware.*`` paths and new values); this module writes them as
``plan`` flags, through the one mapping the option declarations in ``memplan.options`` give (each option's
``field``, ``dim``, ``infer_dim`` and ``hardware``), the same declarations ``memplan.cli.convert`` reads them by."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from enum import Enum
from typing import Any

from memplan.options import OPTS, Opt


@functools.cache
def option_index() -> dict[str, str]:
    """Request path -> option name: ``config.<field>`` (a JobConfig field, dotted for nested models),
    ``space.<dim>`` (a SearchSpace field, also the inference-only ``infer_dim``) and ``hardware.<field>``, each
    from one option's declaration; a path two options declare is an error here, not a silent pick."""
    out: dict[str, str] = {}
    for name, opt in OPTS.items():
        paths = [f"config.{opt.field}" if opt.field else None, f"space.{opt.dim}" if opt.dim else None,
                 f"space.{opt.infer_dim}" if opt.infer_dim else None,
                 f"hardware.{opt.hardware}" if opt.hardware else None]
        for path in filter(None, paths):
            if out.setdefault(path, name) != name:
                raise ValueError(f"options {out[path]!r} and {name!r} both set {path}")
    return out


def leaves(changes: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """(path, value) of each changed field, a nested model's fields (a dict value) as ``path.field``."""
    for path, value in changes.items():
        if isinstance(value, dict):
            yield from leaves({f"{path}.{k}": v for k, v in value.items()})
        else:
            yield path, value


def value_text(opt: Opt, value: Any) -> str:
    """One value as the option's text: ``opt.text`` where declared, an enum's value, a number as typed, a list
    (a search-space choice, or a tuple field such as ``--lora-targets``) comma-separated."""
    if isinstance(value, tuple | list):
        return ",".join(value_text(opt, v) for v in value)
    if opt.text is not None:
        return opt.text(value)
    if value is None or isinstance(value, bool):
        raise ValueError(f"{opt.flags[0]} has no text for {value!r}")
    return str(value.value if isinstance(value, Enum) else value)


def option_text(opt: Opt, value: Any) -> str:
    """The option with its value (``--gpus 8``); a switch (``--a/--no-a``) as the flag its value picks."""
    on, _, off = opt.flags[0].partition("/")
    if opt.kind is bool:
        picked = value[0] if isinstance(value, tuple | list) and len(value) == 1 else value
        if picked is True or (picked is False and off):
            return on if picked else off
        raise ValueError(f"{on} cannot be written as {value!r}")
    return f"{on} {value_text(opt, value)}"


def flag_options(changes: dict[str, Any]) -> list[str]:
    """The ``plan`` options that make ``changes``, each with its value (``--gpus 8``), in the order the change
    names them; paths one option sets (its base field and its search dimension) give it once, and must agree.
    Raises ValueError for a path no option sets: every field a suggestion changes has a flag
    (``tests/test_suggest_flags.py``)."""
    index = option_index()
    written: dict[str, str] = {}
    for path, value in leaves(changes):
        if path not in index:
            raise ValueError(f"no option sets {path}")
        name = index[path]
        text = option_text(OPTS[name], value)
        if written.setdefault(name, text) != text:
            raise ValueError(f"{path}: {text!r} disagrees with {written[name]!r}")
    return list(written.values())


def render_flags(changes: dict[str, Any]) -> str:
    """:func:`flag_options` as one command-line fragment."""
    return " ".join(flag_options(changes))
