"""Turn what a user types after ``--model`` into a ModelSpec.

Accepted, in this order:
- ``params:7.5B``: a params-only model of that many parameters (decimal suffixes K, M, B, T);
- ``hf:org/name``: the repository's ``config.json`` via huggingface_hub (the ``hub`` extra),
  which honours ``HF_HUB_OFFLINE`` and its local cache;
- a catalog name, case-insensitive (``llama-3.1-8b``);
- a path to a ``config.json`` or to a directory holding one.
"""

from __future__ import annotations

from pathlib import Path

from memplan.catalog.hf import load_config_file, read_config_json, spec_from_hf_config
from memplan.catalog.schema import Family, ModelSpec
from memplan.catalog.store import catalog_model, model_names
from memplan.errors import MemplanError, did_you_mean
from memplan.units import parse_count

PARAMS_PREFIX = "params:"
HUB_PREFIX = "hf:"
HUB_URL = "https://huggingface.co/{repo}/blob/main/config.json"


def params_only_model(text: str) -> ModelSpec:
    """A params-only spec named ``params:<count>`` from ``"7.5B"``-style text."""
    count = parse_count(text.strip(), field="params")
    return ModelSpec(name=f"{PARAMS_PREFIX}{text.strip()}", source="parameter count given by the user",
                     family=Family.PARAMS_ONLY, published_params=count)


def _hub_config_path(repo: str) -> Path:
    """Local path of ``repo``'s config.json, downloaded (or found in the cache) by huggingface_hub."""
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError:
        raise MemplanError(f"reading hf:{repo} needs huggingface_hub; install memplan[hub].") from None
    unreachable = (f"cannot reach the hub for hf:{repo} and no cached config.json was found; "
                   "check the network, HF_HUB_OFFLINE and the cache (HF_HUB_CACHE).")
    try:
        return Path(hf_hub_download(repo_id=repo, filename="config.json"))
    except LocalEntryNotFoundError:
        raise MemplanError(unreachable) from None
    except RepositoryNotFoundError:
        raise MemplanError(f"hf:{repo} is not a repository on the hub, or it is private or gated "
                           "(log in with 'hf auth login').") from None
    except EntryNotFoundError:
        raise MemplanError(f"hf:{repo} has no config.json.") from None
    except (OSError, ValueError):
        raise MemplanError(unreachable) from None


def hub_model(repo: str) -> ModelSpec:
    """The spec of Hugging Face repository ``org/name`` from its config.json, named ``name``."""
    repo = repo.strip().strip("/")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise MemplanError(f"hf:{repo} is not a repository id; write it like hf:meta-llama/Llama-3.1-8B.")
    cfg = read_config_json(_hub_config_path(repo))
    return spec_from_hf_config(cfg, name=repo.split("/")[1], source=HUB_URL.format(repo=repo))


def _looks_like_path(text: str) -> bool:
    return text.endswith(".json") or "/" in text or "\\" in text or text.startswith(".")


def _exists(path: Path) -> bool:
    """``path.exists()``, False for a name the OS cannot even look up (too long, say)."""
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


def load_model(text: str) -> ModelSpec:
    """The ModelSpec that ``text`` names: ``params:7.5B``, ``hf:org/name``, a catalog name, or a path."""
    if not isinstance(text, str):
        raise MemplanError(f"model: expected a name, a config.json path, hf:org/name or params:7.5B, "
                           f"got a {type(text).__name__}.")
    stripped = text.strip()
    if not stripped:
        raise MemplanError("no model given; write a catalog name, a config.json path, hf:org/name or params:7.5B.")
    lowered = stripped.lower()
    if lowered.startswith(PARAMS_PREFIX):
        return params_only_model(stripped[len(PARAMS_PREFIX):])
    if lowered.startswith(HUB_PREFIX):
        return hub_model(stripped[len(HUB_PREFIX):])
    path_like = _looks_like_path(stripped)
    if not path_like and lowered in model_names():
        return catalog_model(stripped)
    path = Path(stripped).expanduser()
    if lowered.endswith(".gguf"):
        from memplan.catalog.gguf_file import gguf_model

        return gguf_model(path)
    if path_like or _exists(path):
        return load_config_file(path)
    raise MemplanError(
        f"unknown model {text!r}.{did_you_mean(stripped, model_names())} Give a catalog name ('memplan models'), "
        "a config.json path or directory, hf:org/name, or params:7.5B."
    )
