"""The catalog index: every model and GPU name and every GPU alias, in one small JSON file, so that a lookup
by name or alias reads one file rather than every YAML entry.

Regenerate after adding or renaming a catalog entry (a test checks that it is current):
    python -m memplan.catalog.index
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
INDEX = HERE / "index.json"


def build() -> dict[str, Any]:
    """The index from the YAML files themselves: sorted names, and alias (lower case) -> GPU name."""
    import yaml

    gpus = sorted(p.stem for p in (HERE / "gpus").glob("*.yaml"))
    aliases: dict[str, str] = {}
    for stem in gpus:
        data = yaml.safe_load((HERE / "gpus" / f"{stem}.yaml").read_text(encoding="utf-8")) or {}
        for alias in data.get("aliases") or ():
            aliases[str(alias).lower()] = stem
    return {"models": sorted(p.stem for p in (HERE / "models").glob("*.yaml")), "gpus": gpus,
            "gpu_aliases": dict(sorted(aliases.items()))}


def text(index: dict[str, Any]) -> str:
    return json.dumps(index, indent=1) + "\n"


@cache
def load() -> dict[str, Any]:
    """The prebuilt index (built on the fly if the file is missing, e.g. in a partial checkout)."""
    try:
        data: dict[str, Any] = json.loads(INDEX.read_text(encoding="utf-8"))
        return data
    except (OSError, ValueError):
        return build()


if __name__ == "__main__":
    INDEX.write_text(text(build()), encoding="utf-8")
    print(f"wrote {INDEX}")
