"""Training activations per block: each layer's recompute mode, the counting, and the bytes one block keeps.

One micro-batch's saved bytes of a block under ``none`` / ``selective`` / ``full`` / ``op`` recompute (Korthikanti
et al. 2022, Sec. 5; Megatron-Core's ``--recompute-modules`` through ``memory.megatron_recompute``), the micro-batches
in flight of 1F1B (Narayanan et al. 2021, Sec. 2.2), and the recompute workspace. Under fp8 training on megatron the
Linear inputs TransformerEngine saves in fp8 change the block's bytes (``memory.te_fp8``). Split out of
``memory.activations``, which re-exports every name.
"""

from __future__ import annotations

from memplan.arch.parallel import in_flight_micro_batches
from memplan.arch.tensors import Layer
from memplan.catalog.schema import Family, ModelSpec
from memplan.config import Engine, JobConfig, Recompute
from memplan.memory import accelerate_fp8, litgpt, megatron_recompute, te_fp8
from memplan.memory import activations_amp as amp_extra
from memplan.memory import activations_block as blk
from memplan.memory import activations_ffn as ffn
from memplan.memory import activations_lora as lora
from memplan.memory.context import Context
from memplan.memory.memo import canonical_layers, per_layer_class, size_free
from memplan.units import ceil_div


def modelled(ctx: Context) -> bool:
    """Whether training activations can be estimated: a training job on a model with blocks."""
    return ctx.cfg.job.trains and bool(ctx.arch.layers) and ctx.arch.spec.family is not Family.PARAMS_ONLY


def counting_for(cfg: JobConfig) -> blk.Counting:
    """The accounting the job asks for: PyTorch on CUDA, or the paper's."""
    return blk.PAPER if cfg.effective_activation_accounting == "paper" else blk.CUDA


def interleave_knobs(cfg: JobConfig) -> tuple[int | None, int]:
    """(g, e) of Megatron's interleaved schedule (``arch.interleaved.warmup_chunk_forwards``): g its
    ``microbatch_group_size_per_vp_stage`` (None: the default), e = 1 extra warm-up forward with
    ``overlap_moe_expert_parallel_comm`` (schedules.py ``get_pp_rank_microbatches``), on engine megatron only."""
    knobs = cfg.engine_config
    if cfg.effective_engine is not Engine.MEGATRON:
        return None, 0
    return knobs.microbatch_group_size_per_vp_stage, int(knobs.overlap_moe_expert_parallel_comm)


def micro_batches_in_flight(ctx: Context) -> int:
    """Micro-batches whose activations the reported stage holds: pp - stage under 1F1B, more with the
    interleaved schedule, never more than the step's ``grad_accum`` (``arch.parallel.in_flight_micro_batches``)."""
    from memplan.memory import pp_schedule_flight as psf

    if psf.named(ctx.cfg):  # a named torch schedule (engine_config.pp_schedule): its replay
        return psf.whole_stage_flight(ctx)
    group, extra = interleave_knobs(ctx.cfg)
    return in_flight_micro_batches(ctx.cfg.pp, ctx.stage, ctx.cfg.perf.virtual_stages, ctx.cfg.grad_accum,
                                   group=group, extra=extra)


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
    fp8 = sum(term.bytes for term in te_fp8.block_terms(spec, layer, cfg, blk.dims(spec, cfg), mods or frozenset()))
    fp8 += sum(term.bytes for term in accelerate_fp8.block_terms(spec, layer, cfg, blk.dims(spec, cfg)))
    if mods is not None:  # Megatron-Core's --recompute-modules (memory.megatron_recompute)
        dm = blk.dims(spec, cfg)
        top_k = layer.experts_per_token or spec.num_experts_per_tok or 0
        expert_ffn = ceil_div(spec.moe_intermediate_size or spec.intermediate_size or 0, dm.tp)
        impl = blk.attention_impl(spec, cfg)
        fused = impl in ("flash", "sdpa") and not counting.cpu
        terms = megatron_recompute.apply(spec, dm, counting, terms, mods, moe_layer=layer.moe, pairs=dm.seq_tokens * top_k,
                                         expert_ffn=expert_ffn, down_trains=tr.routed_trains("down"),
                                         mla_widths=blk.mla_qkv_widths(spec, dm.n, impl) if fused else None)
        return sum(term.bytes for term in terms) + fp8
    return sum(term.bytes for term in terms if mode is Recompute.NONE or not term.core) + fp8


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
