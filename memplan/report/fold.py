"""Text folded to the width of a pipe (``PIPE_WIDTH``): lines at spaces, and a name too long for its line
after its separators, so that output read through a pipe or a file fits 80 columns and keeps every character
but the spaces it folds at (``memplan.report.table`` lays tables out with it)."""

from __future__ import annotations

import re
from collections.abc import Hashable
from typing import TypeVar

K = TypeVar("K", bound=Hashable)

PIPE_WIDTH = 80
"""Columns of output printed to a pipe or a file, where lines are laid out to fit (a terminal uses its own width)."""


WORD_BREAKS = re.compile(r"[^/_,.]+[/_,.]*|[/_,.]+")
"""Pieces of a word longer than its column: a name breaks after ``/``, ``_``, ``,`` or ``.``
(``activations/`` + ``flash_`` + ``backward_`` + ``workspace``), never inside a piece."""


def wrap_words(text: str, width: int) -> list[str]:
    """``text`` folded at spaces into lines of at most ``width`` columns; a word longer than ``width`` breaks
    after its separators (``WORD_BREAKS``), and only a piece longer than ``width`` stays longer. Spaces inside a
    line stay as they were (``PASS  name``); those at a fold go."""
    tokens: list[tuple[str, str]] = []  # (the space before the piece: '' inside a word, the piece)
    for match in re.finditer(r"(\s*)(\S+)", text):
        space, word = match.groups()
        pieces = [word] if len(word) <= width else WORD_BREAKS.findall(word)
        tokens += [(space if k == 0 else "", piece) for k, piece in enumerate(pieces)]
    lines: list[str] = []
    for space, piece in tokens:
        if lines and len(lines[-1]) + len(space) + len(piece) <= width:
            lines[-1] += space + piece
        else:
            lines.append(piece)
    return lines or [""]


def fit_line(line: str, indent: str | None = None, hang: int = 2) -> str:
    """One line folded at spaces to ``PIPE_WIDTH`` columns; further lines start with ``indent`` (default: the
    line's own indentation plus ``hang`` spaces). A word too long for a line breaks after ``/``, ``_``, ``,`` or
    ``.`` (:func:`wrap_words`)."""
    if len(line) <= PIPE_WIDTH:
        return line
    lead = line[:len(line) - len(line.lstrip())]
    rest = lead + " " * hang if indent is None else indent
    folded = wrap_words(line.strip(), PIPE_WIDTH - max(len(lead), len(rest)))
    return "\n".join([lead + folded[0], *(rest + t for t in folded[1:])])


def fit_text(text: str, indent: str | None = None, hang: int = 2) -> str:
    """Every line of ``text`` folded to ``PIPE_WIDTH`` columns (:func:`fit_line`)."""
    return "\n".join(fit_line(line, indent, hang) for line in text.split("\n"))


def panels(names: list[K], first: int, cells: dict[K, int], width: int, gap: int) -> list[list[K]]:
    """``names`` (columns, each as wide as ``cells[name]`` plus ``gap``) in runs that fit ``width`` after a first
    column ``first`` wide; every run holds at least one column (``memplan sweep``'s GPU panels, ``--pivot``, a plain
    table too wide even folded)."""
    out: list[list[K]] = [[]]
    used = first
    for name in names:
        need = gap + cells[name]
        if out[-1] and used + need > width:
            out.append([])
            used = first
        out[-1].append(name)
        used += need
    return out
