"""Bytes that single modules save for backward: the terms of the training-activation model.

Each function counts the tensors PyTorch autograd keeps between the forward and the
backward pass for one module of a transformer block, on one rank, for ``tokens`` token rows
(B·S, or B·S/t for sequence-parallel parts). Which tensors are saved was read from each op's
derivative formula (PyTorch ``tools/autograd/derivatives.yaml``) and the module code of Hugging
Face transformers 5.x (``models/<family>/modeling_<family>.py``), and checked by measurement
(``memplan.measure.saved``). A tensor saved by two ops (a norm's output read by q, k and v)
is counted once, by the module that produces it.

Symbols: B batch, S sequence, D hidden, F ffn, N query heads, K kv heads, H head dim, V vocab;
``b`` is the bits of the compute dtype. Bytes are rounded up once per tensor (``bits_to_bytes``).
"""

from __future__ import annotations

from memplan.units import bits_to_bytes

FP32_BITS = 32
"""fp32 upcasts (RMSNorm input, softmax, log-softmax) and statistics (rstd, logsumexp)."""
INT64_BITS = 64
"""Index tensors (token ids, targets, top-k and permutation indices) are int64 in PyTorch."""
INT32_BITS = 32
"""grouped_mm offsets per expert (transformers ``integrations/moe.py``: cumsum to int32)."""
BOOL_BITS = 8
"""torch.bool takes one byte per element (attention masks, dropout masks on CUDA)."""
CUDA_DROPOUT_MASK_BITS = BOOL_BITS
"""CUDA ``native_dropout`` saves a bool mask, one byte per element (ATen ``Dropout.cpp``)."""
CUDA_NORM_STATS_BITS = 32
"""CUDA ``native_layer_norm`` keeps mean and rstd in the accumulate type, fp32 for 16-bit inputs."""


def tensor_bytes(*, count: int, bits: int) -> int:
    """Bytes of one saved tensor of ``count`` elements of ``bits`` bits: ceil(count·bits/8)."""
    return bits_to_bytes(count, bits)


def rms_norm_bytes(*, tokens: int, width: int, bits: int, weight_trains: bool = True) -> int:
    """Bytes a Llama-style RMSNorm saves for ``tokens`` rows of ``width`` features.

    Formula: tokens·(4·width + 4 + b/8·width): the input upcast to fp32 (saved by ``pow`` and the
    multiply by rstd), the fp32 rstd per row, and the normalized tensor cast back to the dtype (saved
    by the multiply with the weight, only when the weight trains). In an fp32 model the "upcast" is
    the input itself.
    Source: transformers ``LlamaRMSNorm.forward`` (also Mistral, Qwen2/3, Phi-3, Mixtral, DeepSeek).
    Assumes: the norm's output (the next linear's input) is counted by its consumer.
    """
    total = tensor_bytes(count=tokens * width, bits=FP32_BITS) + tensor_bytes(count=tokens, bits=FP32_BITS)
    if weight_trains:
        total += tensor_bytes(count=tokens * width, bits=bits)
    return total


def gemma_rms_norm_bytes(*, tokens: int, width: int, weight_trains: bool = True) -> int:
    """Bytes a Gemma-2 RMSNorm saves: tokens·(4·width + 4 [+ 4·width]) + 4·width.

    Formula: fp32 input, fp32 rstd, the fp32 ``1 + weight`` vector, and, when the weight trains, the
    fp32 normalized tensor (multiplied by ``1 + weight`` in fp32, so saved before the cast back).
    Source: transformers ``Gemma2RMSNorm.forward`` (``self._norm(x.float()) * (1.0 + self.weight.float())``).
    """
    total = (tensor_bytes(count=tokens * width, bits=FP32_BITS) + tensor_bytes(count=tokens, bits=FP32_BITS)
             + tensor_bytes(count=width, bits=FP32_BITS))
    if weight_trains:
        total += tensor_bytes(count=tokens * width, bits=FP32_BITS)
    return total


