"""SGLang: the static memory fraction, the token pool it leaves, and the capacity that pool gives.

SGLang sizes its KV token pool from two free-memory readings, not from a profiled forward
(python/sglang/srt/model_executor/model_runner_kv_cache_mixin.py ``_profile_available_bytes``):

    rest = free_after_weights − free_before_weights × (1 − mem_fraction_static)
    max_total_num_tokens = rest // cell_size, rounded down to whole pages of ``page_size`` tokens

``free_before_weights`` is what the GPU has free once the CUDA context and the communicators exist
(``ModelRunner.init_torch_distributed``, the minimum over ranks), so the pool is
``f × free_before − weights``. Activations of a chunked-prefill step, the CUDA graphs and the
attention backend's metadata must fit in the share ``(1 − f) × free_before`` that SGLang leaves; when
they do not, SGLang runs out of memory at the first large step. memplan shows that overflow as memory the
pool cannot have (``Pool.activation_peak``), so a plan never counts on it.

``mem_fraction_static`` defaults from the GPU's memory (python/sglang/srt/server_args.py
``ServerArgs._handle_gpu_memory_settings``, the version with the 10 GiB floor on GPUs above 60 GiB):
reserved MiB = 512 + 1.5 × max(chunked_prefill_size, 2048) + 2 × cuda_graph_max_bs + tp·pp/8 × 1024,
at least 10,240 on such GPUs, and f = round((gpu_mem − reserved) / gpu_mem, 3), gpu_mem being the
driver's total in MiB (``get_device_memory_capacity``, nvidia-smi's figure).
"""

from __future__ import annotations

from dataclasses import replace
from fractions import Fraction

from memplan.arch.tensors import Architecture
from memplan.catalog.schema import GpuSpec, HostSpec
from memplan.config import JobConfig
from memplan.dtypes import Dtype
from memplan.engines import vllm
from memplan.errors import MemplanError
from memplan.memory import runtime, weights
from memplan.memory.breakdown import Row, Tier, tier_total
from memplan.memory.context import Context
from memplan.memory.kv_cache import sized_kv_dtype

SOURCE = "sglang python/sglang/srt/model_executor/model_runner_kv_cache_mixin.py _profile_available_bytes"
DEFAULTS_SOURCE = "sglang python/sglang/srt/server_args.py ServerArgs._handle_gpu_memory_settings"
GPU_BANDS: tuple[tuple[int | None, int, int, int], ...] = (
    (20 * 1024, 2048, 8, 8),        # T4, 4080
    (35 * 1024, 2048, 24, 80),      # A10, 4090, 5090
    (60 * 1024, 4096, 32, 160),     # A100 40GB, L40
    (90 * 1024, 8192, 256, 512),    # H100, A100 80GB
    (160 * 1024, 8192, 256, 512),   # H20, H200
    (None, 16384, 512, 512),        # B200, MI300
)
"""(upper bound of the GPU's MiB, exclusive; chunked_prefill_size; cuda_graph_max_bs at tp < 4; at tp >= 4),
SGLang's defaults by GPU memory (``_handle_gpu_memory_settings``)."""
LARGE_TP = 4
RESERVED_BASE_MIB = 512
"""Constant metadata (attention backend) in SGLang's reserved share, MiB."""
MIN_PREFILL_TOKENS = 2048
PREFILL_MIB_PER_TOKEN = Fraction(3, 2)
GRAPH_MIB_PER_BATCH = 2
PARALLEL_MIB = 1024
"""SGLang adds tp·pp/8 × 1024 MiB for large parallel sizes."""
LARGE_GPU_MIB = 60 * 1024
LARGE_GPU_FLOOR_MIB = 10 * 1024
MIN_REQS, MAX_REQS, REQS_PER_CONTEXT = 2048, 4096, 512
"""``_resolve_max_num_reqs``: clamp(tokens / context_len × 512, 2048, 4096), at most tokens // 2."""
SUPPORTED_KV_DTYPES = (Dtype.BF16, Dtype.FP16, Dtype.FP32, Dtype.FP8)
"""``--kv-cache-dtype`` values SGLang accepts: auto (the model dtype), bf16, fp8_e4m3, fp8_e5m2 (server_args.py)."""


def check(cfg: JobConfig) -> None:
    """Refuse what SGLang does not run, in one sentence each (exit 2)."""
    dtype = sized_kv_dtype(cfg)
    if dtype not in SUPPORTED_KV_DTYPES:
        names = ", ".join(d.value for d in SUPPORTED_KV_DTYPES)
        raise MemplanError(f"SGLang has no {dtype.value} KV cache; supported KV dtypes: {names}.")


