"""bitsandbytes' transient copies of one whole weight: the 16-bit weight a matmul dequantizes, and the fp16 copy a
layer is quantized from while the model loads.

Both are the largest quantized weight of the GPU's tensors in 16 bits (per tp rank), alive for one matmul or one
layer's conversion, on top of everything else alive then:

- ``activations/dequant_workspace`` (``dequant_workspace_bytes``): bitsandbytes' 4-bit matmul runs
  ``torch.nn.functional.linear(A, F.dequantize_4bit(B, state).to(A.dtype).t(), bias)``
  (bitsandbytes/autograd/_functions.py ``MatMul4Bit.forward``, 0.41 to 0.45; ``backward`` dequantizes again for
  ``grad_A``). ``dequantize_4bit`` allocates ``torch.empty(shape, dtype=state dtype)``, the dtype the weight had when
  quantized; ``.to(A.dtype)`` is a second copy when that differs from the compute dtype. Lightning Fabric quantizes
  from ``weight.contiguous().to(device="cuda", dtype=torch.half)`` (lightning/fabric/plugins/precision/
  bitsandbytes.py ``_Linear4bit._quantize_weight``, 2.1 to 2.5), so a bf16 run holds both copies; transformers
  quantizes the weight as loaded (``torch_dtype``), one copy. A single token with no gradient (decoding one
  sequence) takes ``F.gemv_4bit`` instead (``matmul_4bit``: ``A.numel() == A.shape[-1] and not A.requires_grad``),
  with no copy. LLM.int8 (``MatMul8bitLt``) runs int8 kernels forward and dequantizes in backward only:
  ``CB = state.CB.to(ctx.dtype_A, copy=True).mul_(...)`` (one 16-bit copy).
- ``runtime/quantize_workspace`` (``quantize_workspace_bytes``, inference load): the layer being quantized exists as
  a 16-bit GPU copy next to what quantizing it makes. Lightning quantizes every layer a second time, from the
  checkpoint, in a ``load_state_dict`` pre-hook (``_quantize_on_load_hook``) while the whole model, quantized when it
  was built on the GPU, is there: the new quantized tensors are extra (int8: ``double_quant`` returns ``CB`` and
  ``CBt``, both int8, before ``del CBt``). transformers quantizes each weight once as it arrives
  (``Params4bit._quantize``: ``w = self.data.contiguous().to(device)``; ``Int8Params.cuda``: ``double_quant`` then
  ``del CBt``, bitsandbytes < 0.45), so only the 16-bit copy (and int8's ``CBt``) is extra.

GPTQ's exllama kernel keeps the same kind of buffer for good: ``runtime/exllama_temp_dq`` (``exllama_temp_dq_bytes``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from memplan.arch.parallel import sharded_numel
from memplan.config import Job, JobConfig, Recompute
from memplan.dtypes import Dtype
from memplan.errors import MemplanError
from memplan.memory.breakdown import Phase, Row, Tier
from memplan.memory.context import Context
from memplan.memory.memo import UNREAD, size_free
from memplan.memory.quant import Library, get_format, storage
from memplan.memory.weights import (
    alike_key,
    alike_placed,
    effective_quant,
    job_library,
    layer_format,
    placed_tensors,
    quantized_head,
)
from memplan.units import bits_to_bytes

SIXTEEN_BITS = 16
"""Dequantized and load copies are 16-bit (the quantization state's dtype; fp16 for int8 and under Lightning)."""
INT8_BYTES = 1
INT8 = "int8"
"""LLM.int8 (``MatMul8bitLt``), the one 8-bit bitsandbytes format."""


@dataclass(frozen=True)
class Largest:
    """The largest weight the GPU keeps in a bitsandbytes format: per-rank elements, stored bytes, format."""

    numel: int
    stored: int
    fmt: str

    @property
    def int8(self) -> bool:
        return self.fmt == INT8


@size_free
def _largest(ctx: Context) -> Largest | None:
    """The largest weight (per tp rank) the job keeps in a bitsandbytes format, or None; size-free, memoized per
    (architecture, configuration without its sizes, stage) (``memory.memo.size_free``)."""
    cfg = ctx.cfg
    best: Largest | None = None
    layers = len(ctx.arch.layers)
    seen: set[tuple] = set()
    for tensor, layer in alike_placed(ctx):  # the tensors not alike to an earlier one (those the walk reads)
        fmt = layer_format(cfg, layer)
        if fmt is None or get_format(fmt).library is not Library.BITSANDBYTES:
            continue
        key = alike_key(fmt, tensor, layer)
        if key in seen:  # an alike tensor already weighed (the first of equals stays the largest)
            continue
        seen.add(key)
        tensor = replace(tensor, name=UNREAD, copies=1)  # bitsandbytes' rules read neither the name nor the index
        st = storage(fmt, tensor, layer_index=None if layer is None else UNREAD, num_layers=layers, dtype=cfg.dtype,
                     head=quantized_head(cfg))
        numel = sharded_numel(replace(tensor, routed=False), cfg.tp)
        if st.quantized and (best is None or numel > best.numel):
            best = Largest(numel, -(-st.bytes * numel // tensor.numel_each), fmt)
    return best


def dequant_copies(cfg: JobConfig, fmt: str) -> int:
    """16-bit copies of one weight in format ``fmt`` alive in a bitsandbytes matmul: 1, or 2 when Lightning's fp16
    quantization state is cast to a bf16 compute dtype (module docstring); LLM.int8's backward: 1."""
    if cfg.bnb_integration == "lightning" and cfg.dtype is not Dtype.FP16 and fmt != INT8:
        return 2
    return 1


def dequant_workspace_bytes(ctx: Context) -> int:
    """Bytes of the 16-bit copies of the largest bitsandbytes weight dequantized by one matmul.

    Formula: dequant_copies · numel_rank(largest quantized weight) · 2; 0 without a bitsandbytes format, and for
    LLM.int8 when nothing trains (its forward runs int8 kernels).
    Source: module docstring (``MatMul4Bit.forward``/``backward``, ``MatMul8bitLt.backward``).
    Assumptions: the copy lives for one matmul; it is counted with the activations of a training forward (the
    last linear's dequantization, or the first ones of backward, run with nearly all of them alive) and of a
    prefill step.
    """
    largest = _largest(ctx)
    if largest is None or (largest.int8 and not ctx.cfg.job.trains):
        return 0
    return dequant_copies(ctx.cfg, largest.fmt) * bits_to_bytes(largest.numel, SIXTEEN_BITS)


def quantize_workspace_bytes(ctx: Context) -> int:
    """Bytes made while loading, on top of the loaded weights, to quantize the largest bitsandbytes weight.

    Formula: 16-bit copy (numel · 2) + [lightning: the new quantized tensors (4-bit: the stored bytes; int8:
    ``CB`` and ``CBt``, numel each)] + [transformers int8: ``CBt``, numel].
    Source: module docstring (``_quantize_on_load_hook``, ``Params4bit._quantize``, ``Int8Params.cuda``).
    Assumptions: every other weight is on the GPU already (the largest one is converted last).
    """
    largest = _largest(ctx)
    if largest is None:
        return 0
    numel, stored = largest.numel, largest.stored
    copy16 = bits_to_bytes(numel, SIXTEEN_BITS)
    if largest.int8:
        transposed = INT8_BYTES * numel
        return copy16 + transposed + (INT8_BYTES * numel if ctx.cfg.bnb_integration == "lightning" else 0)
    return copy16 + (stored if ctx.cfg.bnb_integration == "lightning" else 0)


def exllama_temp_dq_bytes(ctx: Context) -> int:
    """Bytes of AutoGPTQ's exllama ``temp_dq`` buffer: one fp16 matrix the size of the largest GPTQ linear, allocated
    after loading and kept (the kernel dequantizes into it for cuBLAS on prefill-sized inputs).

    Formula: 2 · max over GPTQ linears of (qweight.numel() · 8) = 2 · max(out · in) (per tp rank).
    Source: auto_gptq/modeling/_utils.py ``autogptq_post_init`` (0.4.x): ``"temp_dq": torch.zeros((1,
    max_dq_buffer_size), dtype=torch.float16)``, ``max_dq_buffer_size = max(submodule.qweight.numel() * 8)``; its
    ``temp_state`` is (1, 1) without act-order. transformers/optimum GPTQ (``GPTQQuantizer.post_init_model``) call it.
    Assumptions: the exllama (v1) kernel, the default of auto-gptq 0.4 (exllamav2's scratch is sized differently).
    """
    cfg, layers = ctx.cfg, len(ctx.arch.layers)
    best = 0
    for tensor, layer in placed_tensors(ctx):
        fmt = layer_format(cfg, layer)
        if fmt is None or get_format(fmt).library is not Library.GPTQ:
            continue
        if storage(fmt, replace(tensor, copies=1), layer_index=layer, num_layers=layers, dtype=cfg.dtype).quantized:
            best = max(best, sharded_numel(replace(tensor, copies=1, routed=False), cfg.tp))
    return bits_to_bytes(best, SIXTEEN_BITS)


def dequant_phases(ctx: Context) -> frozenset[Phase]:
    """Training: forward (plus the start of backward when the output layer itself is quantized and dequantized
    next to the logits' gradient); serving: prefill, and decode when more than one sequence is decoded."""
    cfg = ctx.cfg
    if cfg.job.trains:
        return frozenset({Phase.FORWARD} | ({Phase.BACKWARD_START} if quantized_head(cfg) else set()))
    return frozenset({Phase.PREFILL} | ({Phase.DECODE} if cfg.micro_batch > 1 else set()))


def rows(ctx: Context) -> list[Row]:
    """Serving's GPU rows of both workspaces (empty without a bitsandbytes format), and exllama's buffer for GPTQ;
    a training job's dequantization workspace is an activations row (``activations.breakdown``), so the planner's
    activation tables hold it too."""
    library = job_library(ctx.cfg)
    if library is Library.GPTQ and ctx.cfg.job is Job.INFER:  # training with peft disables exllama
        return [Row("runtime/exllama_temp_dq", Tier.GPU, exllama_temp_dq_bytes(ctx),
                    "auto_gptq modeling/_utils.py autogptq_post_init", "fp16 buffer of the largest GPTQ linear")]
    if ctx.cfg.job not in (Job.LORA, Job.QLORA, Job.INFER) or library is not Library.BITSANDBYTES:
        return []
    out = []
    dequant = dequant_workspace_bytes(ctx) if ctx.cfg.job is Job.INFER else 0  # training: activations.breakdown
    if dequant:
        copies = dequant / bits_to_bytes(_largest(ctx).numel, SIXTEEN_BITS)  # type: ignore[union-attr]
        note = f"{copies:.0f} 16-bit copies of the largest quantized weight ({ctx.cfg.bnb_integration})"
        out.append(Row("activations/dequant_workspace", Tier.GPU, dequant, "bitsandbytes MatMul4Bit/MatMul8bitLt",
                       note, dequant_phases(ctx)))
    if ctx.cfg.job is Job.INFER:
        load = quantize_workspace_bytes(ctx)
        out.append(Row("runtime/quantize_workspace", Tier.GPU, load, "bitsandbytes quantization at load",
                       f"the largest weight quantized from a 16-bit copy ({ctx.cfg.bnb_integration})",
                       frozenset({Phase.LOAD})))
    return out


INPUT_RELEASE_FIX = (0, 43, 2)
"""The first bitsandbytes release whose ``MatMul4Bit.forward`` keeps ``ctx.tensors = (None, B)`` (commit 9e75374,
PR #1270 "fix QLoRA mem bug: delete useless buffered activation", tags 0.43.2+); 0.43.1 and older keep ``(A, B)``
(bitsandbytes/autograd/_functions.py, read at 0.41.0, 0.42.0, 0.43.1, 0.44.0)."""


def bnb_release(cfg: JobConfig) -> tuple[int, ...] | None:
    """``bnb_version`` as a tuple of ints (0.42 -> (0, 42, 0)), or None when not given."""
    if cfg.bnb_version is None:
        return None
    parts = tuple(int(p) for p in cfg.bnb_version.split("."))
    return parts + (0,) * (3 - len(parts))


def matmul4bit_keeps_input(cfg: JobConfig) -> bool:
    """Whether bitsandbytes' 4-bit matmul keeps its input A for backward: yes up to 0.43.1, no from 0.43.2
    (``INPUT_RELEASE_FIX``: ``grad_A`` needs only the weight); an unknown release (None) keeps it (conservative)."""
    release = bnb_release(cfg)
    return release is None or release < INPUT_RELEASE_FIX


def retains_inputs(cfg: JobConfig) -> bool:
    """Whether the kept inputs outlive their backward: ``ctx.tensors`` is a plain attribute, which autograd's
    ``release_variables`` does not clear after the node runs (only ``save_for_backward``'s saved variables), so A
    lives while anything references the graph. Known only when ``bnb_version`` names a release up to 0.43.1."""
    release = bnb_release(cfg)
    return release is not None and release < INPUT_RELEASE_FIX


def check_bnb_version(cfg: JobConfig) -> None:
    """Refuse ``bnb_version`` for a job whose weights are not in a bitsandbytes 4-bit format (no flag is silently
    ignored: the version only changes what the 4-bit matmul keeps)."""
    if cfg.bnb_version is None:
        return
    formats = {f for f in (effective_quant(cfg), *(cfg.quant_map or ())) if f}  # QLoRA's default: nf4-dq
    if not formats or any(get_format(f).library is not Library.BITSANDBYTES or f == INT8 for f in formats):
        raise MemplanError(f"bnb_version={cfg.bnb_version} sets what bitsandbytes' 4-bit matmul keeps for backward; "
                           "set --quant to a 4-bit bitsandbytes format (nf4, nf4-dq, fp4, fp4-dq), or drop --bnb-version.")
    if not cfg.job.trains:
        raise MemplanError("bnb_version matters to training only (what the matmul keeps for backward); "
                           "drop --bnb-version.")


def retained_input_bytes(ctx: Context, tokens: int | None = None) -> int:
    """Bytes of one micro-batch's inputs that bitsandbytes (<= 0.43.1) 4-bit linears keep on ``ctx`` past backward.

    Formula: Σ over the stage's blocks without recompute of b/8·T·(D [q/k/v input, if quantized and needing a
    gradient] + N·H [o input] + D [gate/up input] + F [down input]) + b/8·T·D (the output layer's input, when it is
    quantized and on this stage); T = ``tokens`` (default B·S of the micro-batch), widths per tp rank; 0 unless
    ``retains_inputs``.
    Source: ``retains_inputs`` and ``activations_lora.quantized_inputs``.
    Assumes: a recomputed block keeps none (not modelled: non-reentrant checkpointing bypasses the saved-tensor
    hooks for ``ctx`` attributes).
    """
    if not retains_inputs(ctx.cfg) or not ctx.cfg.job.trains:
        return 0
    from memplan.memory import activations, activations_block
    from memplan.memory import activations_terms as t
    from memplan.memory.activations_lora import first_block_input_grad, quantized_inputs

    cfg = ctx.cfg
    dm = activations_block.dims(ctx.arch.spec, cfg)
    tokens = dm.tokens if tokens is None else tokens
    width = {"q": dm.d, "k": dm.d, "v": dm.d, "o": dm.n * dm.h, "gate": dm.d, "up": dm.d, "down": dm.f}
    shared = {"k": "q", "v": "q", "up": "gate"}  # one input tensor feeds them
    elements = 0
    for i, mode in activations.layer_modes(ctx).items():
        quantized = quantized_inputs(ctx.arch.layers[i], cfg, i) if mode is Recompute.NONE else set()
        if i == 0 and not first_block_input_grad(cfg):
            quantized -= {"q", "k", "v"}
        elements += sum(width[p] for p in {shared.get(p, p) for p in quantized})
    if ctx.holds_output and quantized_head(cfg):
        elements += dm.d
    return t.tensor_bytes(count=tokens * elements, bits=dm.bits)


def retained_phases(cfg: JobConfig) -> frozenset[Phase]:
    """Backward (the graph lives until ``backward()`` returns) and the optimizer step when the loop still holds the
    output (``kept_output``, or litgpt's loop). The next forward, which litgpt's loop runs with the previous
    micro-batch's graph still referenced, is ``activations/bnb_retained_previous`` (``previous_seq_len``)."""
    phases = {Phase.BACKWARD}
    if cfg.kept_output != "none" or cfg.module_layout == "litgpt":
        phases.add(Phase.OPTIMIZER)
    return frozenset(phases)
