"""Context parallelism (``--cp``, ``--cp-comm``): the per-rank activation split, the key/value exchange buffers,
the engine and shape rules, the communication terms of the step time, and the planner's cp dimension.

Expected values are independent arithmetic written here (Korthikanti et al. 2022's per-layer closed form at
s/cp; the exchange buffers counted from the engine sources named in ``memory.context_parallel``; the alpha-beta
collective formula), never a number memplan printed.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from memplan.catalog.schema import ModelSpec
from memplan.catalog.store import catalog_gpu, catalog_model
from memplan.config import CpComm, JobConfig
from memplan.errors import MemplanError
from memplan.estimator import estimate

H100 = "h100-sxm-80gb"
KORTHIKANTI_SBH = 34
"""Korthikanti et al. 2022, Eq. 1: 34·s·b·h bytes per layer without the s² scores (flash), split by t with
sequence parallelism (Table 2)."""


def gpt(hidden: int = 4096, heads: int = 32, layers: int = 8, vocab: int = 51200) -> ModelSpec:
    return ModelSpec(name=f"gpt-h{hidden}", source="test", family="gpt2", hidden_size=hidden,
                     intermediate_size=4 * hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     vocab_size=vocab, max_position_embeddings=2**20, hidden_act="gelu", mlp_gated=False,
                     norm="layernorm", attention_bias=True, mlp_bias=True)


def rows(spec: ModelSpec, **cfg) -> dict[str, int]:
    est = estimate(spec, catalog_gpu(H100), JobConfig(**cfg))
    return {r.component: r.bytes for r in est.rows}


MEGATRON = {"job": "pretrain", "engine": "megatron", "gpus_per_node": 8, "tp": 2, "sequence_parallel": True,
            "activation_accounting": "paper", "dropout": True}


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_layer_activations_hold_s_over_cp_tokens(cp: int) -> None:
    """Korthikanti's 34·s·b·h/t per layer (flash: no scores) with s/cp tokens per rank; the fp32 logits of the
    loss 4·s·b·v/t (Sec. 4.3) with s/cp too."""
    s, b, h, t, layers, v = 16384, 1, 4096, 2, 8, 51200
    got = rows(gpt(h, 32, layers, v), **MEGATRON, cp=cp, seq_len=s)
    local = s // cp
    assert got["activations/layers"] == layers * KORTHIKANTI_SBH * local * b * h // t
    assert got["activations/loss"] == 4 * local * b * v // t


def test_ring_exchange_buffers_on_megatron() -> None:
    """TransformerEngine's ring forward keeps cp KV blocks, cp partial outputs and cp fp32 lse per attention
    (AttnFuncWithCPAndKVP2P): gpt h4096, 32 heads of 128, tp 2 → 16 heads per rank; s = 16384, cp 4 → 4096 tokens."""
    tokens, heads, hd, cp = 4096, 16, 128, 4
    kv = tokens * 2 * heads * hd * 2
    out = tokens * heads * hd * 2
    lse = tokens * heads * 4
    backward = 4 * kv + tokens * heads * hd * 2
    got = rows(gpt(), **MEGATRON, cp=cp, seq_len=16384)
    assert got["activations/cp_exchange"] == max(cp * (kv + out + lse), backward)


def test_ulysses_exchange_buffers_with_gqa() -> None:
    """Ulysses copies q, k, v into all-to-all inputs and receives them into new outputs: 2·(q + k + v) of the local
    chunk. llama-3.1-8b: 32 query and 8 key/value heads of 128, tp 1, cp 4 at s = 32768 → 8192 tokens."""
    tokens, q_heads, kv_heads, hd = 8192, 32, 8, 128
    q, kv = tokens * q_heads * hd * 2, tokens * 2 * kv_heads * hd * 2
    got = rows(catalog_model("llama-3.1-8b"), job="pretrain", engine="megatron", gpus_per_node=4, cp=4,
               cp_comm="ulysses", seq_len=32768)
    assert got["activations/cp_exchange"] == 2 * (q + kv)


def test_allgather_exchange_holds_the_whole_sequence_kv_and_its_gradient() -> None:
    tokens, kv_heads, hd, cp = 8192, 8, 128, 4
    kv = tokens * 2 * kv_heads * hd * 2
    got = rows(catalog_model("llama-3.1-8b"), job="pretrain", engine="megatron", gpus_per_node=4, cp=cp,
               cp_comm="allgather", seq_len=32768)
    assert got["activations/cp_exchange"] == 2 * cp * kv


def test_states_are_sharded_over_data_and_context_ranks() -> None:
    """Megatron's distributed optimizer shards over dp × cp (get_data_parallel_group(with_context_parallel=True)):
    8 GPUs as cp 8 shard the fp32 states 8 ways, exactly as 8 data-parallel ranks do."""
    spec = catalog_model("llama-3.1-8b")
    base = {"job": "pretrain", "engine": "megatron", "gpus_per_node": 8, "seq_len": 8192,
            "engine_config": {"use_distributed_optimizer": True}}
    with_cp = rows(spec, **base, cp=8)
    with_dp = rows(spec, **base)
    states = [k for k in with_dp if k.startswith(("optimizer", "weights", "gradients"))]
    assert states and all(with_cp[k] == with_dp[k] for k in states)
    assert JobConfig(**base, cp=8).batch_dp == 1 and JobConfig(**base, cp=8).dp == 8


def test_cp_one_is_the_default_layout() -> None:
    """cp = 1 (and the default ring named explicitly) changes no row of an estimate."""
    spec = catalog_model("llama-3.1-8b")
    base = {"job": "pretrain", "engine": "fsdp2", "gpus_per_node": 8, "seq_len": 4096}
    assert rows(spec, **base) == rows(spec, **base, cp=1)


@pytest.mark.parametrize("cfg, words", [
    ({"engine": "fsdp2", "cp_comm": "ulysses"}, "engine fsdp2 has context parallelism with ring/allgather only"),
    ({"engine": "deepspeed", "cp_comm": "ring"}, "engine deepspeed has context parallelism with ulysses only"),
    ({"engine": "pytorch"}, "engine pytorch has none"),
    ({"engine": "megatron", "attention": "eager"}, "eager attention has none"),
])
def test_engines_run_only_their_exchanges(cfg: dict, words: str) -> None:
    from memplan.engines.rules import violation

    reason = violation(JobConfig(job="pretrain", gpus_per_node=8, cp=2, seq_len=8192, **cfg))
    assert reason is not None and words in reason


def test_megatron_aliases_name_the_same_exchange() -> None:
    assert [CpComm(x) for x in ("p2p", "a2a", "allgather")] == [CpComm.RING, CpComm.ULYSSES, CpComm.ALLGATHER]


def test_sequence_must_split_into_two_chunks_per_rank() -> None:
    """Megatron's load balancing cuts the sequence into 2·cp chunks (get_batch_on_this_cp_rank)."""
    with pytest.raises(MemplanError, match="multiple of 8 with --cp 4"):
        rows(catalog_model("llama-3.1-8b"), job="pretrain", engine="megatron", gpus_per_node=4, cp=4, seq_len=8196)


