"""The torch peak of vLLM V1's ``profile_run`` at the releases whose source was read: 0.8.4 and 0.8.5.

Read from the sdists of vllm 0.8.4 and 0.8.5 (PyPI); the code below is the same in both, so it holds for any
main commit between them (vllm-project/vllm PR #17122's L40S log is one: its ``gpu_model_runner.py:1316`` lies
between 0.8.4's line 1291 and 0.8.5's line 1347):

- ``Worker.determine_available_memory`` (vllm/v1/worker/gpu_worker.py) calls ``empty_cache`` and
  ``reset_peak_memory_stats`` after the weights are loaded, runs ``profile_run``, and subtracts
  ``allocated_bytes.all.peak`` (weights, the runner's persistent buffers and the profile's transients) plus
  (total − free) − allocated after ``empty_cache``;
- ``GPUModelRunner.profile_run`` (vllm/v1/worker/gpu_model_runner.py) runs ``_dummy_run(max_num_tokens)``, which
  returns ``hidden_states[logit_indices]``: a copy of one row per dummy request, min(max_num_seqs, tokens) rows,
  so the forward's activations are freed before ``_dummy_sampler_run`` computes logits over those rows;
- ``_dummy_sampler_run`` samples with temperature 0.5, top_p 0.9 and top_k V − 1, so the sampler takes
  ``TopKTopPSampler.forward_native`` (vllm/v1/sample/ops/topk_topp_sampler.py: without FlashInfer, or with
  FlashInfer >= 0.2.3, which it turns off) and ``apply_top_k_top_p`` sorts the whole vocabulary.

The peak is therefore max(forward, sampler), not their sum. CUDA graphs are captured after the KV pool is
allocated (``compile_or_warm_up_model``), outside this arithmetic.
"""

from __future__ import annotations

from memplan.units import bits_to_bytes

RELEASES = ((0, 8, 4), (0, 8, 6))
"""[first, end) of the releases whose ``profile_run`` this module reproduces (0.8.4 and 0.8.5, read from their
sdists); other releases keep ``memplan.engines.vllm``'s sum of forward and sampler (the safe side)."""
FP32_BYTES = 4
INT64_BYTES = 8
INT32_BYTES = 4
SEGMENTED_SORT_MIN_ROWS = 128
"""PyTorch sorts 128 rows or more with cub's segmented sort, fewer (but more than one) by a full sort of
(index, segment) pairs (aten/src/ATen/native/cuda/SortStable.cu ``launch_stable_sort_kernel``)."""


def applies(version: tuple[int, ...] | None) -> bool:
    """Whether ``version`` is one of ``RELEASES``."""
    first, end = RELEASES
    return version is not None and first <= version < end


def sort_workspace_per_element(rows: int) -> int:
    """Bytes per element PyTorch allocates inside ``sort`` of a contiguous fp32 [rows, V] tensor, V > 4096.

    Source: aten/src/ATen/native/cuda/SortStable.cu ``launch_stable_sort_kernel`` (Sort.cpp ``sort_cuda_kernel``
    sorts in place only for V <= 4096 and writes straight into the outputs of a contiguous input):
    - rows >= 128, ``segmented_sort_pairs``: int64 reverse indices + cub ``DeviceSegmentedRadixSort::SortPairs``'s
      alternate key and value buffers (fp32 + int64): 8 + 12 = 20;
    - 1 < rows < 128, ``segmented_sort_pairs_by_full_sort``: two int2 (index, segment) arrays + the keys output
      and cub ``DeviceRadixSort::SortPairs``'s alternate fp32 keys and int2 values: 8 + 8 + 4 + 12 = 32;
    - one row, ``segmented_sort_large_segments``: cub's alternate fp32 keys and int64 values: 12.
    Assumption: cub's spine and histogram storage (kilobytes) is left out.
    """
    pair = FP32_BYTES + INT64_BYTES
    if rows >= SEGMENTED_SORT_MIN_ROWS:
        return INT64_BYTES + pair
    if rows > 1:
        return 2 * 2 * INT32_BYTES + FP32_BYTES + FP32_BYTES + 2 * INT32_BYTES
    return pair


def sampler_bytes(*, rows: int, vocab: int, bits: int) -> int:
    """Peak bytes of ``_dummy_sampler_run`` over ``rows`` rows: rows·V × (bits/8 + 4 + 4 + 8 + workspace).

    Alive at the sort inside ``apply_top_k_top_p``: the logits in the compute dtype (``compute_logits``, no
    upcast, held by ``_dummy_sampler_run``), their fp32 copy (``Sampler.forward``: ``logits.to(torch.float32)``;
    temperature is applied in place), the sorted fp32 values and int64 indices (``logits.sort``), and PyTorch's
    sort workspace (``sort_workspace_per_element``). Everything after the sort is smaller: the bool top-k and
    top-p masks, the fp32 softmax (its cumsum written in place), the scattered fp32 logits, then the fp32
    probabilities and the exponential draws of ``random_sample`` once the sort's tensors are freed.
    """
    elements = rows * vocab
    kept = FP32_BYTES + FP32_BYTES + INT64_BYTES + sort_workspace_per_element(rows)
    return bits_to_bytes(elements, bits) + elements * kept


def runner_buffer_bytes(*, max_num_tokens: int, hidden: int, bits: int, max_num_seqs: int,
                        blocks_per_request: int) -> int:
    """Persistent GPU tensors the model runner allocates before the weights, so outside "Model loading took" but
    inside the torch peak: input_ids (int32) and positions (int64) of max_num_tokens, ``inputs_embeds``
    [max_num_tokens, hidden] in the model dtype, and the block table [max_num_seqs, cdiv(max_model_len,
    block_size)] int32. Source: ``GPUModelRunner.__init__`` (vllm/v1/worker/gpu_model_runner.py) and
    vllm/v1/worker/block_table.py at 0.8.4/0.8.5. Assumption: the InputBatch's per-request sampling vectors
    (a few KiB) are left out.
    """
    ids = max_num_tokens * (INT32_BYTES + INT64_BYTES)
    embeds = bits_to_bytes(max_num_tokens * hidden, bits)
    return ids + embeds + max_num_seqs * blocks_per_request * INT32_BYTES


def peak_bytes(*, forward: int, rows: int, hidden: int, vocab: int, bits: int, last_stage: bool) -> int:
    """The profile's transient peak: max(forward, rows·hidden slice + sampler) on the last pipeline stage, the
    forward alone on the others (``profile_run`` samples only where ``get_pp_group().is_last_rank``)."""
    if not last_stage:
        return forward
    return max(forward, bits_to_bytes(rows * hidden, bits) + sampler_bytes(rows=rows, vocab=vocab, bits=bits))
