"""Training activations around the blocks: the embedding lookup (first stage), the rotary tables and the
checkpointed blocks' keyword arguments (every stage), the final norm, the loss, the logits peak and the kept model
output (last stage). One micro-batch each. Split out of ``memory.activations``, which re-exports every name.
"""

from __future__ import annotations

from memplan.arch.build_families import EMBEDDING_NORMS
from memplan.catalog.schema import Family
from memplan.config import JobConfig
from memplan.memory import activations_amp as amp_extra
from memplan.memory import activations_block as blk
from memplan.memory import activations_lora as lora
from memplan.memory import activations_terms as t
from memplan.memory import hf_legacy
from memplan.memory.activations_layers import _amp
from memplan.memory.context import Context
from memplan.memory.context_parallel import local_seq_len
from memplan.units import ceil_div


def _tokens(ctx: Context) -> tuple[int, int]:
    """(B·S rows, rows of hidden-wide tensors: B·S/t with sequence parallelism)."""
    dm = blk.dims(ctx.arch.spec, ctx.cfg)
    return dm.tokens, dm.seq_tokens


def embedding_bytes(ctx: Context, counting: blk.Counting) -> int:
    """First stage, one micro-batch: int64 token ids (and learned-position ids), embedding dropout mask.

    Sources: PyTorch ``embedding`` saves its indices; GPT-2 ``position_ids`` (1, S), OPT's (B, S)
    (cumsum of the attention mask); GPT-2 ``transformer.drop``; Korthikanti et al. 2022 Sec. 4.3.
    """
    spec, cfg = ctx.arch.spec, ctx.cfg
    tokens, seq = _tokens(ctx)
    total = 0
    if cfg.dropout and spec.family is Family.GPT2:
        total += t.dropout_bytes(count=seq * (spec.hidden_size or 0), mask_bits=counting.mask_bits)
    if spec.family in EMBEDDING_NORMS and lora.first_block_input_grad(cfg):  # BLOOM's word_embeddings_layernorm
        # on the embedding output (a frozen one over a frozen embedding's output saves nothing)
        total += blk.norm_bytes(spec, tokens=seq, width=spec.hidden_size or 0, bits=blk.activation_bits(cfg),
                                counting=counting)
    if counting.paper or not lora.head_trains(cfg):  # a frozen embedding's lookup saves nothing
        return total
    total += t.token_ids_bytes(tokens=tokens)
    if spec.family is Family.GPT2:
        total += t.token_ids_bytes(tokens=local_seq_len(cfg))
    elif spec.family is Family.OPT:
        total += t.token_ids_bytes(tokens=tokens)
    return total


NO_ROTARY = frozenset({Family.GPT2, Family.OPT, Family.GPT_BIGCODE, Family.BLOOM})
"""Learned positions or ALiBi: no cos/sin tables (Falcon with ``alibi: true`` too)."""


ROPE_PER_LAYER_TYPE = frozenset({Family.GEMMA3})
"""One cos/sin table per layer type (``Gemma3TextModel.forward``: ``rotary_emb(..., layer_type)`` for each of
sliding and full attention, with their own rope bases)."""


def rotary_table_bytes(ctx: Context, counting: blk.Counting) -> int:
    """The rotary cos/sin tables saved once per forward on every stage (none without rotary embeddings)."""
    spec = ctx.arch.spec
    if counting.paper or spec.family in NO_ROTARY or spec.alibi:
        return 0
    rot = spec.qk_rope_head_dim if spec.is_mla else (spec.rotary_dim or spec.dim_per_head)
    tables = len({layer.sliding for layer in ctx.arch.layers}) if spec.family in ROPE_PER_LAYER_TYPE else 1
    bits = t.FP32_BITS if _amp(ctx, counting) else blk.activation_bits(ctx.cfg)  # cos.to(x.dtype), x fp32 under AMP
    return tables * t.rotary_bytes(s=local_seq_len(ctx.cfg), rot_dim=rot or 0, bits=bits)


