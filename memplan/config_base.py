"""The base of every configuration model: frozen, no unknown keys, no bools where numbers go.

Part of ``memplan.config`` (which re-exports every name).
"""

from __future__ import annotations

import functools
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator


def _mentions_bool(annotation: Any) -> bool:
    """Whether a field's annotation admits a bool (``bool``, ``bool | None``, ``tuple[bool, ...]``)."""
    return "bool" in str(annotation)


@functools.cache
def _numeric_fields(model: type[BaseModel]) -> frozenset[str]:
    """The fields of ``model`` that do not admit a bool (computed once per class: ``reject_bools`` runs on every
    validation, thousands of times in one plan)."""
    return frozenset(name for name, f in model.model_fields.items() if not _mentions_bool(f.annotation))


def reject_bools(model: type[BaseModel], data: Any) -> Any:
    """``data`` unchanged, or a ValueError naming the first field that is not a bool but was given
    ``True``/``False`` (or a list holding one): Python treats a bool as the integer 1 or 0, so without this
    ``seq_len=True`` would silently mean 1 and ``zero: [true]`` ZeRO stage 1."""
    if not isinstance(data, dict):
        return data
    numeric = _numeric_fields(model)
    for name, value in data.items():
        if isinstance(value, bool):
            boolean = True
        elif isinstance(value, list | tuple):
            boolean = any(isinstance(v, bool) for v in value)
        else:
            continue  # the common case, a scalar: no generator per field
        if boolean and name in numeric:
            items = value if isinstance(value, list | tuple) else (value,)
            raise ValueError(f"{name}: expected {'a number' if items is not value else 'numbers'} or names, "
                             f"got the boolean {str(value).lower()}")
    return data


def release(value: Any, *, pattern: str, form: str, hint: str = "") -> Any:
    """``value`` unchanged when it is None or a string matching ``pattern`` (the field's own ``pattern``, kept for
    the JSON schema); else a ValueError saying the form it takes (``form``: "a vLLM release like 0.8.4"), for a
    field validator run before pydantic's pattern check, whose message quotes the regular expression; ``hint``
    follows the value. A number
    (YAML reads ``0.43`` as one) is told to be written as text: the float has lost any trailing zero."""
    if value is None or (isinstance(value, str) and re.fullmatch(pattern, value)):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        raise ValueError(f"takes {form} as text (quote it in YAML: '{value}'), not the number {value}{hint}")
    raise ValueError(f"takes {form}, not {value!r}{hint}")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_bools_as_numbers(cls, data: Any) -> Any:
        return reject_bools(cls, data)
