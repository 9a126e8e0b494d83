"""vLLM's profile-run peak and CUDA graphs, both subtracted from its budget (``memplan.engines.vllm``).

The torch peak is measured by ``profile_run`` (vllm/v1/worker/gpu_model_runner.py): one dummy forward of
``max_num_batched_tokens`` tokens plus ``_dummy_sampler_run`` over ``max_num_seqs`` rows of logits (for the releases
they reproduce, ``vllm_profile_v1`` and ``vllm_profile_now``).

CUDA-graph memory (``capture_model``) is subtracted as well, as vLLM does when it estimates graph memory
during profiling (``VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS``); older releases captured graphs after
sizing the pool, so their pool is larger by that amount (under 1% of the published figures).
"""

from __future__ import annotations

from memplan.config import Engine, JobConfig
from memplan.engines import vllm_profile_now, vllm_profile_v1
from memplan.engines.vllm_budget import max_model_len
from memplan.memory import inference
from memplan.memory.context import Context
from memplan.memory.kv_cache import compute_dtype
from memplan.units import bits_to_bytes, ceil_div

MAX_CAPTURE_SIZE = 512
"""Largest default CUDA-graph capture size: min(2·max_num_seqs, 512) (vllm/config/vllm.py ``_set_cudagraph_sizes``)."""
ALLREDUCES_PER_LAYER = 2
"""Row-parallel outputs all-reduced per decoder layer: attention o_proj and MLP down_proj (Megatron-LM Sec. 3)."""
SAMPLER_FP32_COPIES = 3
"""The sampler upcasts logits to fp32 and computes probabilities and log-probabilities, each fp32 over
rows × V (vllm/model_executor/layers/sampler.py ``Sampler.forward``; v1/sample/sampler.py)."""


def sampler_bytes(*, rows: int, vocab: int, bits: int) -> int:
    """Bytes of the sampler's peak over ``rows`` logits rows: rows·V × (compute bits + 3 × 32) / 8.

    Source: lm_head output in the compute dtype plus fp32 logits, probs and logprobs (vLLM ``Sampler``);
    ``_dummy_sampler_run`` profiles it with max_num_seqs rows. Assumption: the whole vocabulary on each rank
    (logits are gathered to every tp rank before sampling).
    """
    return bits_to_bytes(rows * vocab, bits + SAMPLER_FP32_COPIES * 32)


def capture_sizes(cfg: JobConfig, max_num_seqs: int) -> tuple[int, ...]:
    """The CUDA-graph batch sizes: configured, none with enforce_eager, else vLLM's default list
    [1, 2, 4] + 8..248 step 8 + 256..max step 16, max = min(2·max_num_seqs, 512)."""
    if cfg.serve.enforce_eager:
        return ()
    if cfg.serve.cudagraph_capture_sizes is not None:
        return tuple(cfg.serve.cudagraph_capture_sizes)
    top = min(2 * max_num_seqs, MAX_CAPTURE_SIZE)
    sizes = [1, 2, 4, *range(8, 256, 8), *range(256, top + 1, 16)]
    return tuple(s for s in sizes if s <= top)


def activation_peak_bytes(ctx: Context, *, tokens: int, rows: int, version: tuple[int, ...] | None = None) -> int:
    """The profile run's torch peak: one forward of ``tokens`` tokens and the sampler over ``rows`` rows.

    Formula: forward_peak(B=1, T=tokens) + sampler_bytes(min(rows, tokens)) on the last pipeline stage; for the
    releases ``vllm_profile_v1`` reproduces, its runner buffers + max(forward, sampler) as their source computes; for
    the current profiler (``vllm_profile_now``, vLLM 0.34.0 on), max(forward, kept hidden states + its sampler) plus
    the sampler's persistent penalty state.
    Source: vllm/v1/worker/gpu_model_runner.py ``profile_run`` (``_dummy_run(max_num_tokens)`` then
    ``_dummy_sampler_run``); the forward with flash attention (no score matrix).
    """
    cfg, spec = ctx.cfg, ctx.arch.spec
    bits = compute_dtype(cfg.dtype).bits
    out = inference.forward_peak_bytes(ctx, batch=1, tokens=tokens, kv_tokens=tokens)
    if cfg.serve.allreduce_keeps_inputs and cfg.tp > 1:
        out += legacy_allreduce_bytes(layers=len(ctx.layers), tokens=tokens, hidden=spec.hidden_size or 0, bits=bits)
    last = ctx.stage == cfg.pp - 1
    if vllm_profile_v1.applies(version):
        buffers = vllm_profile_v1.runner_buffer_bytes(
            max_num_tokens=tokens, hidden=spec.hidden_size or 0, bits=bits, max_num_seqs=rows,
            blocks_per_request=ceil_div(max_model_len(ctx), cfg.serve.block_size))
        return buffers + vllm_profile_v1.peak_bytes(forward=out, rows=min(rows, tokens), hidden=spec.hidden_size or 0,
                                                    vocab=spec.vocab_size or 0, bits=bits, last_stage=last)
    if cfg.engine == Engine.VLLM and vllm_profile_now.applies(version):  # SGLang's step_bytes keeps the sum
        return vllm_profile_now.peak_bytes(forward=out, tokens=tokens, max_num_seqs=rows, hidden=spec.hidden_size or 0,
                                           vocab=spec.vocab_size or 0, bits=bits, last_stage=last)
    if last:
        out += sampler_bytes(rows=min(rows, tokens), vocab=spec.vocab_size or 0, bits=bits)
    return out


def legacy_allreduce_bytes(*, layers: int, tokens: int, hidden: int, bits: int) -> int:
    """Bytes of all-reduce inputs that vLLM <= 0.2.5 kept alive through the profile forward: 2·L·T·D × bits/8.

    Source: vllm-project/vllm PR #2151 ("Fix all-reduce memory usage", v0.2.6): torch.distributed.all_reduce
    on the input tensor kept every layer's input alive (25.5 -> 19.5 GiB peak for Llama-70B at tp=8).
    """
    return bits_to_bytes(ALLREDUCES_PER_LAYER * layers * tokens * hidden, bits)


def cudagraph_bytes(ctx: Context, sizes: tuple[int, ...]) -> int:
    """Memory of the captured CUDA graphs: their shared pool, the decode forward at the largest size.

    Source: vllm/v1/worker/gpu_model_runner.py ``capture_model`` (graphs captured largest first share one
    memory pool). Assumption: per-graph bookkeeping (kernel nodes) is not counted; a lower bound.
    """
    if not sizes:
        return 0
    return inference.forward_peak_bytes(ctx, batch=max(sizes), tokens=1, kv_tokens=1)
