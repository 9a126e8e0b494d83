"""Why a training search space has no valid combination: its reasons, short (``train.build_problem``'s error)."""

from __future__ import annotations

from typing import Any

MAX_REASON_CHARS = 300
"""The reasons of an invalid search space are cut to this many characters: a sentence, not a page."""


def invalid_reasons(dims: dict[str, tuple], reasons: list[str]) -> str:
    """Why no combination is valid, short: an empty dimension by name, else each distinct reason once
    (the first combination that gave it as the example), cut at MAX_REASON_CHARS."""
    empty = [d for d, values in dims.items() if not values]
    if empty:
        return f"no valid {', '.join(empty)} choice (ZeRO-Offload needs ZeRO stage 1 or higher, " \
               "parameter and NVMe offload stage 3)" if empty == ["placement"] else f"no valid {', '.join(empty)} choice"
    distinct: dict[str, str] = {}
    for reason in reasons:
        where, _, why = reason.partition(": ")
        distinct.setdefault(why or where, where)
    if not distinct:
        return "every combination was excluded (see the excluded values above)"
    text = "; ".join(f"{why} (e.g. {where})" if why else where for why, where in distinct.items())
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 1].rstrip() + "…"


def describe(choice: dict[str, Any]) -> str:
    """A global choice as the flags that name it (``placement`` spelled out)."""
    parts = []
    for k, v in choice.items():
        if k == "placement":
            z, oo, po = v
            parts.append(f"zero={int(z)} offload_optimizer={oo.value} offload_params={po.value}")
        else:
            parts.append(f"{k}={getattr(v, 'value', v)}")
    return " ".join(parts)
