"""Find catalog entries by name: one YAML file per entry, read only when asked for.

Names are case-insensitive; a file's stem is its canonical name (``llama-3.1-8b.yaml``).
GPU entries may also carry ``aliases``.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from memplan.catalog.schema import GpuSpec, ModelSpec
from memplan.errors import MemplanError, did_you_mean

_HERE = Path(__file__).parent
MODELS_DIR = _HERE / "models"
GPUS_DIR = _HERE / "gpus"

T = TypeVar("T", bound=BaseModel)


def _stems(directory: Path) -> list[str]:
    return sorted(p.stem for p in directory.glob("*.yaml"))


def read_entry(path: Path, schema: type[T]) -> T:
    """Load and validate one catalog file; errors name the file and the field."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise MemplanError(f"cannot read catalog file {path}: {yaml_error_sentence(exc)}.") from None
    if not isinstance(data, dict):
        raise MemplanError(f"catalog file {path} must hold a mapping of fields.")
    data.setdefault("name", path.stem)
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise MemplanError(f"catalog file {path}: {format_validation_error(exc)}") from None


def yaml_error_sentence(exc: Exception) -> str:
    """A YAML (or OS) error on one line: the problem and where it is, without PyYAML's source excerpt."""
    problem = getattr(exc, "problem", None) or getattr(exc, "strerror", None) or str(exc).splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{problem}{where}".rstrip(".")


def format_validation_error(exc: ValidationError) -> str:
    """One sentence naming each invalid field."""
    parts: list[str] = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-"))
        if err["type"] == "value_error" and "error" in err.get("ctx", {}):
            msg = str(err["ctx"]["error"])  # our own sentence, without pydantic's "Value error," prefix
        else:
            msg = err["msg"].replace("Input should be", "must be")
        line = f"{loc}: {msg}" if loc else msg
        if line not in parts:
            parts.append(line)
    return "; ".join(parts)


def model_names() -> list[str]:
    return _stems(MODELS_DIR)


def gpu_names() -> list[str]:
    return _stems(GPUS_DIR)


@cache
def _gpu_aliases() -> dict[str, str]:
    out: dict[str, str] = {}
    for stem in gpu_names():
        spec = read_entry(GPUS_DIR / f"{stem}.yaml", GpuSpec)
        for alias in spec.aliases:
            out[alias.lower()] = stem
    return out


def catalog_model(name: str) -> ModelSpec:
    """The catalog model called ``name`` (case-insensitive)."""
    path = MODELS_DIR / f"{name.lower()}.yaml"
    if name.lower() not in model_names():  # not path.is_file(): no '../' or over-long names reach the disk
        raise MemplanError(f"unknown model {name!r}.{did_you_mean(name, model_names())} "
                           "Run 'memplan models' for the catalog, or pass a config.json path or params:7B.")
    return read_entry(path, ModelSpec)


def catalog_gpu(name: str) -> GpuSpec:
    """The catalog GPU called ``name`` or one of its aliases (case-insensitive)."""
    if not isinstance(name, str):
        raise MemplanError(f"gpu: expected a catalog name such as 'h100-sxm-80gb', got a {type(name).__name__}.")
    key = name.lower().strip()
    path = GPUS_DIR / f"{key}.yaml"
    if key not in gpu_names():  # not path.is_file(): no '../' or over-long names reach the disk
        stem = _gpu_aliases().get(key)
        if stem is None:
            choices = gpu_names() + sorted(_gpu_aliases())
            raise MemplanError(f"unknown GPU {name!r}.{did_you_mean(name, choices)} Run 'memplan gpus' for the catalog.")
        path = GPUS_DIR / f"{stem}.yaml"
    return read_entry(path, GpuSpec)


def all_models() -> list[ModelSpec]:
    return [read_entry(MODELS_DIR / f"{n}.yaml", ModelSpec) for n in model_names()]


def all_gpus() -> list[GpuSpec]:
    return [read_entry(GPUS_DIR / f"{n}.yaml", GpuSpec) for n in gpu_names()]
