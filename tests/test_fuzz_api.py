"""Fuzzing the Python API: ``estimate``, ``load_model``, ``load_gpu``, the config.json reader, the catalog
reader and the size parsers. Bad input raises MemplanError (one sentence naming the field); anything
else returns a correct answer, whose byte figures are exact ints. No other exception may escape.

Fixed seed (``derandomize=True``) and bounded examples, as in test_fuzz_cli.py.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import event, given
from hypothesis import strategies as st
from test_fuzz_cli import FIXTURE_FILES, config_edits, fuzz_settings

from memplan import estimate, load_gpu, load_model
from memplan.catalog.hf import spec_from_hf_config
from memplan.catalog.schema import GpuSpec, ModelSpec
from memplan.catalog.store import read_entry
from memplan.config import JobConfig
from memplan.errors import MemplanError
from memplan.memory.breakdown import Tier
from memplan.units import parse_count, parse_fraction_or_size, parse_size

GPU = "h100-sxm-80gb"


def check_estimate(api_est: Any) -> None:
    """Rows are non-negative ints, every total is their exact sum, the peak is the largest phase total,
    and the public API's ``peak`` is the memory model's GPU peak."""
    est = getattr(api_est, "detail", api_est)  # memplan.estimate's result wraps the memory model's
    if est is not api_est:
        assert api_est.peak == est.peak(Tier.GPU) and api_est.fits == est.fits
    for row in est.rows:
        assert isinstance(row.bytes, int) and not isinstance(row.bytes, bool) and row.bytes >= 0, row
    for tier in Tier:
        assert est.total(tier) == sum(r.bytes for r in est.rows if r.tier is tier)
        assert est.peak(tier) == max(est.phases(tier).values()) <= est.total(tier)
        assert est.headroom(tier) == est.capacity(tier) - est.peak(tier)
    assert est.fits == all(est.headroom(t) >= 0 for t in Tier)


def outcome(func: Any, *args: Any, **kwargs: Any) -> Any:
    """``func(...)``, or None when it raised MemplanError with a one-line message; anything else fails."""
    try:
        value = func(*args, **kwargs)
    except MemplanError as exc:
        message = str(exc)
        assert message and "\n" not in message.strip(), repr(message)
        event(f"{getattr(func, '__name__', func)}: MemplanError")
        return None
    event(f"{getattr(func, '__name__', func)}: answer")
    return value


# -- wrong types and absurd values for every JobConfig field -------------------------------------------

weird = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.sampled_from([0, -1, 10**15, 10**7, 100_000, "3", "full", "bf16", "nan", b"bytes", object()]),
    st.lists(st.integers(-2, 4), max_size=3),
    st.dictionaries(st.sampled_from(["rank", "context", "alpha", "kv_dtype", "targets", "x"]),
                    st.one_of(st.integers(-3, 10**9), st.floats(), st.text(max_size=4)), max_size=2),
)
FIELDS = sorted(JobConfig.model_fields)


@fuzz_settings(120)
@given(field=st.sampled_from(FIELDS), value=weird, model=st.sampled_from(["llama-3.2-1b", "gpt2", "params:7B"]))
def test_estimate_overrides(field: str, value: Any, model: str) -> None:
    est = outcome(estimate, model, GPU, **{field: value})
    if est is not None:
        check_estimate(est)


@fuzz_settings(40)
@given(model=weird, gpu=st.one_of(weird, st.just(GPU)), config=st.one_of(st.none(), weird),
       host=st.one_of(st.none(), weird))
def test_estimate_wrong_argument_types(model: Any, gpu: Any, config: Any, host: Any) -> None:
    est = outcome(estimate, model, gpu, config, host=host)
    if est is not None:
        check_estimate(est)


@fuzz_settings(40)
@given(value=st.one_of(weird, st.text(max_size=20).map(lambda t: f"params:{t}")))
def test_load_model_and_gpu(value: Any) -> None:
    spec = outcome(load_model, value)
    assert spec is None or isinstance(spec, ModelSpec)
    gpu = outcome(load_gpu, value)
    assert gpu is None or isinstance(gpu, GpuSpec)


# -- the config.json reader on mutated real configs ---------------------------------------------------

@fuzz_settings(150)
@given(fixture=st.sampled_from(FIXTURE_FILES), edit=config_edits, layers=st.sampled_from([None, 1, 2, 10**6, 2**70]))
def test_spec_from_mutated_config(fixture: Path, edit: tuple[Any, ...], layers: int | None) -> None:
    """Mutated configs (and absurd layer counts) give a MemplanError or a model that estimates exactly."""
    cfg = json.loads(fixture.read_text())
    kind, arg, value = edit
    if kind in ("delete", "set"):
        key = sorted(cfg)[arg % len(cfg)]
        if kind == "delete":
            del cfg[key]
        else:
            cfg[key] = value
    if layers is not None:
        cfg["n_layer" if "n_layer" in cfg else "num_hidden_layers"] = layers
    spec = outcome(spec_from_hf_config, cfg, name="fuzzed", source="test")
    if spec is None:
        return
    est = outcome(estimate, spec, GPU, job="full")
    if est is not None:
        check_estimate(est)
        assert est.arch.params > 0


# -- catalog YAML: truncated and garbage files ---------------------------------------------------------

REAL_YAML = (Path(__file__).resolve().parents[1] / "memplan" / "catalog" / "gpus" / "h100-sxm-80gb.yaml").read_text()
yaml_texts = st.one_of(
    st.integers(0, len(REAL_YAML)).map(lambda n: REAL_YAML[:n]),
    st.text(max_size=40),
    st.sampled_from(["- a\n- b", "{", "a: [1, 2", "!!python/object:os.system {}", "key: *alias", ":\t:",
                     "memory_mib: .nan\n", "memory_mib: -80\n", "memory_mib: 1e400\n", "\x00", "%YAML 9.9\n---\n"]),
    st.binary(max_size=30).map(lambda b: b.decode("latin-1")),
)


@fuzz_settings(60)
@given(text=yaml_texts, schema=st.sampled_from([GpuSpec, ModelSpec]))
def test_catalog_yaml_garbage(text: str, schema: type) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "entry.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogateescape")
        entry = outcome(read_entry, path, schema)
    assert entry is None or isinstance(entry, schema)


# -- size and count parsers -------------------------------------------------------------------------

@fuzz_settings(80)
@given(text=st.one_of(st.text(max_size=12), st.integers(-(10**20), 10**20), st.floats().map(str),
                      st.tuples(st.sampled_from(["1", "0", "-1", "1.5", "1e400", "nan", "inf", "1e-400", "7.5", "9" * 50]),
                                st.sampled_from(["", "B", "GiB", "GB", "%", "T", "TiB", "k", "M"])).map("".join)))
def test_parsers(text: Any) -> None:
    size = outcome(parse_size, text, field="--x")
    assert size is None or (isinstance(size, int) and size >= 0)
    count = outcome(parse_count, text, field="--x")
    assert count is None or (isinstance(count, int) and count > 0)
    part = outcome(parse_fraction_or_size, str(text), total=10**12, field="--x")
    assert part is None or (isinstance(part, int) and part >= 0)


def test_parse_count_is_exact_for_huge_counts() -> None:
    assert parse_count("1000000B") == 10**15
    assert parse_count("7.5B") == 7_500_000_000
    assert parse_count("1.000000000000000001T") == 10**12 + 0  # below one parameter: floored, never rounded up by float


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_floats_are_named(value: float) -> None:
    with pytest.raises(MemplanError, match="allocator_reserve_pct"):
        estimate("gpt2", GPU, allocator_reserve_pct=value)


INT_FIELDS = [*(n for n, f in JobConfig.model_fields.items() if "int" in str(f.annotation) and "bool" not in str(f.annotation)),
              "zero"]


@pytest.mark.parametrize("field", INT_FIELDS)
@pytest.mark.parametrize("value", [True, False, [True], (False, 1)])
def test_a_bool_is_never_a_number(field: str, value: Any) -> None:
    """Python's bool is an int subclass: ``seq_len=True`` must not silently mean 1 (issue 14 part 8)."""
    with pytest.raises(MemplanError, match="boolean"):
        estimate("gpt2", GPU, **{field: value})


@pytest.mark.parametrize("field", ["tp", "pp", "zero", "micro_batch", "context", "seq_len", "batch", "gpus"])
def test_a_bool_is_never_a_search_value(field: str) -> None:
    from pydantic import ValidationError

    from memplan.planner.space import SearchSpace

    with pytest.raises(ValidationError, match="boolean"):
        SearchSpace.model_validate({field: [True]})
