"""The inference job's sub-configurations: the KV cache and prompt (``JobConfig.infer``) and the serving engines'
knobs (``JobConfig.serve``).

Part of ``memplan.config`` (which re-exports every name).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from memplan.config_base import Strict, release
from memplan.dtypes import Dtype

VLLM_RELEASE = r"^\d+\.\d+(\.\d+)?$"


class InferConfig(Strict):
    context: int = Field(default=4096, gt=0)
    kv_dtype: Dtype | None = None
    """None: the weights' compute dtype."""
    paged: bool = False
    block_size: int = Field(default=16, gt=0)
    prefill_chunk: int | None = Field(default=None, gt=0)
    all_logits: bool = False
    mla_cache: Literal["latent", "decompressed"] = "latent"
    """MLA models (DeepSeek-V2/V3): ``latent`` caches kv_lora_rank + qk_rope_head_dim per token and layer
    (vLLM, SGLang, transformers 5.x); ``decompressed`` caches full per-head K and V (transformers 4.x)."""
    kv_group_size: int | None = Field(default=None, gt=0)
    """int8/int4 KV cache: elements per quantization group along the head dim; None: one group per token per head."""
    offload_map: tuple[bool, ...] | None = None
    """Per-layer weight placement, one entry per layer (the planner's per-layer choice): True keeps that
    layer's weights in CPU RAM and streams them to the GPU for each forward pass (accelerate ``device_map``
    with "cpu" entries, ``AlignDevicesHook(offload=True)``); None: every layer on the GPU."""

    @model_validator(mode="after")
    def _block_size_needs_paged(self) -> InferConfig:
        """``block_size`` sizes the blocks of a paged cache only (``memory.kv_cache``): set without ``paged`` it
        would be silently ignored."""
        if not self.paged and self.block_size != type(self).model_fields["block_size"].default:
            raise ValueError("infer.block_size sizes a paged KV cache's blocks: add --paged (infer.paged) or drop it.")
        return self


