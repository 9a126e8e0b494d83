"""Context parallelism: each sequence split over ``cp`` ranks, and the key/value exchange of one attention.

Every sequence-proportional activation of a rank holds ``s/cp`` tokens (``local_seq_len``, read by
``activations_block.dims`` and ``activations``): block tensors, norms, rotary tables, the loss and the logits
(the loss is computed on the local tokens and all-reduced: Megatron ``get_batch_on_this_cp_rank``, torch
``context_parallel`` shards every buffer along the sequence). With a flash kernel the saved attention tensors
(q, k, v, out, softmax lse) are the local chunk's too: the ring saves the local K/V and the merged output
(TransformerEngine ``AttnFuncWithCPAndKVP2P.forward``: ``save_for_backward(q, kv, out, softmax_lse, ...)``);
Ulysses saves [s, heads/cp] after its all-to-all, the same elements as [s/cp, heads].

What CP adds is transient, one attention at a time (``exchange_bytes``, the row ``activations/cp_exchange``).
Weights, gradients and optimizer states are replicated over cp unless the engine shards them: the data × context
group is ``JobConfig.dp``, over which ZeRO, FSDP and Megatron's distributed optimizer shard.
"""

from __future__ import annotations

from dataclasses import dataclass

from memplan.catalog.schema import ModelSpec
from memplan.config import CpComm, Engine, JobConfig
from memplan.dtypes import Dtype
from memplan.errors import MemplanError
from memplan.units import ceil_div

FP32_BYTES = 4
LOAD_BALANCE_CHUNKS = 2
"""Megatron (``get_batch_on_this_cp_rank``) and torch (``_HeadTailLoadBalancer``) cut the sequence into 2·cp chunks
and give rank r chunks r and 2·cp − 1 − r, so causal attention costs every rank the same: the sequence must be a
multiple of 2·cp. DeepSpeed-Ulysses cuts it into cp chunks (``DistributedAttention``)."""
ENGINE_COMMS: dict[Engine, tuple[CpComm, ...]] = {
    Engine.MEGATRON: (CpComm.RING, CpComm.ULYSSES, CpComm.ALLGATHER),
    Engine.FSDP2: (CpComm.RING, CpComm.ALLGATHER),
    Engine.DEEPSPEED: (CpComm.ULYSSES,),
}
"""Which exchange each training engine runs: Megatron-Core ``--cp-comm-type p2p|a2a|allgather``
(megatron/core/transformer/transformer_config.py ``cp_comm_type``, TransformerEngine
``attention/dot_product_attention/context_parallel.py``); torchtitan/FSDP2 ``torch.distributed.tensor.experimental
.context_parallel`` (ring; ``set_rotate_method("allgather"|"alltoall")``); DeepSpeed ``deepspeed/sequence/layer.py``
``DistributedAttention`` (Ulysses). Engine ``pytorch`` (one process or DDP) has none."""


def local_seq_len(cfg: JobConfig) -> int:
    """Tokens of each sequence one rank holds: s / cp (``check_shape`` makes it exact)."""
    return ceil_div(cfg.seq_len, cfg.cp)


def seq_multiple(cfg: JobConfig) -> int:
    """What the sequence must be a multiple of: 2·cp with load balancing (Megatron, FSDP2), cp for DeepSpeed."""
    return cfg.cp * (1 if cfg.effective_engine is Engine.DEEPSPEED else LOAD_BALANCE_CHUNKS)


def check_shape(spec: ModelSpec, cfg: JobConfig) -> None:
    """Reject a context-parallel layout the model's shape does not allow, in one sentence.

    The sequence must split evenly (``seq_multiple``). Ulysses scatters heads: each tensor-parallel rank's query
    heads and key/value heads must divide by cp (TransformerEngine ``flash_attn_a2a_communicate`` views
    [.., heads] as [.., cp, heads/cp]; DeepSpeed ``_SeqAllToAll`` splits the head dimension the same way).
    """
    if cfg.cp == 1:
        return
    multiple = seq_multiple(cfg)
    if cfg.seq_len % multiple:
        how = "2·cp chunks for causal load balancing" if multiple != cfg.cp else "cp chunks"
        raise MemplanError(f"--seq-len {cfg.seq_len} must be a multiple of {multiple} with --cp {cfg.cp} (the "
                           f"{cfg.effective_engine.value} engine cuts each sequence into {how}).")
    if cfg.cp_comm is CpComm.ULYSSES:
        heads, kv = (spec.num_attention_heads or 1) // cfg.tp, max(1, spec.kv_heads // cfg.tp)
        if heads % cfg.cp or kv % cfg.cp:
            raise MemplanError(f"--cp-comm ulysses scatters attention heads over the {cfg.cp} context-parallel ranks, "
                               f"but each tensor-parallel rank has {heads} query and {kv} key/value heads, which --cp "
                               f"{cfg.cp} does not divide: use --cp-comm ring, or a --cp that divides {min(heads, kv)}.")


