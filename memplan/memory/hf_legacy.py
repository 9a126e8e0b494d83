"""Bytes that older transformers releases hold and current ones do not (``JobConfig.transformers_version``).

Sources read (the wheels of each release, ``models/llama/modeling_llama.py`` and ``models/mistral/modeling_mistral.py``):
- 4.37.2 to 4.40.0: every attention layer owns its rotary module (``LlamaAttention._init_rope``,
  ``MistralAttention.__init__``), which registers ``cos_cached``/``_cos_cached`` and ``sin_cached``/``_sin_cached``
  of (max_position_embeddings, head_dim) in ``torch.get_default_dtype()`` at construction; non-persistent buffers, so
  no checkpoint load or FSDP sharding touches them and every rank holds them whole on its GPU. The SDPA attention
  calls ``repeat_kv`` before ``scaled_dot_product_attention`` (no ``enable_gqa``): k and v are saved at N heads.
- 4.38.x only: ``LlamaModel.__init__`` registers ``causal_mask``, a (M, M) bool ``torch.triu`` buffer (M =
  max_position_embeddings), and ``_update_causal_mask`` builds ``causal_mask[None, None].repeat(B, 1, 1, 1)
  .to(dtype) * min_dtype``: a (B, 1, M, M) mask in the compute dtype on every forward, even without an
  ``attention_mask``; ``LlamaSdpaAttention`` slices it with ``causal_mask[:, :, cache_position, :S]`` (advanced
  indexing: a (B, 1, S, S) copy per layer) and SDPA saves that copy for backward. A checkpointed layer keeps the
  whole (B, 1, M, M) mask among its inputs until its backward.
- 4.39.x: ``_update_causal_mask`` builds an (S, S) mask in the dtype and expands it over the batch (a view, and
  the layers' slices are views of it).
- 4.38-4.39: an explicit mask means SDPA cannot take its flash kernel (huggingface/transformers issue #30010,
  fixed in 4.40 by passing ``is_causal`` instead).
Assumptions: the mask rules follow ``LlamaModel`` (memplan's llama family; ``MistralModel`` of 4.38 builds no mask
without padding, ``_prepare_4d_causal_attention_mask_for_sdpa`` returning None, so for a Mistral checkpoint these rows
over-count); the rotary caches are counted in fp32, torch's default dtype, as a model built without ``torch_dtype``
holds them (a model built or cast in 16 bits holds half); no padding mask (``attention_mask=None`` or all ones).
"""

from __future__ import annotations

from memplan.catalog.schema import Family, ModelSpec
from memplan.config import JobConfig
from memplan.errors import MemplanError
from memplan.memory import activations_terms as t
from memplan.memory.breakdown import Phase, Row, Tier
from memplan.memory.context import Context

ROPE_CACHE_RELEASES = ((4, 37), (4, 40))
"""First and last release read whose attention layers register rotary cos/sin caches."""
REGISTERED_MASK_RELEASE = (4, 38)
EXPLICIT_MASK_RELEASES = ((4, 38), (4, 39))
ROPE_TABLES = 2
"""cos and sin."""


def release(cfg: JobConfig) -> tuple[int, int] | None:
    """(major, minor) of ``transformers_version``, or None for current transformers."""
    if cfg.transformers_version is None:
        return None
    major, minor = cfg.transformers_version.split(".")[:2]
    return int(major), int(minor)


def _llama(spec: ModelSpec) -> bool:
    return spec.family is Family.LLAMA and bool(spec.max_position_embeddings)


def check(spec: ModelSpec, cfg: JobConfig) -> None:
    """Refuse ``transformers_version`` where no rule of this module applies (a flag is never silently ignored)."""
    if cfg.transformers_version is not None and not _llama(spec):
        raise MemplanError(f"--transformers-version models the Llama layout's buffers and masks (LlamaModel, "
                           f"MistralModel sources read); {spec.name} is {spec.family.value}: drop the flag.")