class ServeConfig(Strict):
    """Knobs of the serving engines, each under the engine's own name (``JobConfig.engine`` picks the engine).

    vLLM (``vllm serve`` flags, vllm/engine/arg_utils.py ``EngineArgs``): ``gpu_memory_utilization``,
    ``max_num_batched_tokens``, ``max_num_seqs``, ``block_size``, ``enforce_eager``,
    ``cudagraph_capture_sizes``, ``max_model_len``. SGLang (``sglang.launch_server`` flags,
    python/sglang/srt/server_args.py): ``mem_fraction_static``, ``chunked_prefill_size``, ``max_running_requests``,
    ``page_size``, ``cuda_graph_max_bs``. llama.cpp (``llama-server``/``llama-cli`` flags,
    common/arg.cpp): ``n_gpu_layers`` (-ngl), ``n_ctx`` (-c), ``n_batch`` (-b), ``n_ubatch`` (-ub),
    ``cache_type_k``/``cache_type_v`` (-ctk/-ctv), ``flash_attn`` (-fa), ``tensor_split`` (-ts; ``pp`` > 1 is
    ``-sm layer`` over pp GPUs), ``ggml_sched_max_copies`` (the build's ``GGML_SCHED_MAX_COPIES``), ``op_offload``
    (--no-op-offload), ``llama_set_rows`` (LLAMA_SET_ROWS), ``swa_full`` (--swa-full). transformers ``generate``:
    ``cache_implementation``.
    """

    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    """vLLM: share of the GPU's memory the instance may use (weights, activations, KV pool)."""
    max_num_batched_tokens: int | None = Field(default=None, gt=0)
    """vLLM: tokens of one scheduler step (chunked prefill); None: vLLM's default for ``vllm serve``
    (8192 on GPUs of at least 70 GiB other than A100, else 2048; ``EngineArgs.get_batch_defaults``)."""
    max_num_seqs: int | None = Field(default=None, gt=0)
    """vLLM: sequences one step may hold; None: vLLM's default (1024 on GPUs of at least 70 GiB other than A100, else 256)."""
    block_size: int = Field(default=16, gt=0)
    """vLLM: tokens per KV-cache block."""
    enforce_eager: bool = False
    """vLLM: no CUDA graphs (no graph memory)."""
    cudagraph_capture_sizes: tuple[int, ...] | None = None
    """vLLM: batch sizes captured as CUDA graphs; None: vLLM's default list up to min(2·max_num_seqs, 512)."""
    max_model_len: int | None = Field(default=None, gt=0)
    """vLLM: longest sequence (prompt + output) served; None: the model's max_position_embeddings."""
    non_torch_bytes: int | None = Field(default=None, ge=0)
    """vLLM: memory outside PyTorch's allocator (CUDA context, cuBLAS, NCCL, custom all-reduce); None: the
    default of ``memplan.engines.vllm.non_torch_bytes``."""
    allreduce_keeps_inputs: bool = False
    """vLLM <= 0.2.5 only (before PR #2151): every all-reduce input stayed alive through the profile forward."""
    vllm_release: str | None = Field(default=None, pattern=VLLM_RELEASE)
    """vLLM: the release whose memory profiler to reproduce ("0.8.4"); None: the current profiler. Releases whose
    arithmetic differs are named in ``memplan.engines.vllm`` (``counts_context``, ``subtracts_cudagraphs``)."""
    mem_fraction_static: float | None = Field(default=None, gt=0, lt=1)
    """SGLang --mem-fraction-static: share of free memory for weights and the KV pool; None: SGLang's default for
    the GPU (``memplan.engines.sglang.mem_fraction_static``)."""
    chunked_prefill_size: int | None = Field(default=None, gt=0)
    """SGLang --chunked-prefill-size: tokens of one prefill chunk; None: SGLang's default for the GPU's memory."""
    max_running_requests: int | None = Field(default=None, gt=0)
    """SGLang --max-running-requests; None: SGLang's cap from the pool (``_resolve_max_num_reqs``)."""
    page_size: int = Field(default=1, gt=0)
    """SGLang --page-size: tokens per KV page (1 by default)."""
    cuda_graph_max_bs: int | None = Field(default=None, gt=0)
    """SGLang --cuda-graph-max-bs: largest batch captured as a CUDA graph; None: SGLang's default for the GPU and tp."""
    n_gpu_layers: int | None = Field(default=None, ge=0)
    """llama.cpp -ngl: repeating layers offloaded to the GPU; None: all (llama.cpp's default since b5xxx is 999)."""
    n_ctx: int | None = Field(default=None, gt=0)
    """llama.cpp -c: context size of the KV cache; None: ``infer.context``."""
    n_batch: int = Field(default=2048, gt=0)
    """llama.cpp -b: logical batch size (tokens submitted per llama_decode)."""
    n_ubatch: int = Field(default=512, gt=0)
    """llama.cpp -ub: physical batch size (tokens per graph evaluation); sizes the compute buffers."""
    cache_type_k: Literal["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1"] = "f16"
    """llama.cpp -ctk: K cache type."""
    cache_type_v: Literal["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1"] = "f16"
    """llama.cpp -ctv: V cache type; a quantized V cache needs flash attention."""
    tensor_split: tuple[float, ...] | None = None
    """llama.cpp -ts: proportions of the layers per GPU of the layer split (``--pp`` GPUs, ``-sm layer``); None:
    equal shares (llama.cpp splits by free memory, equal on identical GPUs)."""
    flash_attn: bool = True
    """llama.cpp -fa: on by default (llama.cpp's ``-fa auto``, the default since 2025, enables it on CUDA)."""
    ggml_sched_max_copies: int = Field(default=4, ge=1, le=64)
    """llama.cpp's build option ``-DGGML_SCHED_MAX_COPIES`` (4 by default, ggml/src/ggml-backend.cpp): copies of the
    scheduler's inputs kept when pipeline parallelism is on (a full layer split over several GPUs); 1 turns it off."""
    op_offload: bool = True
    """llama.cpp --op-offload/--no-op-offload: under -ngl partial offload the first GPU runs the CPU layers' ops of
    large batches with their weights copied in (``memplan.engines.llamacpp_offload``)."""
    llama_set_rows: bool = True
    """llama.cpp's ``LLAMA_SET_ROWS``: KV writes by ``ggml_set_rows`` with I64 index inputs in the compute buffers (the
    default since llama.cpp PR #14959, Aug 2025); false: builds before it, or ``LLAMA_SET_ROWS=0``, the ``ggml_cpy``
    path without them (``memplan.engines.llamacpp_inputs``)."""
    swa_full: bool = False
    """llama.cpp --swa-full: a full-size SWA cache for interleaved sliding-window models (Gemma-2/3); also the
    arithmetic of builds before llama.cpp PR #13194 (May 2025), whose sliding-window mask had n_ctx rows."""
    prompt_tokens: int | None = Field(default=None, gt=0)
    """Prompt length for the time to first token; None: ``infer.context`` (the whole context is prompt, the upper bound)."""
    hbm_efficiency: float | None = Field(default=None, gt=0, le=1)
    """Share of peak memory bandwidth decode reaches; None: the GPU generation's default (planner.serve_cost)."""
    compute_efficiency: float | None = Field(default=None, gt=0, le=1)
    """Share of peak dense FLOP/s prefill reaches; None: the GPU generation's default (planner.serve_cost)."""
    cache_implementation: Literal["dynamic", "static", "legacy"] = "dynamic"
    """transformers ``generate(cache_implementation=...)``: ``dynamic`` (DynamicCache, grows by torch.cat) or ``static``;
    ``legacy``: the tuple ``past_key_values`` of transformers < 4.36 (before ``DynamicCache``), where a decode step
    keeps the whole previous cache alive next to the new one (``memory.kv_cache.legacy_previous_bytes``)."""

    @field_validator("vllm_release", mode="before")
    @classmethod
    def _vllm_release(cls, value: object) -> object:
        return release(value, pattern=VLLM_RELEASE, form="a vLLM release like 0.8.4")
