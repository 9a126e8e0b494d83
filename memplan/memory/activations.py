"""Training activations: the bytes kept for backward on the reported GPU, and the transient peaks.

Per block, ``activations_block`` counts what PyTorch autograd saves in the Hugging Face module
(or, with ``activation_accounting="paper"``, what Korthikanti et al. 2022 count). This module adds
the model around the blocks and the schedule:

- recompute (Korthikanti et al. 2022, Sec. 5): ``selective`` drops the S×S attention-core tensors,
  ``full`` keeps only each checkpointed block's input; ``recompute_layers = k`` checkpoints k of
  the L layers (the first ones of each stage, Megatron-LM's "block" method), the rest keep
  everything; during backward one checkpointed block's tensors are live again (workspace row);
- pipeline 1F1B (Narayanan et al. 2021, Sec. 2.2): stage ``i`` of ``pp`` holds ``pp - i``
  micro-batches in flight, so the first stage holds ``pp`` (Korthikanti et al. 2022, Sec. 4.2.3);
- the first stage adds the embedding lookup, the last the final norm, the loss and the logits peak.

Inference activations are ``memplan.memory.inference``'s; a params-only model is not modelled.
"""

from __future__ import annotations

from memplan.arch.build_families import EMBEDDING_NORMS
from memplan.arch.interleaved import chunk_layer_counts, peak_chunk_bytes
from memplan.arch.parallel import in_flight_micro_batches
from memplan.arch.tensors import Layer
from memplan.catalog.schema import Family, ModelSpec
from memplan.config import JobConfig, Recompute
from memplan.memory import activations_amp as amp_extra
from memplan.memory import activations_block as blk
from memplan.memory import activations_ffn as ffn
from memplan.memory import activations_lora as lora
from memplan.memory import activations_terms as t
from memplan.memory import bnb_workspace, flash_workspace, hf_legacy, litgpt, megatron_recompute, sdpa_workspace
from memplan.memory.breakdown import Phase, Row, Tier
from memplan.memory.context import Context
from memplan.memory.context_parallel import exchange_bytes, local_seq_len
from memplan.memory.memo import canonical_layers, per_layer_class, size_free
from memplan.units import ceil_div

SRC_BLOCK = "autograd saved tensors of the HF block (activations_block); Korthikanti et al. 2022"
SAVED_ROWS = ("activations/embeddings", "activations/rotary", "activations/layer_kwargs", "activations/layers",
              "activations/final_norm", "activations/loss")
"""Rows made of tensors saved for backward (what ``memplan.measure.saved`` measures); the others are peaks."""


def modelled(ctx: Context) -> bool:
    """Whether training activations can be estimated: a training job on a model with blocks."""
    return ctx.cfg.job.trains and bool(ctx.arch.layers) and ctx.arch.spec.family is not Family.PARAMS_ONLY


def counting_for(cfg: JobConfig) -> blk.Counting:
    """The accounting the job asks for: PyTorch on CUDA, or the paper's."""
    return blk.PAPER if cfg.effective_activation_accounting == "paper" else blk.CUDA


def micro_batches_in_flight(ctx: Context) -> int:
    """Micro-batches whose activations the reported stage holds: pp - stage under 1F1B, more with the
    interleaved schedule, never more than the step's ``grad_accum`` (``arch.parallel.in_flight_micro_batches``)."""
    return in_flight_micro_batches(ctx.cfg.pp, ctx.stage, ctx.cfg.perf.virtual_stages, ctx.cfg.grad_accum)