def test_cp_comm_without_cp_is_an_error() -> None:
    with pytest.raises(ValueError, match="applies with context parallelism"):
        JobConfig(job="pretrain", cp_comm="ulysses")


def _cli(*args: str) -> subprocess.CompletedProcess:
    code = "import sys; from memplan.cli.app import main; sys.argv[0] = 'memplan'; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)


def test_ulysses_head_divisibility_is_one_sentence_exit_2() -> None:
    """qwen2.5-0.5b has 14 query and 2 key/value heads: Ulysses over 4 ranks cannot scatter them."""
    res = _cli("estimate", "qwen2.5-0.5b", "--job", "pretrain", "--engine", "megatron", "--gpus", "4", "--cp", "4",
               "--cp-comm", "ulysses", "--seq-len", "8192")
    assert res.returncode == 2
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "ulysses scatters attention heads" in lines[0] and "Traceback" not in res.stderr


def test_ring_traffic_hides_behind_long_attention_but_ulysses_pays_its_all_to_alls() -> None:
    """Per layer and micro-batch: the ring's cp − 1 KV sends hide behind cp attention steps when each step is
    longer than a send; Ulysses' all-to-alls are on the critical path: 2 directions × (a2a(q + kv) + a2a(out)),
    a2a(n bytes) = (cp − 1)/cp · n / bw + (cp − 1)·α (alpha-beta ring, nccl-tests busbw)."""
    from memplan.planner.steptime import cp_layer_seconds, links

    spec, gpu = catalog_model("llama-3.1-8b"), catalog_gpu(H100)
    from memplan.arch.build import build_architecture

    arch = build_architecture(spec)
    ring = JobConfig(job="pretrain", engine="megatron", gpus_per_node=8, cp=8, seq_len=131072)
    assert cp_layer_seconds(arch, gpu, ring, core_s=1.0) == 0.0
    uly = ring.model_copy(update={"cp_comm": CpComm.ULYSSES})
    link = links(gpu, uly)
    tokens, cp = 131072 // 8, 8
    q, kv, out = tokens * 32 * 128 * 2, tokens * 2 * 8 * 128 * 2, tokens * 32 * 128 * 2

    def a2a(n: int) -> float:
        return (cp - 1) / cp * n / link.intra_bw + (cp - 1) * link.intra_lat

    assert cp_layer_seconds(arch, gpu, uly, core_s=1.0) == pytest.approx(2 * (a2a(q + kv) + a2a(out)))


