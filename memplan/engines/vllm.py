"""vLLM: the memory budget, the KV pool it leaves, and the capacity that pool gives.

vLLM sizes its KV cache by subtraction (vllm/v1/worker/gpu_worker.py ``Worker.determine_available_memory``,
with ``memory_profiling`` in vllm/utils/mem_utils.py, formerly vllm/utils.py, introduced by
vllm-project/vllm PR #10511):

    requested = gpu_memory_utilization × total GPU memory
    available_kv_cache_memory = requested − (weights + torch activation peak + non-torch memory)

The terms live in smaller modules, and every name is importable from here: ``vllm_budget`` (the budget, scheduler
defaults, non-torch memory, release switches, KV page size, ``max_model_len``), ``vllm_peak`` (the profile run's
torch peak and the CUDA graphs), ``vllm_pool`` (the KV pool, its blocks and capacity; ``pool``, ``stage_capacity``).
This module adds the rows, the start-up summary and the capacity of an estimate.
"""

from __future__ import annotations

from memplan.arch.tensors import Architecture
from memplan.catalog.schema import GpuSpec, HostSpec
from memplan.config import JobConfig
from memplan.engines.vllm_budget import (
    ABSOLUTE_NON_TORCH_RELEASES,
    LARGE_GPU_BYTES,
    NON_TORCH_TP1_BYTES,
    NON_TORCH_TP_BYTES,
    SERVE_BATCHED_TOKENS,
    SERVE_MAX_NUM_SEQS,
    SUPPORTED_KV_DTYPES,
    budget_bytes,
    check_kv_dtype,
    counts_context,
    kv_dtype,
    large_gpu,
    max_model_len,
    non_torch_bytes,
    page_bytes_per_token,
    release,
    scheduler_defaults,
    subtracts_cudagraphs,
)
from memplan.engines.vllm_peak import (
    ALLREDUCES_PER_LAYER,
    MAX_CAPTURE_SIZE,
    SAMPLER_FP32_COPIES,
    activation_peak_bytes,
    capture_sizes,
    cudagraph_bytes,
    legacy_allreduce_bytes,
    sampler_bytes,
)
from memplan.engines.vllm_pool import Pool, pool, stage_capacity
from memplan.errors import MemplanError
from memplan.memory import weights
from memplan.memory.breakdown import Row, Tier
from memplan.memory.context import Context

__all__ = [
    "ABSOLUTE_NON_TORCH_RELEASES",
    "ALLREDUCES_PER_LAYER",
    "LARGE_GPU_BYTES",
    "MAX_CAPTURE_SIZE",
    "NON_TORCH_TP1_BYTES",
    "NON_TORCH_TP_BYTES",
    "SAMPLER_FP32_COPIES",
    "SERVE_BATCHED_TOKENS",
    "SERVE_MAX_NUM_SEQS",
    "SOURCE",
    "SUPPORTED_KV_DTYPES",
    "UNBUDGETED_SOURCE",
    "Pool",
    "activation_peak_bytes",
    "budget_bytes",
    "capacity",
    "capture_sizes",
    "check_kv_dtype",
    "counts_context",
    "cudagraph_bytes",
    "kv_dtype",
    "large_gpu",
    "legacy_allreduce_bytes",
    "max_context",
    "max_model_len",
    "non_torch_bytes",
    "page_bytes_per_token",
    "pool",
    "release",
    "rows",
    "sampler_bytes",
    "scheduler_defaults",
    "stage_capacity",
    "subtracts_cudagraphs",
    "summary",
]

SOURCE = "vllm/v1/worker/gpu_worker.py Worker.determine_available_memory (vllm-project/vllm PR #10511)"
UNBUDGETED_SOURCE = "memory vLLM leaves outside gpu_memory_utilization × total (vllm/config/cache.py)"


