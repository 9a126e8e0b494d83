"""vLLM's KV pool on one GPU: what its budget leaves (``memplan.engines.vllm``), in blocks, and the capacity it gives.

The KV pool is cut into pages of ``block_size`` tokens (vllm/v1/core/kv_cache_utils.py
``get_kv_cache_config``: ``num_blocks = available_memory // page_size_bytes // num_layers``), and
``_report_kv_cache_config`` logs "GPU KV cache size: N tokens" (num_blocks × block_size) and the maximum
concurrency at ``max_model_len``. vLLM refuses to start when one ``max_model_len`` request does not fit
(``check_enough_kv_cache_memory``) and when ``max_model_len`` exceeds the model's
``max_position_embeddings`` (vllm/config/model.py ``_get_and_verify_max_len``).

``pool`` assembles the ``Pool`` from ``vllm_budget`` and ``vllm_peak``; ``stage_capacity`` takes the smallest capacity
over the pipeline stages (SGLang's pool reuses both).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from memplan.arch.tensors import Architecture
from memplan.catalog.schema import GpuSpec, HostSpec
from memplan.config import JobConfig
from memplan.engines import vllm_hybrid
from memplan.engines.vllm_budget import (
    budget_bytes,
    check_kv_dtype,
    counts_context,
    kv_dtype,
    non_torch_bytes,
    page_bytes_per_token,
    release,
    scheduler_defaults,
    subtracts_cudagraphs,
)
from memplan.engines.vllm_hybrid import Groups
from memplan.engines.vllm_peak import activation_peak_bytes, capture_sizes, cudagraph_bytes
from memplan.memory import runtime, weights
from memplan.memory.breakdown import Tier, tier_total
from memplan.memory.context import Context


@dataclass(frozen=True)
class Pool:
    """vLLM's arithmetic on one GPU: the budget, what it subtracts, and the KV pool left. ``total`` is the
    CUDA runtime's total (``torch.cuda.mem_get_info()[1]``), which vLLM multiplies by the utilization."""

    total: int
    budget: int
    weights: int
    non_torch: int
    activation_peak: int
    cudagraphs: int
    block_size: int
    token_bytes: int
    max_num_batched_tokens: int
    max_num_seqs: int
    graphs_in_budget: bool = True
    groups: Groups = vllm_hybrid.ONE_GROUP
    """KV-cache groups (``vllm_hybrid.groups``); one group by default, ``token_bytes`` then spans all layers."""

    @property
    def kv_bytes(self) -> int:
        """available_kv_cache_memory (may be negative: vLLM then refuses to start); CUDA graphs are taken away
        only where the release sizes the pool after them (``subtracts_cudagraphs``)."""
        graphs = self.cudagraphs if self.graphs_in_budget else 0
        return self.budget - self.weights - self.non_torch - self.activation_peak - graphs

    @property
    def blocks(self) -> int:
        """num_gpu_blocks = available // (block_size × bytes per token), at least 0."""
        return max(0, self.kv_bytes) // (self.block_size * self.token_bytes) if self.token_bytes else 0

    @property
    def tokens(self) -> int:
        """"GPU KV cache size: N tokens" = blocks // groups × block_size."""
        return self.blocks // self.groups.count * self.block_size

    def blocks_per_sequence(self, context: int) -> int:
        """Blocks one sequence of ``context`` tokens takes: cdiv(S, block_size), or over the hybrid groups."""
        return self.groups.blocks_per_sequence(context, self.block_size)

    def demand_bytes(self, sequences: int, context: int) -> int:
        """KV bytes ``sequences`` sequences of ``context`` tokens hold: sequences × their blocks × block bytes."""
        return sequences * self.blocks_per_sequence(context) * self.block_size * self.token_bytes

    def longest(self, *, sequences: int, limit: int) -> int:
        """The longest context each of ``sequences`` sequences can have in the pool, at most ``limit``."""
        return vllm_hybrid.longest_sequence(self.groups, blocks=self.blocks // max(sequences, 1),
                                            block_size=self.block_size, limit=limit)

    def concurrency(self, context: int) -> int:
        """Sequences of ``context`` tokens the pool holds at once: min(blocks // ceil(S / block), max_num_seqs)."""
        return min(self.blocks // self.blocks_per_sequence(context), self.max_num_seqs)


def pool(ctx: Context) -> Pool:
    """vLLM's memory arithmetic for the GPU of ``ctx`` (its tp rank and pipeline stage)."""
    cfg, gpu = ctx.cfg, ctx.gpu
    check_kv_dtype(kv_dtype(cfg))
    total = gpu.capacity_bytes  # the CUDA runtime's total: what vLLM's mem_get_info reads
    version = release(cfg)
    context = runtime.cuda_context_bytes(vendor=gpu.vendor, override=cfg.cuda_context_bytes) \
        if counts_context(version) else 0
    tokens, seqs = scheduler_defaults(cfg, total_bytes=total, gpu_name=gpu.name)
    g = vllm_hybrid.groups(ctx, hybrid=version is None or version >= vllm_hybrid.HYBRID_FROM,
                           max_num_batched_tokens=tokens)
    return Pool(total=total, budget=budget_bytes(total_bytes=total, utilization=cfg.serve.gpu_memory_utilization),
                weights=tier_total(weights.rows(ctx), Tier.GPU),
                non_torch=non_torch_bytes(tp=cfg.tp, override=cfg.serve.non_torch_bytes, context=context),
                activation_peak=activation_peak_bytes(ctx, tokens=tokens, rows=seqs, version=version),
                cudagraphs=cudagraph_bytes(ctx, capture_sizes(cfg, seqs)),
                graphs_in_budget=subtracts_cudagraphs(version),
                block_size=cfg.serve.block_size, token_bytes=page_bytes_per_token(ctx, g.size),
                max_num_batched_tokens=tokens, max_num_seqs=seqs, groups=g)


def stage_capacity(arch: Architecture, cfg: JobConfig, gpu: GpuSpec, host: HostSpec, field: str,
                   pool_of: Callable[[Context], Any], limit_of: Callable[[Context], int]) -> int:
    """The smallest capacity over the pipeline stages (each holds its layers' KV pool): concurrent sequences of
    ``infer.context`` tokens (``field == "micro_batch"``; 0 past the engine's length limit) or the longest
    context each of ``micro_batch`` sequences can have. ``pool_of``/``limit_of``: the engine's pool and limit."""
    worst: int | None = None
    for stage in range(cfg.pp):
        ctx = Context(arch, cfg, gpu, host, stage_override=stage)
        p = pool_of(ctx)
        if field == "micro_batch":
            value = p.concurrency(cfg.infer.context) if cfg.infer.context <= limit_of(ctx) else 0
        else:
            value = p.longest(sequences=cfg.micro_batch, limit=limit_of(ctx))
        worst = value if worst is None else min(worst, value)
    return worst or 0
