"""Non-persistent buffers that current transformers models register: resident for the whole step, yet outside the
state dict, so neither ``weights/params`` nor anything a checkpoint load, ZeRO-3 or FSDP shards (``fully_shard``
shards parameters only; every rank holds its buffers whole).

Sources read (transformers 5.20.2):
- ``models/gpt_bigcode/modeling_gpt_bigcode.py`` ``GPTBigCodeModel.__init__``: ``self.bias = nn.Buffer(torch.tril(
  torch.ones((max_positions, max_positions), dtype=torch.bool)), persistent=False)`` with ``max_positions =
  config.max_position_embeddings`` (``n_positions``): M² bools, on the model's device, although the forward builds its
  mask with ``masking_utils.create_causal_mask`` and never reads it. StarCoder (M = 8192) holds 64 MiB of it.
- ``models/gptj/modeling_gptj.py`` ``GPTJAttention.__init__``: ``self.embed_positions = nn.Buffer(
  create_sinusoidal_positions(self.max_positions, self.pos_embd_dim), persistent=False)`` in every attention layer,
  ``pos_embd_dim = rotary_dim or embed_dim``; ``create_sinusoidal_positions`` multiplies ``.float()`` positions, so
  the table is fp32 whatever ``dtype`` the model is built in: L · M · rotary_dim · 4 bytes.
Rotary ``inv_freq`` buffers (a few hundred bytes) are left out. Older releases' buffers: ``memory.hf_legacy``.

Assumptions: the model runs the Hugging Face module layout (not Megatron-Core's, not a serving engine's own model);
GPT-J's rotary width is the spec's ``rotary_dim``, else one head (a config whose ``rotary_dim`` is null uses the
hidden size in transformers; memplan's catalog reads GPT-J's default 64 then).
"""

from __future__ import annotations

from memplan.catalog.schema import Family, ModelSpec
from memplan.memory import activations_terms as t
from memplan.memory.breakdown import Row, Tier
from memplan.memory.context import Context

SOURCE = ("transformers models/gpt_bigcode/modeling_gpt_bigcode.py GPTBigCodeModel.__init__ (bias: M² bools); "
          "models/gptj/modeling_gptj.py GPTJAttention.__init__ (embed_positions: M × rotary_dim fp32 per layer)")


def causal_bias_bytes(spec: ModelSpec) -> int:
    """Bytes of GPT-BigCode's ``GPTBigCodeModel.bias``: M² bools (M = max_position_embeddings); 0 for other families.

    Source: transformers 5.20.2 models/gpt_bigcode/modeling_gpt_bigcode.py ``GPTBigCodeModel.__init__``."""
    if spec.family is not Family.GPT_BIGCODE:
        return 0
    return t.tensor_bytes(count=(spec.max_position_embeddings or 0) ** 2, bits=t.BOOL_BITS)


def sinusoidal_positions_bytes(spec: ModelSpec, layers: int) -> int:
    """Bytes of GPT-J's per-layer ``embed_positions`` tables for ``layers`` attention layers: layers · M · r · 4
    (fp32), r = rotary_dim (else one head's width); 0 for other families.

    Source: transformers 5.20.2 models/gptj/modeling_gptj.py ``GPTJAttention.__init__``,
    ``create_sinusoidal_positions`` (fp32 sin/cos of M positions)."""
    if spec.family is not Family.GPTJ:
        return 0
    width = spec.rotary_dim or spec.dim_per_head or 0
    return layers * t.tensor_bytes(count=(spec.max_position_embeddings or 0) * width, bits=t.FP32_BITS)


def buffer_bytes(ctx: Context) -> int:
    """The reported stage's buffers: GPT-BigCode's bias with the embeddings (stage 0), GPT-J's tables with the
    stage's layers."""
    spec = ctx.arch.spec
    bias = causal_bias_bytes(spec) if ctx.stage == 0 else 0
    return bias + sinusoidal_positions_bytes(spec, len(ctx.layers))


def rows(ctx: Context) -> list[Row]:
    """One GPU row, ``weights/model_buffers`` (alive in every phase), when the model registers such buffers."""
    nbytes = buffer_bytes(ctx)
    if not nbytes:
        return []
    return [Row("weights/model_buffers", Tier.GPU, nbytes, SOURCE, "non-persistent buffers, replicated on every rank")]
