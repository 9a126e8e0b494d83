"""The one exception type for bad user input: the CLI prints its message and exits 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class MemplanError(ValueError):
    """Invalid input a user can fix: one clear sentence, with a suggestion where one exists."""


def did_you_mean(word: str, choices: Iterable[str], *, n: int = 3) -> str:
    """Return ' Did you mean X?' for the closest choices, or '' when none is close."""
    options = list(choices)
    lowered = {c.lower(): c for c in options}
    close = difflib.get_close_matches(word.lower(), list(lowered), n=n, cutoff=0.5)
    if not close:
        close = [c for c in lowered if word.lower() in c][:n]
    if not close:
        return ""
    names = " or ".join(lowered[c] for c in close)
    return f" Did you mean {names}?"
