"""litgpt's module layout (``JobConfig.module_layout = "litgpt"``): what its blocks save for backward where they differ
from the Hugging Face modules memplan models by default.

Sources read: Lightning-AI/litgpt at 43c44323 (April 2024, the config-hub benchmark table) and lit-gpt 8641822
(October 2023, the resource tables), ``litgpt/model.py`` and ``litgpt/lora.py``:

- ``CausalSelfAttention.forward``: one fused ``attn`` linear gives ``qkv``, viewed as (B, T, K, N/K + 2, H) and
  permuted; ``q, k, v = qkv.split(...)``. With K < N, k and v are ``expand``-ed to the N heads and ``reshape``-d
  (copies of N·H per token); with K = N, or K = 1 (the expanded size-1 dim merges with stride 0), v stays a view,
  so SDPA's saved v keeps the whole (N + 2K)·H qkv output alive. ``apply_rope`` then
  ``torch.cat((q_roped, q[..., rope_n_elem:]), -1)`` makes q and k new (B, N, T, H) tensors: q is head-major,
  so the kernel's output is too (``empty_like(q)``), and ``y.transpose(1, 2).reshape(B, T, C)`` is a copy, which the
  output projection saves when it keeps its input
  (a trained or bitsandbytes-quantized ``proj``).
- ``LoRAQKVLinear.forward``: one ``lora_dropout`` over the block input for all of q, k, v, ``lora_A`` of
  r·m rows (m adapted of q, k, v), a grouped ``conv1d`` for ``lora_B``; when m < 3, ``zero_pad`` scatters the update
  into a zero qkv-wide tensor with ``index_copy(1, torch.tensor(lora_ind), x.reshape(-1, Σ widths))``, whose
  backward keeps ``source`` (derivatives.yaml ``index_copy``: ``expand_as(source)``) and the int64 index.
- ``LoRALinear`` (o, MLP, head adapters): ``lora_dropout(x) @ lora_A.T @ lora_B.T``, as peft (per-module dropout).
- litgpt never calls ``enable_input_require_grads``: the first block's input (the frozen embedding's output) has
  no gradient, in QLoRA too.
- ``finetune/lora.py`` / ``full.py``: ``logits = model(...)`` stays referenced until the next iteration's
  forward returns (so does its autograd graph); ``chunked_cross_entropy`` runs ``cross_entropy`` on the bf16
  logit chunks (no fp32 upcast: ``JobConfig.loss_fp32=False``).
"""

from __future__ import annotations

from memplan.catalog.schema import Family, ModelSpec
from memplan.config import JobConfig
from memplan.errors import MemplanError
from memplan.memory import activations_terms as t

LITGPT = "litgpt"
QKV = ("q", "k", "v")


def applies(cfg: JobConfig) -> bool:
    return cfg.module_layout == LITGPT


def check(spec: ModelSpec, cfg: JobConfig, has_moe: bool) -> None:
    """Refuse ``module_layout="litgpt"`` where this module's rules were not read (a flag is never silently ignored):
    litgpt's sequential Llama block (RMSNorm, gated MLP, full rotary, no q/k norm, no MoE, no latent attention)."""
    if not applies(cfg):
        if cfg.previous_seq_len is not None:
            raise MemplanError("previous_seq_len sizes what a loop holds from the previous micro-batch through the next "
                               "forward, which litgpt's loop does: add --module-layout litgpt or drop it.")
        return
    llama_like = (spec.family is not Family.PARAMS_ONLY and not spec.parallel_attn and spec.mlp_gated
                  and spec.norm == "rmsnorm" and spec.rotary_dim is None and not spec.qk_norm and not spec.is_mla
                  and not has_moe and spec.family not in (Family.GEMMA, Family.GEMMA2, Family.GEMMA3))
    if not llama_like:
        raise MemplanError(f"--module-layout litgpt models litgpt's Llama block (RMSNorm, gated MLP, full rotary); "
                           f"{spec.name} ({spec.family.value}) is not one: drop the flag.")
    if cfg.previous_seq_len is not None and cfg.previous_seq_len > cfg.seq_len:
        raise MemplanError(f"previous_seq_len={cfg.previous_seq_len} exceeds seq_len={cfg.seq_len}: seq_len is the "
                           "longest micro-batch; swap them.")
    if cfg.activation_accounting == "paper":
        raise MemplanError("--activation-accounting paper counts Korthikanti et al.'s tensors, not a module layout: "
                           "drop --module-layout litgpt or use autograd accounting.")
    if cfg.transformers_version is not None:
        raise MemplanError("--transformers-version describes transformers' modules; litgpt runs its own "
                           "(--module-layout litgpt): drop one of them.")
    if cfg.job.value in ("lora", "qlora") and cfg.lora.dtype.bits != (32 if cfg.dtype.value == "fp32" else 16):
        raise MemplanError(f"litgpt builds the LoRA weights in the model's dtype (--module-layout litgpt): "
                           f"set --lora-dtype {cfg.dtype.value}.")