def layer_norm_bytes(*, tokens: int, width: int, bits: int, stats_bits: int) -> int:
    """Bytes ``nn.LayerNorm`` saves: tokens·(b/8·width + 2·stats/8).

    Formula: the input in the dtype plus mean and rstd per row. Source: PyTorch ``native_layer_norm``
    (derivatives.yaml: saves input, mean, rstd). Korthikanti et al. 2022 (Sec. 4.1) count the input
    only (2sbh); ``stats_bits=0`` gives their count. CUDA keeps the statistics in fp32, the CPU kernel in
    the dtype.
    """
    return tensor_bytes(count=tokens * width, bits=bits) + 2 * tensor_bytes(count=tokens, bits=stats_bits)


def dropout_bytes(*, count: int, mask_bits: int) -> int:
    """Bytes of one dropout's saved mask: count·mask_bits/8.

    Source: PyTorch ``native_dropout`` (CUDA: bool mask, 1 byte/element, as Korthikanti et al. 2022
    Sec. 4.1 count it); the CPU path multiplies by a noise tensor of the input dtype. The dropout's
    output is counted by whichever op saves it.
    """
    return tensor_bytes(count=count, bits=mask_bits)


def mlp_bytes(*, tokens: int, ffn: int, bits: int, gated: bool, act_saved: int, down_trains: bool = True,
              act_keeps_output: bool = False) -> int:
    """Bytes of an MLP's intermediate tensors (its input is counted with the norm before it).

    Formula, per token in units of b/8·F: gated ``down(act(gate(x)) * up(x))``: up output and act
    output (saved by the product) + ``act_saved`` + the product when down's weight trains (mm saves
    its input only for the weight's gradient); plain ``fc2(act(fc1(x)))``: ``act_saved`` + the act
    output when fc2's weight trains or the activation keeps its own output (ReLU).
    ``act_saved`` counts the F-wide tensors the activation saves besides its output: 1 for fused
    SiLU/GELU (the input), 0 for ReLU, 4 for the Python ``gelu_new``.
    Source: PyTorch derivatives.yaml (mm saves its input for the weight's gradient, mul both factors,
    silu/gelu their input, relu its result); Korthikanti et al. 2022 Sec. 4.1 (8sbh + 8sbh for GeLU).
    Assumes: a fused gate_up projection (Phi-3) keeps its 2F output alive, the same bytes as gate + up.
    """
    output_saved = down_trains or (act_keeps_output and not gated)  # gated: the product is down's input
    factors = (2 if gated else 0) + act_saved + (1 if output_saved else 0)
    return factors * tensor_bytes(count=tokens * ffn, bits=bits)


def flash_attention_bytes(*, tokens: int, heads: int, q_width: int, kv_width: int, out_width: int, bits: int) -> int:
    """Bytes a fused attention kernel saves: q, k, v, the output and the fp32 logsumexp.

    Formula: b/8·B·S·(q_width + kv_width + out_width) + 4·B·S·N, with widths in elements per token
    (q: N·H; k and v: 2·K·H, or the whole fused qkv output when v is a view of it).
    Source: FlashAttention-2 (Dao 2023) saves q, k, v, out and the softmax logsumexp; PyTorch
    ``_scaled_dot_product_flash_attention`` / ``_efficient_attention`` likewise; no S×S tensor.
    Assumes: the output is laid out (B, S, N, H), so the o_proj input is the same storage; grouped-query
    k and v stay K heads wide (flash GQA, SDPA ``enable_gqa``); a saved view keeps its whole storage.
    """
    qkvo = tensor_bytes(count=tokens * (q_width + kv_width + out_width), bits=bits)
    return qkvo + tensor_bytes(count=tokens * heads, bits=FP32_BITS)


def math_attention_bytes(*, b: int, s: int, n: int, h: int, hv: int, bits: int) -> int:
    """Bytes PyTorch's math SDPA fallback saves for 16-bit inputs: everything upcast to fp32.

    Formula: 4·B·S·N·(2H + Hv) (scaled q, k expanded to N heads, v) + 4·B·N·S² (softmax) + b/8·B·S·N·Hv
    (the o_proj input copy). Source: ATen ``_scaled_dot_product_attention_math`` (``query_.to(kFloat)``);
    chosen when no fused kernel accepts the inputs, e.g. multi-query k of 1 head without ``enable_gqa``
    (transformers Falcon with sdpa).
    """
    upcast = tensor_bytes(count=b * s * n * (2 * h + hv), bits=FP32_BITS)
    scores = tensor_bytes(count=b * n * s * s, bits=FP32_BITS)
    return upcast + scores + tensor_bytes(count=b * s * n * hv, bits=bits)


