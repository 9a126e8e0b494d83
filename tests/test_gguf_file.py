"""A .gguf file as the model: metadata and tensor table read with gguf-py, buffers by -ngl (llama.cpp engine)."""

from __future__ import annotations

from pathlib import Path

import pytest

gguf = pytest.importorskip("gguf", reason="the optional gguf extra is not installed")
np = pytest.importorskip("numpy")

from memplan.catalog.resolve import load_model  # noqa: E402
from memplan.estimator import estimate  # noqa: E402

D, F, V, L, HEADS, KV = 256, 512, 1000, 2, 4, 2
Q4K, Q6K = (256, 144), (256, 210)  # ggml type traits: values per block, bytes per block


def _q(rows: int, cols: int, traits: tuple[int, int], kind: object) -> tuple[np.ndarray, object]:
    return np.zeros((rows, cols // traits[0] * traits[1]), dtype=np.uint8), kind


def _write(path: Path) -> dict[str, int]:
    """A tiny Llama-layout Q4_K_M-like file; returns the byte size of each tensor as ggml stores it."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_block_count(L)
    w.add_embedding_length(D)
    w.add_feed_forward_length(F)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV)
    w.add_context_length(2048)
    w.add_vocab_size(V)
    w.add_file_type(15)
    sizes: dict[str, int] = {}
    q4, q6 = gguf.GGMLQuantizationType.Q4_K, gguf.GGMLQuantizationType.Q6_K
    hd = D // HEADS

    def add(name: str, data: np.ndarray, kind: object = None) -> None:
        w.add_tensor(name, data, raw_dtype=kind) if kind is not None else w.add_tensor(name, data)
        sizes[name] = data.nbytes

    add("token_embd.weight", *_q(V, D, Q4K, q4))
    for i in range(L):
        add(f"blk.{i}.attn_norm.weight", np.zeros(D, dtype=np.float32))
        add(f"blk.{i}.attn_q.weight", *_q(D, D, Q4K, q4))
        add(f"blk.{i}.attn_k.weight", *_q(KV * hd, D, Q4K, q4))
        add(f"blk.{i}.attn_v.weight", *_q(KV * hd, D, Q6K, q6))
        add(f"blk.{i}.attn_output.weight", *_q(D, D, Q4K, q4))
        add(f"blk.{i}.ffn_norm.weight", np.zeros(D, dtype=np.float32))
        add(f"blk.{i}.ffn_gate.weight", *_q(F, D, Q4K, q4))
        add(f"blk.{i}.ffn_up.weight", *_q(F, D, Q4K, q4))
        add(f"blk.{i}.ffn_down.weight", *_q(D, F, Q6K, q6))
    add("output_norm.weight", np.zeros(D, dtype=np.float32))
    add("output.weight", *_q(V, D, Q6K, q6))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return sizes


def test_gguf_metadata_becomes_the_model(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    _write(path)
    spec = load_model(str(path))
    assert (spec.hidden_size, spec.intermediate_size, spec.num_hidden_layers) == (D, F, L)
    assert (spec.num_attention_heads, spec.num_key_value_heads, spec.vocab_size) == (HEADS, KV, V)
    assert spec.max_position_embeddings == 2048 and not spec.tie_word_embeddings and spec.name == "tiny-llama"


def _pad(ncols: int, traits: tuple[int, int]) -> int:
    """ggml-cuda pads a quantized tensor with rows of ncols % 512 != 0 by (512 − ncols % 512) values."""
    return (512 - ncols % 512) // traits[0] * traits[1] if ncols % 512 else 0


def test_gguf_model_buffers_follow_the_file_and_ngl(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    sizes = _write(path)
    block = {i: sum(b for n, b in sizes.items() if n.startswith(f"blk.{i}.")) for i in range(L)}
    # per block: attn_q, attn_k, attn_output, ffn_gate, ffn_up (Q4_K, rows of 256) and attn_v (Q6_K, 256) padded;
    # ffn_down has rows of 512 values: no padding
    block_pad = 5 * _pad(D, Q4K) + _pad(D, Q6K)
    output = sizes["output_norm.weight"] + sizes["output.weight"] + _pad(D, Q6K)

    def rows(**serve: object) -> dict[str, int]:
        est = estimate(str(path), "rtx-4090", job="infer", engine="llamacpp", infer={"context": 512}, serve=serve)
        return {r.component: r.bytes for r in est.rows}

    full = rows()
    assert full["weights/llamacpp_gpu"] == block[0] + block[1] + 2 * block_pad + output
    assert full["weights/llamacpp_host"] == sizes["token_embd.weight"]
    one = rows(n_gpu_layers=1)  # the last block on the GPU, the output layer on the host
    assert one["weights/llamacpp_gpu"] == block[1] + block_pad
    assert one["weights/llamacpp_host"] == sizes["token_embd.weight"] + block[0] + sizes["output_norm.weight"] \
        + sizes["output.weight"]
    # KV: 512 cells × 2 layers on the GPU × (K + V) × KV·hd f16 values
    assert full["kv_cache"] == 512 * L * 2 * KV * (D // HEADS) * 2


def test_not_a_gguf_file(tmp_path: Path) -> None:
    from memplan.errors import MemplanError

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf")
    with pytest.raises(MemplanError):
        load_model(str(bad))
