"""vLLM: the memory budget, the KV pool it leaves, and the capacity that pool gives.

vLLM sizes its KV cache by subtraction (vllm/v1/worker/gpu_worker.py ``Worker.determine_available_memory``,
with ``memory_profiling`` in vllm/utils/mem_utils.py, formerly vllm/utils.py, introduced by
vllm-project/vllm PR #10511):

    requested = gpu_memory_utilization × total GPU memory
    available_kv_cache_memory = requested − (weights + torch activation peak + non-torch memory)

The torch peak is measured by ``profile_run`` (vllm/v1/worker/gpu_model_runner.py): one dummy forward of
``max_num_batched_tokens`` tokens plus ``_dummy_sampler_run`` over ``max_num_seqs`` rows of logits. The
KV pool is then cut into pages of ``block_size`` tokens (vllm/v1/core/kv_cache_utils.py
``get_kv_cache_config``: ``num_blocks = available_memory // page_size_bytes // num_layers``), and
``_report_kv_cache_config`` logs "GPU KV cache size: N tokens" (num_blocks × block_size) and the maximum
concurrency at ``max_model_len``. vLLM refuses to start when one ``max_model_len`` request does not fit
(``check_enough_kv_cache_memory``) and when ``max_model_len`` exceeds the model's
``max_position_embeddings`` (vllm/config/model.py ``_get_and_verify_max_len``).

CUDA-graph memory (``capture_model``) is subtracted as well, as vLLM does when it estimates graph memory
during profiling (``VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS``); older releases captured graphs after
sizing the pool, so their pool is larger by that amount (under 1% of the published figures).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from memplan.arch.tensors import Architecture
from memplan.catalog.schema import GpuSpec, HostSpec
from memplan.config import Engine, JobConfig
from memplan.dtypes import Dtype
from memplan.engines import vllm_hybrid, vllm_profile_now, vllm_profile_v1
from memplan.engines.vllm_hybrid import Groups
from memplan.errors import MemplanError
from memplan.memory import inference, runtime, weights
from memplan.memory.breakdown import Row, Tier, tier_total
from memplan.memory.context import Context
from memplan.memory.kv_cache import cached_shapes, compute_dtype, elements_per_token, sized_kv_dtype
from memplan.units import GiB, bits_to_bytes, ceil_div

SOURCE = "vllm/v1/worker/gpu_worker.py Worker.determine_available_memory (vllm-project/vllm PR #10511)"
LARGE_GPU_BYTES = 70 * GiB
"""vLLM picks larger scheduler defaults on GPUs with at least 70 GiB that are not A100s
(vllm/engine/arg_utils.py ``EngineArgs.get_batch_defaults``)."""
SERVE_BATCHED_TOKENS = {True: 8192, False: 2048}
"""``vllm serve`` default max_num_batched_tokens on large / other GPUs (``get_batch_defaults``, OPENAI_API_SERVER)."""
SERVE_MAX_NUM_SEQS = {True: 1024, False: 256}
"""``vllm serve`` default max_num_seqs on large / other GPUs (``get_batch_defaults``)."""
MAX_CAPTURE_SIZE = 512
"""Largest default CUDA-graph capture size: min(2·max_num_seqs, 512) (vllm/config/vllm.py ``_set_cudagraph_sizes``)."""
NON_TORCH_TP1_BYTES = round(Fraction("1.79") * GiB)
"""Non-torch memory of one vLLM worker without tensor parallelism: 1.79 GiB, as vLLM's profiler logged it
for Llama-3-8B on one H100 (PR #10511, youkaichao, 2024-12-14): CUDA context, cuBLAS/cuBLASLt workspaces,
attention-kernel and Triton module images. A measurement, not derived from parts."""
NON_TORCH_TP_BYTES = round(Fraction("3.58") * GiB) - NON_TORCH_TP1_BYTES
"""Added non-torch memory of a worker in a tensor-parallel group: the same PR's tp=2 log says 3.58 GiB, 1.79 GiB
above tp=1 (NCCL communicator and the custom all-reduce's buffers, vllm/distributed/device_communicators).
Paid once per worker, not per peer: with it, Llama-2-70B at tp=4 reproduces vLLM's 20,865 blocks (PR #2031)
within 1%, where a per-peer growth would miss by 13% (tests/test_vllm_published.py)."""
ALLREDUCES_PER_LAYER = 2
"""Row-parallel outputs all-reduced per decoder layer: attention o_proj and MLP down_proj (Megatron-LM Sec. 3)."""
SAMPLER_FP32_COPIES = 3
"""The sampler upcasts logits to fp32 and computes probabilities and log-probabilities, each fp32 over
rows × V (vllm/model_executor/layers/sampler.py ``Sampler.forward``; v1/sample/sampler.py)."""
ABSOLUTE_NON_TORCH_RELEASES = ((0, 8, 0), (0, 9, 1))
"""[first, end) of the releases whose V1 worker measured non-torch memory on the whole device: after the profile
run and ``empty_cache``, non_torch = (total − free) − torch allocated (vllm/v1/worker/gpu_worker.py
``determine_available_memory`` at v0.8.0 to v0.9.0, before vllm-project/vllm PR #19312, "[V1] Reuse V0's
memory_profiling util", which says it "incorrectly counts memory used by other processes as non_torch_allocations").
That count holds the CUDA context as well; V0's ``memory_profiling`` (PR #10511) and V1 from v0.9.1 on (its
``determine_available_memory`` wraps ``profile_run`` in ``memory_profiling(self.init_snapshot, ...)``, the snapshot
taken in ``init_device`` after the context was made) subtract that baseline. V1 became the default engine in 0.8.0."""
SUPPORTED_KV_DTYPES = (Dtype.BF16, Dtype.FP16, Dtype.FP32, Dtype.FP8)
"""``--kv-cache-dtype`` values vLLM accepts: auto (the model dtype) and fp8 (vllm/config/cache.py ``CacheDType``)."""


def large_gpu(total_bytes: int, gpu_name: str) -> bool:
    """Whether vLLM treats the GPU as large (>= 70 GiB and not an A100) for its scheduler defaults."""
    return total_bytes >= LARGE_GPU_BYTES and "a100" not in gpu_name.lower()


def scheduler_defaults(cfg: JobConfig, *, total_bytes: int, gpu_name: str) -> tuple[int, int]:
    """(max_num_batched_tokens, max_num_seqs): the configured values, else ``vllm serve``'s defaults."""
    big = large_gpu(total_bytes, gpu_name)
    s = cfg.serve
    return (s.max_num_batched_tokens or SERVE_BATCHED_TOKENS[big], s.max_num_seqs or SERVE_MAX_NUM_SEQS[big])


def budget_bytes(*, total_bytes: int, utilization: float) -> int:
    """Bytes vLLM may use: floor(gpu_memory_utilization × total), the utilization read as written (exact).

    Source: ``Worker.determine_available_memory`` (``requested_memory = total × gpu_memory_utilization``).
    """
    share = Fraction(str(utilization))
    return total_bytes * share.numerator // share.denominator


def non_torch_bytes(*, tp: int, override: int | None = None, context: int = 0) -> int:
    """Non-torch bytes of one worker: base, plus the communicator buffers when tp > 1, plus ``context`` (the CUDA
    context, for releases that count it: ``counts_context``), or ``override``.

    Source: vLLM's own profiler lines in PR #10511 (tp=1: 1.79 GiB, tp=2: 3.58 GiB, measured above a baseline
    taken after the CUDA context existed).
    """
    if override is not None:
        return override
    return NON_TORCH_TP1_BYTES + (NON_TORCH_TP_BYTES if tp > 1 else 0) + context


def release(cfg: JobConfig) -> tuple[int, ...] | None:
    """``serve.vllm_release`` as a version tuple ("0.8.4" -> (0, 8, 4)); None: the current profiler."""
    text = cfg.serve.vllm_release
    return None if text is None else tuple(int(part) for part in text.split("."))


def counts_context(version: tuple[int, ...] | None) -> bool:
    """Whether that release's non-torch figure includes the CUDA context (``ABSOLUTE_NON_TORCH_RELEASES``)."""
    first, end = ABSOLUTE_NON_TORCH_RELEASES
    return version is not None and first <= version < end


def subtracts_cudagraphs(version: tuple[int, ...] | None) -> bool:
    """Whether the pool is sized after CUDA-graph memory: memplan assumes so for the current profiler and for
    releases from ``ABSOLUTE_NON_TORCH_RELEASES[1]`` on (the safe side). The releases before captured graphs after
    the pool was allocated (V1 ``EngineCore._initialize_kv_caches``: ``determine_available_memory``, then
    the executor's ``initialize_from_config`` (vllm/v1/executor/abstract.py), which then calls the worker's
    ``compile_or_warm_up_model`` and so ``capture_model``; V0
    ``Worker._warm_up_model``), so graph memory lay outside their arithmetic."""
    return version is None or version >= ABSOLUTE_NON_TORCH_RELEASES[1]


def sampler_bytes(*, rows: int, vocab: int, bits: int) -> int:
    """Bytes of the sampler's peak over ``rows`` logits rows: rows·V × (compute bits + 3 × 32) / 8.

    Source: lm_head output in the compute dtype plus fp32 logits, probs and logprobs (vLLM ``Sampler``);
    ``_dummy_sampler_run`` profiles it with max_num_seqs rows. Assumption: the whole vocabulary on each rank
    (logits are gathered to every tp rank before sampling).
    """
    return bits_to_bytes(rows * vocab, bits + SAMPLER_FP32_COPIES * 32)


def capture_sizes(cfg: JobConfig, max_num_seqs: int) -> tuple[int, ...]:
    """The CUDA-graph batch sizes: configured, none with enforce_eager, else vLLM's default list
    [1, 2, 4] + 8..248 step 8 + 256..max step 16, max = min(2·max_num_seqs, 512)."""
    if cfg.serve.enforce_eager:
        return ()
    if cfg.serve.cudagraph_capture_sizes is not None:
        return tuple(cfg.serve.cudagraph_capture_sizes)
    top = min(2 * max_num_seqs, MAX_CAPTURE_SIZE)
    sizes = [1, 2, 4, *range(8, 256, 8), *range(256, top + 1, 16)]
    return tuple(s for s in sizes if s <= top)


def check_kv_dtype(dtype: Dtype) -> None:
    """A MemplanError listing vLLM's KV cache dtypes when ``dtype`` is not one of them."""
    if dtype not in SUPPORTED_KV_DTYPES:
        names = ", ".join(d.value for d in SUPPORTED_KV_DTYPES)
        raise MemplanError(f"vLLM has no {dtype.value} KV cache; supported KV dtypes: {names}.")


def kv_dtype(cfg: JobConfig) -> Dtype:
    """The KV dtype vLLM sizes: ``infer.kv_dtype``, else the compute dtype (``--kv-cache-dtype auto``)."""
    return sized_kv_dtype(cfg)


def page_bytes_per_token(ctx: Context, layers: int | None = None) -> int:
    """KV bytes one token takes on this GPU over ``layers`` layers (default: the stage's): L · Σ heads·dim × bits / 8.

    Source: vllm/v1/kv_cache_interface.py ``AttentionSpec.page_size_bytes`` (2·block_size·K·H·dtype bytes;
    MLA: one latent "head" of kv_lora_rank + qk_rope_head_dim). The hybrid manager's block spans one layer of
    each group, ``Groups.size`` layers in all (``memplan.engines.vllm_hybrid``).
    """
    spec = ctx.arch.spec
    shapes = cached_shapes(spec, mla_cache="latent", tp=ctx.cfg.tp)
    count = len(ctx.layers) if layers is None else layers
    return bits_to_bytes(count * elements_per_token(shapes), kv_dtype(ctx.cfg).bits)


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


def activation_peak_bytes(ctx: Context, *, tokens: int, rows: int, version: tuple[int, ...] | None = None) -> int:
    """The profile run's torch peak: one forward of ``tokens`` tokens and the sampler over ``rows`` rows.

    Formula: forward_peak(B=1, T=tokens) + sampler_bytes(min(rows, tokens)) on the last pipeline stage; for the
    releases ``vllm_profile_v1`` reproduces, its runner buffers + max(forward, sampler) as their source computes; for
    the current profiler (``vllm_profile_now``, vLLM 0.34.0 on), max(forward, kept hidden states + its sampler) plus
    the sampler's persistent penalty state.
    Source: vllm/v1/worker/gpu_model_runner.py ``profile_run`` (``_dummy_run(max_num_tokens)`` then
    ``_dummy_sampler_run``); the forward with flash attention (no score matrix).
    """
    cfg, spec = ctx.cfg, ctx.arch.spec
    bits = compute_dtype(cfg.dtype).bits
    out = inference.forward_peak_bytes(ctx, batch=1, tokens=tokens, kv_tokens=tokens)
    if cfg.serve.allreduce_keeps_inputs and cfg.tp > 1:
        out += legacy_allreduce_bytes(layers=len(ctx.layers), tokens=tokens, hidden=spec.hidden_size or 0, bits=bits)
    last = ctx.stage == cfg.pp - 1
    if vllm_profile_v1.applies(version):
        buffers = vllm_profile_v1.runner_buffer_bytes(
            max_num_tokens=tokens, hidden=spec.hidden_size or 0, bits=bits, max_num_seqs=rows,
            blocks_per_request=ceil_div(max_model_len(ctx), cfg.serve.block_size))
        return buffers + vllm_profile_v1.peak_bytes(forward=out, rows=min(rows, tokens), hidden=spec.hidden_size or 0,
                                                    vocab=spec.vocab_size or 0, bits=bits, last_stage=last)
    if cfg.engine == Engine.VLLM and vllm_profile_now.applies(version):  # SGLang's step_bytes keeps the sum
        return vllm_profile_now.peak_bytes(forward=out, tokens=tokens, max_num_seqs=rows, hidden=spec.hidden_size or 0,
                                           vocab=spec.vocab_size or 0, bits=bits, last_stage=last)
    if last:
        out += sampler_bytes(rows=min(rows, tokens), vocab=spec.vocab_size or 0, bits=bits)
    return out


def legacy_allreduce_bytes(*, layers: int, tokens: int, hidden: int, bits: int) -> int:
    """Bytes of all-reduce inputs that vLLM <= 0.2.5 kept alive through the profile forward: 2·L·T·D × bits/8.

    Source: vllm-project/vllm PR #2151 ("Fix all-reduce memory usage", v0.2.6): torch.distributed.all_reduce
    on the input tensor kept every layer's input alive (25.5 -> 19.5 GiB peak for Llama-70B at tp=8).
    """
    return bits_to_bytes(ALLREDUCES_PER_LAYER * layers * tokens * hidden, bits)


def cudagraph_bytes(ctx: Context, sizes: tuple[int, ...]) -> int:
    """Memory of the captured CUDA graphs: their shared pool, the decode forward at the largest size.

    Source: vllm/v1/worker/gpu_model_runner.py ``capture_model`` (graphs captured largest first share one
    memory pool). Assumption: per-graph bookkeeping (kernel nodes) is not counted; a lower bound.
    """
    if not sizes:
        return 0
    return inference.forward_peak_bytes(ctx, batch=max(sizes), tokens=1, kv_tokens=1)


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


def max_model_len(ctx: Context) -> int:
    """The longest sequence vLLM serves: ``max_model_len``, else the model's max_position_embeddings.

    vLLM refuses a max_model_len above max_position_embeddings (vllm/config/model.py ``_get_and_verify_max_len``).
    """
    limit = ctx.arch.spec.max_position_embeddings
    asked = ctx.cfg.serve.max_model_len
    if asked is not None and limit and asked > limit:
        raise MemplanError(f"vLLM refuses max_model_len {asked}: the model's max_position_embeddings is {limit} "
                           "(vllm/config/model.py); lower max_model_len.")
    return asked or limit or ctx.cfg.infer.context


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