def eager_qkvo_bytes(*, b: int, s: int, n: int, h: int, hv: int, bits: int, o_trains: bool = True) -> int:
    """Bytes of q, k, v and the merged output saved by eager attention: b/8·B·S·N·(2H + 2Hv).

    Source: transformers ``eager_attention_forward``: ``matmul(q, k^T)`` saves q and k, ``repeat_kv``
    copies k and v to N heads, ``matmul(p, v)`` saves v, ``o_proj`` saves the contiguous merged output
    (when its weight trains). Korthikanti et al. 2022 Sec. 4.1: "QK^T 4sbh, V 2sbh, projection input 2sbh".
    """
    return tensor_bytes(count=b * s * n * (2 * h + (2 if o_trains else 1) * hv), bits=bits)


def eager_scores_bytes(*, b: int, s: int, n: int, bits: int, softmax_bits: int, softcap: bool,
                       mask_bits: int | None) -> int:
    """Bytes of the S×S tensors eager attention saves: B·N·S²·(softcap + softmax + probs / dropout).

    Formula per score: tanh output b/8 if soft-capped (Gemma-2); the softmax output (softmax_bits/8,
    fp32 when the model upcasts); then, with dropout (``mask_bits`` set), the mask and the dropout output
    (b/8), else the probabilities cast back to the dtype when the softmax ran in a wider type.
    Source: transformers ``eager_attention_forward`` (``softmax(..., dtype=torch.float32).to(q.dtype)``);
    Korthikanti et al. 2022 Sec. 4.1: softmax output 2as²b, mask as²b, dropout output 2as²b (5as²b).
    """
    count = b * n * s * s
    total = tensor_bytes(count=count, bits=softmax_bits)
    if softcap:
        total += tensor_bytes(count=count, bits=bits)
    if mask_bits is not None:
        total += dropout_bytes(count=count, mask_bits=mask_bits) + tensor_bytes(count=count, bits=bits)
    elif softmax_bits != bits:
        total += tensor_bytes(count=count, bits=bits)
    return total


def moe_router_bytes(*, tokens: int, experts: int, top_k: int, normalized: bool) -> int:
    """Bytes a top-k router saves beyond its input: tokens·(4E + 8k [+ 4 + 4k]).

    Formula: fp32 softmax (or sigmoid) scores over E experts, int64 top-k indices, and when the top-k
    weights are renormalized in place, their fp32 sum and a clone of the weights.
    Source: transformers ``MixtralTopKRouter`` / ``Qwen3MoeTopKRouter`` / ``DeepseekV3TopkRouter``.
    """
    total = tensor_bytes(count=tokens * experts, bits=FP32_BITS) + tensor_bytes(count=tokens * top_k, bits=INT64_BITS)
    if normalized:
        total += tensor_bytes(count=tokens * (1 + top_k), bits=FP32_BITS)
    return total


def moe_experts_bytes(*, pairs: int, hidden: int, ffn: int, experts: int, bits: int, weight_bits: int,
                      up_trains: bool = True, down_trains: bool = True, fused_act: bool = False) -> int:
    """Bytes the routed experts save for ``pairs`` = tokens·k (token, expert) pairs.

    Formula per pair: 3 int64 permutation indices (gather, weight gather, un-permute) + the gathered
    input (b/8·D, for gate_up's weight gradient) + gate_up output (2·b/8·F) + act output (b/8·F) + the
    product (b/8·F, for down's weight gradient) + the down output (b/8·D, saved by the multiply with the
    routing weight) + the routing weight; + int32 offsets (E).
    Source: transformers ``integrations/moe.py`` ``grouped_mm_experts_forward`` (the default
    ``experts_implementation``); only top-k experts see each token.
    ``fused_act``: the gated activation is one fused op that saves its 2F input only, its output being down's
    saved input (Megatron-Core ``fusions/fused_bias_swiglu.py`` ``SwiGLUFunction``, which
    ``transformer/moe/experts.py`` applies to the grouped fc1 output): no separate act output (one F fewer).
    Assumes: balanced routing, no capacity factor or token dropping.
    """
    f_wide = (2 if fused_act else 3) + (1 if down_trains else 0)
    per_pair = (tensor_bytes(count=3 * pairs, bits=INT64_BITS)
                + tensor_bytes(count=pairs * hidden * (1 + (1 if up_trains else 0)), bits=bits)
                + tensor_bytes(count=pairs * ffn * f_wide, bits=bits)
                + tensor_bytes(count=pairs, bits=weight_bits))
    return per_pair + tensor_bytes(count=experts, bits=INT32_BITS)


