"""llama.cpp's GPU compute buffer: the working sets of one ubatch's graph, and which one a GPU of the split gets.

``compute_terms`` are the one-copy working sets (attention, FFN, logits) as ggml-alloc reuses freed tensors;
``gpu_compute_bytes`` picks, per GPU, the single-copy buffer, the pipeline-parallel one
(``memplan.engines.llamacpp_sched``) or the partial-offload one (``memplan.engines.llamacpp_offload``);
``host_working_set`` is the CPU's own share under -ngl partial offload.
"""

from __future__ import annotations

from memplan.memory.context import Context

F32_BYTES = 4
F16_BYTES = 2
EMBD_WORK_TENSORS = 4
"""f32 tensors of n_embd × n_ubatch alive next to the attention scores: the layer input, the residual, the
attention output and the current hidden state (src/llama-graph.cpp ``build_attn``/``build_ffn``)."""
FFN_INTERMEDIATES = 3
"""n_ff × n_ubatch f32 tensors alive in the FFN: gate, up and their fused swiglu (src/llama-graph.cpp ``build_ffn``)."""
FFN_EMBD_TENSORS = EMBD_WORK_TENSORS
"""n_embd × n_ubatch f32 tensors alive next to them, the same allowance as the attention's: ``build_ffn`` names two
(the FFN's residual input and its normed input); on the one log whose FFN sets the buffer (Mistral-Small-24B,
n_ubatch 4096, two GPUs, a build with ``ggml_set_rows``; tests/test_llamacpp_pipeline.py) two leave memplan 128.00 MiB
(0.96%) under, four 32.00 MiB (0.25%) over; the rest is ggml-alloc's free-block fragmentation, not modelled, so the
conservative four."""


def ffn_width(ctx: Context) -> int:
    """Values per token of one FFN intermediate: n_ff, or for MoE n_ff_exp × n_expert_used (``build_moe_ffn``)."""
    spec = ctx.arch.spec
    if spec.num_experts and spec.moe_intermediate_size:
        return spec.moe_intermediate_size * (spec.num_experts_per_tok or 1)
    return spec.intermediate_size or 0


def mask_bytes(ctx: Context, cells: int, first_gpu: bool, held: bool) -> tuple[int, int]:
    """(attention's, FFN's) KQ-mask bytes in a GPU's working set, every mask counted (``llamacpp_inputs``).

    Without flash attention the masks are the f32 inputs. With it each f32 mask is cast to f16 in the first layer that
    reads it, on the first GPU; the f32 copy is freed after its cast, and the copies of the masks are allocated at the
    start of the split, so with masks a (read first) and b the attention holds 4a + 2a + 4b at a's cast and
    2a + 4b + 2b at b's; later GPUs copy the f16 casts. ``held``: the inputs are counted elsewhere (pipeline
    parallelism's held copies), only the casts made on this GPU remain. Source: src/llama-graph.cpp
    (``build_attn_inp_kv``, ``build_attn_inp_kv_iswa``: ``ggml_cast(..., GGML_TYPE_F16)``), ggml-backend.cpp
    (split inputs allocated at the split's start).
    """
    from memplan.engines.llamacpp_inputs import mask_row_counts

    rows = mask_row_counts(ctx, cells)
    if not ctx.cfg.serve.flash_attn:
        return (0, 0) if held else (sum(rows) * F32_BYTES,) * 2
    live = sum(rows) * F16_BYTES
    if not first_gpu:
        return (0, 0) if held else (live, live)
    if held:
        return live, live
    a, b = rows[0], sum(rows[1:])
    return live + max(a * F32_BYTES + b * (F32_BYTES - F16_BYTES), b * F32_BYTES), live


