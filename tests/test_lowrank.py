"""GaLore / APOLLO optimizer-state, projection and gradient bytes against the papers and their code."""

from __future__ import annotations

import pytest

from memplan.arch.build import build_architecture
from memplan.arch.tensors import Role, Tensor
from memplan.catalog.schema import Family, GpuSpec, HostSpec, ModelSpec
from memplan.config import GaloreConfig, Job, JobConfig
from memplan.dtypes import Dtype
from memplan.errors import MemplanError
from memplan.memory import lowrank as lr
from memplan.memory import optimizer as opt
from memplan.memory.breakdown import Tier, components
from memplan.memory.context import Context
from memplan.units import GB

GPU = GpuSpec(name="rtx-4090-test", vendor="nvidia", source="test", memory_mib=24564, marketed_memory_gb=24,
              bf16_dense_tflops=165.2, hbm_bandwidth_gbps=1008.0, interconnect_gbps=32.0, pcie_gen=4)
LLAMA_7B = ModelSpec(name="llama-7b", source="GaLore App. C Table 5 / huggyllama/llama-7b", family=Family.LLAMA,
                     hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     vocab_size=32000)
UP = Tensor("mlp.up_proj.weight", (11008, 4096), Role.LINEAR, frozenset({"up"}))
DOWN = Tensor("mlp.down_proj.weight", (4096, 11008), Role.LINEAR, frozenset({"down"}))


def test_galore_table1_memory_is_mr_plus_2nr() -> None:
    """GaLore Table 1: for W ∈ R^{m×n}, m ≤ n, optimizer memory is mr + 2nr (P plus two r × n states),
    whichever way round the matrix is stored (galore_torch ``proj_type='std'``). m=4096, n=11008, r=128."""
    m, n, r = 4096, 11008, 128
    for t in (UP, DOWN):
        states = lr.lowrank_state_bytes([t], rank=r, state_dtype=Dtype.BF16, eight_bit=False)
        proj = lr.projection_bytes([t], rank=r, dtype=Dtype.BF16)
        assert states == 2 * n * r * 2
        assert proj == m * r * 2
        assert (states + proj) // 2 == m * r + 2 * n * r


def test_rank_is_capped_by_the_smaller_side() -> None:
    square = Tensor("self_attn.q_proj.weight", (64, 64), Role.LINEAR, frozenset({"q"}))
    assert lr.lowrank_state_numel(rank=1024, rows=64, cols=64) == 64 * 64
    assert lr.projection_bytes([square], rank=1024, dtype=Dtype.FP32) == 64 * 64 * 4


