"""KV cache bytes of an inference job: GQA/MQA, MLA, sliding windows, quantized and paged caches.

Every decoder layer keeps, per sequence and cached token, a key and a value vector per KV head
(vLLM paper, Kwon et al. 2023, Sec. 3: OPT-13B needs 2 × 5120 × 40 × 2 bytes = 800 KB per token).
What one token costs per layer is described by its *cached tensors*, ``(heads, dim)`` pairs:

- multi-head / grouped-query / multi-query attention: ``((K, H), (K, H))``, key then value;
- MLA ``latent`` (DeepSeek-V2 paper Sec. 2.1.2; vLLM ``MLAAttentionSpec`` with one "head" of
  ``kv_lora_rank + qk_rope_head_dim``; transformers 5.x ``DeepseekV3Attention`` caches ``kv_nope``
  and ``k_rot`` as its key and value): ``((1, kv_lora_rank), (1, qk_rope_head_dim))``;
- MLA ``decompressed`` (transformers 4.x ``DeepseekV3Attention`` and DeepSeek's remote code, which
  cache per-head K and V after ``kv_b_proj``): ``((N, qk_nope + qk_rope), (N, v_head_dim))``.

The transformers 4.x flash-attention-2 path also padded V to ``qk_nope + qk_rope`` before caching;
that padding is not modelled. vLLM's ``fp8_ds_mla`` format (656 bytes per token) is not modelled.
"""

from __future__ import annotations

from memplan.arch.tensors import Layer
from memplan.catalog.schema import ModelSpec
from memplan.config import Engine, InferConfig, Job, JobConfig
from memplan.dtypes import Dtype
from memplan.errors import MemplanError
from memplan.memory.breakdown import Row, Tier
from memplan.memory.context import Context
from memplan.units import bits_to_bytes, ceil_div

KV_TENSORS = 2
"""A key and a value tensor per layer (vLLM paper Sec. 3)."""
FP8_TENSOR_SCALE_BITS = 32
"""fp8 KV: one fp32 scale per K and per V tensor per layer (vLLM ``Attention._k_scale/_v_scale``,
``KVQuantMode.FP8_PER_TENSOR``; transformers ``Fp8QuantizedLayer``)."""
INT8_SCALE_BITS, INT8_ZERO_BITS = 32, 0
"""int8 KV: symmetric, one fp32 scale per token per head (vLLM ``int8_per_token_head``:
``AttentionSpec.page_size_bytes`` adds ``2 * block_size * num_kv_heads * 4`` bytes per page)."""
INT4_SCALE_BITS, INT4_ZERO_BITS = 16, 16
"""int4 KV: asymmetric, an fp16 scale and an fp16 zero point per group (KIVI, Liu et al. 2024, Sec. 3;
transformers ``QuantizedCache`` keeps scale and zero point in the compute dtype)."""
VLLM_PAPER = "vLLM paper (Kwon et al. 2023) Sec. 3"


def compute_dtype(dtype: Dtype) -> Dtype:
    """The dtype activations and the default KV cache use: ``dtype`` if it is a float, else bf16.

    Assumption: integer or fp8 weight formats are weight-only; compute runs in bf16.
    """
    return dtype if dtype in (Dtype.FP32, Dtype.BF16, Dtype.FP16) else Dtype.BF16


def sized_kv_dtype(cfg: JobConfig) -> Dtype:
    """The dtype the KV cache is sized in: ``infer.kv_dtype``, else the compute dtype of ``cfg.dtype``
    (fp8 or integer weights compute, and cache, in bf16). Every KV row and every ``kv=`` label reads this."""
    return cfg.infer.kv_dtype or compute_dtype(cfg.dtype)


def kv_label(cfg: JobConfig) -> str:
    """The KV cache's type as a plan line names it (``kv=``): llama.cpp sizes its cache by its own types,
    ``serve.cache_type_k``/``cache_type_v`` (-ctk/-ctv, ``engines.llamacpp``), shown as ``k/v`` when they differ;
    every other engine by ``sized_kv_dtype``."""
    if cfg.effective_engine is Engine.LLAMACPP:
        k, v = cfg.serve.cache_type_k, cfg.serve.cache_type_v
        return k if k == v else f"{k}/{v}"
    return sized_kv_dtype(cfg).value


def kv_cache_bytes(*, batch: int, seq: int, layers: int, kv_heads: int, head_dim: int, bits: int) -> int:
    """Bytes of a plain KV cache (no window, no paging, no scales).

    Formula: 2·B·S·L·K·H elements × bits / 8.
    Source: vLLM paper (Kwon et al. 2023) Sec. 3 (2 × hidden × layers × bytes per token for OPT-13B).
    Assumptions: every layer caches S tokens; K and V share the head dim H.
    """
    return bits_to_bytes(KV_TENSORS * batch * seq * layers * kv_heads * head_dim, bits)


