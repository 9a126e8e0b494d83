"""Find catalog entries by name: one YAML file per entry, read through the prebuilt index
(``memplan/catalog/index.json``, ``python -m memplan.catalog.index``), which holds every entry's data.

Names are case-insensitive; a file's stem is its canonical name (``llama-3.1-8b.yaml``).
GPU entries may also carry ``aliases``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from memplan.catalog.schema import GpuSpec, ModelSpec
from memplan.errors import MemplanError, did_you_mean

_HERE = Path(__file__).parent
MODELS_DIR = _HERE / "models"
GPUS_DIR = _HERE / "gpus"

T = TypeVar("T", bound=BaseModel)


def read_entry(path: Path, schema: type[T]) -> T:
    """Load and validate one catalog file; errors name the file and the field."""
    import yaml

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
            msg = str(err["ctx"]["error"]).rstrip(".")  # our own sentence, without pydantic's "Value error," prefix
            # nor its full stop (the caller ends the joined sentence)
        elif err["type"] == "string_pattern_mismatch":  # a regular expression is for no user (config_base.release)
            msg = f"{err.get('input')!r} is not in the form this field takes"
        else:
            msg = err["msg"].replace("Input should be", "must be")
        line = f"{loc}: {msg}" if loc else msg
        if line not in parts:
            parts.append(line)
    return "; ".join(parts)


def model_names() -> list[str]:
    from memplan.catalog.index import load

    return list(load()["models"])


def gpu_names() -> list[str]:
    from memplan.catalog.index import load

    return list(load()["gpus"])


def _gpu_aliases() -> dict[str, str]:
    """Alias (lower case) -> GPU name, from the prebuilt index (not from every GPU file)."""
    from memplan.catalog.index import load

    return dict(load()["gpu_aliases"])


def _entry(kind: str, stem: str, schema: type[T]) -> T:
    """The entry ``stem`` validated from the index (from its file when the index lacks it)."""
    from memplan.catalog.index import load

    path = (MODELS_DIR if kind == "models" else GPUS_DIR) / f"{stem}.yaml"
    data = load()[kind].get(stem)
    if not isinstance(data, dict):
        return read_entry(path, schema)
    try:
        return schema.model_validate(dict(data))
    except ValidationError as exc:
        raise MemplanError(f"catalog file {path}: {format_validation_error(exc)}") from None


def catalog_model(name: str) -> ModelSpec:
    """The catalog model called ``name`` (case-insensitive)."""
    if name.lower() not in model_names():  # not path.is_file(): no '../' or over-long names reach the disk
        raise MemplanError(f"unknown model {name!r}.{did_you_mean(name, model_names())} "
                           "Run 'memplan models' for the catalog, or pass a config.json path or params:7B.")
    return _entry("models", name.lower(), ModelSpec)


def catalog_gpu(name: str) -> GpuSpec:
    """The catalog GPU called ``name`` or one of its aliases (case-insensitive)."""
    if not isinstance(name, str):
        raise MemplanError(f"gpu: expected a catalog name such as 'h100-sxm-80gb', got a {type(name).__name__}.")
    key = name.lower().strip()
    if key not in gpu_names():
        stem = _gpu_aliases().get(key)
        if stem is None:
            choices = gpu_names() + sorted(_gpu_aliases())
            raise MemplanError(f"unknown GPU {name!r}.{did_you_mean(name, choices)} Run 'memplan gpus' for the catalog.")
        key = stem
    return _entry("gpus", key, GpuSpec)


def all_models() -> list[ModelSpec]:
    return [_entry("models", n, ModelSpec) for n in model_names()]


def all_gpus() -> list[GpuSpec]:
    return [_entry("gpus", n, GpuSpec) for n in gpu_names()]
