"""vLLM's budget terms that come from its configuration: the budget (utilization × total), the scheduler's defaults,
the non-torch memory, what a pinned release counts, the KV dtype and page size, and ``max_model_len``.

They feed the subtraction described in ``memplan.engines.vllm``; the pool it leaves is ``memplan.engines.vllm_pool``.
"""

from __future__ import annotations

from fractions import Fraction

from memplan.config import JobConfig
from memplan.dtypes import Dtype
from memplan.errors import MemplanError
from memplan.memory.context import Context
from memplan.memory.kv_cache import cached_shapes, elements_per_token, sized_kv_dtype
from memplan.units import GiB, bits_to_bytes

LARGE_GPU_BYTES = 70 * GiB
"""vLLM picks larger scheduler defaults on GPUs with at least 70 GiB that are not A100s
(vllm/engine/arg_utils.py ``EngineArgs.get_batch_defaults``)."""
SERVE_BATCHED_TOKENS = {True: 8192, False: 2048}
"""``vllm serve`` default max_num_batched_tokens on large / other GPUs (``get_batch_defaults``, OPENAI_API_SERVER)."""
SERVE_MAX_NUM_SEQS = {True: 1024, False: 256}
"""``vllm serve`` default max_num_seqs on large / other GPUs (``get_batch_defaults``)."""
NON_TORCH_TP1_BYTES = round(Fraction("1.79") * GiB)
"""Non-torch memory of one vLLM worker without tensor parallelism: 1.79 GiB, as vLLM's profiler logged it
for Llama-3-8B on one H100 (PR #10511, youkaichao, 2024-12-14): CUDA context, cuBLAS/cuBLASLt workspaces,
attention-kernel and Triton module images. A measurement, not derived from parts."""
NON_TORCH_TP_BYTES = round(Fraction("3.58") * GiB) - NON_TORCH_TP1_BYTES
"""Added non-torch memory of a worker in a tensor-parallel group: the same PR's tp=2 log says 3.58 GiB, 1.79 GiB
above tp=1 (NCCL communicator and the custom all-reduce's buffers, vllm/distributed/device_communicators).
Paid once per worker, not per peer: with it, Llama-2-70B at tp=4 reproduces vLLM's 20,865 blocks (PR #2031)
within 1%, where a per-peer growth would miss by 13% (tests/test_vllm_published.py)."""
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
