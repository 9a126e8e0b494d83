"""LoRA / QLoRA / DoRA adapter counts and bytes against hand-computed and published figures."""

from __future__ import annotations

import pytest

from memplan.arch.build import build_architecture
from memplan.arch.tensors import Role
from memplan.catalog.schema import Family, GpuSpec, HostSpec, ModelSpec
from memplan.config import Job, JobConfig, LoraConfig, OptimizerKind
from memplan.dtypes import Dtype
from memplan.errors import MemplanError
from memplan.memory import peft
from memplan.memory.breakdown import Tier, tier_total
from memplan.memory.context import Context
from memplan.units import GB

GPU = GpuSpec(name="test-80gb", vendor="nvidia", source="test", memory_mib=81559, marketed_memory_gb=80,
              bf16_dense_tflops=989.0, hbm_bandwidth_gbps=3350.0, interconnect_gbps=450.0, pcie_gen=5)

LLAMA_7B = ModelSpec(name="llama-7b", source="https://huggingface.co/huggyllama/llama-7b", family=Family.LLAMA,
                     hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     vocab_size=32000)
LLAMA_65B = LLAMA_7B.model_copy(update={"name": "llama-65b", "hidden_size": 8192, "intermediate_size": 22016,
                                        "num_hidden_layers": 80, "num_attention_heads": 64})