def layer_kwargs_bytes(ctx: Context, layers: set[int], counting: blk.Counting) -> int:
    """What checkpointed blocks hold until backward besides their input: (B, 1, S, S) attention masks,
    once per kind, and the int64 position ids (1, S).

    Eager attention gets an additive mask in the dtype, SDPA a bool one on sliding layers whose
    window is shorter than S (full-attention layers use ``is_causal``, flash needs none); a model
    with full and sliding layers builds one mask of each kind.
    Source: transformers ``masking_utils`` (``create_causal_mask`` / ``create_sliding_window_causal_mask``);
    the checkpoint keeps the layer's keyword arguments (``partial(forward, **kwargs)``) until backward.
    """
    spec, cfg = ctx.arch.spec, ctx.cfg
    if counting.paper or not layers:
        return 0
    s = local_seq_len(cfg)
    impl = blk.attention_impl(spec, cfg)
    if hf_legacy.explicit_mask(spec, cfg, impl):  # the model's mask is its own row (hf_legacy.rows)
        return t.token_ids_bytes(tokens=s)
    if impl == "eager":
        kinds, bits = {ctx.arch.layers[i].sliding for i in layers}, blk.activation_bits(cfg)
    elif impl == "sdpa":
        masked = [blk.sdpa_mask_materialized(spec, ctx.arch.layers[i], impl, s) for i in layers]
        kinds, bits = ({True} if any(masked) else set()), t.BOOL_BITS
    else:
        kinds, bits = set(), t.BOOL_BITS
    masks = len(kinds) * t.tensor_bytes(count=cfg.micro_batch * s * s, bits=bits)
    return masks + t.token_ids_bytes(tokens=s)


def final_norm_bytes(ctx: Context, counting: blk.Counting) -> int:
    """Last stage: the final norm's saved tensors and its output, the lm_head input (b/8·B·S·D),
    which a frozen output layer (adapter jobs) does not save."""
    spec, bits = ctx.arch.spec, blk.activation_bits(ctx.cfg)
    _, seq = _tokens(ctx)
    width, trains = spec.hidden_size or 0, lora.head_trains(ctx.cfg)
    norm = blk.norm_bytes(spec, tokens=seq, width=width, bits=bits, counting=counting, weight_trains=trains)
    if _amp(ctx, counting):
        norm += amp_extra.norm_extra_bytes(spec, tokens=seq, width=width)
    return norm + (t.tensor_bytes(count=seq * width, bits=bits) if trains else 0)


def _loss_bits(cfg: JobConfig) -> int:
    return t.FP32_BITS if cfg.loss_fp32 else blk.activation_bits(cfg)


def loss_bytes(ctx: Context, counting: blk.Counting) -> int:
    """Last stage: log-softmax output and targets (vocab split over tp), Gemma-2's soft-cap tanh output.

    The paper counts the fp32 logits only, 4sbv/t (Korthikanti et al. 2022 Sec. 4.3).
    """
    spec, cfg = ctx.arch.spec, ctx.cfg
    tokens, _ = _tokens(ctx)
    vocab = ceil_div(spec.vocab_size or 0, cfg.tp)
    if counting.paper:
        return t.tensor_bytes(count=tokens * vocab, bits=t.FP32_BITS)
    total = t.log_softmax_bytes(tokens=tokens, vocab=vocab, bits=_loss_bits(cfg))
    if spec.family is Family.GEMMA2:  # final_logit_softcapping: tanh saves its output
        total += t.tensor_bytes(count=tokens * vocab, bits=blk.activation_bits(cfg))
    return total


def logits_peak_bytes(ctx: Context, counting: blk.Counting) -> int:
    """Last stage: logits alive beyond what the loss saves (see ``logits_transient_bytes``); 0 for the paper."""
    if counting.paper:
        return 0
    tokens, _ = _tokens(ctx)
    vocab = ceil_div(ctx.arch.spec.vocab_size or 0, ctx.cfg.tp)
    return t.logits_transient_bytes(tokens=tokens, vocab=vocab, bits=blk.activation_bits(ctx.cfg),
                                    loss_bits=_loss_bits(ctx.cfg))


def kept_output_bytes(ctx: Context, counting: blk.Counting, tokens: int | None = None) -> int:
    """Last stage: the model output's logits the training loop keeps until after the optimizer step
    (``JobConfig.kept_output``, see ``kept_logits_bytes``); one micro-batch's (each forward replaces it), of ``tokens``
    (default the micro-batch's; litgpt's previous micro-batch: ``litgpt.previous_tokens``); 0 for the paper's
    accounting and for ``kept_output="none"``."""
    kept = ctx.cfg.kept_output
    if counting.paper or kept == "none":
        return 0
    tokens = _tokens(ctx)[0] if tokens is None else tokens
    vocab = ceil_div(ctx.arch.spec.vocab_size or 0, ctx.cfg.tp)
    bits = t.FP32_BITS if kept == "logits_fp32" else blk.activation_bits(ctx.cfg)
    return t.kept_logits_bytes(tokens=tokens, vocab=vocab, bits=bits)
