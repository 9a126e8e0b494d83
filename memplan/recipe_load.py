"""Loading recipes: read the YAML, validate it (errors name the file and the field), look up the
model and GPU, and build the JobConfig a recipe describes. The schema is ``memplan.recipe``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from memplan.catalog.schema import GpuSpec, HostSpec, ModelSpec
from memplan.config import Job, JobConfig
from memplan.errors import MemplanError
from memplan.planner.space import Objective, SearchSpace
from memplan.recipe import SHAPE_FIELDS, Recipe, error_lines, size_bytes


@dataclass(frozen=True)
class LoadedRecipe:
    """A validated recipe with everything resolved: the model, GPU, host and configuration."""

    recipe: Recipe
    path: Path
    name: str
    model: ModelSpec
    gpu: GpuSpec
    host: HostSpec
    config: JobConfig

    @property
    def space(self) -> SearchSpace | None:
        return planned_space(self.recipe)

    @property
    def objective(self) -> Objective:
        return self.recipe.objective or Objective.THROUGHPUT


PINNED_BY_JOB = {"concurrency": "batch", "micro_batch": "micro_batch", "context": "context", "seq_len": "seq_len"}
"""Job-shape keys that fix one search dimension of a planned recipe (job key -> search key)."""


def planned_space(recipe: Recipe) -> SearchSpace | None:
    """The search space of a planned recipe, with the job shape's fixed values pinned: ``job.concurrency: 64``
    searches batch 64 only. A value given both in ``job`` and in ``search`` is an error naming both."""
    space = recipe.search
    if space is None:
        return None
    update: dict[str, Any] = {}
    for job_key, dim in PINNED_BY_JOB.items():
        value = getattr(recipe.job, job_key)
        if value is None:
            continue
        if getattr(space, dim) is not None:
            raise MemplanError(f"job.{job_key} ({value}) and search.{dim} both set the {dim.replace('_', ' ')}; "
                               f"give one (search.{dim}: [{value}] to fix it).")
        update[dim] = (value,)
    if recipe.job.global_batch and space.global_batch is None:
        update["global_batch"] = recipe.job.global_batch
    return space.model_copy(update=update) if update else space


def job_config(recipe: Recipe) -> JobConfig:
    """The JobConfig a recipe describes: ``fixed`` fields plus the job shape and hardware."""
    fixed = dict(recipe.fixed)
    misplaced = [f"fixed.{k}: set it as {SHAPE_FIELDS[k]}" for k in fixed if k in SHAPE_FIELDS]
    infer = fixed.get("infer")
    if isinstance(infer, dict) and "context" in infer:
        misplaced.append("fixed.infer.context: set it as job.context")
    if misplaced:
        raise MemplanError("; ".join(misplaced))
    if "cuda_context" in fixed:
        try:
            fixed["cuda_context_bytes"] = size_bytes(fixed.pop("cuda_context"))
        except ValueError as exc:
            raise MemplanError(f"fixed.cuda_context: {exc}") from None
    shape, hw = recipe.job, recipe.hardware
    data: dict[str, Any] = {**fixed, "job": shape.type, "gpus_per_node": hw.gpus_per_node, "nodes": hw.nodes}
    if shape.type is Job.INFER:
        data["micro_batch"] = shape.concurrency or 1
        data["infer"] = {**(infer if isinstance(infer, dict) else {}), **({"context": shape.context} if shape.context else {})}
    else:
        data.update({k: v for k, v in (("seq_len", shape.seq_len), ("micro_batch", shape.micro_batch)) if v})
    try:
        cfg = JobConfig.model_validate(data)
    except ValidationError as exc:
        raise MemplanError(error_lines(exc, prefix="fixed", model=JobConfig)) from None
    if shape.global_batch and not recipe.planned:
        cfg = cfg.model_copy(update={"grad_accum": grad_accum(shape.global_batch, cfg)})
    return cfg


def grad_accum(global_batch: int, cfg: JobConfig) -> int:
    """Gradient-accumulation steps for ``global_batch`` sequences: global / (micro-batch × dp), exact."""
    per_step = cfg.micro_batch * cfg.batch_dp
    if global_batch % per_step:
        raise MemplanError(f"job.global_batch: {global_batch} is not a multiple of micro-batch {cfg.micro_batch} × "
                           f"data-parallel degree {cfg.batch_dp} = {per_step}.")
    return global_batch // per_step


def model_reference(text: str, base: Path) -> str:
    """``text`` with a relative config.json path resolved against the recipe's directory."""
    lowered = text.strip().lower()
    if lowered.startswith(("hf:", "params:")):
        return text
    path_like = text.endswith(".json") or "/" in text or "\\" in text or text.startswith(".")
    if path_like and not Path(text).expanduser().is_absolute():
        return str(base / text)
    return text