# D=64, F=96, N=4 heads, K=2 kv heads, H=16: q/o are 64×64, k/v are 32×64.
TINY = ModelSpec(name="tiny-llama", source="test", family=Family.LLAMA, hidden_size=64, intermediate_size=96,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
TINY_GPT2 = ModelSpec(name="tiny-gpt2", source="test", family=Family.GPT2, hidden_size=64, num_hidden_layers=2,
                      num_attention_heads=4, vocab_size=128, max_position_embeddings=32, tie_word_embeddings=True,
                      mlp_gated=False, norm="layernorm", hidden_act="gelu_new")
TINY_PHI3 = TINY.model_copy(update={"name": "tiny-phi3", "family": Family.PHI3})
TINY_MIXTRAL = TINY.model_copy(update={"name": "tiny-mixtral", "family": Family.MIXTRAL, "num_hidden_layers": 1,
                                       "num_experts": 4, "num_experts_per_tok": 2})
TINY_DEEPSEEK = ModelSpec(name="tiny-deepseek", source="test", family=Family.DEEPSEEK, hidden_size=64,
                          intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=4, vocab_size=128, num_experts=4, num_experts_per_tok=2,
                          n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=24, kv_lora_rank=16,
                          qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)


def count(spec: ModelSpec, **lora: object) -> int:
    return peft.lora_params(build_architecture(spec), LoraConfig(**lora))


def test_llama_7b_r8_q_v_is_the_famous_peft_printout() -> None:
    """peft's ``print_trainable_parameters`` for LLaMA-7B, r=8 on q_proj and v_proj, as printed in
    alpaca-lora and LLaMA-Factory training logs: 'trainable params: 4194304 || all params: 6742609920'.
    32 layers × 2 modules × 8 × (4096 + 4096); all params = the base 6,738,415,616 + the adapters."""
    lora = count(LLAMA_7B, rank=8, targets=("q", "v"))
    assert lora == 4_194_304
    assert build_architecture(LLAMA_7B).params + lora == 6_742_609_920


def test_qlora_65b_r64_all_linear() -> None:
    """QLoRA (Dettmers et al. 2023, Sec. 4): r=64 on all linear layers of LLaMA-65B (D=8192, F=22016):
    per layer 4 × 64·(8192 + 8192) + 3 × 64·(8192 + 22016) = 9,994,240; × 80 layers."""
    assert count(LLAMA_65B, rank=64, targets=("all-linear",)) == 80 * 9_994_240 == 799_539_200


def test_qlora_65b_model_states_fit_48gb() -> None:
    """QLoRA abstract: a 65B model fine-tunes on one 48 GB GPU. NF4 + double-quant weights are 33.7 GB
    (published_cases.yaml qlora-nf4-double-quant-bits); the adapters add bf16 weights and gradients and
    fp32 paged-AdamW states: 799,539,200 × (2 + 2 + 8) bytes = 9.59 GB, leaving ~4.7 GB for
    checkpointed activations."""
    arch = build_architecture(LLAMA_65B)
    cfg = JobConfig(job=Job.QLORA, quant="nf4", lora=LoraConfig(rank=64, targets=("all-linear",)))
    rows = {b.component: b.nbytes for b in peft.adapter_buffers(Context(arch, cfg, GPU, HostSpec()))}
    assert rows == {"weights/lora_adapters": 1_599_078_400, "gradients/lora_adapters": 1_599_078_400,
                    "optimizer/adam_m": 3_198_156_800, "optimizer/adam_v": 3_198_156_800}
    total = sum(rows.values()) + int(33.7 * GB)
    assert 43 * GB < total < 48 * GB


def test_qlora_65b_rows_end_to_end_leave_room_on_48gb() -> None:
    """The same job through ``rows``: NF4 base (weights module, 34.46 GB with bf16 embeddings and head)
    plus the adapters' 9.59 GB is 44.05 GB of model states, under the 48 GB the QLoRA paper used."""
    arch = build_architecture(LLAMA_65B)
    cfg = JobConfig(job=Job.QLORA, lora=LoraConfig(rank=64, targets=("all-linear",)))
    got = tier_total(peft.rows(Context(arch, cfg, GPU, HostSpec())), Tier.GPU)
    assert 44.0 * GB < got < 44.1 * GB


def test_tiny_llama_hand_count_and_shapes() -> None:
    """r=4: q 4·(64+64)=512, k 4·(64+32)=384, v 384, o 512 → 1792 per layer, 2 layers."""
    assert count(TINY, rank=4, targets=("q", "k", "v", "o")) == 3584
    adapters = peft.lora_tensors(build_architecture(TINY), LoraConfig(rank=4, targets=("k",)))
    assert [(t.name, t.shape) for t in adapters[:2]] == [
        ("self_attn.k_proj.lora_A.weight", (4, 64)), ("self_attn.k_proj.lora_B.weight", (32, 4))]
    assert all(t.role is Role.OTHER for t in adapters)


def test_tiny_llama_all_linear_excludes_lm_head_and_embeddings() -> None:
    """all-linear: q,k,v,o (1792) + gate, up 4·(64+96) each, down 4·(96+64) = 1920 → 3712 per layer."""
    assert count(TINY, rank=4, targets=("all-linear",)) == 2 * 3712
    assert count(TINY, rank=4, targets=("q", "k", "v", "o", "gate", "up", "down")) == 2 * 3712


def test_dora_adds_one_magnitude_per_output_feature() -> None:
    """DoRA (Liu et al. 2024) magnitude vector: q 64 + v 32 outputs per layer on top of LoRA's 512 + 384."""
    assert count(TINY, rank=4, targets=("q", "v"), dora=True) == 2 * (512 + 384 + 64 + 32)
    assert peft.lora_module_params(rank=4, in_features=64, out_features=32, dora=True) == 384 + 32


def test_fused_modules_are_adapted_whole() -> None:
    """GPT-2's c_attn (D → 3D) is one Conv1D: targeting q adapts it all, 4·(64 + 192) = 1024;
    Phi-3's gate_up_proj (D → 2F): 4·(64 + 192) = 1024."""
    assert count(TINY_GPT2, rank=4, targets=("q",)) == 2 * 1024
    assert count(TINY_GPT2, rank=4, targets=("q", "v")) == 2 * 1024
    assert count(TINY_PHI3, rank=4, targets=("gate",)) == 2 * 1024


def test_mixtral_all_linear_fuses_expert_gate_up_with_rank_2r() -> None:
    """peft on transformers 5 (measured, see test_measure_peft): per expert gate_up A 2r×D, B 2F×2r and
    down A r×F, B D×r: 8·64 + 192·8 + 4·96 + 64·4 = 2688; 4 experts; router 4·(64 + 4) = 272;
    attention 1792."""
    assert count(TINY_MIXTRAL, rank=4, targets=("all-linear",)) == 4 * 2688 + 272 + 1792
    assert count(TINY_MIXTRAL, rank=4, targets=("gate", "up", "down")) == 4 * 2688


def test_mixtral_half_of_a_fused_pair_or_dora_on_experts_is_rejected() -> None:
    with pytest.raises(MemplanError, match="gate_up_proj"):
        count(TINY_MIXTRAL, rank=4, targets=("gate",))
    with pytest.raises(MemplanError, match="ParamWrapper"):
        count(TINY_MIXTRAL, rank=4, targets=("all-linear",), dora=True)
    assert count(TINY_MIXTRAL, rank=4, targets=("q", "v"), dora=True) == 512 + 384 + 64 + 32


def test_deepseek_dense_and_shared_mlps_get_no_adapter() -> None:
    """peft remaps gate_proj/up_proj/down_proj to the fused experts on Qwen2-MoE-style models, so the dense
    layer 0 and the shared experts get none: only layer 1's 4 experts, each 8·64 + 64·8 + 4·32 + 64·4."""
    assert count(TINY_DEEPSEEK, rank=4, targets=("gate", "up", "down")) == 4 * (512 + 512 + 128 + 256)


def test_unknown_target_suggests_a_name() -> None:
    with pytest.raises(MemplanError, match="Did you mean q"):
        count(TINY, targets=("qq",))
    with pytest.raises(MemplanError, match="alone"):
        count(TINY, targets=("all-linear", "q"))


def test_pipeline_stages_partition_the_adapters() -> None:
    arch, lora = build_architecture(LLAMA_7B), LoraConfig(rank=8, targets=("all-linear",))
    stages = [peft.stage_lora_tensors(arch, lora, pp=3, stage=s) for s in range(3)]
    assert sum(t.numel for s in stages for t in s) == peft.lora_params(arch, lora)
    assert [len(s) for s in stages] == [2 * 7 * 11, 2 * 7 * 11, 2 * 7 * 10]


def test_expert_parallel_divides_routed_adapters_only() -> None:
    adapters = peft.lora_tensors(build_architecture(TINY_MIXTRAL), LoraConfig(rank=4, targets=("all-linear",)))
    local = peft.per_rank(adapters, ep=2)
    assert sum(t.numel for t in local) == 2 * 2688 + 272 + 1792


def lora_ctx(spec: ModelSpec = TINY, **cfg: object) -> Context:
    return Context(build_architecture(spec), JobConfig(**cfg), GPU, HostSpec())


def test_adapter_states_follow_peft_and_trainer_defaults() -> None:
    """fp32 adapters (peft's autocast default) with torch AdamW: fp32 states, no master copy.
    bf16 adapters: bf16 states (zeros_like), unless QLoRA's paged_adamw_32bit (fp32) or an explicit master."""
    fp32 = JobConfig(job=Job.LORA, lora=LoraConfig(dtype=Dtype.FP32))
    assert peft.adapter_state_dtype(fp32) is Dtype.FP32 and not peft.adapter_master_weights(fp32)
    assert JobConfig(job=Job.LORA).lora.dtype is Dtype.FP32, "LoRA adapters default to peft's fp32"
    assert JobConfig(job=Job.QLORA).lora.dtype is Dtype.BF16, "QLoRA adapters default to bf16 (qlora.py)"
    assert peft.adapter_state_dtype(JobConfig(job=Job.LORA, lora=LoraConfig(dtype=Dtype.BF16))) is Dtype.BF16
    assert peft.adapter_state_dtype(JobConfig(job=Job.QLORA)) is Dtype.FP32
    master = JobConfig(job=Job.LORA, master_weights=True, lora=LoraConfig(dtype=Dtype.BF16))
    assert peft.adapter_master_weights(master) and peft.adapter_state_dtype(master) is Dtype.FP32


def test_adapter_buffers_bytes_and_paging() -> None:
    """TINY, r=16 on q,k,v,o: 2 × 16·(128+96+96+128) = 14,336 params; bf16 weights and grads 28,672 B each."""
    ctx = lora_ctx(job=Job.LORA, optimizer=OptimizerKind.ADAMW_8BIT,
                   lora=LoraConfig(paged_optimizer=True, dtype=Dtype.BF16))
    bufs = {b.component: b for b in peft.adapter_buffers(ctx)}
    assert bufs["weights/lora_adapters"].nbytes == bufs["gradients/lora_adapters"].nbytes == 28_672
    assert bufs["optimizer/adam8bit_states"].tier is Tier.CPU
    # 16 adapter tensors of 1024-2048 elements, all below bitsandbytes' min_8bit_size: fp32 states.
    assert bufs["optimizer/adam8bit_states"].nbytes == 14_336 * 8


def test_dora_workspace_formula() -> None:
    """in=4096, out=11008, fp32 adapters, bf16 compute, 4-bit base: 4096² · 4 + 11008·4096 · (4 + 2 + 2 + 2)."""
    got = peft.dora_workspace_bytes(in_features=4096, out_features=11008, adapter_dtype=Dtype.FP32,
                                    compute_dtype=Dtype.BF16, dequantized=True)
    assert got == 4096 * 4096 * 4 + 11008 * 4096 * 10


def test_rows_include_frozen_weights_and_adapters() -> None:
    ctx = lora_ctx(job=Job.LORA, lora=LoraConfig(dora=True))
    names = {r.component for r in peft.rows(ctx)}
    assert {"weights/lora_adapters", "gradients/lora_adapters", "runtime/dora_workspace"} <= names


def test_params_only_models_cannot_take_adapters() -> None:
    spec = ModelSpec(name="params:7B", source="test", family=Family.PARAMS_ONLY, published_params=7 * 10**9)
    with pytest.raises(MemplanError, match="params:N"):
        count(spec)