def rows(ctx: Context) -> list[Row]:
    """The rows of one vLLM GPU: weights, non-torch memory, the profile run's activation peak, CUDA graphs,
    the KV blocks of ``micro_batch`` sequences of ``infer.context`` tokens, and the memory outside the budget.

    The GPU total stays within the GPU's memory exactly when those sequences fit in vLLM's KV pool.
    """
    p = pool(ctx)
    cfg = ctx.cfg
    limit = max_model_len(ctx)
    if cfg.infer.context > limit:
        raise MemplanError(f"vLLM refuses a {cfg.infer.context}-token sequence above max_model_len {limit}; "
                           "raise max_model_len (up to max_position_embeddings) or shorten the context.")
    per_seq = p.blocks_per_sequence(cfg.infer.context)
    demand = p.demand_bytes(cfg.micro_batch, cfg.infer.context)
    pool_note = (f"pool {max(p.kv_bytes, 0)} B = {p.blocks} blocks of {p.block_size} tokens = {p.tokens} tokens; "
                 f"{cfg.micro_batch} × {per_seq} blocks used; max concurrency {p.concurrency(cfg.infer.context)} "
                 f"at {cfg.infer.context} tokens (max_num_seqs {p.max_num_seqs})")
    unbudgeted = max(0, p.total - p.budget - (0 if p.graphs_in_budget else p.cudagraphs))
    out = weights.rows(ctx)
    out += [
        Row("runtime/vllm_non_torch", Tier.GPU, p.non_torch, SOURCE + "; PR #10511 profiler logs",
            f"tp={cfg.tp} (non_torch_bytes)"),
        Row("activations/vllm_profile_peak", Tier.GPU, p.activation_peak,
            "vllm gpu_model_runner.py profile_run: forward of max_num_batched_tokens + sampler",
            f"{p.max_num_batched_tokens} tokens, {p.max_num_seqs} sampler rows"),
        Row("runtime/vllm_cudagraphs", Tier.GPU, p.cudagraphs, "vllm gpu_model_runner.py capture_model",
            "enforce_eager" if cfg.serve.enforce_eager else f"{len(capture_sizes(cfg, p.max_num_seqs))} capture sizes"),
        Row("kv_cache", Tier.GPU, demand, "vllm/v1/core/kv_cache_utils.py get_kv_cache_config", pool_note),
        Row("runtime/vllm_unbudgeted", Tier.GPU, unbudgeted, UNBUDGETED_SOURCE,
            f"(1 − {cfg.serve.gpu_memory_utilization:g}) × {p.total} B" + ("" if p.graphs_in_budget else
                                                                            " less the CUDA graphs captured in it")),
    ]
    return out


def summary(ctx: Context) -> dict[str, int]:
    """What vLLM reports at start-up for the GPU of ``ctx`` (worker logs "Available KV cache memory", "GPU KV
    cache size: N tokens", "Maximum concurrency for S tokens per request"): the KV pool in bytes, blocks and
    tokens, the concurrency at ``infer.context`` and the longest sequence one request can have. Source:
    vllm/v1/core/kv_cache_utils.py (``get_kv_cache_config``, ``get_max_concurrency_for_kv_cache_config``)."""
    p = pool(ctx)
    return {"budget_bytes": p.budget, "kv_pool_bytes": max(0, p.kv_bytes), "kv_pool_blocks": p.blocks,
            "kv_pool_tokens": p.tokens, "block_size": p.block_size, "max_num_seqs": p.max_num_seqs,
            "max_num_batched_tokens": p.max_num_batched_tokens,
            "max_concurrency": p.concurrency(ctx.cfg.infer.context), "max_context": max_context(ctx)}


def max_context(ctx: Context) -> int:
    """The longest sequence one request can have: min(max_model_len, KV pool tokens) (with sliding groups, the
    longest whose blocks over all groups fit), 0 when the pool is empty."""
    return pool(ctx).longest(sequences=1, limit=max_model_len(ctx))


def capacity(arch: Architecture, cfg: JobConfig, gpu: GpuSpec, host: HostSpec, field: str) -> int:
    """Exact capacity of an estimate's vLLM configuration.

    ``micro_batch``: concurrent sequences of ``infer.context`` tokens, min(blocks // ceil(S / block_size),
    max_num_seqs); ``context``: the longest context each of ``micro_batch`` sequences can have,
    min(max_model_len, (blocks // B) × block_size). Source: vllm/v1/core/kv_cache_utils.py
    (``get_max_concurrency_for_kv_cache_config``), vllm/v1/core/sched/scheduler.py (max_num_seqs).
    """
    return stage_capacity(arch, cfg, gpu, host, field, pool, max_model_len)
