"""The torch peak of the current vLLM's ``profile_run``: the forward, then the sampler on what it kept.

Read from the sdist of vllm 0.34.0 (PyPI, November 2026, the newest release), whose CUDA worker runs model runner
V2 (vllm/v1/worker/gpu/model_runner.py; vllm/v1/worker/gpu_model_runner.py is gone):

- ``Worker.determine_available_memory`` (vllm/v1/worker/gpu_worker.py) wraps ``profile_run`` in
  ``memory_profiling(self.init_snapshot, weights_memory=...)`` (vllm/utils/mem_utils.py), whose
  ``transient_peak_headroom = allocated_bytes.all.peak − allocated_bytes.all.current`` after the run: only the
  transient part of the peak, the persistent tensors being counted in ``total_consumed`` (the drop of free memory
  since the snapshot ``init_device`` took after NCCL and the cuBLAS handles existed);
- ``GPUModelRunner.profile_run`` runs ``_dummy_run(max_num_tokens, skip_attn=True, is_profile=True)``, which
  returns ``hidden_states`` and ``hidden_states[input_batch.logits_indices]`` (min(max_num_seqs, tokens) rows);
  ``profile_run`` holds both until its ``del`` after ``_dummy_sampler_run``. The forward's other activations
  are freed when ``execute_model`` returns, so the peak is max(forward, kept hidden states + sampler), not the sum;
- ``_dummy_sampler_run`` computes logits over those rows in the model dtype (``compute_logits``, no upcast) and
  samples twice: a default pass (no per-request processing: the logits as they are) and a pass with
  ``SamplingParams.for_sampler_warmup()`` (vllm/sampling_params.py: temperature 0.9, top_k 50, top_p 0.9,
  min_p, penalties, logit_bias, bad words, logprobs 5), the larger;
- that pass (vllm/v1/worker/gpu/sample/sampler.py ``Sampler.apply_sampling_params``) copies the logits to a new
  fp32 tensor and applies processors, temperature and min_p in place; with top-k and top-p, no greedy row, no
  seed and raw logprobs it takes ``flashinfer_sample`` (vllm/v1/sample/ops/topk_topp_sampler.py), whose
  ``top_k_top_p_sampling_from_logits`` (flashinfer/sampling.py, ``filter_apply_order="top_k_first"``) makes
  ``top_k_mask_logits`` (fp32) and ``torch.softmax`` of it (fp32) before ``top_p_sampling_from_probs``.
  FlashInfer is the CUDA default: ``flashinfer_sampler_supported`` (``VLLM_USE_FLASHINFER_SAMPLER`` defaults to
  on in vllm/envs.py; flashinfer is in requirements/cuda.txt) turns it off only off CUDA, on an unsupported
  compute capability, on 16 SMs or fewer, or where FlashInfer cannot JIT for the GPU.

The default pass holds the logits only, so the warmup pass is the sampler's peak. The sampler also holds a
persistent penalty state from its construction (``PenaltiesState.__init__``, vllm/v1/worker/gpu/sample/penalties.py):
``output_bin_counts`` [max_num_seqs, V] and ``prompt_bin_mask`` [max_num_seqs, cdiv(V, 32)], int32 on the GPU, made
after the ``init_device`` snapshot and so inside ``total_consumed`` (the runner's other per-request state is
UVA host memory, ``RequestState.all_token_ids``, or vectors of max_num_seqs elements). CUDA graphs are profiled
after ``profile_run`` (``profile_cudagraph_memory``, under ``VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS``, on since
v0.21.0), outside this peak (``memplan.engines.vllm.cudagraph_bytes``).
"""

from __future__ import annotations

from memplan.units import bits_to_bytes

CURRENT_RELEASE = (0, 34, 0)
"""The release whose source this module reproduces; it applies to it, to later releases and to the current
profiler (no ``vllm_release``). Releases between 0.8.6 and 0.33 were not read and keep
``memplan.engines.vllm``'s sum of forward and sampler (the safe side)."""
FP32_BYTES = 4
INT32_BYTES = 4
BIN_MASK_BITS = 32
"""Tokens per int32 word of the prompt bit mask (``cdiv(vocab_size, 32)`` words a row)."""
SAMPLER_FP32_TENSORS = 3
"""fp32 [rows, V] tensors alive at the fused sampler's peak: the processed copy of the logits
(``Sampler.apply_sampling_params``), FlashInfer's ``top_k_mask_logits`` output and its ``torch.softmax``."""


def applies(version: tuple[int, ...] | None) -> bool:
    """Whether ``version`` (None: the current profiler) is ``CURRENT_RELEASE`` or later."""
    return version is None or version >= CURRENT_RELEASE


def sampler_bytes(*, rows: int, vocab: int, bits: int) -> int:
    """Peak bytes of ``_dummy_sampler_run``'s warmup pass over ``rows`` rows: rows·V × (bits/8 + 3 × 4).

    The logits in the compute dtype (held by ``_dummy_sampler_run``) and the three fp32 tensors of
    ``SAMPLER_FP32_TENSORS``. Assumptions: FlashInfer's sampler (the CUDA default, see the module docstring); the
    top-k logprobs and the int32/int64 per-row outputs (rows × a few elements) are left out; the whole vocabulary
    on each rank (``compute_logits`` gathers it).
    """
    elements = rows * vocab
    return bits_to_bytes(elements, bits) + elements * SAMPLER_FP32_TENSORS * FP32_BYTES


def penalty_state_bytes(*, max_num_seqs: int, vocab: int) -> int:
    """Bytes of the sampler's persistent penalty state: max_num_seqs × (V + cdiv(V, 32)) × 4.

    Source: ``PenaltiesState.__init__`` (vllm/v1/worker/gpu/sample/penalties.py at 0.34.0): int32
    ``output_bin_counts`` [max_num_reqs, V] and ``prompt_bin_mask`` [max_num_reqs, cdiv(V, 32)], always allocated
    on the last pipeline stage's GPU whether or not a request uses penalties.
    """
    words = -(-vocab // BIN_MASK_BITS)
    return max_num_seqs * (vocab + words) * INT32_BYTES


def kept_bytes(*, tokens: int, rows: int, hidden: int, bits: int) -> int:
    """Bytes ``profile_run`` keeps from the forward through the sampler: ``hidden_states`` [tokens, D] and its
    ``logits_indices`` rows [rows, D], both in the compute dtype (``_dummy_run``'s two return values)."""
    return bits_to_bytes((tokens + rows) * hidden, bits)


def peak_bytes(*, forward: int, tokens: int, max_num_seqs: int, hidden: int, vocab: int, bits: int,
               last_stage: bool) -> int:
    """The profile's torch bytes: max(forward, kept_bytes + sampler_bytes) + penalty_state_bytes on the last
    pipeline stage, the forward alone on the others (``profile_run`` samples and the ``Sampler`` exists only where
    ``is_last_pp_rank``).

    ``forward``: the forward's peak over ``tokens`` tokens (``memplan.memory.inference.forward_peak_bytes``); the
    sampled rows are the dummy requests, min(max_num_seqs, tokens) (``_dummy_run``'s ``num_reqs``). The penalty
    state is persistent (``total_consumed``) where the rest is transient (``transient_peak_headroom``); vLLM
    subtracts both from the budget.
    """
    if not last_stage:
        return forward
    rows = min(max_num_seqs, tokens)
    after = kept_bytes(tokens=tokens, rows=rows, hidden=hidden, bits=bits)
    return (max(forward, after + sampler_bytes(rows=rows, vocab=vocab, bits=bits))
            + penalty_state_bytes(max_num_seqs=max_num_seqs, vocab=vocab))
