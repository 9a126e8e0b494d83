"""Units: bytes are ints; widths are bits; conversion to GiB/GB happens only in reports.

Sizes typed by users must carry an explicit unit (``80GiB``, ``512GB``, ``1.5TiB``);
a bare ``80G`` is ambiguous between 2^30 and 10^9 and is rejected.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from memplan.errors import MemplanError

KiB = 2**10
MiB = 2**20
GiB = 2**30
TiB = 2**40
KB = 10**3
MB = 10**6
GB = 10**9
TB = 10**12

_SIZE_UNITS = {
    "b": 1, "bytes": 1,
    "kib": KiB, "mib": MiB, "gib": GiB, "tib": TiB,
    "kb": KB, "mb": MB, "gb": GB, "tb": TB,
}
_COUNT_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "t": 10**12}
MAX_SIZE_BYTES = 2**100
"""Largest size a user may type (about 10^30 bytes): far beyond any memory, small enough to print."""
MAX_COUNT = 10**30
"""Largest parameter (or other) count a user may type; 10^15 parameters is an accepted extreme."""
_SIZE_RE = re.compile(r"^\s*(-?[0-9]+(?:\.[0-9]+)?(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*$")


def counted(n: int, noun: str, *, grouped: bool = False) -> str:
    """``n`` and ``noun``, plural unless ``n`` is 1 ("1 GPU", "8 GPUs", "1 node"); ``grouped``: thousands commas.
    The regular English plural (an "s") only: the nouns memplan counts this way are GPU, node, replica, stage."""
    number = f"{n:,}" if grouped else str(n)
    return f"{number} {noun}" if n == 1 else f"{number} {noun}s"


def ceil_div(numerator: int, denominator: int) -> int:
    """Integer division rounded up: the safe direction when sharding bytes for a capacity gate."""
    if denominator <= 0:
        raise ValueError(f"ceil_div by non-positive denominator {denominator}")
    return -(-numerator // denominator)


def round_up(value: int, multiple: int) -> int:
    """``value`` rounded up to a multiple of ``multiple`` (a kernel's block, an allocator's granularity)."""
    return ceil_div(value, multiple) * multiple


def bits_to_bytes(count: int, bits: int) -> int:
    """Bytes to store ``count`` elements of ``bits`` bits each, packed, rounded up once."""
    return ceil_div(count * bits, 8)


def parse_size(text: str | int, *, field: str = "size") -> int:
    """Parse ``"80GiB"``, ``"512GB"``, ``"0"`` or an int of bytes into an int of bytes.

    Raises MemplanError for a missing or ambiguous unit (``80G``) or a negative value.
    """
    if isinstance(text, bool):
        raise MemplanError(f"{field}: expected a size such as '80GiB' or '512GB', got {text!r}.")
    if isinstance(text, int):
        value = text
    else:
        match = _SIZE_RE.match(str(text))
        if not match:
            raise MemplanError(f"{field}: cannot read {text!r} as a size; write it like '80GiB' or '512GB'.")
        number, unit = match.groups()
        unit_l = unit.lower()
        if unit_l in ("g", "m", "k", "t"):
            raise MemplanError(
                f"{field}: '{text}' is ambiguous; write {number}{unit.upper()}iB (2^30-style) "
                f"or {number}{unit.upper()}B (10^9-style)."
            )
        if unit_l == "" and Decimal(number) != 0:
            raise MemplanError(f"{field}: '{text}' has no unit; write it like '{number}GiB' or '{number}GB'.")
        scale = _SIZE_UNITS.get(unit_l or "b")
        if scale is None:
            raise MemplanError(f"{field}: unknown unit {unit!r} in {text!r}; use B, KiB, MiB, GiB, TiB, KB, MB, GB or TB.")
        value = int(Decimal(number) * scale)
    if value < 0:
        raise MemplanError(f"{field}: must not be negative, got {text!r}.")
    if value > MAX_SIZE_BYTES:
        raise MemplanError(f"{field}: {text!r} is larger than any memory memplan models (at most 2^100 bytes).")
    return value


def parse_count(text: str | int, *, field: str = "count") -> int:
    """Parse ``"7.5B"``, ``"125M"``, ``"1.2T"`` or an int into an exact int (decimal suffixes)."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        match = _SIZE_RE.match(str(text))
        suffix = match.group(2).lower() if match else None
        if not match or suffix not in _COUNT_SUFFIX:
            raise MemplanError(f"{field}: cannot read {text!r} as a count; write it like '7.5B' or '125M'.")
        try:
            value = int(Decimal(match.group(1)) * _COUNT_SUFFIX[suffix])
        except InvalidOperation:  # pragma: no cover - regex already guarantees a number
            raise MemplanError(f"{field}: cannot read {text!r} as a count.") from None
    if value <= 0:
        raise MemplanError(f"{field}: must be positive, got {text!r}.")
    if value > MAX_COUNT:
        raise MemplanError(f"{field}: {text!r} is more than memplan counts (at most 10^30).")
    return value


def parse_fraction_or_size(text: str, *, total: int, field: str) -> int:
    """Parse ``"10%"`` (of ``total``, rounded up) or a size such as ``"2GiB"`` into bytes."""
    stripped = str(text).strip()
    if stripped.endswith("%"):
        try:
            pct = Decimal(stripped[:-1])
        except InvalidOperation:
            raise MemplanError(f"{field}: cannot read {text!r} as a percentage.") from None
        if not pct.is_finite() or pct < 0 or pct > 100:
            raise MemplanError(f"{field}: percentage must be between 0% and 100%, got {text!r}.")
        return int((pct * total / 100).to_integral_value(rounding="ROUND_CEILING"))
    return parse_size(stripped, field=field)


def gib(n_bytes: int) -> float:
    """Bytes to GiB (2^30), for display only."""
    return n_bytes / GiB


def gb(n_bytes: int) -> float:
    """Bytes to GB (10^9), for display only."""
    return n_bytes / GB