def kv_heads_per_rank(*, kv_heads: int, tp: int) -> int:
    """KV heads one tensor-parallel rank holds: ceil(K / tp), at least 1.

    Source: Megatron-LM / vLLM ``QKVParallelLinear``: heads split over tp; when tp > K each KV head
    is replicated on tp / K ranks, so every rank still holds one.
    """
    return max(1, ceil_div(kv_heads, tp))


def expands_kv(spec: ModelSpec) -> bool:
    """Whether transformers caches K and V broadcast to all N query heads: Falcon's new decoder architecture.

    Source: transformers ``models/falcon/modeling_falcon.py`` (4.3x to 5.20) ``FalconAttention._split_heads``:
    ``key = torch.broadcast_to(key, query.shape)`` then ``flatten``; ``forward`` reshapes keys and values to
    ``num_kv_heads = self.num_heads if self.new_decoder_architecture`` heads before ``layer_past.update``. vLLM
    (``num_kv_heads``) and llama.cpp (``n_head_kv``) cache the K heads.
    Assumptions: a Falcon config with 1 < K < N is the new decoder architecture (the old one has K = 1 with
    ``multi_query`` or K = N); a new-architecture config with K = 1 or K = N is counted as K (N for K = N).
    """
    from memplan.catalog.schema import Family

    heads = spec.num_attention_heads or 1
    return spec.family is Family.FALCON and 1 < spec.kv_heads < heads


def hf_cache_layout(cfg: JobConfig) -> bool:
    """Whether the cache is transformers' own (the transformers engine, or no serving engine named)."""
    from memplan.config import Engine

    return cfg.engine in (None, Engine.TRANSFORMERS)


def cached_shapes(spec: ModelSpec, *, mla_cache: str, tp: int, hf: bool = False) -> tuple[tuple[int, int], ...]:
    """The ``(heads, dim)`` tensors one layer caches per token on one tp rank (see module docstring).

    MLA ``latent`` is not split by tp: vLLM keeps the whole latent on every rank (one KV "head").
    ``hf``: transformers' cache, which holds all N heads where ``expands_kv``.
    """
    if spec.is_mla:
        rope = spec.qk_rope_head_dim or 0
        if mla_cache == "latent":
            return ((1, spec.kv_lora_rank or 0), (1, rope))
        heads = ceil_div(spec.num_attention_heads or 1, tp)
        return ((heads, (spec.qk_nope_head_dim or 0) + rope), (heads, spec.v_head_dim or 0))
    kv = (spec.num_attention_heads or 1) if hf and expands_kv(spec) else spec.kv_heads
    heads = kv_heads_per_rank(kv_heads=kv, tp=tp)
    return ((heads, spec.dim_per_head), (heads, spec.dim_per_head))


def elements_per_token(shapes: tuple[tuple[int, int], ...]) -> int:
    """Cached elements per token per layer: Σ heads·dim (2·K·H for GQA; r + d_rope for MLA latent)."""
    return sum(heads * dim for heads, dim in shapes)


def scale_bits_per_token(*, shapes: tuple[tuple[int, int], ...], dtype: Dtype, group_size: int | None) -> int:
    """Bits of quantization scales (and zero points) per token per layer.

    Formula: Σ heads·ceil(dim / G)·(scale + zero bits) for int8/int4 (G = dim when ``group_size`` is None,
    i.e. one group per token per head); 0 for float formats and for fp8 (per-tensor scales).
    Source: vLLM ``int8_per_token_head`` (fp32 scale); KIVI Sec. 3 (int4, fp16 scale + zero point).
    Assumption: keys and values are grouped the same way, along the head dim.
    """
    if dtype is Dtype.INT8:
        per_group = INT8_SCALE_BITS + INT8_ZERO_BITS
    elif dtype is Dtype.INT4:
        per_group = INT4_SCALE_BITS + INT4_ZERO_BITS
    else:
        return 0
    return sum(heads * ceil_div(dim, group_size or dim) * per_group for heads, dim in shapes if dim)


def tensor_scale_bytes_per_layer(*, dtype: Dtype) -> int:
    """Bytes of per-tensor scales per layer: 2 × fp32 for fp8 (vLLM ``FP8_PER_TENSOR``), else 0."""
    return bits_to_bytes(KV_TENSORS, FP8_TENSOR_SCALE_BITS) if dtype is Dtype.FP8 else 0