def rotary_bytes(*, s: int, rot_dim: int, bits: int) -> int:
    """Bytes of the rotary tables saved once per forward: 2·S·H_rot·b/8 (cos and sin).

    Source: transformers ``apply_rotary_pos_emb``: ``q * cos`` and ``rotate_half(q) * sin`` save cos and
    sin (q and k do not require saving); computed once per forward and shared by all layers.
    Assumes: position ids of batch 1 (the default ``arange``), so the tables are (1, S, H_rot).
    """
    return 2 * tensor_bytes(count=s * rot_dim, bits=bits)


def token_ids_bytes(*, tokens: int) -> int:
    """Bytes of int64 indices saved by an embedding lookup (or a loss's targets): 8·tokens."""
    return tensor_bytes(count=tokens, bits=INT64_BITS)


def log_softmax_bytes(*, tokens: int, vocab: int, bits: int) -> int:
    """Bytes cross-entropy saves: the log-softmax output, bits/8·B·S·V (fp32 after HF's upcast),
    plus the int64 targets, 8·B·S.

    Source: PyTorch ``cross_entropy`` = ``log_softmax`` (saves its output) + ``nll_loss`` (saves the
    target); transformers ``ForCausalLMLoss`` upcasts the logits first (``logits.float()``).
    Korthikanti et al. 2022 Sec. 4.3: "cross entropy loss ... 4sbv" (fp32 logits).
    """
    return tensor_bytes(count=tokens * vocab, bits=bits) + token_ids_bytes(tokens=tokens)


def logits_transient_bytes(*, tokens: int, vocab: int, bits: int, loss_bits: int) -> int:
    """Bytes of logits alive beyond the saved log-softmax at the worst moment of the loss.

    Formula: max(forward, backward); forward = b/8·B·S·V (the logits) + loss_bits/8·B·S·V (their
    upcast copy, when the loss runs wider than the logits); backward = 2·loss_bits/8·B·S·V (the
    gradient of the log-probabilities from nll_loss and of the logits from log_softmax's backward).
    Source: transformers ``ForCausalLMLoss`` (``logits.float()``); PyTorch ``nll_loss_backward`` and
    ``_log_softmax_backward_data`` (dense gradients). Not saved for backward: a peak on top of it.
    Assumes: the caller drops the model output (HF Trainer's ``compute_loss``) before backward.
    """
    count = tokens * vocab
    forward = tensor_bytes(count=count, bits=bits)
    if loss_bits != bits:
        forward += tensor_bytes(count=count, bits=loss_bits)
    backward = 2 * tensor_bytes(count=count, bits=loss_bits)
    return max(forward, backward)


def kept_logits_bytes(*, tokens: int, vocab: int, bits: int) -> int:
    """Bytes of the logits a training loop keeps referenced (the model output) from the forward pass until after
    the optimizer step: bits/8·B·S·V.

    Source: AnswerDotAI fsdp_qlora train.py (training loop: ``output = model(...)``, ``loss.backward()``,
    ``optimizer.step()``, then ``output = None``); ``output.logits`` is ``logits.float()`` (fp32) in early-2024 transformers
    (v4.38 ``LlamaForCausalLM.forward``), the model's dtype in current ones (the upcast is inside ``ForCausalLMLoss``).
    Not saved for backward: alive beside the backward and optimizer-step peaks, on the last pipeline stage.
    """
    return tensor_bytes(count=tokens * vocab, bits=bits)