def test_micro_batches_count_replicas_not_context_ranks() -> None:
    """16 GPUs as dp 4 × cp 4: a global batch of 32 sequences is 8 micro-batches per replica."""
    from memplan.planner.steptime import global_batch_of, micro_batches

    cfg = JobConfig(job="pretrain", engine="megatron", gpus_per_node=8, nodes=2, cp=4, seq_len=8192, grad_accum=8)
    assert micro_batches(cfg, 32) == 8 and global_batch_of(cfg) == 32


def test_plan_picks_context_parallelism_when_one_gpu_cannot_hold_the_sequence() -> None:
    """llama-3.2-1b at 256k tokens on 4 GPUs, tp = pp = 1: the fp32 loss of one sequence alone (4·s·V bytes,
    262,144 × 128,256 × 4 = 125 GiB) exceeds an H100, so only a cp that splits it fits."""
    spec = catalog_model("llama-3.2-1b")
    assert 4 * 262144 * spec.vocab_size > catalog_gpu(H100).memory_bytes
    res = _cli("plan", "llama-3.2-1b", "--job", "pretrain", "--engine", "megatron", "--gpus", "4", "--tp", "1",
               "--pp", "1", "--cp", "1,2,4", "--seq-len", "262144", "--global-batch", "4", "--format", "json")
    assert res.returncode == 0, res.stderr
    best = json.loads(res.stdout)["best"]["config"]
    assert best["cp"] in (2, 4)


def test_allgather_exposes_its_gathers_and_reduce_scatter() -> None:
    """TransformerEngine's all-gather CP (Llama 3's, Dubey et al. 2024, Sec. 3.3.2: "exposed in the critical path"):
    forward one all-gather of the whole sequence's K/V, backward another and a reduce-scatter of dK/dV;
    (cp − 1)/cp · bytes / bw + (cp − 1)·α each, inter-node when tp·cp exceeds a node (tp 1, cp 16 on 8-GPU nodes)."""
    from memplan.arch.build import build_architecture
    from memplan.planner.steptime import cp_layer_split, links

    gpu = catalog_gpu(H100)
    arch = build_architecture(catalog_model("llama-3.1-8b"))
    cfg = JobConfig(job="pretrain", engine="megatron", gpus_per_node=8, nodes=2, cp=16, cp_comm="allgather",
                    seq_len=131072)
    link, cp = links(gpu, cfg), 16
    total_kv = 131072 * 2 * 8 * 128 * 2
    one = (cp - 1) / cp * total_kv / link.inter_bw + (cp - 1) * link.inter_lat
    forward, backward = cp_layer_split(arch, gpu, cfg, core_s=1.0)
    assert forward == pytest.approx(one) and backward == pytest.approx(2 * one)


def test_torch_ring_exchange_on_fsdp2() -> None:
    """torch ``context_parallel`` (``_templated_ring_attention``): forward the current and next KV plus the fp32
    merged output and lse; backward the rotating KV, fp32 dq/dk/dv accumulators and the rotating fp32 dKV:
    2·kv + 2·q + 4·kv. llama-3.1-8b, cp 4 at s = 32768 → 8192 tokens, 32 query and 8 key/value heads of 128."""
    tokens = 8192
    kv, q, out, lse = tokens * 2 * 8 * 128 * 2, tokens * 32 * 128 * 2, tokens * 32 * 128 * 2, tokens * 32 * 4
    got = rows(catalog_model("llama-3.1-8b"), job="pretrain", engine="fsdp2", gpus_per_node=4, cp=4, seq_len=32768)
    assert got["activations/cp_exchange"] == max(2 * kv + 2 * out + lse, 6 * kv + 2 * q)


def test_deepspeed_ulysses_needs_only_cp_chunks() -> None:
    """DeepSpeed-Ulysses splits the sequence into cp chunks (no causal load balancing): 8196 = 4 · 2049 runs with
    cp 4, where Megatron's 2·cp chunks would need a multiple of 8."""
    spec = catalog_model("llama-3.1-8b")
    got = rows(spec, job="pretrain", engine="deepspeed", gpus_per_node=4, cp=4, cp_comm="ulysses", seq_len=8196)
    assert got["activations/cp_exchange"] > 0


def test_plan_chooses_among_exchanges_and_rejects_an_exchange_without_cp() -> None:
    from memplan.planner.dims import cp_bases
    from memplan.planner.space import SearchSpace

    base = JobConfig(job="pretrain", engine="megatron", gpus_per_node=8, seq_len=65536)
    excluded: list[str] = []
    got = cp_bases([base], SearchSpace(cp=(1, 3, 4), cp_comm=(CpComm.RING, CpComm.ULYSSES)), excluded)
    assert [(b.cp, b.cp_comm) for b in got] == [(1, CpComm.RING), (4, CpComm.RING), (4, CpComm.ULYSSES)]
    assert excluded == ["cp=3 does not divide the 8 GPUs"]
    with pytest.raises(MemplanError, match="with --cp 1 there are none"):
        cp_bases([base], SearchSpace(cp_comm=(CpComm.ULYSSES,)), [])
