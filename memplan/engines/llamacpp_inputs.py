"""llama.cpp's attention graph inputs: the KQ masks and the KV-cache index inputs of the worst-case ubatch.

Every input below is a graph input (``ggml_set_input``): ggml-backend's scheduler puts it on the host (the last
backend) and copies it into each GPU split that reads it, inside that GPU's compute buffer
(``memplan.engines.llamacpp_sched``), ``n_copies`` times under pipeline parallelism.

- The KQ mask: f32, n_kv × pad64(n_ubatch) (src/llama-graph.cpp ``build_attn_inp_kv``), cast to f16 under flash
  attention. Sliding-window models that llama.cpp builds with the interleaved-SWA cache (``llama_kv_cache_iswa``,
  since PR #13194, May 2025: Gemma-2, Gemma-3, Cohere2) have a second one, ``self_kq_mask_swa``, of n_kv_swa rows
  (``build_attn_inp_kv_iswa``); before that PR their ``build_inp_KQ_mask_swa`` had n_ctx rows, as ``swa_full`` now.
- The KV index inputs of ``ggml_set_rows`` (llama.cpp PR #14285, the default since PR #14959, Aug 2025;
  ``LLAMA_SET_ROWS=0`` restored the old ``ggml_cpy`` path until it was removed): per KV cache ``k_idxs``, I64 ×
  n_ubatch, and ``v_idxs``, I64 × n_ubatch, or × n_ubatch·n_embd_v_gqa when the V cache is transposed (no flash
  attention: ``v_trans = !flash_attn``), one index per V element (src/llama-kv-cache.cpp ``build_input_k_idxs``,
  ``build_input_v_idxs``, ``set_input_v_idxs``). An interleaved-SWA model has a pair per cache.
"""

from __future__ import annotations

from memplan.catalog.schema import Family
from memplan.memory.context import Context
from memplan.units import round_up

I64_BYTES = 8
SWA_CACHE_PAD = 256
"""The SWA cache's cells are padded to 256 (src/llama-kv-cache-iswa.cpp, llama.cpp issue #17037)."""
ISWA_FAMILIES = (Family.GEMMA2, Family.GEMMA3, Family.COHERE)
"""memplan families whose sliding layers llama.cpp runs on the interleaved-SWA cache (llama.cpp's gemma2, gemma3 and
cohere2 archs, src/llama-model.cpp ``create_memory``). Mistral-7B-v0.1's ``sliding_window`` is not one: llama.cpp's
llama arch has no SWA."""


def swa_layers(ctx: Context) -> list[int]:
    """Layers llama.cpp puts in the SWA cache: the sliding layers of an ``ISWA_FAMILIES`` model, else none."""
    if ctx.arch.spec.family not in ISWA_FAMILIES:
        return []
    return [i for i, layer in enumerate(ctx.arch.layers) if layer.sliding]


def swa_cells(ctx: Context, cells: int) -> int:
    """Cells of the SWA cache over all sequences (0 without one): n_ctx with ``swa_full`` (--swa-full), else
    n_seq × pad256(min(n_ctx / n_seq, n_swa + n_ubatch)).

    Source: src/llama-kv-cache-iswa.cpp (``llama_kv_cache_iswa`` constructor, ``size_swa``): each of the n_seq streams
    (llama-server's slots, memplan's ``micro_batch``) of a non-unified cache has its own SWA cells; n_ubatch is
    min(-ub, -b) (llama-context.cpp). Checked: Gemma-3-270M at n_ctx 8192 measured 39, 54 and 84 MiB of KV with 1, 2
    and 4 slots (unsloth PR #7530, llama-server). Assumption: a unified cache (--kv-unified) holds
    pad256(min(n_ctx, n_swa · n_seq + n_ubatch)) cells, no more than this, so memplan is over there.
    """
    if not swa_layers(ctx):
        return 0
    s, n_seq = ctx.cfg.serve, ctx.cfg.micro_batch
    if s.swa_full:
        return cells
    window = ctx.arch.spec.sliding_window or cells
    return n_seq * round_up(min(cells // n_seq, window + min(s.n_ubatch, s.n_batch)), SWA_CACHE_PAD)


def mask_row_counts(ctx: Context, cells: int) -> list[int]:
    """Elements of each KQ mask, in the order the layers first use them: n_kv × pad64(n_ubatch) for the full cache
    and, for an interleaved-SWA model, n_kv_swa × pad64(n_ubatch) (the first entry is the mask of layer 0's kind)."""
    from memplan.engines.llamacpp_sched import KQ_MASK_PAD, ubatch

    padded = round_up(ubatch(ctx, cells), KQ_MASK_PAD)
    swa = swa_layers(ctx)
    if not swa:
        return [cells * padded]
    full, sliding = cells * padded, swa_cells(ctx, cells) * padded
    return [sliding, full] if swa[0] == 0 else [full, sliding]


def kv_index_bytes(ctx: Context, cells: int) -> int:
    """Bytes of the KV index inputs (``k_idxs`` + ``v_idxs`` of each KV cache); 0 before ``ggml_set_rows``.

    Formula per cache: n_ubatch · 8 + n_ubatch · (n_embd_v_gqa without flash attention, else 1) · 8; two caches for
    an interleaved-SWA model. Example: Command-R (n_embd_v_gqa 64 × 128 = 8192), n_ubatch 512, no flash attention:
    512 · 8 + 512 · 8192 · 8 = 32 MiB + 4 KiB. Source: src/llama-kv-cache.cpp ``build_input_k_idxs``,
    ``build_input_v_idxs``. Assumption: ``n_embd_v_gqa_max`` is n_kv_heads · head_dim (the same in every layer).
    """
    from memplan.engines.llamacpp_sched import ubatch

    s = ctx.cfg.serve
    if not s.llama_set_rows:
        return 0
    ub = ubatch(ctx, cells)
    spec = ctx.arch.spec
    v_per_token = 1 if s.flash_attn else spec.kv_heads * spec.dim_per_head
    return (ub * I64_BYTES + ub * v_per_token * I64_BYTES) * (2 if swa_layers(ctx) else 1)


def layer_cells(ctx: Context, cells: int) -> list[int]:
    """KV cells of each layer: the SWA cache's (``swa_cells``) for the layers in it, n_ctx for the others.

    Source: src/llama-kv-cache-iswa.cpp (``filter_base``/``filter_swa`` give each layer to one of the two caches,
    sized ``size_base`` = n_ctx and ``size_swa``); one cache of n_ctx cells for a model without one.
    """
    swa, small = set(swa_layers(ctx)), swa_cells(ctx, cells)
    return [small if i in swa else cells for i in range(len(ctx.arch.layers))]
