"""Reading Hugging Face config.json files (real layouts) and resolving --model text."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli

from memplan.arch.build import build_architecture
from memplan.catalog.hf import load_config_file, spec_from_hf_config
from memplan.catalog.resolve import load_model
from memplan.catalog.schema import Family
from memplan.catalog.store import catalog_model
from memplan.errors import MemplanError

FIXTURES = Path(__file__).parent / "fixtures" / "hf_configs"
CONFIGS = sorted(FIXTURES.glob("*.json"))
IDENTITY = {"name", "source", "published_params"}


def _cfg(stem: str) -> dict:
    return json.loads((FIXTURES / f"{stem}.json").read_text())


def _write(tmp_path: Path, cfg: dict | str, name: str = "config.json") -> Path:
    path = tmp_path / name
    path.write_text(cfg if isinstance(cfg, str) else json.dumps(cfg))
    return path


def test_fixtures_cover_the_required_layouts() -> None:
    stems = {p.stem for p in CONFIGS}
    assert {"llama-3.1-8b", "qwen2.5-7b", "qwen3-8b", "mistral-7b", "mixtral-8x7b", "gemma-2-9b", "phi-3-mini",
            "gpt2", "deepseek-v2-lite", "deepseek-v3"} <= stems
    types = {json.loads(p.read_text())["model_type"] for p in CONFIGS}
    assert len(types) >= 12, types


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_json_matches_catalog_entry(path: Path) -> None:
    spec = load_config_file(path)
    entry = catalog_model(path.stem)
    assert spec.name == path.stem
    assert spec.published_params is None
    assert build_architecture(spec).params == build_architecture(entry).params
    mine, theirs = spec.model_dump(exclude=IDENTITY), entry.model_dump(exclude=IDENTITY)
    assert mine == theirs, {k: (mine[k], theirs[k]) for k in mine if mine[k] != theirs[k]}


def test_layout_details() -> None:
    assert load_config_file(FIXTURES / "qwen2.5-7b.json").attention_bias  # Qwen2 always biases q, k, v
    assert load_config_file(FIXTURES / "qwen2.5-7b.json").sliding_window is None  # use_sliding_window: false
    assert load_config_file(FIXTURES / "gemma-2-9b.json").tie_word_embeddings  # absent key: Gemma2Config default
    falcon = load_config_file(FIXTURES / "falcon-7b.json")
    assert (falcon.kv_heads, falcon.intermediate_size) == (1, 4 * 4544)
    v3 = load_config_file(FIXTURES / "deepseek-v3.json")
    assert (v3.topk_method, v3.num_nextn_predict_layers, v3.family) == ("noaux_tc", 1, Family.DEEPSEEK)


def test_qwen_sliding_layers_follow_max_window_layers() -> None:
    cfg = {**_cfg("qwen2.5-7b"), "num_hidden_layers": 4, "use_sliding_window": True, "max_window_layers": 2,
           "sliding_window": 4096}
    spec = spec_from_hf_config(cfg, name="q", source="test")
    assert [layer.sliding for layer in build_architecture(spec).layers] == [False, False, True, True]
    transformers = pytest.importorskip("transformers", reason="compares with transformers' Qwen2Config")
    hf = transformers.AutoConfig.for_model("qwen2", **{k: v for k, v in cfg.items() if k != "model_type"})
    assert list(spec.layer_types or ()) == list(hf.layer_types)


def test_config_directory_is_named_after_it(tmp_path: Path) -> None:
    folder = tmp_path / "My-Llama"
    folder.mkdir()
    _write(folder, _cfg("llama-3.1-8b"))
    spec = load_config_file(folder)
    assert spec.name == "My-Llama"
    assert build_architecture(spec).params == 8_030_261_248


@pytest.mark.parametrize("edit, message", [
    ({"hidden_size": None}, "missing the required field 'hidden_size'"),
    ({"num_key_value_heads": 5}, r"num_key_value_heads \(5\) must divide num_attention_heads \(32\)"),
    ({"model_type": "mamba"}, "model_type 'mamba' is not supported"),
    ({"attention_bias": True}, "attention_bias: true"),
    ({"vocab_size": 0}, "vocab_size"),
])
def test_bad_llama_configs(edit: dict, message: str) -> None:
    cfg = {k: v for k, v in {**_cfg("llama-3.1-8b"), **edit}.items() if v is not None}
    with pytest.raises(MemplanError, match=message):
        spec_from_hf_config(cfg, name="bad", source="test")


@pytest.mark.parametrize("stem, edit, message", [
    ("gpt2", {"n_embd": None}, "'n_embd'"),
    ("mixtral-8x7b", {"num_local_experts": None}, "'num_local_experts'"),
    ("opt-13b", {"word_embed_proj_dim": 512}, "word_embed_proj_dim 512 != hidden_size 5120"),
    ("falcon-7b", {"multi_query": "true"}, "'multi_query' must be true or false, got the string 'true'"),
    ("deepseek-v3", {"kv_lora_rank": None}, "'kv_lora_rank'"),
    ("qwen3-30b-a3b", {"mlp_only_layers": [0]}, "mlp_only_layers"),
])
def test_unsupported_or_incomplete_family_configs(stem: str, edit: dict, message: str) -> None:
    cfg = {k: v for k, v in {**_cfg(stem), **edit}.items() if v is not None}
    with pytest.raises(MemplanError, match=message):
        spec_from_hf_config(cfg, name="bad", source="test")


def test_malformed_json(tmp_path: Path) -> None:
    with pytest.raises(MemplanError, match=r"is not valid JSON: .* line 1"):
        load_config_file(_write(tmp_path, '{"model_type": "llama",'))
    with pytest.raises(MemplanError, match="must hold a JSON object"):
        load_config_file(_write(tmp_path, "[1, 2]"))


def test_missing_file_and_directory_without_config(tmp_path: Path) -> None:
    with pytest.raises(MemplanError, match=r"has no config\.json"):
        load_config_file(tmp_path)
    with pytest.raises(MemplanError, match="does not exist"):
        load_config_file(tmp_path / "nowhere" / "config.json")


# --- load_model ----------------------------------------------------------------------------

def test_load_model_catalog_params_and_paths() -> None:
    assert load_model("Llama-2-7B").name == "llama-2-7b"
    spec = load_model("params:7.5B")
    assert (spec.name, spec.family, spec.published_params) == ("params:7.5B", Family.PARAMS_ONLY, 7_500_000_000)
    assert build_architecture(spec).params == 7_500_000_000
    assert load_model(str(FIXTURES / "gpt2.json")).name == "gpt2"


@pytest.mark.parametrize("text, message", [
    ("lama-2-7b", "Did you mean llama-2-7b"),
    ("qwen2.5-7", "Did you mean qwen2.5-7b"),
    ("params:7.5G", "cannot read '7.5G' as a count"),
    ("hf:no-slash", "not a valid repository id"),
    ("", "no model given"),
    ("./missing/config.json", "does not exist"),
])
def test_load_model_errors(text: str, message: str) -> None:
    with pytest.raises(MemplanError, match=message):
        load_model(text)


def test_hf_without_huggingface_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(MemplanError, match=r"install memplan\[hub\]"):
        load_model("hf:meta-llama/Llama-3.1-8B")


def _hub_cache(root: Path, repo: str, cfg: dict) -> None:
    """huggingface_hub's cache layout: blobs/<etag>, snapshots/<commit>/config.json -> blob, refs/main."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "blobs").mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "snapshots" / commit).mkdir(parents=True)
    blob = folder / "blobs" / "d1e2c3b4a5f60718293a4b5c6d7e8f9012345678"
    blob.write_text(json.dumps(cfg))
    (folder / "snapshots" / commit / "config.json").symlink_to(os.path.relpath(blob, folder / "snapshots" / commit))
    (folder / "refs" / "main").write_text(commit)