def layer_modes(ctx: Context) -> dict[int, Recompute]:
    """Recompute mode of each layer of the reported stage.

    ``cfg.recompute_map`` (the planner's per-layer choice) gives one mode per layer. Otherwise
    ``recompute_layers = k`` of L layers gives each stage floor(k·n/L) of its n layers, its first
    ones, in mode ``cfg.recompute`` (rounding down keeps more activations, the safe direction),
    and None checkpoints every layer.
    """
    cfg, stage = ctx.cfg, [i for i, _ in ctx.layers]
    if cfg.recompute_map is not None:
        return {i: cfg.recompute_map[i] for i in stage}
    if cfg.recompute is Recompute.NONE:
        return dict.fromkeys(stage, Recompute.NONE)
    if cfg.recompute_layers is None:
        return dict.fromkeys(stage, cfg.recompute)
    count = min(len(stage), cfg.recompute_layers * len(stage) // len(ctx.arch.layers))
    return {i: cfg.recompute if n < count else Recompute.NONE for n, i in enumerate(stage)}


def checkpointed(ctx: Context) -> set[int]:
    """Layer indices of the reported stage that recompute (see ``layer_modes``)."""
    return {i for i, mode in layer_modes(ctx).items() if mode is not Recompute.NONE}


@size_free
def _trainables(ctx: Context) -> tuple[blk.Trainable, ...]:
    """Each layer's trained weights and adapters (``activations_lora.block_trainable``): size-free, memoized.

    Computed once per class of alike blocks (``memory.memo.canonical_layers``: equal but for their tensors' names),
    first block apart, and format (``weights.layer_format``): ``block_trainable`` reads the layer's tensors but for
    their names (the adapters it builds carry names, not read), and the index only through ``layer_index != 0``
    and the layer's format."""
    from memplan.memory.weights import layer_format

    family, cfg, classes = ctx.arch.spec.family, ctx.cfg, canonical_layers(ctx.arch)
    done: dict[tuple, blk.Trainable] = {}
    out = []
    for i, layer in enumerate(ctx.arch.layers):
        key = (classes[i][0], i == 0, layer_format(cfg, i))
        if key not in done:
            done[key] = lora.block_trainable(family, layer, cfg, i)
        out.append(done[key])
    return tuple(out)


def block_terms(ctx: Context, layer_index: int, counting: blk.Counting) -> list[blk.Term]:
    """Every term one block saves for one micro-batch on one rank, without recompute; computed once per class
    of alike blocks (``memory.memo.per_layer_class``: the terms read the layer, not its index or names)."""
    return per_layer_class(ctx, layer_index, _block_terms, _trainables(ctx)[layer_index], counting,
                           _amp(ctx, counting))


def _block_terms(spec: ModelSpec, cfg: JobConfig, layer: Layer, tr: blk.Trainable,
                 counting: blk.Counting, amp_fp32: bool) -> list[blk.Term]:
    dm = blk.dims(spec, cfg)
    amp = [blk.Term("amp_fp32", amp_extra.block_extra_bytes(spec, layer, dm))] if amp_fp32 else []
    return (blk.norm_terms(spec, layer, dm, counting, tr) + blk.attention_terms(spec, layer, cfg, dm, counting, tr)
            + ffn.mlp_terms(spec, layer, dm, counting, tr) + ffn.dropout_terms(spec, cfg, dm, counting)
            + ffn.adapter_terms(dm, tr, counting) + _litgpt_adapter(cfg, dm, counting, tr) + amp)


def _litgpt_adapter(cfg: JobConfig, dm: blk.Dims, counting: blk.Counting, tr: blk.Trainable) -> list[blk.Term]:
    """litgpt's one fused q/k/v adapter per block (``memory.litgpt.qkv_adapter_bytes``); [] in the HF layout."""
    adapted = tuple(p for p in litgpt.QKV if p in tr.adapted)
    if not litgpt.applies(cfg) or not adapted:
        return []
    value = litgpt.qkv_adapter_bytes(
        tokens=dm.tokens, d=dm.d, widths={"q": dm.n * dm.h, "k": dm.k * dm.h, "v": dm.k * dm.h}, adapted=adapted,
        rank=cfg.lora.rank, bits=tr.adapter_bits, dropout=cfg.lora.dropout > 0,
        mask_bits=tr.adapter_bits if counting.cpu else counting.mask_bits, input_grad=tr.input_grad)
    return [blk.Term("lora/qkv_adapter", value)]


def _amp(ctx: Context, counting: blk.Counting) -> bool:
    """PyTorch AMP's fp32 residual stream applies (not to the paper's 16-bit accounting)."""
    return not counting.paper and amp_extra.autocast_amp(ctx)


def layer_micro_bytes(ctx: Context, layer_index: int, mode: Recompute, counting: blk.Counting | None = None) -> int:
    """Bytes one block keeps for one micro-batch under ``mode``: all terms, the non-core ones, or its input."""
    spec, cfg = ctx.arch.spec, ctx.cfg
    counting = counting or counting_for(cfg)
    if mode is Recompute.FULL:  # under AMP the block input is the fp32 residual stream
        full = blk.block_input_bytes(spec, cfg)
        return 2 * full if _amp(ctx, counting) else full
    if mode is Recompute.OP:
        from memplan.memory.activations_op import op_layer_bytes

        return op_layer_bytes(ctx, layer_index)
    return per_layer_class(ctx, layer_index, _kept_bytes, _trainables(ctx)[layer_index], counting, mode,
                           _amp(ctx, counting))


def _kept_bytes(spec: ModelSpec, cfg: JobConfig, layer: Layer, tr: blk.Trainable, counting: blk.Counting,
                mode: Recompute, amp_fp32: bool) -> int:
    terms = _block_terms(spec, cfg, layer, tr, counting, amp_fp32)
    mods = megatron_recompute.modules(cfg) if mode is Recompute.SELECTIVE else None
    if mods is not None:  # Megatron-Core's --recompute-modules (memory.megatron_recompute)
        dm = blk.dims(spec, cfg)
        top_k = layer.experts_per_token or spec.num_experts_per_tok or 0
        expert_ffn = ceil_div(spec.moe_intermediate_size or spec.intermediate_size or 0, dm.tp)
        impl = blk.attention_impl(spec, cfg)
        fused = impl in ("flash", "sdpa") and not counting.cpu
        terms = megatron_recompute.apply(spec, dm, counting, terms, mods, moe_layer=layer.moe, pairs=dm.seq_tokens * top_k,
                                         expert_ffn=expert_ffn, down_trains=tr.routed_trains("down"),
                                         mla_widths=blk.mla_qkv_widths(spec, dm.n, impl) if fused else None)
        return sum(term.bytes for term in terms)
    return sum(term.bytes for term in terms if mode is Recompute.NONE or not term.core)


def stage_layers_bytes(ctx: Context, modes: dict[int, Recompute], counting: blk.Counting) -> int:
    """Sum of ``layer_micro_bytes`` over the stage's blocks (bytes, one micro-batch): blocks of one class
    (``memory.memo.canonical_layers``) with equal trained weights and mode keep equal bytes, so each such kind is
    computed once and counted; ``Recompute.OP`` blocks are summed one by one (``op_layer_bytes`` takes the index)."""
    classes, trainables = canonical_layers(ctx.arch), _trainables(ctx)
    kinds: dict[tuple, list[int]] = {}
    total = 0
    for i, _ in ctx.layers:
        if modes[i] is Recompute.OP:
            total += layer_micro_bytes(ctx, i, modes[i], counting)
        else:
            kinds.setdefault((classes[i][0], trainables[i], modes[i]), []).append(i)
    return total + sum(len(idx) * layer_micro_bytes(ctx, idx[0], modes[idx[0]], counting) for idx in kinds.values())


def chunk_saved_bytes(ctx: Context, modes: dict[int, Recompute], counting: blk.Counting) -> dict[str, tuple[int, ...]]:
    """One micro-batch's saved bytes per model chunk of the reported stage (v = ``virtual_stages`` chunks, 1 without
    interleaving), by row: ``activations/layers`` (the stage's blocks split into chunks in order,
    ``arch.interleaved.chunk_layer_counts``), the embedding on chunk 0 of the first stage, the final norm and loss on
    chunk v − 1 of the last."""
    cfg = ctx.cfg
    v = max(1, cfg.perf.virtual_stages) if cfg.pp > 1 else 1
    per_layer = [layer_micro_bytes(ctx, i, modes[i], counting) for i, _ in ctx.layers]
    chunks, start = [], 0
    for size in chunk_layer_counts(len(per_layer), v, first_stage=ctx.stage == 0):
        chunks.append(sum(per_layer[start:start + size]))
        start += size
    out = {"activations/layers": tuple(chunks)}
    ends = {"activations/embeddings": (0, embedding_bytes, ctx.stage == 0),
            "activations/final_norm": (v - 1, final_norm_bytes, ctx.stage == cfg.pp - 1),
            "activations/loss": (v - 1, loss_bytes, ctx.stage == cfg.pp - 1)}
    for name, (chunk, fn, present) in ends.items():
        if present:
            out[name] = tuple(fn(ctx, counting) if c == chunk else 0 for c in range(v))
    return out


def peak_chunk_counts(ctx: Context, modes: dict[int, Recompute],
                      counting: blk.Counting) -> tuple[dict[str, tuple[int, ...]], tuple[int, ...]]:
    """(``chunk_saved_bytes``, micro-batches each chunk holds) at the moment the interleaved stage's saved bytes are
    largest (``arch.interleaved.peak_chunk_bytes`` weighted by one micro-batch's bytes of each chunk); v > 1, pp > 1."""
    per = chunk_saved_bytes(ctx, modes, counting)
    weights = tuple(sum(col) for col in zip(*per.values(), strict=True))
    return per, peak_chunk_bytes(ctx.cfg.pp, ctx.stage, ctx.cfg.grad_accum, weights)[1]


def layer_flights(ctx: Context, modes: dict[int, Recompute], counting: blk.Counting) -> dict[int, int]:
    """Micro-batches each of the stage's blocks holds at the stage's peak: ``micro_batches_in_flight`` for every block
    under 1F1B; under the interleaved schedule its chunk's count at the moment ``in_flight_saved`` takes."""
    cfg, v = ctx.cfg, max(1, ctx.cfg.perf.virtual_stages)
    if v <= 1 or cfg.pp <= 1:
        return dict.fromkeys((i for i, _ in ctx.layers), micro_batches_in_flight(ctx))
    counts = peak_chunk_counts(ctx, modes, counting)[1]
    sizes = chunk_layer_counts(len(ctx.layers), v, first_stage=ctx.stage == 0)
    chunk_of = [c for c, size in enumerate(sizes) for _ in range(size)]
    return {i: counts[chunk_of[k]] for k, (i, _) in enumerate(ctx.layers)}


def in_flight_saved(ctx: Context, modes: dict[int, Recompute], counting: blk.Counting, flight: int) -> dict[str, int]:
    """The saved rows that scale with the micro-batches in flight at the stage's peak: the blocks, and the embedding
    (first stage) and final norm and loss (last stage).

    1F1B (v = 1): ``flight`` × one micro-batch's bytes. Interleaved (v > 1, pp > 1): counted per chunk
    (``chunk_saved_bytes``), each chunk's micro-batches in flight taken at the moment the stage's sum is largest
    (``arch.interleaved.peak_chunk_bytes``: the order of Megatron's ``forward_backward_pipelining_with_interleaving``
    and torch's ``ScheduleInterleaved1F1B``), instead of ⌈chunk micro-batches / v⌉ whole stages. The planner's
    linear model keeps the rounded-up whole-stage count."""
    cfg, v = ctx.cfg, max(1, ctx.cfg.perf.virtual_stages)
    if v <= 1 or cfg.pp <= 1:
        out = {"activations/layers": flight * stage_layers_bytes(ctx, modes, counting)}
        if ctx.stage == 0:
            out["activations/embeddings"] = flight * embedding_bytes(ctx, counting)
        if ctx.stage == cfg.pp - 1:
            out["activations/final_norm"] = flight * final_norm_bytes(ctx, counting)
            out["activations/loss"] = flight * loss_bytes(ctx, counting)
        return out
    per, counts = peak_chunk_counts(ctx, modes, counting)
    return {name: sum(n * b for n, b in zip(counts, each, strict=True)) for name, each in per.items()}


def layer_bytes(ctx: Context, layer_index: int, mode: Recompute) -> int:
    """Bytes layer ``layer_index`` adds to the reported GPU under ``mode``, all micro-batches in flight.

    For the planner's per-layer choice; the recompute workspace is ``workspace_bytes``.
    """
    return micro_batches_in_flight(ctx) * layer_micro_bytes(ctx, layer_index, mode)


def _core_bytes(ctx: Context, layer_index: int, counting: blk.Counting) -> int:
    return sum(term.bytes for term in block_terms(ctx, layer_index, counting) if term.core)


def workspace_bytes(ctx: Context, mode: Recompute, layers: set[int], counting: blk.Counting | None = None) -> int:
    """Bytes live again while one checkpointed block is recomputed in backward (one micro-batch).

    Full and op-level: the largest checkpointed block's saved tensors (op-level recomputes the rest of the block,
    alive with the outputs it kept); selective: its S×S attention core; Megatron's ``--recompute-modules``: all
    that the modules dropped from the block (an upper bound: Megatron rebuilds each just before its consumer's
    backward).
    Source: Korthikanti et al. 2022 Sec. 5 (recomputation happens one layer at a time).
    """
    counting = counting or counting_for(ctx.cfg)
    if mode is Recompute.NONE or not layers:
        return 0
    if mode in (Recompute.FULL, Recompute.OP):
        return max(layer_micro_bytes(ctx, i, Recompute.NONE, counting) for i in layers)
    if megatron_recompute.modules(ctx.cfg) is not None:  # what Megatron's modules dropped, rebuilt for one layer
        return max(layer_micro_bytes(ctx, i, Recompute.NONE, counting)
                   - layer_micro_bytes(ctx, i, Recompute.SELECTIVE, counting) for i in layers)
    return max(_core_bytes(ctx, i, counting) for i in layers)


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


def breakdown(ctx: Context, counting: blk.Counting | None = None) -> dict[str, int]:
    """Component name -> bytes on the reported GPU; empty when not modelled or for inference."""
    if not modelled(ctx):
        return {}
    counting = counting or counting_for(ctx.cfg)
    cfg, flight = ctx.cfg, micro_batches_in_flight(ctx)
    modes = layer_modes(ctx)
    ckpt = {i for i, mode in modes.items() if mode is not Recompute.NONE}
    saved = in_flight_saved(ctx, modes, counting, flight)
    out = {"activations/layers": saved["activations/layers"]}
    out["activations/recompute_workspace"] = max(
        (workspace_bytes(ctx, modes[i], {i}, counting) for i in ckpt), default=0)
    out["activations/rotary"] = flight * rotary_table_bytes(ctx, counting)
    out["activations/cp_exchange"] = exchange_bytes(ctx.arch.spec, cfg)
    out["activations/layer_kwargs"] = flight * layer_kwargs_bytes(ctx, ckpt, counting)
    out |= {name: b for name, b in saved.items() if name != "activations/layers"}
    if ctx.stage == cfg.pp - 1:
        out["activations/logits"] = logits_peak_bytes(ctx, counting)
        out["activations/kept_output"] = kept_output_bytes(ctx, counting)
    out["activations/dequant_workspace"] = bnb_workspace.dequant_workspace_bytes(ctx)
    out["activations/bnb_retained_inputs"] = bnb_workspace.retained_input_bytes(ctx)
    previous = litgpt.previous_tokens(cfg)  # litgpt's loop: the previous micro-batch's output, into the next forward
    if previous and ctx.stage == cfg.pp - 1:
        out["activations/kept_output_previous"] = kept_output_bytes(ctx, counting, previous)
    if previous:
        out["activations/bnb_retained_previous"] = bnb_workspace.retained_input_bytes(ctx, previous)
    return {name: value for name, value in out.items() if value}


def saved_bytes_estimate(ctx: Context, counting: blk.Counting | None = None) -> int:
    """Bytes saved for backward at the end of the forward pass (the rows in SAVED_ROWS)."""
    return sum(v for k, v in breakdown(ctx, counting).items() if k in SAVED_ROWS)


_SOURCES = {
    "activations/layers": SRC_BLOCK,
    "activations/recompute_workspace": "one checkpointed block recomputed in backward (Korthikanti et al. 2022 Sec. 5)",
    "activations/rotary": "cos/sin tables saved by apply_rotary_pos_emb, 2·S·H·b/8",
    "activations/layer_kwargs": "(B, 1, S, S) masks and position ids held by checkpointed blocks",
    "activations/embeddings": "int64 token ids (+ position ids) and embedding dropout mask",
    "activations/final_norm": "final norm + lm_head input (Korthikanti et al. 2022 Sec. 4.3)",
    "activations/loss": "log-softmax output 4·B·S·V/t + int64 targets (HF ForCausalLMLoss)",
    "activations/logits": "logits + fp32 copy, or their two fp32 gradients, whichever is larger",
    "activations/kept_output": "logits of the model output the training loop holds until after the step",
    "activations/bnb_retained_inputs": "bitsandbytes <= 0.43.1 MatMul4Bit ctx.tensors = (A, B): one micro-batch's "
                                       "quantized-linear inputs, alive while the graph is referenced "
                                       "(memory.bnb_workspace)",
    "activations/bnb_retained_previous": "the previous micro-batch's bitsandbytes <= 0.43.1 quantized-linear inputs, "
                                         "held by litgpt's loop through the next forward (memory.bnb_workspace)",
    "activations/kept_output_previous": "the previous micro-batch's logits, held by litgpt's loop (logits = model(...))"
                                        " until the next forward returns (memory.litgpt)",
    "activations/dequant_workspace": "bitsandbytes MatMul4Bit/MatMul8bitLt: the largest quantized weight dequantized "
                                     "to 16 bits (memory.bnb_workspace)",
    "activations/cp_exchange": "context parallelism: key/value exchange buffers of one attention (context_parallel)",
    "activations/sdpa_backward_workspace": "SDPA memory-efficient kernel's fp32 dQ (and dK/dV) staging and delta "
                                           "of one attention's backward (memory.sdpa_workspace)",
    "activations/flash_backward_workspace": "flash-attention 2 backward's fp32 dq_accum and softmax_d, and the "
                                            "16-bit dK/dV of every query head under GQA/MQA, of one attention's "
                                            "backward (memory.flash_workspace)",
}


def rows(ctx: Context) -> list[Row]:
    """GPU rows of training activations for the reported stage; [] for inference or params-only models."""
    saved = "saved for backward"
    dequant = {"activations/dequant_workspace": bnb_workspace.dequant_phases(ctx),
               "activations/bnb_retained_inputs": bnb_workspace.retained_phases(ctx.cfg)}
    out = [Row(name, Tier.GPU, value, _SOURCES[name], saved if name in SAVED_ROWS else "transient peak",
               dequant.get(name)) for name, value in breakdown(ctx).items()]
    if not out:
        return out
    out += _attention_backward_rows(ctx)
    if ctx.cfg.transformers_version is None:
        return out
    checkpointed = any(mode is not Recompute.NONE for mode in layer_modes(ctx).values())
    return out + hf_legacy.rows(ctx, blk.attention_impl(ctx.arch.spec, ctx.cfg), blk.activation_bits(ctx.cfg),
                                checkpointed)


def _attention_backward_rows(ctx: Context) -> list[Row]:
    """The attention kernel's backward workspace: the memory-efficient kernel's (masked layers) or flash's
    (the others); where a model has both kinds of layers only the larger, since one layer's backward runs at a
    time."""
    rows = _sdpa_workspace_rows(ctx) + _flash_workspace_rows(ctx)
    return [max(rows, key=lambda r: r.bytes)] if rows else []


def _flash_kernel(ctx: Context) -> tuple[bool, int, int] | None:
    """(Dao-AILab's kernel, query heads, key/value heads) where a 16-bit CUDA job's attention runs flash-attention 2:
    ``attention="flash"`` (transformers' flash_attention_2, the flash_attn package), or SDPA on an Ampere-or-newer
    GPU (flash needs sm80: ``mha_bwd``'s check; T4/V100 are the catalog's GPUs without bf16) with at least one
    unmasked layer (``sdp_utils.cpp``: flash refuses ``attn_mask``), head dims ≤ 256 and equal q/k and v head dims
    (not MLA, not Falcon's multi-query math path); None otherwise. Heads as the kernel sees them: k and v copied
    to N heads by litgpt, ``repeat_kv`` (transformers 4.37-4.40 SDPA), Falcon's new decoder, MLA's expand_kv."""
    spec, cfg = ctx.arch.spec, ctx.cfg
    impl = blk.attention_impl(spec, cfg)
    if (blk.activation_bits(cfg) == t.FP32_BITS or counting_for(cfg) is not blk.CUDA or not ctx.gpu.supports_bf16
            or impl not in ("flash", "sdpa")):
        return None
    dm = blk.dims(spec, cfg)
    n, k = dm.n, dm.k
    if impl == "flash":
        return True, n, (n if spec.is_mla or blk.falcon_broadcasts_kv(spec) else k)
    mqa_math = spec.family is Family.FALCON and spec.kv_heads == 1 < (spec.num_attention_heads or 1)
    if spec.is_mla or mqa_math or hf_legacy.explicit_mask(spec, cfg, impl) or all(
            blk.sdpa_mask_materialized(spec, layer, impl, dm.s) for layer in ctx.arch.layers):
        return None
    expanded = litgpt.applies(cfg) or hf_legacy.repeats_kv(cfg, impl) or blk.falcon_broadcasts_kv(spec)
    return False, n, (n if expanded else k)


def _flash_workspace_rows(ctx: Context) -> list[Row]:
    """Backward-phase row of flash-attention 2's workspace (``flash_workspace.backward_workspace_bytes``) for one
    attention call of one layer; [] where flash does not run (``_flash_kernel``)."""
    spec, cfg = ctx.arch.spec, ctx.cfg
    kernel = _flash_kernel(ctx)
    dm = blk.dims(spec, cfg)
    head_dim = (spec.qk_nope_head_dim or 0) + (spec.qk_rope_head_dim or 0) if spec.is_mla else dm.h
    if kernel is None or not head_dim or head_dim > flash_workspace.MAX_HEAD_DIM:
        return []
    dao, n, kv = kernel
    value = flash_workspace.backward_workspace_bytes(dm.b, n, kv, dm.s, dm.s, head_dim, bits=dm.bits, dao=dao)
    name = "activations/flash_backward_workspace"
    return [Row(name, Tier.GPU, value, _SOURCES[name], "one attention's backward", frozenset({Phase.BACKWARD}))]


def _sdpa_workspace_rows(ctx: Context) -> list[Row]:
    """Backward-phase row of SDPA's memory-efficient kernel workspace, where a 16-bit CUDA job's attention gets an
    explicit mask (transformers 4.38-4.39's 4-D mask, sliding windows shorter than S, Falcon): flash refuses
    ``attn_mask`` (``sdp_utils.cpp``), the cutlass kernel takes it; [] otherwise."""
    spec, cfg = ctx.arch.spec, ctx.cfg
    impl, bits = blk.attention_impl(spec, cfg), blk.activation_bits(cfg)
    if impl != "sdpa" or bits == t.FP32_BITS or counting_for(cfg) is not blk.CUDA:
        return []
    dm = blk.dims(spec, cfg)
    masked = hf_legacy.explicit_mask(spec, cfg, impl) or any(
        blk.sdpa_mask_materialized(spec, layer, impl, dm.s) for layer in ctx.arch.layers)
    if not masked or not dm.n or not dm.h:
        return []
    value = (sdpa_workspace.backward_workspace_bytes(dm.b, dm.n, dm.s, dm.s, dm.h, dm.h)
             + sdpa_workspace.delta_bytes(dm.b, dm.n, dm.s))
    name = "activations/sdpa_backward_workspace"
    return [Row(name, Tier.GPU, value, _SOURCES[name], "one attention's backward", frozenset({Phase.BACKWARD}))]