def test_eight_bit_states_use_bitsandbytes_blocks_and_small_fallback() -> None:
    """r=1024 on up_proj: 1024·11008 = 11,272,192 elements ≥ 4096: 2 × (n + ceil(n/256)·4) bytes.
    r=1 on a 64 × 64 matrix: 64 elements < min_8bit_size: two fp32 states."""
    n = 1024 * 11008
    assert lr.lowrank_state_bytes([UP], rank=1024, state_dtype=Dtype.BF16, eight_bit=True) == 2 * (n + n // 256 * 4)
    small = Tensor("self_attn.q_proj.weight", (64, 64), Role.LINEAR, frozenset({"q"}))
    assert lr.lowrank_state_bytes([small], rank=1, state_dtype=Dtype.BF16, eight_bit=True) == 2 * 64 * 4


def test_only_dense_attention_and_mlp_matrices_are_projected() -> None:
    embed = Tensor("model.embed_tokens.weight", (32000, 4096), Role.EMBEDDING)
    head = Tensor("lm_head.weight", (32000, 4096), Role.LM_HEAD)
    router = Tensor("mlp.gate.weight", (8, 4096), Role.ROUTER)
    experts = Tensor("mlp.experts.*.up_proj.weight", (1408, 4096), Role.LINEAR, frozenset({"up"}), 8, True)
    norm = Tensor("input_layernorm.weight", (4096,), Role.NORM)
    assert [lr.is_projected(t) for t in (embed, head, router, experts, norm, UP)] == [False] * 5 + [True]


def test_apollo_mini_is_rank_one_with_a_limiter_scalar() -> None:
    """APOLLO-Mini: rank 1 whatever galore.rank says; states 2 · max(m, n) plus one norm-limiter scalar."""
    assert lr.variant_rank(GaloreConfig(rank=256, variant="apollo-mini")) == 1
    got = lr.lowrank_state_bytes([UP], rank=1, state_dtype=Dtype.BF16, eight_bit=False, apollo=True)
    assert got == (2 * 11008 + 1) * 2


def test_per_layer_updates_hold_one_gradient() -> None:
    tensors = build_architecture(LLAMA_7B).all_tensors()
    assert lr.gradient_bytes(tensors, grad_dtype=Dtype.BF16, per_layer_updates=True) == 32000 * 4096 * 2
    assert lr.gradient_bytes(tensors, grad_dtype=Dtype.BF16, per_layer_updates=False) == 6_738_415_616 * 2


def test_svd_workspace_formula() -> None:
    """bf16 11008 × 4096 gradient: fp32 copy + U (11008 × 4096) + S (4096) + Vh (4096 × 4096), fp32."""
    got = lr.svd_workspace_bytes(rows=11008, cols=4096, dtype=Dtype.BF16)
    assert got == 4 * (2 * 11008 * 4096 + 4096 + 4096 * 4096)


def _llama7b_states(*, rank: int, eight_bit: bool) -> int:
    """Optimizer bytes of LLaMA-7B GaLore in pure bf16: low-rank states, projections, plain AdamW elsewhere."""
    tensors = build_architecture(LLAMA_7B).all_tensors()
    regular = [t for t in tensors if not lr.is_projected(t)]
    states = lr.lowrank_state_bytes(tensors, rank=rank, state_dtype=Dtype.BF16, eight_bit=eight_bit)
    proj = lr.projection_bytes(tensors, rank=rank, dtype=Dtype.BF16)
    if eight_bit:
        plain = sum(opt.adam8bit_state_bytes(numel=t.numel) for t in regular)
    else:
        plain = sum(opt.adam_state_bytes(numel=t.numel, state_dtype=Dtype.BF16) for t in regular)
    return states + proj + plain


def test_galore_7b_rank_1024_optimizer_reduction_matches_abstract() -> None:
    """GaLore abstract: 'reduces memory usage by up to 65.5% in optimizer states' against BF16 Adam
    (2 × 2 bytes/param). With rank 1024 (the paper's and README's 7B setting) memplan gives 65.1%,
    counting the bf16 projection matrices as optimizer state, as Table 1 does."""
    baseline = 2 * 2 * build_architecture(LLAMA_7B).params
    reduction = 1 - _llama7b_states(rank=1024, eight_bit=False) / baseline
    assert reduction == pytest.approx(0.655, abs=0.01)


def test_8bit_galore_7b_total_reduction_matches_abstract() -> None:
    """GaLore abstract: 8-bit GaLore cuts total training memory by 63.3% against the BF16 baseline, which
    Sec. 1 puts at 58 GB (14 GB weights, 42 GB states and gradients, 2 GB activations).
    memplan: 13.48 GB bf16 weights + 5.70 GB 8-bit states with projections + 0.26 GB for the one live
    gradient (per-layer updates: the 32000 × 4096 embedding) + the paper's 2 GB activations = 21.44 GB,
    a 63.0% cut.
    Not reproduced: '8-bit GaLore reduces optimizer memory by up to 82.5%'. At rank 1024 memplan gets
    78.9% with the bf16 projections counted (85.8% without them); the paper names neither the rank nor
    whether P is counted for that figure, so it is not asserted."""
    arch = build_architecture(LLAMA_7B)
    grads = lr.gradient_bytes(arch.all_tensors(), grad_dtype=Dtype.BF16, per_layer_updates=True)
    total = 2 * arch.params + _llama7b_states(rank=1024, eight_bit=True) + grads + 2 * GB
    assert 1 - total / (58 * GB) == pytest.approx(0.633, abs=0.01)
    eight_bit_cut = 1 - _llama7b_states(rank=1024, eight_bit=True) / (4 * arch.params)
    assert eight_bit_cut == pytest.approx(0.789, abs=0.001)


def galore_ctx(spec: ModelSpec = LLAMA_7B, **cfg: object) -> Context:
    return Context(build_architecture(spec), JobConfig(job=Job.GALORE, **cfg), GPU, HostSpec())


def test_8bit_galore_7b_rows_fit_the_readme_24gb_run() -> None:
    """GaLore README: 'LLaMA-7B, 8-bit GaLore-Adam, single GPU, activation checkpointing, bsz=16, 22.8G'
    (rank 1024, bf16, --optimizer galore_adamw8bit_per_layer, RTX 4090). memplan's non-activation rows:
    weights 13.48 GB, one gradient 0.26 GB, low-rank 8-bit states 3.29 GB, projections 1.88 GB,
    8-bit AdamW for embeddings/head/norms 0.53 GB, step workspace 0.43 GB: 19.87 GB. The README's
    remaining ~3 GB ('G' unspecified; 22.8 GB or GiB) is checkpointed activations at batch 16, the logits
    and the CUDA context, which other components model."""
    ctx = galore_ctx(galore=GaloreConfig(rank=1024, eight_bit=True, per_layer_updates=True))
    got = components(lr.rows(ctx), Tier.GPU)
    assert got["gradients"] == 32000 * 4096 * 2
    assert got["optimizer/lowrank_projection"] == 939_524_096 * 2
    total = sum(got.values())
    assert 19.8 * GB < total < 19.9 * GB < 22.8 * GB


def test_without_per_layer_updates_all_gradients_are_held() -> None:
    ctx = galore_ctx(galore=GaloreConfig(rank=1024, per_layer_updates=False))
    assert components(lr.rows(ctx), Tier.GPU)["gradients"] == 6_738_415_616 * 2


def test_per_layer_updates_on_several_gpus_is_rejected() -> None:
    with pytest.raises(MemplanError, match="one GPU"):
        lr.rows(galore_ctx(gpus_per_node=2))
    with pytest.raises(MemplanError, match="apollo"):
        lr.rows(galore_ctx(galore=GaloreConfig(variant="apolo")))


def test_params_only_models_are_rejected() -> None:
    spec = ModelSpec(name="params:7B", source="test", family=Family.PARAMS_ONLY, published_params=7 * 10**9)
    with pytest.raises(MemplanError, match="params:N"):
        lr.rows(galore_ctx(spec))