def attention_terms(*, tokens: int, n: int, k: int, h: int, bits: int, o_saves_input: bool) -> list[tuple[str, int]]:
    """(name, bytes) of litgpt's attention for one micro-batch: SDPA's saved q, k, v, output and logsumexp, and the
    output projection's input copy.

    Formula: b/8·B·S·(q + kv + out) + 4·B·S·N, q = out = N·H; kv = N·H + (N + 2K)·H when K = N or K = 1 (k a new
    N-head tensor; v a view of the whole qkv output: the expanded size-1 group dim merges with stride 0), else 2·N·H
    (k and v expanded to N heads and copied by ``reshape``); plus b/8·B·S·N·H for the ``reshape`` copy of the
    head-major output when ``proj`` keeps its input.
    Source: module docstring (``CausalSelfAttention.forward``, ``scaled_dot_product_attention``).
    """
    kv = n * h + (n + 2 * k) * h if k in (n, 1) else 2 * n * h
    out = [("attention/qkv", t.flash_attention_bytes(tokens=tokens, heads=n, q_width=n * h, kv_width=kv,
                                                     out_width=n * h, bits=bits))]
    if o_saves_input:
        out.append(("attention/o_proj_input", t.tensor_bytes(count=tokens * n * h, bits=bits)))
    return out


def qkv_adapter_bytes(*, tokens: int, d: int, widths: dict[str, int], adapted: tuple[str, ...], rank: int, bits: int,
                      dropout: bool, mask_bits: int, input_grad: bool = True) -> int:
    """Bytes the one ``LoRAQKVLinear`` adapter of a block saves for one micro-batch (0 when none of q, k, v is adapted).

    Formula: [dropout: mask·B·S·D/8 (none when the block input has no gradient: no autograd node) + b/8·B·S·D (its
    output, which lora_A saves)] + b/8·B·S·r·m (lora_A's output,
    which the conv1d saves) + [m < 3: b/8·B·S·Σw (index_copy's source) + 8·Σw (its int64 index)], m adapted of
    q, k, v with widths w (q: N·H, k and v: K·H). Without dropout lora_A reads the block's normed input itself,
    counted with the norms as a trained projection's input.
    Source: module docstring (``LoRAQKVLinear.forward``, ``zero_pad``).
    """
    if not adapted:
        return 0
    total = t.tensor_bytes(count=tokens * rank * len(adapted), bits=bits)
    if dropout:
        mask = t.dropout_bytes(count=tokens * d, mask_bits=mask_bits) if input_grad else 0
        total += mask + t.tensor_bytes(count=tokens * d, bits=bits)
    if len(adapted) < len(QKV):
        width = sum(widths[p] for p in adapted)
        total += t.tensor_bytes(count=tokens * width, bits=bits) + t.tensor_bytes(count=width, bits=t.INT64_BITS)
    return total


def previous_tokens(cfg: JobConfig) -> int:
    """Tokens of the previous micro-batch that litgpt's loop holds through the next forward: micro_batch ·
    (``previous_seq_len``, else ``seq_len``); 0 outside the litgpt layout."""
    if not applies(cfg):
        return 0
    seq = cfg.seq_len if cfg.previous_seq_len is None else cfg.previous_seq_len
    return cfg.micro_batch * seq
