"""llama.cpp's layer split over several GPUs (-sm layer, -ts), as src/llama-model.cpp ``load_tensors`` assigns
layers: layer il >= i_gpu_start = n_layer - ngl goes to the first GPU whose cumulative share exceeds
(il - i_gpu_start) / act_gpu_layers, act_gpu_layers = min(ngl, n_layer + 1); the output layer is il = n_layer."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli

from memplan.engines import llamacpp
from memplan.errors import MemplanError
from memplan.estimator import estimate
from memplan.memory.breakdown import Tier
from memplan.memory.context import Context

N_LAYER = 32  # Llama-3.1-8B


def _est(**kw: object):
    return estimate("llama-3.1-8b", "rtx-4090", job="infer", engine="llamacpp", quant="q4_k_m",
                    infer={"context": 8192}, **kw)


def _expected(shares: list[float], ngl: int) -> list[tuple[list[int], bool]]:
    start, act = max(N_LAYER - ngl, 0), min(ngl, N_LAYER + 1)
    points = [sum(shares[: i + 1]) / sum(shares) for i in range(len(shares))]
    out: list[tuple[list[int], bool]] = [([], False) for _ in shares]
    for il in range(start, N_LAYER + 1):
        if il - start >= act:
            continue
        d = next(i for i, p in enumerate(points) if p > (il - start) / act)
        layers, output = out[d]
        out[d] = ([*layers, il], True) if il == N_LAYER else ([*layers, il], output)
    return [([i for i in layers if i < N_LAYER], output) for layers, output in out]


@pytest.mark.parametrize(("shares", "ngl"), [([1, 1], 33), ([3, 1], 33), ([1, 1], 20), ([1, 2, 1], 33)])
def test_layers_go_where_llama_cpp_puts_them(shares: list[float], ngl: int) -> None:
    n = len(shares)
    est = _est(pp=n, gpus_per_node=n, serve={"tensor_split": tuple(float(s) for s in shares), "n_gpu_layers": ngl})
    got = [llamacpp.device_layers(est.config, N_LAYER, d) for d in range(n)]
    assert got == _expected(shares, ngl)


def test_each_gpu_holds_its_layers_weights_kv_and_context() -> None:
    one = _est()
    two = _est(pp=2, gpus_per_node=2)
    ctx = Context(two.arch, two.config, two.gpu, two.host)
    per_layer = llamacpp.kv_bytes_per_layer(ctx, 8192)
    parts = [llamacpp.device_layers(two.config, N_LAYER, d) for d in range(2)]
    weights = [llamacpp.model_buffers(ctx, layers, out)[0] for layers, out in parts]
    single = next(r.bytes for r in one.rows if r.component == "weights/llamacpp_gpu")
    assert sum(weights) == single  # the layer split moves whole tensors: nothing is duplicated or lost
    totals = []
    for stage in range(2):
        rows = llamacpp.rows(ctx.at_stage(stage))
        kv = next(r.bytes for r in rows if r.component == "kv_cache")
        assert kv == per_layer * len(parts[stage][0])
        totals.append(sum(r.bytes for r in rows if r.tier is Tier.GPU))
    assert two.total(Tier.GPU) == max(totals) < one.total(Tier.GPU)


def test_split_errors_are_one_sentence() -> None:
    with pytest.raises(MemplanError, match="-sm row"):
        _est(tp=2, gpus_per_node=2)
    with pytest.raises(MemplanError, match="2 proportions for 3 GPUs"):
        _est(pp=3, gpus_per_node=3, serve={"tensor_split": (1.0, 1.0)})
    with pytest.raises(MemplanError, match="moves no byte"):
        _est(serve={"tensor_split": (1.0,)})


def test_cli_tensor_split(runner) -> None:
    result = run_cli(runner, "estimate", "llama-3.1-8b", "--gpu", "rtx-4090", "--gpus", "2", "--pp", "2", "--job",
                     "infer", "--engine", "llamacpp", "--quant", "q4_k_m", "--tensor-split", "3,1", "--format", "json")
    kv = json.loads(result.stdout)["memory"]["gpu"]["components"]["kv_cache"]
    assert kv == 25 * 4096 * 2 * 8 * 128 * 2  # the fuller GPU: 25 of 32 layers' f16 K and V of 4,096 cells
    bad = run_cli(runner, "estimate", "llama-3.1-8b", "--gpus", "2", "--pp", "2", "--job", "infer", "--engine",
                  "llamacpp", "--quant", "q4_k_m", "--tensor-split", "a,b", code=2)
    assert "--tensor-split" in bad.stderr