_HUB_SCRIPT = """
import json, sys
from memplan.catalog.resolve import load_model
from memplan.errors import MemplanError
out = {}
for text in sys.argv[1:]:
    try:
        spec = load_model(text)
        out[text] = [spec.name, spec.source, spec.num_hidden_layers]
    except MemplanError as exc:
        out[text] = str(exc)
print(json.dumps(out))
"""


def test_hf_reads_the_local_cache_with_the_network_off(tmp_path: Path) -> None:
    pytest.importorskip("huggingface_hub", reason="hf: needs the hub extra")
    _hub_cache(tmp_path / "hub", "meta-llama/Llama-3.1-8B", _cfg("llama-3.1-8b"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "home"),
           "HF_HUB_CACHE": str(tmp_path / "hub")}
    cached, missing = "hf:meta-llama/Llama-3.1-8B", "hf:meta-llama/Llama-3.1-70B"
    run = subprocess.run([sys.executable, "-c", _HUB_SCRIPT, cached, missing], env=env, capture_output=True,
                         text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out[cached] == ["Llama-3.1-8B", "https://huggingface.co/meta-llama/Llama-3.1-8B/blob/main/config.json", 32]
    assert "HF_HUB_OFFLINE is set and hf:meta-llama/Llama-3.1-70B has no cached config.json" in out[missing]


# --- strict reading (issue 14 part 8) ------------------------------------------------------

@pytest.mark.parametrize("key, value, shown", [
    ("tie_word_embeddings", "false", "the string 'false'"),
    ("attention_bias", "false", "the string 'false'"),
    ("mlp_bias", 0, "int 0"),
])
def test_config_booleans_must_be_json_booleans(key: str, value: object, shown: str) -> None:
    """A quoted "false" is a non-empty string, true to Python and to transformers: refused, not guessed."""
    with pytest.raises(MemplanError, match=f"'{key}' must be true or false, got {shown}; write a JSON boolean"):
        spec_from_hf_config({**_cfg("llama-3.1-8b"), key: value}, name="bad", source="test")
    real = spec_from_hf_config({**_cfg("llama-3.1-8b"), "tie_word_embeddings": False}, name="ok", source="test")
    assert real.tie_word_embeddings is False


@pytest.mark.parametrize("key, value, message", [
    ("hidden_size", "4096", "hidden_size: expected a number, got the string '4096'"),
    ("num_key_value_heads", "8", "num_key_value_heads: expected a number, got the string '8'"),
])
def test_config_numbers_must_be_json_numbers(key: str, value: str, message: str) -> None:
    with pytest.raises(MemplanError, match=message):
        spec_from_hf_config({**_cfg("llama-3.1-8b"), key: value}, name="bad", source="test")


def test_integer_beyond_pythons_digit_limit_is_one_sentence(tmp_path: Path, runner: object) -> None:
    digits = sys.get_int_max_str_digits() + 700  # 5,000 with Python's default limit of 4,300
    path = _write(tmp_path, '{"model_type": "llama", "hidden_size": ' + "9" * digits + "}")
    with pytest.raises(MemplanError, match=r"more digits than Python reads \(4,300\)"):
        load_config_file(path)
    result = run_cli(runner, "estimate", str(path), code=2)
    assert "more digits than Python reads" in result.stderr and "Traceback" not in result.stderr


def test_sizes_beyond_any_model_are_refused_before_arithmetic() -> None:
    with pytest.raises(MemplanError, match=r"hidden_size: is larger than 2\^50"):
        spec_from_hf_config({**_cfg("llama-3.1-8b"), "hidden_size": 10**4000}, name="bad", source="test")


def test_json_nested_too_deeply(tmp_path: Path) -> None:
    with pytest.raises(MemplanError, match="nests JSON arrays or objects too deeply"):
        load_config_file(_write(tmp_path, "[" * 100_000 + "]" * 100_000))


def test_symlink_loop_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("loop").symlink_to("loop")
    for text in ("loop", "./loop", str(tmp_path / "loop")):
        with pytest.raises(MemplanError, match=r"cannot read .*loop: Too many levels of symbolic links"):
            load_model(text)


@pytest.mark.parametrize("text", ["hf:../..", "hf:a--b/c", "hf:org/..", "hf:-org/name", "hf:org/name.git",
                                  "hf:o/" + "n" * 97])
def test_invalid_hub_ids_are_named_invalid(text: str) -> None:
    with pytest.raises(MemplanError, match="is not a valid repository id"):
        load_model(text)


_ONE_ATTEMPT_SCRIPT = """
import time, httpx2
from memplan.catalog.resolve import load_model
from memplan.errors import MemplanError
sent = []
real_send = httpx2.Client.send
def counting_send(self, request, **kwargs):
    if str(request.url).endswith("config.json"):  # not huggingface_hub's own daily agent-registry fetch
        sent.append(str(request.url))
    return real_send(self, request, **kwargs)
def no_sleep(seconds):
    raise AssertionError(f"retried after a {seconds} s backoff")
httpx2.Client.send = counting_send
time.sleep = no_sleep
try:
    load_model("hf:org/model")
except MemplanError as exc:
    print(exc)
print(sent)
"""


def test_unreachable_hub_is_one_attempt(tmp_path: Path) -> None:
    """No network: HF_ENDPOINT is a closed local port. One request, no backoff sleep, one sentence."""
    pytest.importorskip("huggingface_hub", reason="hf: needs the hub extra")
    pytest.importorskip("httpx2", reason="counts requests through huggingface_hub's HTTP client")
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "home"),
           "HF_HUB_CACHE": str(tmp_path / "hub")}
    env.pop("HF_HUB_OFFLINE", None)
    env.pop("TRANSFORMERS_OFFLINE", None)
    run = subprocess.run([sys.executable, "-c", _ONE_ATTEMPT_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    message, sent = run.stdout.strip().splitlines()
    assert message.startswith("cannot reach the hub (http://127.0.0.1:9) for hf:org/model")
    assert sent == "['http://127.0.0.1:9/org/model/resolve/main/config.json']"