def defaults(cfg: JobConfig, gpu: GpuSpec) -> tuple[int, int]:
    """(chunked_prefill_size, cuda_graph_max_bs): the configured values, else SGLang's for the GPU and tp."""
    s = cfg.serve
    for bound, chunk, small, large in GPU_BANDS:
        if bound is None or gpu.memory_mib < bound:
            graph_bs = small if cfg.tp < LARGE_TP else large
            return s.chunked_prefill_size or chunk, s.cuda_graph_max_bs or graph_bs
    raise AssertionError("GPU_BANDS ends with an open band")


def reserved_mib(*, gpu_mib: int, chunk: int, graph_bs: int, tp: int, pp: int) -> Fraction:
    """SGLang's reserved MiB outside the static fraction: 512 + 1.5·max(chunk, 2048) + 2·graph_bs + tp·pp/8·1024,
    at least 10,240 MiB on GPUs above 60 GiB. Source: ``_handle_gpu_memory_settings``."""
    out = (RESERVED_BASE_MIB + PREFILL_MIB_PER_TOKEN * max(chunk, MIN_PREFILL_TOKENS) + GRAPH_MIB_PER_BATCH * graph_bs
           + Fraction(tp * pp, 8) * PARALLEL_MIB)
    return max(out, Fraction(LARGE_GPU_FLOOR_MIB)) if gpu_mib > LARGE_GPU_MIB else out


def mem_fraction_static(cfg: JobConfig, gpu: GpuSpec) -> Fraction:
    """``--mem-fraction-static``, else round((gpu_mem − reserved) / gpu_mem, 3) as SGLang computes it."""
    if cfg.serve.mem_fraction_static is not None:
        return Fraction(str(cfg.serve.mem_fraction_static))
    chunk, graph_bs = defaults(cfg, gpu)
    reserved = reserved_mib(gpu_mib=gpu.memory_mib, chunk=chunk, graph_bs=graph_bs, tp=cfg.tp, pp=cfg.pp)
    return Fraction(str(round(float((gpu.memory_mib - reserved) / gpu.memory_mib), 3)))


def before_load_bytes(cfg: JobConfig, gpu: GpuSpec) -> int:
    """Memory in use when SGLang reads ``free_before_weights``: the CUDA context, plus the communicator buffers
    (NCCL, custom all-reduce) when tp > 1. Assumption: those buffers are the size vLLM's profiler logged for its
    tp group (``vllm.NON_TORCH_TP_BYTES``); both engines use NCCL and the same custom all-reduce design."""
    context = runtime.cuda_context_bytes(vendor=gpu.vendor, override=cfg.cuda_context_bytes)
    return context + (vllm.NON_TORCH_TP_BYTES if cfg.tp > 1 else 0)


def step_bytes(ctx: Context, *, chunk: int, graph_bs: int) -> int:
    """What must fit in SGLang's reserved share: the forward of one chunked-prefill step plus the sampler over
    cuda_graph_max_bs rows, and the CUDA graphs at cuda_graph_max_bs (``vllm.activation_peak_bytes``,
    ``vllm.cudagraph_bytes``: the same PyTorch forward). Assumption: decode batches beyond cuda_graph_max_bs run
    eagerly within the same peak."""
    return vllm.activation_peak_bytes(ctx, tokens=chunk, rows=graph_bs) + vllm.cudagraph_bytes(ctx, (graph_bs,))


REQ_TO_TOKEN_EXTRA = 4
"""``ReqToTokenPool(size=max_num_reqs + 1, max_context_len=context_len + 4)``: one int32 slot index per token of each
request (python/sglang/srt/mem_cache/memory_pool.py, model_runner_kv_cache_mixin.py ``_init_pools``)."""
INT32_BYTES = 4


def req_to_token_bytes(requests: int, context: int) -> int:
    """Bytes of SGLang's request-to-token table: (requests + 1) × (context_len + 4) × 4 (int32), taken from the
    reserved share after the pool is sized."""
    return (requests + 1) * (context + REQ_TO_TOKEN_EXTRA) * INT32_BYTES