@dataclass(frozen=True)
class Chunk:
    """Bytes of one rank's local chunk (s/cp tokens, heads after tp) of the attention tensors."""

    q: int
    kv: int
    out: int
    lse: int


def chunk(spec: ModelSpec, cfg: JobConfig) -> Chunk:
    """The local chunk of q, k + v, the output and the fp32 softmax lse, in the compute dtype.

    K/V widths: K heads (rounded up over tp, replicated when tp > K) × head dim; MLA: all N heads of
    d_nope + d_rope (keys) and d_v (values) after the up-projection (what TransformerEngine exchanges).
    """
    tokens = cfg.micro_batch * local_seq_len(cfg)
    elem = FP32_BYTES if cfg.dtype is Dtype.FP32 else 2
    n = ceil_div(spec.num_attention_heads or 1, cfg.tp)
    if spec.is_mla:
        qk, v = (spec.qk_nope_head_dim or 0) + (spec.qk_rope_head_dim or 0), spec.v_head_dim or 0
        kv_width = n * (qk + v)
    else:
        qk = v = spec.dim_per_head
        kv_width = 2 * ceil_div(spec.kv_heads, cfg.tp) * spec.dim_per_head
    return Chunk(q=tokens * n * qk * elem, kv=tokens * kv_width * elem, out=tokens * n * v * elem,
                 lse=tokens * n * FP32_BYTES)


def _ring_bytes(c: Chunk, cfg: JobConfig) -> int:
    """Ring exchange transients, the larger of forward and backward.

    Megatron (TransformerEngine ``AttnFuncWithCPAndKVP2P``): the forward keeps every received KV block in
    ``p2p_comm_buffers`` and every step's ``out_per_step``/``softmax_lse_per_step`` until the output correction at
    its end: cp·(kv + out + lse) on the last rank, whose steps are all full tiles; the backward double-buffers KV and
    dKV (two buffers of [2, *kv.shape]): 4·kv, plus dq.
    torch ``context_parallel`` (``_templated_ring_attention``): the current and the next KV (2·kv) and the
    ``_SDPAMerger`` fp32 output and lse; backward: 2·kv rotating, fp32 dq, dk, dv accumulators and the rotating fp32
    dKV (``convert_to_f32``): 2·kv + 2·q + 4·kv.
    """
    if cfg.effective_engine is Engine.MEGATRON:
        return max(cfg.cp * (c.kv + c.out + c.lse), 4 * c.kv + c.q)
    return max(2 * c.kv + 2 * c.out + c.lse, 6 * c.kv + 2 * c.q)


def exchange_bytes(spec: ModelSpec, cfg: JobConfig) -> int:
    """Bytes one attention with context parallelism adds while it runs (0 with cp = 1).

    - ring: ``_ring_bytes``;
    - allgather (TransformerEngine ``AttnFuncWithCPAndKVAllGather``; torch's ``allgather`` rotate): the gathered
      K/V of the whole sequence, cp·kv, and in backward their gradients before the reduce-scatter: 2·cp·kv;
    - ulysses (TransformerEngine ``flash_attn_a2a_communicate``, DeepSpeed ``_SeqAllToAll``): each of q, k, v is
      copied to a contiguous all-to-all input and received into a new output, 2·(q + kv); backward the same for
      dq, dk, dv.
    Assumption: one attention's buffers at a time (the exchange ends before the next layer starts).
    """
    if cfg.cp == 1:
        return 0
    c = chunk(spec, cfg)
    if cfg.cp_comm is CpComm.RING:
        return _ring_bytes(c, cfg)
    if cfg.cp_comm is CpComm.ALLGATHER:
        return 2 * cfg.cp * c.kv
    return 2 * (c.q + c.kv)
