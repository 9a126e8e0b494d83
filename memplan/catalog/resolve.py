"""Turn what a user types after ``--model`` into a ModelSpec.

Accepted, in this order:
- ``params:7.5B``: a params-only model of that many parameters (decimal suffixes K, M, B, T); with
  ``,largest=32M`` its largest layer (ZeRO-3/FSDP gather granularity);
- ``hf:org/name``: the repository's ``config.json`` via huggingface_hub (the ``hub`` extra),
  which honours ``HF_HUB_OFFLINE`` and its local cache;
- a catalog name, case-insensitive (``llama-3.1-8b``);
- a path to a ``config.json`` or to a directory holding one.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from memplan.catalog.hf import load_config_file, read_config_json, spec_from_hf_config
from memplan.catalog.schema import Family, ModelSpec
from memplan.catalog.store import catalog_model, model_names
from memplan.errors import MemplanError, did_you_mean
from memplan.units import parse_count

PARAMS_PREFIX = "params:"
HUB_PREFIX = "hf:"
HUB_URL = "https://huggingface.co/{repo}/blob/main/config.json"


LARGEST_KEY = "largest="
"""``params:7.5B,largest=32M``: the largest layer (module) of a parameter-count-only model, for ZeRO-3/FSDP
gather buffers (``ModelSpec.largest_layer_params``, as DeepSpeed's estimator takes ``largest_layer_params``)."""


def params_only_model(text: str) -> ModelSpec:
    """A params-only spec named ``params:<count>`` from ``"7.5B"``-style text, optionally with its largest layer:
    ``"7.5B,largest=32M"``."""
    count_text, _, rest = text.strip().partition(",")
    largest = None
    if rest:
        rest = rest.strip()
        if not rest.lower().startswith(LARGEST_KEY):
            raise MemplanError(f"params:{text.strip()}: after the count only 'largest=<count>' may follow "
                               "(the largest layer, e.g. params:7.5B,largest=32M).")
        largest = parse_count(rest[len(LARGEST_KEY):].strip(), field="largest layer")
    count = parse_count(count_text.strip(), field="params")
    if largest is not None and largest > count:
        raise MemplanError(f"params:{text.strip()}: the largest layer ({largest:,}) exceeds the model ({count:,}).")
    return ModelSpec(name=f"{PARAMS_PREFIX}{text.strip()}", source="parameter count given by the user",
                     family=Family.PARAMS_ONLY, published_params=count, largest_layer_params=largest)


HUB_TIMEOUT_S = 5
"""Seconds the one metadata request to the hub may take before memplan falls back to the local cache."""
REPO_PART = re.compile(r"[A-Za-z0-9_](?:[\w.-]{0,94}[A-Za-z0-9_])?")
"""One side of ``org/name`` as the hub accepts it (huggingface_hub ``validate_repo_id``: letters, digits,
``-``, ``_``, ``.``; at most 96 characters; no ``--`` or ``..``; not starting or ending with ``-`` or ``.``)."""


def _check_repo_id(repo: str) -> None:
    parts = repo.split("/")
    valid = len(parts) == 2 and all(REPO_PART.fullmatch(p) and "--" not in p and ".." not in p for p in parts)
    if not valid or repo.endswith(".git"):
        raise MemplanError(f"hf:{repo} is not a valid repository id; write it like hf:meta-llama/Llama-3.1-8B "
                           "(letters, digits, '-', '_' and '.').")


def _offline(constants: Any) -> bool:
    return bool(constants.is_offline_mode() if hasattr(constants, "is_offline_mode") else constants.HF_HUB_OFFLINE)


def _cached(hub: Any, repo: str) -> Path | None:
    found = hub.try_to_load_from_cache(repo_id=repo, filename="config.json")
    return Path(found) if isinstance(found, str) else None


def _hub_config_path(repo: str) -> Path:
    """Local path of ``repo``'s config.json: one metadata request (no retries) when online, then the
    download or the cache; offline (``HF_HUB_OFFLINE``) or unreachable, the cached copy or a MemplanError.

    huggingface_hub's own ``hf_hub_download`` retries a failed request five times with backoff (about
    24 s) when nothing is cached; memplan asks once with a ``HUB_TIMEOUT_S`` timeout instead.
    """
    try:
        import huggingface_hub as hub
        from huggingface_hub import constants
        from huggingface_hub.utils import EntryNotFoundError, RepositoryNotFoundError
    except ImportError:
        raise MemplanError(f"reading hf:{repo} needs huggingface_hub; install memplan[hub].") from None
    unreachable = (f"cannot reach the hub ({constants.ENDPOINT}) for hf:{repo} and no cached config.json "
                   "was found; check the network, HF_ENDPOINT, HF_HUB_OFFLINE and the cache (HF_HUB_CACHE).")
    if _offline(constants):
        found = _cached(hub, repo)
        if found is None:
            raise MemplanError(f"HF_HUB_OFFLINE is set and hf:{repo} has no cached config.json; unset it or "
                               "download the model first.")
        return found
    try:
        url = hub.hf_hub_url(repo, "config.json", endpoint=constants.ENDPOINT)
        hub.get_hf_file_metadata(url, timeout=HUB_TIMEOUT_S, endpoint=constants.ENDPOINT)
        return Path(hub.hf_hub_download(repo_id=repo, filename="config.json", endpoint=constants.ENDPOINT))
    except RepositoryNotFoundError:
        raise MemplanError(f"hf:{repo} is not a repository on the hub, or it is private or gated "
                           "(log in with 'hf auth login').") from None
    except EntryNotFoundError:
        raise MemplanError(f"hf:{repo} has no config.json.") from None
    except Exception as exc:  # the network layer's errors (httpx, requests, OSError): one attempt, then the cache
        if isinstance(exc, MemplanError):
            raise
        found = _cached(hub, repo)
        if found is None:
            raise MemplanError(unreachable) from None
        return found


def hub_model(repo: str) -> ModelSpec:
    """The spec of Hugging Face repository ``org/name`` from its config.json, named ``name``."""
    repo = repo.strip().strip("/")
    _check_repo_id(repo)
    cfg = read_config_json(_hub_config_path(repo))
    return spec_from_hf_config(cfg, name=repo.split("/")[1], source=HUB_URL.format(repo=repo))


def _looks_like_path(text: str) -> bool:
    return text.endswith(".json") or "/" in text or "\\" in text or text.startswith(".")


def _exists(path: Path) -> bool:
    """Whether ``path`` names something: a file, a directory, or a symlink (even a broken or looping one,
    so that reading it says why); False for a name the OS cannot even look up (too long, say)."""
    try:
        return path.exists() or path.is_symlink()
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
