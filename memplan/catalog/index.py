"""The catalog index: every model and GPU entry (its YAML data, as JSON) and every GPU alias, in one file, so
that a lookup by name or alias, or a listing, reads one file and needs no YAML parser. The YAML files stay
the source: they are what people edit and review.

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
    """The index from the YAML files themselves: entries by name (sorted), and alias (lower case) -> GPU name."""
    import yaml

    out: dict[str, Any] = {}
    for kind in ("models", "gpus"):
        entries = {}
        for path in sorted((HERE / kind).glob("*.yaml")):
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
            if isinstance(data, dict):
                data.setdefault("name", path.stem)
            entries[path.stem] = data
        out[kind] = entries
    aliases = {str(a).lower(): stem for stem, data in out["gpus"].items() if isinstance(data, dict)
               for a in data.get("aliases") or ()}
    out["gpu_aliases"] = dict(sorted(aliases.items()))
    return out


def text(index: dict[str, Any]) -> str:
    """One entry per line: small, and a diff shows which entry changed."""
    parts = []
    for kind in ("models", "gpus"):
        rows = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}" for k, v in index[kind].items())
        parts.append(f" {json.dumps(kind)}: {{\n{rows}\n }}")
    parts.append(f' "gpu_aliases": {json.dumps(index["gpu_aliases"])}')
    return "{\n" + ",\n".join(parts) + "\n}\n"


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
