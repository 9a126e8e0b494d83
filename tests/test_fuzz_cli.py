"""Fuzzing the command line: bad or extreme input gets exit 2 and one sentence naming the field, or a
correct answer (exit 0, or exit 1 for a plan that does not fit); never a traceback, never exit 3.

Hypothesis runs with a fixed seed (``derandomize=True``) and a bounded number of examples, so CI sees
the same inputs every run. Inputs: wrong types, negative and zero sizes, NaN and infinity, absurd
values (10^15 parameters, a 10M-token context, 100,000 GPUs), unknown enum values, truncated or
garbage ``config.json``, configs with missing or contradictory fields, unreadable files and a
directory where a file is expected. Answers are checked for exactness: every byte figure is an int
and each tier's total equals the sum of its component rows.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.control import current_build_context
from hypothesis.errors import InvalidArgument
from typer.testing import CliRunner

from memplan.cli.app import app

FIXTURES = Path(__file__).parent / "fixtures" / "hf_configs"
FIXTURE_FILES = sorted(FIXTURES.glob("*.json"))
RUNNER = CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1", "HF_HUB_OFFLINE": "1"})
SMALL_MODEL = "llama-3.2-1b"


SCALE = float(os.environ.get("MEMPLAN_FUZZ_SCALE", "1"))
"""Multiply every example budget (e.g. 20 for a long local hunt); CI runs the default, 1."""
RANDOM = os.environ.get("MEMPLAN_FUZZ_RANDOM") == "1"
"""Draw fresh random inputs instead of the fixed seed (local hunts only)."""


def fuzz_settings(examples: int) -> Any:
    """Fixed seed, bounded examples, no example database: the same inputs on every run and machine."""
    return settings(derandomize=not RANDOM, max_examples=max(1, int(examples * SCALE)), deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


# -- outcome checks ------------------------------------------------------------------------------

def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_estimate_json(doc: dict[str, Any]) -> None:
    """Every byte figure an int; each tier's total the exact sum of its rows, its peak the largest phase total
    (never above the sum); headroom and verdicts from the peak."""
    headrooms = {}
    for tier, block in doc["memory"].items():
        comps = block["components"]
        assert all(is_int(v) and v >= 0 for v in comps.values()), (tier, comps)
        assert is_int(block["total_bytes"]) and block["total_bytes"] == sum(comps.values()), (tier, block)
        assert (is_int(block["capacity_bytes"]) and block["capacity_bytes"] > 0) or tier == "nvme", (tier, block)
        assert is_int(block["peak_bytes"]) and block["peak_bytes"] == max(block["phases"].values()), (tier, block)
        assert block["peak_bytes"] <= block["total_bytes"], (tier, block)
        assert block["headroom_bytes"] == block["capacity_bytes"] - block["peak_bytes"], (tier, block)
        headrooms[tier] = block["headroom_bytes"]
    assert doc["fits"] == all(h >= 0 for h in headrooms.values()), doc["fits"]
    used = [t for t, b in doc["memory"].items() if t == "gpu" or b["peak_bytes"] > 0]
    assert doc["headroom_bytes"] == min(headrooms[t] for t in used)
    assert is_int(doc["model"]["params"]) and doc["model"]["params"] > 0


def check_plan_json(doc: dict[str, Any], exit_code: int) -> None:
    assert doc["status"] in ("optimal", "infeasible"), doc["status"]
    assert (exit_code == 0) == (doc["best"] is not None), (exit_code, doc["status"])
    for cand in [doc["best"], *doc["alternatives"]] if doc["best"] else []:
        check_estimate_json(cand)
        assert cand["fits"], "a plan that does not fit was offered"


def names_for(option: str, extra: Iterable[str] = ()) -> tuple[str, ...]:
    """Ways an error may name the field behind ``option`` (the flag, or its config field)."""
    bare = option.lstrip("-")
    return (option, bare, bare.replace("-", "_"), *extra)


def check_result(result: Any, *, names: tuple[str, ...] = (), fmt: str = "json", command: str = "estimate") -> int:
    """Exit 2 with one line naming one of ``names``, or a correct answer; returns the exit code."""
    exc = result.exception
    assert exc is None or isinstance(exc, SystemExit), f"uncaught {type(exc).__name__}: {exc}"
    out, err = result.stdout, result.stderr
    assert "Traceback" not in out + err
    code = result.exit_code
    note_event(f"exit {code}")
    allowed = (0, 1, 2) if command == "plan" else (0, 2)
    assert code in allowed, f"exit {code}\nstderr: {err}"
    if code == 2:
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("memplan: "), f"not one line:\n{err}"
        assert lines[0].rstrip().endswith((".", "?", "!")), f"not a sentence: {lines[0]}"
        if names:
            low = err.lower()
            assert any(n.lower() in low for n in names), f"{names} not named in: {err}"
        return code
    if fmt == "json":
        doc = json.loads(out)
        if command == "plan":
            check_plan_json(doc, code)
        else:
            check_estimate_json(doc)
    return code


def note_event(text: str) -> None:
    """Count an outcome for ``--hypothesis-show-statistics`` (only inside a hypothesis test)."""
    try:
        current_build_context()
    except InvalidArgument:  # not inside @given
        return
    from hypothesis import event

    event(text)


FORMATS = st.sampled_from(["json", "json", "table", "csv"])
"""Output formats drawn per example: JSON is checked for exactness, table and CSV for a clean exit."""


def invoke(*args: str) -> Any:
    return RUNNER.invoke(app, [str(a) for a in args])


# -- strategies ----------------------------------------------------------------------------------

BAD_NUMBER_TEXT = ["nan", "NaN", "inf", "-inf", "Infinity", "1e3", "1.5", "-0", "", " ", "abc", "0x10", "٣",
                   "10_000", "+5", "1 000", "9" * 40, "-" + "9" * 40, "1e400", "None", "true"]
ints_any = st.one_of(
    st.integers(min_value=-(2**70), max_value=0).map(str),
    st.integers(min_value=1, max_value=2**70).map(str),
    st.sampled_from(BAD_NUMBER_TEXT),
    st.text(max_size=6),
)
floats_any = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["nan", "inf", "-inf", "1e308", "1e-320", "-1", "0", "100", "100.0000001", "abc", ""]),
)
SIZE_NUMBERS = ["0", "1", "-1", "1.5", "1e3", "1e15", "1e400", "nan", "inf", ".5", "80", "1e-9", "9" * 30]
SIZE_UNITS = ["", "G", "GiB", "GB", "gib", "TiB", "B", "bytes", " MiB", "xB", "%", "iB", "Gi"]
sizes_any = st.one_of(
    st.tuples(st.sampled_from(SIZE_NUMBERS), st.sampled_from(SIZE_UNITS)).map("".join),
    st.text(max_size=8),
)


def mutated(valid: list[str]) -> st.SearchStrategy[str]:
    """Valid enum values and near misses: case, whitespace, truncation, a typo, random text."""
    base = st.sampled_from(valid)
    return st.one_of(
        base,
        base.map(str.upper),
        base.map(lambda v: f" {v} "),
        base.map(lambda v: v[:-1]),
        base.map(lambda v: v + "x"),
        st.text(max_size=10),
    )


# -- numeric options -----------------------------------------------------------------------------

# option -> (extra args that make the option matter, other names an error may use)
INT_OPTIONS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "--batch": ((), ("micro_batch",)),
    "--seq-len": ((), ()),
    "--gpus": (("--zero", "3"), ("gpus_per_node", "GPUs")),
    "--nodes": (("--zero", "3"), ("GPUs",)),
    "--tp": (("--gpus", "8"), ("tp × pp", "tensor")),
    "--pp": (("--gpus", "8"), ("tp × pp", "layers")),
    "--ep": (("--gpus", "8"), ("experts",)),
    "--zero": (("--gpus", "8"), ()),
    "--lora-rank": (("--job", "lora"), ("lora.rank",)),
    "--galore-rank": (("--job", "galore"), ("galore.rank",)),
    "--context": (("--job", "infer"), ("infer.context",)),
    "--block-size": (("--job", "infer", "--paged"), ("infer.block_size",)),
    "--recompute-layers": (("--recompute", "full"), ()),
}


@fuzz_settings(70)
@given(option=st.sampled_from(sorted(INT_OPTIONS)), value=ints_any, fmt=FORMATS)
def test_integer_options(option: str, value: str, fmt: str) -> None:
    extra, aliases = INT_OPTIONS[option]
    result = invoke("estimate", SMALL_MODEL, *extra, option, value, "--format", fmt)
    check_result(result, names=names_for(option, aliases), fmt=fmt)


FLOAT_OPTIONS = {"--allocator-reserve": ((), ("allocator_reserve_pct",)), "--lora-alpha": (("--job", "lora"), ("lora.alpha",)),
                 "--safety-margin": ((), ("safety_margin_pct",))}


@fuzz_settings(30)
@given(option=st.sampled_from(sorted(FLOAT_OPTIONS)), value=floats_any, fmt=FORMATS)
def test_float_options(option: str, value: str, fmt: str) -> None:
    extra, aliases = FLOAT_OPTIONS[option]
    result = invoke("estimate", SMALL_MODEL, *extra, option, value, "--format", fmt)
    check_result(result, names=names_for(option, aliases), fmt=fmt)


SIZE_OPTIONS = {"--cpu-ram": (("--zero", "2", "--offload-optimizer", "cpu"), ()),
                "--nvme": (("--zero", "3", "--offload-params", "nvme"), ()),
                "--cuda-context": ((), ())}


@fuzz_settings(40)
@given(option=st.sampled_from(sorted(SIZE_OPTIONS)), value=sizes_any, fmt=FORMATS)
def test_size_options(option: str, value: str, fmt: str) -> None:
    extra, aliases = SIZE_OPTIONS[option]
    result = invoke("estimate", SMALL_MODEL, *extra, option, value, "--format", fmt)
    check_result(result, names=names_for(option, aliases), fmt=fmt)


@fuzz_settings(15)
@given(value=sizes_any)
def test_gpus_min_memory(value: str) -> None:
    result = invoke("gpus", "--min-memory", value, "--format", "json")
    check_result(result, names=("--min-memory",), fmt="none")
    if result.exit_code == 0:
        assert isinstance(json.loads(result.stdout), list)


# -- enum options --------------------------------------------------------------------------------

ENUM_OPTIONS: dict[str, tuple[list[str], tuple[str, ...]]] = {
    "--job": (["pretrain", "full", "lora", "qlora", "galore", "infer"], ()),
    "--dtype": (["fp32", "bf16", "fp16", "fp8"], ()),
    "--quant": (["int8", "nf4", "nf4-dq", "fp4", "gptq-4bit", "awq-4bit", "q4_k_m", "q8_0"], ("quantization",)),
    "--optimizer": (["adamw", "adamw-bf16", "adamw-8bit", "adafactor", "sgd", "sgd-momentum", "lion"], ()),
    "--accounting": (["paper", "deepspeed"], ()),
    "--offload-optimizer": (["none", "cpu", "nvme"], ()),
    "--offload-params": (["none", "cpu", "nvme"], ()),
    "--recompute": (["none", "selective", "full"], ()),
    "--kv-dtype": (["bf16", "fp8", "int8", "int4"], ("infer.kv_dtype",)),
    "--lora-targets": (["q,k,v,o", "all-linear", "gate,up,down"], ("lora.targets", "projection")),
    "--gpu": (["h100-sxm-80gb", "a100-sxm-80gb", "rtx-4090", "mi300x"], ("GPU",)),
    "--grad-dtype": (["fp32", "bf16"], ()),
}
ENUM_CONTEXT = {"--offload-optimizer": ("--zero", "3"), "--offload-params": ("--zero", "3"),
                "--kv-dtype": ("--job", "infer"), "--lora-targets": ("--job", "lora")}


@fuzz_settings(60)
@given(option=st.sampled_from(sorted(ENUM_OPTIONS)), data=st.data(), fmt=FORMATS)
def test_enum_options(option: str, data: st.DataObject, fmt: str) -> None:
    valid, aliases = ENUM_OPTIONS[option]
    value = data.draw(mutated(valid), label="value")
    result = invoke("estimate", SMALL_MODEL, *ENUM_CONTEXT.get(option, ()), option, value, "--format", fmt)
    check_result(result, names=names_for(option, aliases), fmt=fmt)


@fuzz_settings(10)
@given(value=mutated(["table", "json", "csv"]))
def test_format_option(value: str) -> None:
    result = invoke("estimate", SMALL_MODEL, "--format", value)
    check_result(result, names=("--format",), fmt=value if value == "json" else "none")


# -- the model argument --------------------------------------------------------------------------

CATALOG = ["llama-3.1-8b", "mixtral-8x7b", "gpt2", "deepseek-v3", "qwen2.5-0.5b"]
model_texts = st.one_of(
    st.text(max_size=12).map(lambda t: f"params:{t}"),
    st.tuples(st.sampled_from(SIZE_NUMBERS), st.sampled_from(["", "B", "M", "T", "K", "b", "G", "X"]))
    .map(lambda t: "params:" + "".join(t)),
    mutated(CATALOG),
    st.sampled_from(["hf:", "hf:noslash", "hf:a/b/c", "hf:/x", "hf: ", "params:", "params: 7B", "PARAMS:7B",
                     "./", "../", "/", "x.json", "~", "a" * 300, "./" + "a" * 300, "a/" * 100, "-", "--",
                     "nul\x00l", "../gpus/h100-sxm-80gb", "llama-3.1-8b/../gpt2"]),
)


@fuzz_settings(40)
@given(text=model_texts, fmt=FORMATS)
def test_model_argument(text: str, fmt: str) -> None:
    result = invoke("estimate", text, "--format", fmt)
    check_result(result, fmt=fmt)


# -- config.json: garbage, truncation, missing and contradictory fields -------------------------------

def _json_values() -> st.SearchStrategy[Any]:
    scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.text(max_size=6),
                        st.sampled_from([0, -1, 1, 2**63, float("nan"), float("inf"), -0.5, 1.5, 1e308]))
    return st.one_of(scalars, st.lists(scalars, max_size=3), st.dictionaries(st.text(max_size=4), scalars, max_size=2))


def _contradict(cfg: dict[str, Any], kind: str) -> dict[str, Any]:
    out = dict(cfg)
    heads = out.get("num_attention_heads") or out.get("n_head") or 8
    if kind == "kv_not_dividing":
        out["num_key_value_heads"] = heads - 1 if heads > 2 else 3
    elif kind == "kv_above_heads":
        out["num_key_value_heads"] = heads * 2
    elif kind == "head_dim_mismatch":
        out["head_dim"] = 7
    elif kind == "hidden_not_divisible":
        key = "hidden_size" if "hidden_size" in out else "n_embd"
        out[key] = (out.get(key) or 4096) + 1
        out.pop("head_dim", None)
    elif kind == "experts_per_tok_above_experts":
        out["num_experts_per_tok"] = 10**6
        out["num_local_experts"] = out.get("num_local_experts", 2)
    elif kind == "layer_types_length":
        out["layer_types"] = ["full_attention"]
    return out


config_edits = st.one_of(
    st.tuples(st.just("delete"), st.integers(0, 60), st.none()),
    st.tuples(st.just("set"), st.integers(0, 60), _json_values()),
    st.tuples(st.just("truncate"), st.integers(0, 4000), st.none()),
    st.tuples(st.just("contradict"), st.sampled_from(["kv_not_dividing", "kv_above_heads", "head_dim_mismatch",
                                                      "hidden_not_divisible", "experts_per_tok_above_experts",
                                                      "layer_types_length"]), st.none()),
    st.tuples(st.just("garbage"), st.binary(max_size=40), st.none()),
    st.tuples(st.just("not_object"), _json_values(), st.none()),
)


def _apply(path: Path, base: dict[str, Any], edit: tuple[Any, ...]) -> str | None:
    """Write the edited config to ``path``; return the key the edit touched, if any."""
    kind, arg, value = edit
    keys = sorted(base)
    if kind in ("delete", "set"):
        key = keys[arg % len(keys)]
        cfg = dict(base)
        if kind == "delete":
            del cfg[key]
        else:
            cfg[key] = value
        path.write_text(json.dumps(cfg))
        return key
    if kind == "truncate":
        text = json.dumps(base, indent=2)
        path.write_text(text[: arg % max(len(text) - 1, 1)])
    elif kind == "contradict":
        path.write_text(json.dumps(_contradict(base, arg)))
    elif kind == "garbage":
        path.write_bytes(arg)
    else:
        path.write_text(json.dumps(arg))
    return None


@fuzz_settings(70)
@given(fixture=st.sampled_from(FIXTURE_FILES), edit=config_edits)
def test_config_json_mutations(fixture: Path, edit: tuple[Any, ...]) -> None:
    base = json.loads(fixture.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.json"
        _apply(path, base, edit)
        result = invoke("estimate", str(path), "--format", "json")
        code = check_result(result)
    if code == 2 and edit[0] in ("truncate", "garbage", "not_object"):
        assert "config.json" in result.stderr or "JSON" in result.stderr, result.stderr


@pytest.mark.parametrize("fixture", FIXTURE_FILES, ids=lambda p: p.stem)
def test_missing_required_field_is_named(fixture: Path, tmp_path: Path) -> None:
    """Dropping the layer count (under whichever name the layout uses) is refused, naming that key."""
    cfg = json.loads(fixture.read_text())
    key = next(k for k in ("num_hidden_layers", "n_layer") if k in cfg)
    del cfg[key]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    result = invoke("estimate", str(tmp_path), "--format", "json")
    check_result(result, names=(key,))
    assert result.exit_code == 2


def test_kv_heads_not_dividing_heads_is_named(tmp_path: Path) -> None:
    cfg = json.loads((FIXTURES / "llama-3.1-8b.json").read_text())
    cfg["num_key_value_heads"] = 5
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    result = invoke("estimate", str(tmp_path))
    check_result(result, names=("num_key_value_heads",))
    assert result.exit_code == 2


# -- files that cannot be read --------------------------------------------------------------------

def _fifo(tmp: Path) -> Path:
    path = tmp / "config.json"
    os.mkfifo(path)
    return path


def _unreadable(tmp: Path) -> Path:
    """chmod 000 - but root reads through it, so as root a file whose *directory* is a file stands in."""
    path = tmp / "config.json"
    path.write_text((FIXTURES / "gpt2.json").read_text())
    path.chmod(0)
    if os.access(path, os.R_OK):  # running as root: permission bits do not stop reading
        return tmp / "config.json" / "config.json"
    return path


def _written(name: str, content: bytes) -> Any:
    def make(tmp: Path) -> Path:
        path = tmp / name
        path.write_bytes(content)
        return path

    return make


def _directory_named_config_json(tmp: Path) -> Path:
    (tmp / "config.json").mkdir()
    return tmp


def _symlink_loop(tmp: Path) -> Path:
    (tmp / "loop.json").symlink_to(tmp / "loop.json")
    return tmp / "loop.json"


FILE_CASES = {
    "directory_named_config_json": _directory_named_config_json,
    "directory_without_config": lambda tmp: tmp,
    "fifo_where_a_file_is_expected": _fifo,
    "unreadable_file": _unreadable,
    "empty_file": _written("config.json", b""),
    "not_utf8": _written("config.json", b"\xff\xfe{\x00"),
    "symlink_loop": _symlink_loop,
    "missing_file": lambda tmp: tmp / "nope" / "config.json",
    "name_too_long": lambda tmp: tmp / ("x" * 300 + ".json"),
    "deeply_nested_json": _written("config.json", b"[" * 100_000 + b"]" * 100_000),
}


@pytest.mark.parametrize("case", sorted(FILE_CASES))
def test_unreadable_inputs(case: str, tmp_path: Path) -> None:
    path = FILE_CASES[case](tmp_path)
    assert isinstance(path, Path)
    try:
        result = invoke("estimate", str(path), "--format", "json")
    finally:
        for p in tmp_path.rglob("*"):
            if not p.is_symlink() and p.exists() and not stat.S_ISFIFO(p.stat().st_mode):
                p.chmod(0o700)
    check_result(result)
    assert result.exit_code == 2, result.stdout


# -- plan: bad search spaces ---------------------------------------------------------------------

LIST_OPTIONS = {"--tp": ["1,2", "1,,2", "0", "-1", "x", "1.5", "", ",", "3", "999999"],
                "--pp": ["1,2", "0", "x", "7"], "--zero": ["0,1,2,3", "4", "-1", "0,x"],
                "--batch": ["1,2,4", "0", "-3", "1e3", "10000000"], "--optimizer": ["adamw,lion", "foo", ",,"],
                "--offload-optimizer": ["none,cpu", "disk"], "--offload-params": ["none,nvme", "ram"],
                "--recompute": ["none,full", "partial"], "--quant": ["none,int8", "int3"],
                "--objective": ["throughput", "min-gpus", "fastest", ""], "--top": ["0", "-1", "x", "2"],
                "--time-limit": ["nan", "inf", "-1", "0", "1e-9", "x"], "--solver": ["highs", "cbc", "glpk", ""],
                "--global-batch": ["0", "-8", "x", "16"]}


@fuzz_settings(30)
@given(option=st.sampled_from(sorted(LIST_OPTIONS)), data=st.data())
def test_plan_bad_search_space(option: str, data: st.DataObject) -> None:
    value = data.draw(st.one_of(st.sampled_from(LIST_OPTIONS[option]), st.text(max_size=5)), label="value")
    result = invoke("plan", "gpt2", "--gpus", "2", option, value, "--time-limit", "20", "--format", "json") \
        if option != "--time-limit" else invoke("plan", "gpt2", "--gpus", "2", option, value, "--format", "json")
    check_result(result, names=names_for(option, ("search space",)), command="plan")


# -- extreme but valid: exact answers ------------------------------------------------------------

P = 10**15  # params:1000000B


def _gpu(doc: dict[str, Any]) -> dict[str, int]:
    return doc["memory"]["gpu"]["components"]


def test_quadrillion_parameters_exact() -> None:
    """10^15 params, paper accounting, bf16 + AdamW with fp32 master, no ZeRO: 2 + 2 + 12 bytes/param exactly."""
    result = invoke("estimate", "params:1000000B", "--accounting", "paper", "--format", "json")
    check_result(result)
    doc = json.loads(result.stdout)
    comps = _gpu(doc)
    assert doc["model"]["params"] == P
    states = sum(v for k, v in comps.items() if k.split("/")[0] in ("weights", "gradients", "optimizer")
                 and k != "optimizer/step_temporaries")  # the step's transient is not a model state
    assert states == 16 * P
    assert doc["fits"] is False


def test_quadrillion_parameters_over_100k_gpus_zero3_exact() -> None:
    result = invoke("estimate", "params:1000000B", "--gpus", "8", "--nodes", "12500", "--zero", "3",
                    "--accounting", "paper", "--format", "json")
    check_result(result)
    comps = _gpu(json.loads(result.stdout))
    states = sum(v for k, v in comps.items() if k.split("/")[0] in ("weights", "gradients", "optimizer")
                 and k != "optimizer/step_temporaries")  # the step's transient is not a model state
    world = 100_000
    assert states == -(-2 * P // world) + -(-2 * P // world) + -(-12 * P // world)


@pytest.mark.parametrize("args", [
    ("llama-3.1-8b", "--job", "infer", "--context", "10000000"),
    ("llama-3.1-8b", "--seq-len", "10000000"),
    ("llama-3.1-8b", "--seq-len", "10000000", "--no-flash-attention"),
    ("llama-3.1-405b", "--gpus", "8", "--nodes", "12500", "--zero", "3"),
    ("deepseek-v3", "--job", "infer", "--context", "10000000", "--batch", "100000"),
    ("mixtral-8x22b", "--gpus", "8", "--nodes", "8", "--tp", "8", "--ep", "8", "--zero", "1"),
    ("params:1000000B", "--gpus", "8", "--nodes", "12500", "--zero", "3", "--offload-optimizer", "cpu"),
    ("params:1000000B", "--job", "infer", "--quant", "q2_k"),
    ("gpt2", "--batch", str(2**62), "--seq-len", str(2**40)),
], ids=lambda a: " ".join(a)[:60])
def test_extreme_valid_inputs_compute_exactly(args: tuple[str, ...]) -> None:
    result = invoke("estimate", *args, "--format", "json")
    assert check_result(result) == 0, result.stderr


def test_ten_million_token_kv_cache_is_linear_and_exact() -> None:
    """The KV cache at 10M tokens is exactly 10^7/10^3 times the cache at 1,000 tokens (no float rounding)."""
    big = json.loads(invoke("estimate", "llama-3.1-8b", "--job", "infer", "--context", "10000000",
                            "--format", "json").stdout)
    small = json.loads(invoke("estimate", "llama-3.1-8b", "--job", "infer", "--context", "1000",
                              "--format", "json").stdout)
    kv = {k: v for k, v in _gpu(big).items() if k.startswith("kv_cache")}
    kv_small = {k: v for k, v in _gpu(small).items() if k.startswith("kv_cache")}
    assert kv and kv.keys() == kv_small.keys()
    # Llama-3.1-8B: 32 layers x 8 KV heads x 128 head dim x (K and V) x 2 bytes = 131,072 bytes per token.
    assert sum(kv.values()) == 10_000_000 * 131_072
    assert sum(kv_small.values()) * 10_000 == sum(kv.values())


# -- recipes and check: garbage, truncated and mutated YAML ---------------------------------------------

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
ESTIMATED_RECIPES = sorted(p for p in RECIPES.glob("*.yaml") if "\nsearch:" not in p.read_text())
PLANNED_RECIPES = sorted(p for p in RECIPES.glob("*.yaml") if "\nsearch:" in p.read_text())


def _recipe_values() -> st.SearchStrategy[Any]:
    return st.one_of(_json_values(), st.sampled_from(["80G", "10%", "-5GiB", "nan", "1e400GiB", "200%", "h100",
                                                      "infer", [1, 2], {"rank": -1}, {"zero": 9}, "params:1e400"]))


def _dotted_paths(data: Any, prefix: str = "") -> list[str]:
    out = []
    for key, value in (data.items() if isinstance(data, dict) else []):
        path = f"{prefix}{key}"
        out.append(path)
        out += _dotted_paths(value, f"{path}.")
    return out


def _mutate_recipe(data: dict[str, Any], kind: str, index: int, value: Any) -> Any:
    paths = _dotted_paths(data)
    path = paths[index % len(paths)].split(".")
    node = data
    for key in path[:-1]:
        node = node[key]
    if kind == "delete":
        del node[path[-1]]
    elif kind == "set":
        node[path[-1]] = value
    else:  # add an unknown or misplaced key next to it
        node[str(value)[:12] or "x"] = 1
    return data


recipe_edits = st.one_of(
    st.tuples(st.sampled_from(["delete", "set", "add"]), st.integers(0, 60), _recipe_values()),
    st.tuples(st.just("truncate"), st.integers(0, 2000), st.none()),
    st.tuples(st.just("garbage"), st.binary(max_size=40), st.none()),
)


def check_check(result: Any) -> None:
    """check: exit 0/1/2, stderr lines are 'memplan: ...' sentences, stdout is JSON whose verdicts are exact."""
    exc = result.exception
    assert exc is None or isinstance(exc, SystemExit), f"uncaught {type(exc).__name__}: {exc}"
    assert result.exit_code in (0, 1, 2), f"exit {result.exit_code}: {result.stderr}"
    note_event(f"check exit {result.exit_code}")
    for line in result.stderr.splitlines():
        if line.strip():
            assert line.startswith("memplan: ") and "Traceback" not in line, result.stderr
    if result.exit_code == 2 and not result.stdout.strip():
        return
    doc = json.loads(result.stdout)
    for rec in doc["recipes"]:
        if rec["status"] == "error":
            assert rec["reason"] and "\n" not in rec["reason"], rec["reason"]
            continue
        check_estimate_json(rec["estimate"])
        for tier in rec["tiers"]:
            assert tier["total_bytes"] == rec["estimate"]["memory"][tier["tier"]]["peak_bytes"]  # check gates the peak


@fuzz_settings(60)
@given(base=st.sampled_from(ESTIMATED_RECIPES), edit=recipe_edits)
def test_check_mutated_recipes(base: Path, edit: tuple[Any, ...]) -> None:
    import yaml

    kind, arg, value = edit
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / base.name
        if kind == "truncate":
            text = base.read_text()
            path.write_text(text[: arg % max(len(text), 1)])
        elif kind == "garbage":
            path.write_bytes(arg)
        else:
            data = _mutate_recipe(yaml.safe_load(base.read_text()), kind, arg, value)
            path.write_text(yaml.safe_dump(data) if isinstance(data, dict) else "")
        check_check(invoke("check", str(path), "--format", "json"))


@fuzz_settings(25)
@given(base=st.sampled_from(ESTIMATED_RECIPES),
       item=st.one_of(st.tuples(st.sampled_from(["job.seq_len", "job.context", "fixed.zero", "hardware.gpu",
                                                 "hardware.gpus_per_node", "min_headroom", "fixed.safety_margin_pct",
                                                 "job.type", "model", "nope.x", "", "job..x"]), _recipe_values())
                      .map(lambda kv: f"{kv[0]}={json.dumps(kv[1]) if not isinstance(kv[1], str) else kv[1]}"),
                      st.text(max_size=12)))
def test_check_set_overrides(base: Path, item: str) -> None:
    check_check(invoke("check", str(base), "--set", item, "--format", "json"))


@pytest.mark.parametrize("recipe", PLANNED_RECIPES[:2], ids=lambda p: p.stem)
def test_check_planned_recipe_with_an_absurd_override(recipe: Path) -> None:
    check_check(invoke("check", str(recipe), "--set", "hardware.gpus_per_node=100000", "--format", "json",
                       "--time-limit", "10"))


@pytest.mark.parametrize("case", ["directory_named_config_json", "fifo_where_a_file_is_expected", "unreadable_file",
                                  "empty_file", "not_utf8", "symlink_loop", "missing_file", "name_too_long"])
def test_check_unreadable_recipe_files(case: str, tmp_path: Path) -> None:
    path = FILE_CASES[case](tmp_path)
    assert isinstance(path, Path)
    result = invoke("check", str(path), "--format", "json")
    check_check(result)
    assert result.exit_code == 2


# -- sweep: bad grids -----------------------------------------------------------------------------

SWEEP_OPTIONS = {"--model": ["gpt2,qwen2.5-0.5b", "gpt2,,", "nope", "params:1e400", "all,gpt2", ""],
                 "--gpu": ["t4,l4", "t4,nope", "", ","], "--job": ["full,infer", "fly", "infer,"],
                 "--seq-len": ["512,1024", "0", "-1", "x", "10000000"], "--context": ["4096", "0,1", "nan"],
                 "--batch": ["1,2", "0", "99999999999999999999"], "--gpu-count": ["1,8", "0", "3"],
                 "--gpus-per-node": ["0", "-1", "x", "8"], "--metric": ["max-batch", "fits", "max-speed"],
                 "--min-headroom": ["10%", "200%", "80G", "-1GiB", "nan%"], "--tp": ["node", "3", "x", "0"],
                 "--zero": ["4", "-1", "3"]}


@fuzz_settings(30)
@given(option=st.sampled_from(sorted(SWEEP_OPTIONS)), data=st.data())
def test_sweep_bad_grids(option: str, data: st.DataObject) -> None:
    value = data.draw(st.one_of(st.sampled_from(SWEEP_OPTIONS[option]), st.text(max_size=5)), label="value")
    base = {"--model": "gpt2", "--gpu": "t4", "--job": "infer", "--context": "1024", "--workers": "1"}
    args = [a for k, v in {**base, option: value}.items() for a in (k, v)]
    result = invoke("sweep", *args, "--format", "json")
    check_result(result, names=names_for(option, ("grid", "params", "GPU", "size")), fmt="none", command="plan")