def cached_tokens(*, seq: int, window: int | None, step_tokens: int) -> int:
    """Tokens one layer keeps per sequence after a forward of ``step_tokens`` new tokens.

    Formula: S for full attention; min(S, W − 1 + T) for a sliding window W after a step of T tokens.
    Source: transformers ``DynamicSlidingWindowLayer.update`` keeps the last W − 1 tokens as a *view* of
    the concatenated ``W − 1 + T`` states, so the storage stays ``W − 1 + T`` until the next step (its
    ``nbytes`` shows only ``min(S, W − 1)``: pass T = 0 for that); vLLM ``SlidingWindowSpec
    .max_memory_usage_bytes`` allocates ``min(W − 1 + max_num_batched_tokens, max_model_len)`` tokens.
    Assumption: a prefill without chunking is one step of T = S, so the window then saves nothing.
    """
    if window is None:
        return seq
    return min(seq, window - 1 + step_tokens)


def paged_slots(*, seq: int, window: int | None, step_tokens: int, block_size: int) -> int:
    """Token slots one layer allocates per sequence in a paged cache (whole blocks).

    Formula: block_size · ceil(S / block_size) for full attention; for a sliding window, when the
    window has moved past the start, block_size · min(ceil((W − 1 + T) / block_size) + 1, ceil(S / block_size)).
    Source: vLLM v1 ``FullAttentionSpec`` / ``SlidingWindowSpec.max_memory_usage_bytes`` (the +1 block
    because the window may start mid-block); PagedAttention, Kwon et al. 2023, Sec. 4.
    """
    tokens = cached_tokens(seq=seq, window=window, step_tokens=step_tokens)
    full_blocks = ceil_div(seq, block_size)
    blocks = full_blocks if tokens >= seq else min(ceil_div(tokens, block_size) + 1, full_blocks)
    return blocks * block_size


def layer_window(spec: ModelSpec, index: int, layer: Layer) -> int | None:
    """The sliding window of layer ``index``, or None for full attention.

    ``Layer.sliding`` decides, as ``memplan.arch.build`` sets it from ``layer_types`` and
    ``sliding_window`` the way transformers does (Mistral v0.1: every layer; Gemma-2: alternate layers).
    """
    if not layer.sliding:
        return None
    if spec.sliding_window is None:
        raise MemplanError(f"{spec.name}: layer {index} uses sliding attention but the model has no sliding_window.")
    return spec.sliding_window


def layer_bytes(*, batch: int, tokens: int, elements: int, bits: int, scale_bits: int) -> tuple[int, int]:
    """(data bytes, scale bytes) of one layer's cache: B·tokens·elements × bits/8 and B·tokens·scale_bits/8."""
    return bits_to_bytes(batch * tokens * elements, bits), bits_to_bytes(batch * tokens * scale_bits, 1)


def step_tokens(*, context: int, prefill_chunk: int | None) -> int:
    """Tokens of the largest forward: the prefill chunk, or the whole context without chunking."""
    return min(prefill_chunk or context, context)


def dynamic_growth_bytes(*, batch: int, old_tokens: int, shapes: tuple[tuple[int, int], ...], bits: int) -> int:
    """Bytes of the previous K (or V) of one layer, alive while ``torch.cat`` builds the longer one in a decode step.

    Formula: B·(S − 1)·max(K·H_k, K·H_v) × bits/8: keys are concatenated first, then values, so at most one of
    the two old tensors of one layer coexists with its successor.
    Source: transformers ``DynamicLayer.update`` (cache_utils.py, 5.x; ``DynamicCache.update`` since 4.36 does
    the same per layer). Versions before 4.36 passed tuples (``past_key_values``) that kept the whole previous
    cache alive through the forward: ``legacy_previous_bytes``.
    """
    widest = max((heads * dim for heads, dim in shapes), default=0)
    return bits_to_bytes(batch * max(old_tokens, 0) * widest, bits)


def legacy_previous_bytes(cache_bytes: int, *, context: int) -> int:
    """Bytes of the previous decode step's whole cache, alive next to the new one in transformers < 4.36.

    Formula: cache(S) · (S − 1)/S, rounded down: every layer's keys and values one token shorter.
    Source: transformers 4.32-4.35 ``LlamaAttention.forward`` (modeling_llama.py): ``key_states =
    torch.cat([past_key_value[0], key_states], dim=2)``; ``past_key_value = (key_states, value_states) if use_cache``
    returns new tensors while ``generation/utils.py`` ``greedy_search``/``sample`` still hold the previous tuple in
    ``model_inputs`` and ``model_kwargs["past_key_values"]`` until ``_update_model_kwargs_for_generation`` replaces it
    after the forward returns. Since 4.36 ``DynamicCache.update`` replaces each layer in place (``dynamic_growth_bytes``).
    Assumptions: the other models' attention modules follow Llama's (they were copied from it, ``# Copied from``).
    """
    return cache_bytes * max(context - 1, 0) // context if context else 0