def compute_terms(ctx: Context, cells: int, with_output: bool, first_gpu: bool = True,
                  held: bool = False) -> dict[str, int]:
    """The working sets whose largest is a GPU's compute buffer for one ubatch (bytes): attention, FFN, logits.

    Formula: attention = the masks (``mask_bytes``) + KV index inputs (``llamacpp_inputs.kv_index_bytes``) +
    4·n_embd·n_ubatch·4 + without flash attention KQ, n_kv·n_ubatch·n_head·4 (softmax in place); with it no KQ
    exists. FFN = the live masks + the index inputs + 3·n_ff·n_ubatch·4 (gate, up and the fused swiglu output;
    ``ggml_swiglu_split`` is not in place) + 4·n_embd·n_ubatch·4 (``FFN_EMBD_TENSORS``). Logits =
    n_ubatch·(n_vocab + n_embd)·4 where the output layer is (the masks and indices are freed after the last layer).
    ``held``: leave out the graph inputs, held apart under pipeline parallelism (``llamacpp_sched``).
    Source: src/llama-graph.cpp (``build_attn_mha``, ``build_attn_inp_kv``, ``build_ffn``), src/llama-context.cpp
    (``graph_reserve`` with n_outputs = n_ubatch), ggml/src/ggml-alloc.c (``ggml_op_can_inplace``).
    Assumption: ggml-alloc reuses freed tensors perfectly; an approximation of the allocator (exact within 0.01 MiB on
    the published single-GPU logs, builds before ``ggml_set_rows``), not its byte count. The f32 mask next to its
    f16 cast is the arithmetic of builds before llama.cpp PR #23764 (May 2026: "the f32 mask still uses the compute
    buffer even though it is not used"); later builds create the mask in f16 and need n_kv·n_ubatch·4 bytes less
    there (memplan over, the safe side).
    """
    from memplan.engines.llamacpp_inputs import kv_index_bytes
    from memplan.engines.llamacpp_sched import ubatch

    spec, s = ctx.arch.spec, ctx.cfg.serve
    ub = ubatch(ctx, cells)
    embd, heads, vocab = spec.hidden_size or 0, spec.num_attention_heads or 0, spec.vocab_size or 0
    work = EMBD_WORK_TENSORS * embd * ub * F32_BYTES
    attn_mask, ffn_mask = mask_bytes(ctx, cells, first_gpu, held)
    idxs = 0 if held else kv_index_bytes(ctx, cells)
    scores = 0 if s.flash_attn else cells * ub * heads * F32_BYTES
    attention = scores + attn_mask + idxs + work
    ffn = ffn_mask + idxs + (FFN_INTERMEDIATES * ffn_width(ctx) + FFN_EMBD_TENSORS * embd) * ub * F32_BYTES
    logits = ub * (vocab + embd) * F32_BYTES if with_output else 0
    return {"attention": attention, "ffn": ffn, "logits": logits}


def compute_bytes(ctx: Context, cells: int, with_output: bool | None = None, first_gpu: bool = True) -> int:
    """The GPU compute buffer of one ubatch with one copy of each input: the largest of ``compute_terms`` (bytes)."""
    from memplan.engines.llamacpp_sched import output_on_gpu

    out = output_on_gpu(ctx.cfg, len(ctx.arch.layers)) if with_output is None else with_output
    return max(compute_terms(ctx, cells, out, first_gpu).values())


def gpu_compute_bytes(ctx: Context, cells: int, mine: list[int], my_out: bool, *, kv_layer: int,
                      output_weights: int) -> int:
    """This GPU's compute buffer (bytes): ``compute_bytes`` with one copy of each input, or under pipeline parallelism
    (``llamacpp_sched.n_copies`` > 1) ``llamacpp_sched.pp_compute_bytes``; on the first GPU under -ngl partial offload
    at least the working set of the CPU ops it runs (``llamacpp_offload.offload_bytes``, given one layer's KV bytes
    ``kv_layer`` and the CPU output layer's weight bytes ``output_weights``); 0 on any other GPU with no layer."""
    from memplan.engines import llamacpp_offload, llamacpp_sched

    n_layer = len(ctx.arch.layers)
    ub = llamacpp_sched.ubatch(ctx, cells)
    offload = 0
    if llamacpp_offload.applies(ctx, ub, ctx.stage):
        terms = compute_terms(ctx, cells, False, first_gpu=True)
        offload = llamacpp_offload.offload_bytes(ctx, cells, ub, terms, kv_layer, output_weights)
    if not mine and not my_out:
        return offload
    first = bool(mine) and mine[0] == min(llamacpp_sched.gpu_layers(ctx.cfg, n_layer), default=-1)
    if llamacpp_sched.n_copies(ctx.cfg, n_layer) == 1:
        return max(compute_bytes(ctx, cells, with_output=my_out, first_gpu=first), offload)
    terms = compute_terms(ctx, cells, my_out, first, held=True)
    placement = (first, bool(mine), n_layer - 1 in mine)
    return llamacpp_sched.pp_compute_bytes(ctx, cells, terms, placement)


def host_working_set(ctx: Context, cells: int, ub: int) -> int:
    """The CPU's own working set under -ngl partial offload when it keeps its ops (``--no-op-offload`` or n_ubatch
    below 32): the largest of the one-copy attention, FFN and (output layer on the CPU) logits terms (bytes); 0 when
    every layer is offloaded or the first GPU takes the CPU's ops (``llamacpp_offload.applies``). Source: as
    ``compute_terms``, the CPU backend's graph allocation being the same ggml-alloc over the CPU's splits; the graph
    inputs (masks, KV index inputs) are the host's own tensors, read in place and counted once, in
    ``llamacpp_sched.host_compute_bytes``."""
    from memplan.engines.llamacpp_offload import applies
    from memplan.engines.llamacpp_sched import gpu_layers, output_on_gpu

    cfg, n_layer = ctx.cfg, len(ctx.arch.layers)
    cpu_layers = n_layer - len(gpu_layers(cfg, n_layer))
    out_cpu = not output_on_gpu(cfg, n_layer)
    if not (cpu_layers or out_cpu) or applies(ctx, ub, 0):
        return 0
    terms = compute_terms(ctx, cells, out_cpu, first_gpu=True, held=True)  # its inputs: host_compute_bytes
    return max(terms["logits"], terms["attention"] if cpu_layers else 0, terms["ffn"] if cpu_layers else 0)