def rope_cache_bytes(spec: ModelSpec, cfg: JobConfig) -> int:
    """Bytes of the per-layer rotary caches: L · 2 · M · head_dim · 4 (fp32), for releases 4.37-4.40; else 0."""
    rel = release(cfg)
    if rel is None or not (ROPE_CACHE_RELEASES[0] <= rel <= ROPE_CACHE_RELEASES[1]) or not _llama(spec):
        return 0
    head_dim = spec.head_dim or (spec.hidden_size or 0) // (spec.num_attention_heads or 1)
    per_layer = ROPE_TABLES * t.tensor_bytes(count=(spec.max_position_embeddings or 0) * head_dim, bits=t.FP32_BITS)
    return (spec.num_hidden_layers or 0) * per_layer


def mask_buffer_bytes(spec: ModelSpec, cfg: JobConfig) -> int:
    """4.38.x ``LlamaModel.causal_mask`` buffer: M² bools (M = max_position_embeddings); else 0."""
    if release(cfg) != REGISTERED_MASK_RELEASE or not _llama(spec):
        return 0
    return t.tensor_bytes(count=(spec.max_position_embeddings or 0) ** 2, bits=t.BOOL_BITS)


def explicit_mask(spec: ModelSpec, cfg: JobConfig, impl: str) -> bool:
    """Whether LlamaModel hands SDPA/eager attention an explicit 4-D mask (4.38-4.39; flash_attention_2 gets none)."""
    return impl in ("sdpa", "eager") and release(cfg) in EXPLICIT_MASK_RELEASES and _llama(spec)


def mask_copied_per_layer(spec: ModelSpec, cfg: JobConfig, impl: str) -> bool:
    """4.38.x: each attention layer's ``causal_mask[:, :, cache_position, :S]`` is a (B, 1, S, S) copy."""
    return explicit_mask(spec, cfg, impl) and release(cfg) == REGISTERED_MASK_RELEASE


def repeats_kv(cfg: JobConfig, impl: str) -> bool:
    """SDPA attention of releases 4.37-4.40 copies k and v to N heads (``repeat_kv``) before the kernel."""
    rel = release(cfg)
    return impl == "sdpa" and rel is not None and rel <= ROPE_CACHE_RELEASES[1]


def model_mask_bytes(spec: ModelSpec, cfg: JobConfig, impl: str, bits: int) -> int:
    """The mask ``_update_causal_mask`` returns, in the compute dtype: (B, 1, M, M) in 4.38.x, an (S, S) tensor
    expanded over the batch in 4.39.x; 0 otherwise. ``bits``: the activation dtype's."""
    if not explicit_mask(spec, cfg, impl):
        return 0
    if release(cfg) == REGISTERED_MASK_RELEASE:
        return t.tensor_bytes(count=cfg.micro_batch * (spec.max_position_embeddings or 0) ** 2, bits=bits)
    return t.tensor_bytes(count=cfg.seq_len * cfg.seq_len, bits=bits)


def rows(ctx: Context, impl: str, bits: int, checkpointed: bool) -> list[Row]:
    """GPU rows: the model's buffers (whole step) and the model's mask (forward; through backward when a
    checkpointed layer keeps it among its inputs)."""
    spec, cfg = ctx.arch.spec, ctx.cfg
    out = []
    buffers = rope_cache_bytes(spec, cfg) + mask_buffer_bytes(spec, cfg)
    if buffers:
        out.append(Row("weights/hf_buffers", Tier.GPU, buffers, "transformers 4.37-4.40 rotary cos/sin caches per "
                       "layer; 4.38 LlamaModel.causal_mask (max_position_embeddings² bools)", "non-persistent buffers"))
    mask = model_mask_bytes(spec, cfg, impl, bits)
    if mask:
        phases = (Phase.FORWARD, Phase.BACKWARD_START, Phase.BACKWARD) if checkpointed else (Phase.FORWARD,)
        out.append(Row("activations/hf_causal_mask", Tier.GPU, mask, "transformers LlamaModel._update_causal_mask "
                       f"(v{cfg.transformers_version})", "held by checkpointed layers" if checkpointed else "forward",
                       phases=frozenset(phases)))
    return out