def _growth_rows(ctx: Context, shapes: tuple[tuple[int, int], ...], dtype: Dtype, cache_bytes: int = 0) -> list[Row]:
    """The transformers dynamic cache's concat copy (or the legacy tuple cache's previous step), on the transformers
    engine."""
    from memplan.config import Engine
    from memplan.memory.breakdown import Phase

    cfg = ctx.cfg
    if cfg.engine is not Engine.TRANSFORMERS or cfg.infer.paged:
        return []
    if cfg.serve.cache_implementation == "legacy":
        prompt = cfg.infer.prefill_chunk
        if prompt is not None and cfg.infer.context - prompt <= 1:  # generate's one forward makes the one new token
            return []
        old = legacy_previous_bytes(cache_bytes, context=cfg.infer.context)
        return [Row("kv_cache/legacy_previous", Tier.GPU, old, "transformers < 4.36 tuple past_key_values (torch.cat)",
                    "the previous step's whole cache, held by generate until the forward returns",
                    frozenset({Phase.DECODE}))]
    if cfg.serve.cache_implementation != "dynamic":
        return []
    grow = dynamic_growth_bytes(batch=cfg.micro_batch, old_tokens=cfg.infer.context - 1, shapes=shapes, bits=dtype.bits)
    return [Row("kv_cache/dynamic_growth", Tier.GPU, grow, "transformers cache_utils.py DynamicLayer.update (torch.cat)",
                "one layer's old keys (or values) while the decode step concatenates", frozenset({Phase.DECODE}))]


def rows(ctx: Context) -> list[Row]:
    """KV cache rows for an inference job on the reported GPU (its tp rank, its pipeline stage's layers).

    ``kv_cache`` when every layer attends fully; otherwise ``kv_cache/full_attention`` and
    ``kv_cache/sliding_attention``; quantization scales in ``kv_cache/scales``.
    B = ``micro_batch`` sequences of S = ``infer.context`` tokens each.
    Layers offloaded to CPU RAM (``infer.offload_map``) keep their cache on the GPU too: accelerate's
    ``AlignDevicesHook`` runs the layer on its execution device, and transformers'
    ``DynamicLayer.lazy_initialization`` keeps the keys and values on the device they are computed on.
    """
    cfg = ctx.cfg
    if cfg.job is not Job.INFER:
        return []
    spec, inf = ctx.arch.spec, cfg.infer
    dtype = sized_kv_dtype(cfg)
    shapes = cached_shapes(spec, mla_cache=inf.mla_cache, tp=cfg.tp, hf=hf_cache_layout(cfg))
    elements = elements_per_token(shapes)
    sbits = scale_bits_per_token(shapes=shapes, dtype=dtype, group_size=inf.kv_group_size)
    step = step_tokens(context=inf.context, prefill_chunk=inf.prefill_chunk)
    data = {"full_attention": 0, "sliding_attention": 0}
    scales = 0
    for index, layer in ctx.layers:
        window = layer_window(spec, index, layer)
        if inf.paged:
            tokens = paged_slots(seq=inf.context, window=window, step_tokens=step, block_size=inf.block_size)
        else:
            tokens = cached_tokens(seq=inf.context, window=window, step_tokens=step)
        d, s = layer_bytes(batch=cfg.micro_batch, tokens=tokens, elements=elements, bits=dtype.bits, scale_bits=sbits)
        data["sliding_attention" if window else "full_attention"] += d
        scales += s + tensor_scale_bytes_per_layer(dtype=dtype)
    return (_make_rows(data, scales, note=_note(spec, inf, dtype, elements, step))
            + _growth_rows(ctx, shapes, dtype, sum(data.values()) + scales))


def _note(spec: ModelSpec, inf: InferConfig, dtype: Dtype, elements: int, step: int) -> str:
    layout = f"paged, {inf.block_size}-token blocks" if inf.paged else "contiguous"
    mla = f", MLA {inf.mla_cache}" if spec.is_mla else ""
    return f"{dtype.value}, {elements} elements/token/layer{mla}, {layout}, largest step {step} tokens"


def _make_rows(data: dict[str, int], scales: int, *, note: str) -> list[Row]:
    source = f"2·B·S·L·K·H × bytes ({VLLM_PAPER}); see memplan explain kv_cache"
    out: list[Row] = []
    if data["sliding_attention"] == 0:
        out.append(Row("kv_cache", Tier.GPU, data["full_attention"], source, note))
    else:
        if data["full_attention"]:
            out.append(Row("kv_cache/full_attention", Tier.GPU, data["full_attention"], source, note))
        out.append(Row("kv_cache/sliding_attention", Tier.GPU, data["sliding_attention"],
                       source + "; window min(S, W − 1 + T)", note))
    if scales:
        out.append(Row("kv_cache/scales", Tier.GPU, scales, "vLLM kv_cache_interface (int8/fp8); KIVI Sec. 3 (int4)"))
    return out
