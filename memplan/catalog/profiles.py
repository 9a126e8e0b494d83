"""Calibrated runtime profiles per GPU model, written by ``memplan calibrate`` on a CUDA machine and
read by the runtime rows of ``estimate``/``plan`` (JSON only: no torch here)."""

from __future__ import annotations

import json
import os
import re
import stat
from functools import lru_cache
from pathlib import Path
from typing import Any

from memplan.errors import MemplanError

PROFILE_KEYS = ("cuda_context_bytes", "allocator_reserve_pct")


def config_dir() -> Path:
    """memplan's profile directory: ``$XDG_CONFIG_HOME/memplan/profiles`` or ``~/.config/memplan/profiles``."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "memplan" / "profiles"


def profile_path(gpu_name: str) -> Path:
    return _profile_path(gpu_name, os.environ.get("XDG_CONFIG_HOME"), os.environ.get("HOME"))


@lru_cache(maxsize=1024)
def _profile_path(gpu_name: str, xdg: str | None, home: str | None) -> Path:
    """``profile_path`` for the environment that ``config_dir`` reads (memoized: every estimate asks)."""
    slug = re.sub(r"[^a-z0-9.-]+", "-", gpu_name.lower()).strip("-")
    if not slug:
        raise MemplanError(f"cannot name a profile after GPU {gpu_name!r}.")
    return config_dir() / f"{slug}.json"


def load_profile(gpu_name: str) -> dict[str, Any] | None:
    """The calibrated profile of catalog GPU ``gpu_name``, or None when none was written.

    A profile that is not a JSON object with int ``cuda_context_bytes`` and number
    ``allocator_reserve_pct`` (0-100) is a MemplanError naming the file (rerun ``memplan calibrate``).
    The returned dict carries ``path`` too.
    """
    path = profile_path(gpu_name)
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None
    except (OSError, ValueError):
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MemplanError(f"calibration profile {path} cannot be read ({exc}); rerun 'memplan calibrate'.") from None
    context, pct = (data.get(k) for k in PROFILE_KEYS) if isinstance(data, dict) else (None, None)
    valid_context = isinstance(context, int) and not isinstance(context, bool) and context >= 0
    valid_pct = isinstance(pct, int | float) and not isinstance(pct, bool) and 0 <= pct <= 100
    if not (valid_context and valid_pct):
        raise MemplanError(f"calibration profile {path} lacks a valid cuda_context_bytes or allocator_reserve_pct; "
                           "rerun 'memplan calibrate'.")
    return {**data, "path": str(path)}
