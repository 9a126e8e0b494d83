"""Reading a ``.gguf`` file as a model: its metadata and its tensor table, never its tensor data.

The optional ``gguf`` package (pip extra ``memplan[gguf]``; llama.cpp's gguf-py) memory-maps the file;
memplan reads the key/value metadata (gguf-py ``GGUFReader.fields``) and each tensor's name, ggml type,
shape and byte size (``GGUFReader.tensors``: ``tensor_type``, ``shape``, ``n_bytes``), which come from the
header. The weights are never touched. Keys follow llama.cpp's names (gguf-py ``constants.Keys``:
``{arch}.block_count``, ``{arch}.embedding_length``, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, TypedDict

from memplan.catalog.schema import Family, ModelSpec
from memplan.errors import MemplanError


class _LlamaDiff(TypedDict, total=False):
    """``ModelSpec`` fields in which a llama-like GGUF architecture differs from llama."""

    attention_bias: bool
    qk_norm: bool


LLAMA_LIKE: dict[str, _LlamaDiff] = {"llama": {}, "mistral": {}, "qwen2": {"attention_bias": True}, "qwen3": {"qk_norm": True}}
"""GGUF architectures whose tensors memplan's llama layout describes, with their differences."""
FILE_TYPES = {0: None, 1: None, 2: "q4_0", 7: "q8_0", 10: "q2_k", 12: "q3_k_m", 15: "q4_k_m", 17: "q5_k_m", 18: "q6_k"}
"""``general.file_type`` (llama.cpp ``llama_ftype``) -> memplan's GGUF format name (None: 16/32-bit)."""


@dataclass(frozen=True)
class GgufTensor:
    """One tensor of the file: name, ggml type name, shape in ggml order (ne0 first), bytes in the file."""

    name: str
    ggml_type: str
    shape: tuple[int, ...]
    nbytes: int

    @property
    def layer(self) -> int | None:
        """The block index of ``blk.N.*`` tensors, else None."""
        parts = self.name.split(".")
        return int(parts[1]) if parts[0] == "blk" and len(parts) > 2 and parts[1].isdigit() else None


@dataclass(frozen=True)
class GgufFile:
    path: str
    arch: str
    file_type: int | None
    tensors: tuple[GgufTensor, ...]
    metadata: dict[str, Any]


def _reader(path: Path) -> Any:
    try:
        import gguf
    except ImportError:
        raise MemplanError("reading a .gguf file needs the gguf package: pip install 'memplan[gguf]'.") from None
    try:
        return gguf.GGUFReader(path, "r")
    except (OSError, ValueError) as exc:
        raise MemplanError(f"cannot read {path} as a GGUF file: {exc}.") from None


@lru_cache(maxsize=16)
def _read(path: str, mtime_ns: int) -> GgufFile:
    reader = _reader(Path(path))
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key != "tokenizer.ggml.tokens":
            continue
        value = field.contents()
        meta[key] = len(value) if key == "tokenizer.ggml.tokens" else value
    tensors = tuple(GgufTensor(t.name, t.tensor_type.name, tuple(int(d) for d in t.shape), int(t.n_bytes))
                    for t in reader.tensors)
    ftype = meta.get("general.file_type")
    return GgufFile(path, str(meta.get("general.architecture", "")), int(ftype) if ftype is not None else None,
                    tensors, meta)


def read_gguf(path: str | Path) -> GgufFile:
    """The metadata and tensor table of a GGUF file (memoized per path and modification time)."""
    p = Path(path).expanduser().resolve()
    if not p.is_file():
        raise MemplanError(f"no GGUF file at {path}.")
    return _read(str(p), p.stat().st_mtime_ns)


def _int(meta: dict[str, Any], key: str) -> int | None:
    value = meta.get(key)
    return int(value) if value is not None else None


def gguf_model(path: str | Path) -> ModelSpec:
    """A ModelSpec from a GGUF file's metadata (llama-like architectures)."""
    f = read_gguf(path)
    if f.arch not in LLAMA_LIKE:
        raise MemplanError(f"{path}: GGUF architecture {f.arch!r} is not modelled; memplan reads "
                           f"{', '.join(LLAMA_LIKE)} GGUF files.")
    m, a = f.metadata, f.arch
    names = {t.name for t in f.tensors}
    embd = next((t for t in f.tensors if t.name == "token_embd.weight"), None)
    vocab = _int(m, f"{a}.vocab_size") or _int(m, "tokenizer.ggml.tokens") or (embd.shape[1] if embd else None)
    heads = _int(m, f"{a}.attention.head_count")
    return ModelSpec(
        name=str(m.get("general.name") or Path(path).stem), source=f"GGUF file {f.path}", family=Family.LLAMA,
        hidden_size=_int(m, f"{a}.embedding_length"), intermediate_size=_int(m, f"{a}.feed_forward_length"),
        num_hidden_layers=_int(m, f"{a}.block_count"), num_attention_heads=heads,
        num_key_value_heads=_int(m, f"{a}.attention.head_count_kv") or heads,
        head_dim=_int(m, f"{a}.attention.key_length"), vocab_size=vocab,
        max_position_embeddings=_int(m, f"{a}.context_length"),
        tie_word_embeddings="output.weight" not in names, **LLAMA_LIKE[a])


def file_quant(path: str | Path) -> str | None:
    """memplan's format name for the file's ``general.file_type`` (None: 16/32-bit or not a named mix)."""
    return FILE_TYPES.get(read_gguf(path).file_type or 0)


def gguf_path(spec: ModelSpec) -> str | None:
    """The GGUF file a ModelSpec was read from, or None."""
    prefix = "GGUF file "
    return spec.source[len(prefix):] if spec.source.startswith(prefix) else None
