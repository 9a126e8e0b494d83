"""``memplan explain``: every component the estimator emits is explained from its function's docstring."""

from __future__ import annotations

import inspect

import pytest
from conftest import run_cli
from typer.testing import CliRunner

import memplan.cli.ci  # noqa: F401  (registers check, sweep and explain on the app)
from memplan import __version__
from memplan.estimator import estimate
from memplan.explain import COMPONENTS, TOPICS, explain, render, resolve
from memplan.memory import optimizer, runtime

CONFIGS = [  # together these emit every kind of row the estimator has
    ("llama-3.1-8b", {"job": "full"}),
    ("llama-3.1-8b", {"job": "full", "zero": 3, "offload_optimizer": "nvme", "offload_params": "nvme",
                      "gpus_per_node": 8, "recompute": "full"}),
    ("llama-3.1-8b", {"job": "full", "optimizer": "adamw-8bit", "recompute": "selective"}),
    ("llama-3.1-8b", {"job": "full", "optimizer": "adafactor"}),
    ("llama-3.1-8b", {"job": "full", "optimizer": "lion"}),
    ("llama-3.1-8b", {"job": "full", "optimizer": "sgd-momentum"}),
    ("llama-3.1-8b", {"job": "qlora", "lora": {"dora": True, "targets": ["q", "v"]}, "master_weights": True}),
    ("llama-3.1-8b", {"job": "galore"}),
    ("gemma-2-2b", {"job": "infer", "infer": {"kv_dtype": "int8", "paged": True}}),
    ("mixtral-8x7b", {"job": "infer", "quant": "q4_k_m"}),
    ("llama-3.2-1b", {"job": "infer", "infer": {"offload_map": [True] + [False] * 15}}),
    ("zero-infinity-1t", {"job": "full", "zero": 3, "offload_params": "nvme", "offload_optimizer": "nvme",
                          "gpus_per_node": 16}),
]


def emitted_components() -> set[str]:
    names: set[str] = set()
    for model, cfg in CONFIGS:
        names |= {row.component for row in estimate(model, "h100", **cfg).rows}
    return names


def test_every_emitted_component_is_explained() -> None:
    emitted = emitted_components()
    assert len(emitted) >= 35  # the configs above do reach the whole breakdown
    missing = sorted(name for name in emitted if name not in COMPONENTS)
    assert not missing, f"add these to memplan.explain.COMPONENTS: {missing}"


@pytest.mark.parametrize("name", sorted(COMPONENTS))
def test_each_component_resolves_to_documented_functions(name: str) -> None:
    ex = explain(name)
    assert ex.functions
    for dotted in COMPONENTS[name]:
        fn = resolve(dotted)
        assert callable(fn) and (fn.__doc__ or "").strip(), dotted


def words(text: str) -> str:
    """``text`` with its line breaks and indentation as single spaces: a pipe gets lines over 80 columns
    re-flowed (``memplan.report.table.fit_text``), the words and their order unchanged."""
    return " ".join(text.split())


def test_the_docstring_is_printed_verbatim(runner: CliRunner) -> None:
    out = run_cli(runner, "explain", "optimizer/adam_m").stdout
    doc = inspect.cleandoc(optimizer.adam_state_bytes.__doc__)
    assert words(doc) in words(out)
    assert out.startswith("optimizer/adam_m\n") and "Formula: 2 · P · bits(state_dtype) / 8." in out
    assert "memplan.memory.optimizer.adam_state_bytes(*, numel: 'int', state_dtype: 'Dtype') -> 'int'" in words(out)


def test_constants_and_their_sources_come_along(runner: CliRunner) -> None:
    out = run_cli(runner, "explain", "runtime/cuda_context", "--brief").stdout
    assert "CUDA_CONTEXT_BYTES = 512 * MiB" in out and "pytorch/pytorch PR #86509" in out
    assert "About memplan.memory.runtime" not in out  # --brief leaves the module notes out
    full = run_cli(runner, "explain", "runtime/cuda_context").stdout
    assert words(inspect.cleandoc(runtime.__doc__).splitlines()[0]) in words(full)


def test_topics_list_their_components(runner: CliRunner) -> None:
    out = run_cli(runner, "explain", "kv_cache").stdout
    assert "kv_cache.kv_cache_bytes" in out
    topic = render(explain("optimizer"))
    assert "optimizer/adam8bit_states" in topic and "About memplan.memory.optimizer" in topic
    listing = run_cli(runner, "explain", "--list").stdout
    assert all(name in listing for name in [*COMPONENTS, *TOPICS])


def test_unknown_component_exits_2_with_a_suggestion(runner: CliRunner) -> None:
    result = run_cli(runner, "explain", "optimizer/adam_n", code=2)
    assert "unknown component 'optimizer/adam_n'" in result.stderr and "optimizer/adam_m" in result.stderr
    assert result.stdout == ""


def test_version(runner: CliRunner) -> None:
    assert run_cli(runner, "--version").stdout.strip() == f"memplan {__version__}"