def parse_recipe(data: Any, *, name: str) -> Recipe:
    """Validate raw recipe data; MemplanError names the fields."""
    if not isinstance(data, dict):
        raise MemplanError("a recipe must be a mapping of fields (model, hardware, job, ...).")
    try:
        return Recipe.model_validate({"name": name, **data})
    except ValidationError as exc:
        raise MemplanError(error_lines(exc, model=Recipe)) from None


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: the base class reports it
                break
            if duplicate:
                raise yaml.constructor.ConstructorError(None, None, f"the key {key!r} is given twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> Any:
    import stat

    try:
        if not stat.S_ISREG(path.stat().st_mode):  # a FIFO would block the read forever; a directory cannot be read
            raise MemplanError("not a regular file; give a recipe .yaml file or a directory of them.")
        return yaml.load(path.read_text(encoding="utf-8"), Loader=UniqueKeyLoader)
    except FileNotFoundError:
        raise MemplanError("no such recipe file.") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        from memplan.catalog.store import yaml_error_sentence

        raise MemplanError(f"cannot read the recipe: {yaml_error_sentence(exc)}.") from None


def resolve(recipe: Recipe, path: Path) -> LoadedRecipe:
    """Look up the model and GPU and build the configuration of a validated recipe."""
    from memplan.catalog.resolve import load_model
    from memplan.catalog.store import catalog_gpu

    try:
        model = load_model(model_reference(recipe.model, path.parent))
    except MemplanError as exc:
        raise MemplanError(f"model: {exc}") from None
    try:
        gpu = catalog_gpu(recipe.hardware.gpu)
    except MemplanError as exc:
        raise MemplanError(f"hardware.gpu: {exc}") from None
    loaded = LoadedRecipe(recipe, path, recipe.name or path.stem, model, gpu, recipe.hardware.host(), job_config(recipe))
    planned_space(recipe)  # a job value that contradicts the search block is an error now, not at plan time
    return loaded


def load_recipe(path: str | Path, *, overrides: dict[str, Any] | None = None) -> LoadedRecipe:
    """Read, validate and resolve one recipe file; every error names the file and the field."""
    p = Path(path)
    try:
        data = read_yaml(p)
        if overrides:
            data = apply_overrides(data, overrides)
        return resolve(parse_recipe(data, name=p.stem), p)
    except MemplanError as exc:
        raise MemplanError(f"{p}: {exc}") from None


def apply_overrides(data: Any, overrides: dict[str, Any]) -> Any:
    """``data`` with dotted keys set (``job.context`` -> data["job"]["context"]), for what-if checks."""
    if not isinstance(data, dict):
        return data
    out = {**data}
    for key, value in overrides.items():
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            node[part] = {**child} if isinstance(child, dict) else {}
            node = node[part]
        node[parts[-1]] = value
    return out


def parse_set(items: list[str]) -> dict[str, Any]:
    """``["job.context=32768", "fixed.zero=3"]`` -> {dotted key: YAML value}."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise MemplanError(f"--set: expected KEY=VALUE such as job.context=32768, got {item!r}.")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise MemplanError(f"--set: cannot read the value of {item!r}.") from None
    return out