def max_running_requests(cfg: JobConfig, tokens: int, context_len: int) -> int:
    """SGLang's request cap: min(--max-running-requests, tokens // 2), else min(clamp(tokens / context_len × 512,
    2048, 4096), tokens // 2). Source: model_runner_kv_cache_mixin.py ``_resolve_max_num_reqs``."""
    if cfg.serve.max_running_requests is not None:
        return min(cfg.serve.max_running_requests, tokens // 2)
    estimated = max(min(tokens * REQS_PER_CONTEXT // max(context_len, 1), MAX_REQS), MIN_REQS)
    return min(estimated, tokens // 2)


def context_len(ctx: Context) -> int:
    """SGLang's context_len: the model's max_position_embeddings (``--context-length`` is not modelled)."""
    return ctx.arch.spec.max_position_embeddings or ctx.cfg.infer.context


def pool(ctx: Context) -> vllm.Pool:
    """SGLang's arithmetic on one GPU, as a ``vllm.Pool``: budget = f × free_before_weights, less the weights; what
    overflows the reserved share (the step and the request table beyond (1 − f) × free_before) comes off the pool.
    The request cap is computed from the pool before that table (the table depends on the cap)."""
    cfg, gpu = ctx.cfg, ctx.gpu
    check(cfg)
    total = gpu.capacity_bytes  # the CUDA runtime's total (memplan.catalog.capacity)
    free_before = total - before_load_bytes(cfg, gpu)
    f = mem_fraction_static(cfg, gpu)
    budget = free_before * f.numerator // f.denominator
    chunk, graph_bs = defaults(cfg, gpu)
    step, slack = step_bytes(ctx, chunk=chunk, graph_bs=graph_bs), free_before - budget
    p = vllm.Pool(total=total, budget=budget, weights=tier_total(weights.rows(ctx), Tier.GPU), non_torch=0,
                  activation_peak=max(0, step - slack), cudagraphs=0, block_size=cfg.serve.page_size,
                  token_bytes=vllm.page_bytes_per_token(ctx), max_num_batched_tokens=chunk, max_num_seqs=1)
    seqs = max(1, max_running_requests(cfg, p.tokens, context_len(ctx)))
    table = req_to_token_bytes(seqs, context_len(ctx))
    return replace(p, max_num_seqs=seqs, activation_peak=max(0, step + table - slack))


def rows(ctx: Context) -> list[Row]:
    """The rows of one SGLang GPU: weights, the memory in use before the weights, the reserved share (or the
    step's peak where it is larger), the KV of ``micro_batch`` sequences. What the driver keeps
    below nvidia-smi's total is outside the capacity (``GpuSpec.capacity_bytes``), not a row."""
    cfg = ctx.cfg
    p = pool(ctx)
    if cfg.infer.context > context_len(ctx):
        raise MemplanError(f"SGLang rejects a {cfg.infer.context}-token request above the model's context length "
                           f"{context_len(ctx)}; shorten the context.")
    free_before = p.total - before_load_bytes(cfg, ctx.gpu)
    chunk, graph_bs = defaults(cfg, ctx.gpu)
    step = step_bytes(ctx, chunk=chunk, graph_bs=graph_bs) + req_to_token_bytes(p.max_num_seqs, context_len(ctx))
    f = mem_fraction_static(cfg, ctx.gpu)
    pages = p.blocks_per_sequence(cfg.infer.context)
    demand = p.demand_bytes(cfg.micro_batch, cfg.infer.context)
    note = (f"pool {max(p.kv_bytes, 0)} B = {p.tokens} tokens in pages of {p.block_size}; {cfg.micro_batch} × "
            f"{pages} pages used; max concurrency {p.concurrency(cfg.infer.context)} (max_running_requests "
            f"{p.max_num_seqs})")
    return [
        *weights.rows(ctx),
        Row("runtime/sglang_before_load", Tier.GPU, before_load_bytes(cfg, ctx.gpu), SOURCE,
            f"CUDA context{' + NCCL/custom all-reduce buffers' if cfg.tp > 1 else ''} (free_before_weights)"),
        Row("runtime/sglang_reserved", Tier.GPU, max(free_before - p.budget, step), DEFAULTS_SOURCE,
            f"(1 − {float(f):g}) × free_before_weights for a {chunk}-token prefill chunk, CUDA graphs up to batch "
            f"{graph_bs} and the request table of {p.max_num_seqs} requests: {step} B needed"),
        Row("kv_cache", Tier.GPU, demand, SOURCE, note),
    ]


def max_context(ctx: Context) -> int:
    """The longest sequence one request can have: min(context_len, pool tokens)."""
    return pool(ctx).longest(sequences=1, limit=context_len(ctx))


def summary(ctx: Context) -> dict[str, int]:
    """SGLang's start-up figures ("KV Cache is allocated. #tokens: N", max_running_requests) for ``ctx``'s GPU,
    under the same keys as vLLM's (``vllm.summary``)."""
    p = pool(ctx)
    return {"budget_bytes": p.budget, "kv_pool_bytes": max(0, p.kv_bytes), "kv_pool_blocks": p.blocks,
            "kv_pool_tokens": p.tokens, "block_size": p.block_size, "max_num_seqs": p.max_num_seqs,
            "max_num_batched_tokens": p.max_num_batched_tokens,
            "max_concurrency": p.concurrency(ctx.cfg.infer.context), "max_context": max_context(ctx)}


def capacity(arch: Architecture, cfg: JobConfig, gpu: GpuSpec, host: HostSpec, field: str) -> int:
    """Exact capacity: concurrent sequences of ``infer.context`` tokens (min(pages // ceil(S / page_size),
    max_running_requests)), or the longest context each of ``micro_batch`` sequences can have."""
    return vllm.stage_capacity(arch, cfg, gpu, host, field, pool, context_len)

