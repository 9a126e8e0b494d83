"""LoRA and QLoRA on engine fsdp2 (``torch.distributed.fsdp.fully_shard``), as torchtune runs them
(recipes/lora_finetune_distributed.py: ``fully_shard`` on every transformer layer and on the root, frozen base
weights, adapters trained; QLoRA's base is torchao's ``NF4Tensor``, which FSDP2 shards with its scalers).

FSDP2 shards every parameter on dim 0 (a DTensor per parameter, padded to a multiple of Nd), so unlike FSDP1's
FlatParameter (``memory.engine_fsdp1``) a frozen parameter never gets a gradient: only the adapters have gradients,
reduce-scattered per unit, and optimizer states. Sources: torch/distributed/fsdp/_fully_shard/_fsdp_param.py
(``FSDPParam``: sharded ``_sharded_param_data``; ``requires_grad`` per parameter), _fsdp_collectives.py
(``foreach_all_gather`` of a unit's parameters into one buffer; ``foreach_reduce`` of the gradients that exist),
_fsdp_state.py (the root keeps ``reshard_after_forward=False``), _fsdp_param_group.py (implicit prefetch).
torchao/dtypes/nf4tensor.py (``fsdp_pre_all_gather``: the quantized data and its scalers are what is sharded and
gathered).
"""

from __future__ import annotations

from memplan.memory import engine_fsdp1 as f1
from memplan.memory import optimizer as opt
from memplan.memory.breakdown import Row, Tier
from memplan.memory.context import Context
from memplan.units import bits_to_bytes

SRC = "torch/distributed/fsdp/_fully_shard/_fsdp_param.py (per-parameter dim-0 shards); torchao NF4Tensor"
SRC_AG = "torch/distributed/fsdp/_fully_shard/_fsdp_collectives.py foreach_all_gather; _fsdp_state.py root"
SRC_RS = "torch/distributed/fsdp/_fully_shard/_fsdp_collectives.py foreach_reduce (gradients that exist only)"


def unit_bytes(ctx: Context) -> list[tuple[str, int, int]]:
    """(name, stored bytes of the unit's frozen base and adapters, adapter bytes) per ``fully_shard`` unit: each
    transformer block, and the root (everything outside the blocks). A 4-bit base counts its quantized data and
    scalers (NF4Tensor shards both)."""
    cfg = ctx.cfg
    dtype = f1.storage_dtype(ctx)
    out = []

    def add(name: str, tensors: list, layer: int | None) -> None:
        base = sum(sum(f1._tensor_bytes(ctx, t, layer, dtype)) for t in tensors)
        adapters = sum(bits_to_bytes(a.numel, cfg.lora.dtype.bits) for a in f1._adapters(ctx, tensors))
        out.append((name, base + adapters, adapters))

    for i, layer in ctx.layers:
        add(f"block {i}", list(layer.tensors), i)
    inside = {id(t) for _, layer in ctx.layers for t in layer.tensors}
    add("root", [t for t in ctx.tensors if id(t) not in inside], None)
    return out


def gathered_bytes(ctx: Context, units: list[tuple[str, int, int]]) -> int:
    """Unsharded bytes of the units in flight: R + B · (1 + ``fsdp_prefetch``) with ``reshard_after_forward``
    (the root R stays gathered; B the largest block), else every unit; 0 on one rank.
    Source: ``SRC_AG``; the same rule as ``engine_buffers.fsdp2_rows`` for full-weight jobs."""
    cfg = ctx.cfg
    if cfg.dp <= 1:
        return 0
    root = sum(b for name, b, _ in units if name == "root")
    blocks = [b for name, b, _ in units if name != "root"]
    if not cfg.engine_config.reshard_after_forward:
        return root + sum(blocks)
    return root + max(blocks, default=0) * (1 + cfg.engine_config.fsdp_prefetch)


def rows(ctx: Context) -> list[Row]:
    """Every non-activation row of a LoRA/QLoRA job on engine fsdp2, per GPU.

    Formula: params Σ ceil(unit/Nd); gathered ``gathered_bytes``; adapter gradients Σ ceil(adapters/Nd), and in
    backward the largest unit's unsharded adapter gradients plus their shard; optimizer states over the adapters'
    shards in the adapters' dtype (torch AdamW ``zeros_like`` on the DTensor shard).
    """
    cfg = ctx.cfg
    dp = cfg.dp
    units = unit_bytes(ctx)
    adapters = sum(a for _, _, a in units)
    biggest = max((a for _, _, a in units), default=0)
    out = [Row("weights/fsdp2_params", Tier.GPU, sum(f1.shard_bytes(b, dp) for _, b, _ in units), SRC,
               f"{len(units)} fully_shard units, every parameter 1/{dp} on dim 0 (adapters included)"),
           Row("weights/fsdp_all_gather", Tier.GPU, gathered_bytes(ctx, units), SRC_AG,
               "root + largest block × (1 + fsdp_prefetch) gathered"),
           Row("gradients/lora_adapters", Tier.GPU, sum(f1.shard_bytes(a, dp) for _, _, a in units), SRC_RS,
               "sharded adapter gradients (frozen parameters have none)")]
    if dp > 1:
        out.append(Row("gradients/fsdp_reduce_scatter", Tier.GPU, biggest + f1.shard_bytes(biggest, dp), SRC_RS,
                       "largest unit's unsharded adapter gradients and their shard"))
    tensors = f1._adapters(ctx, list(ctx.tensors))
    for name, nbytes in opt.state_rows(optimizer=cfg.optimizer, tensors=tensors, sdtype=cfg.lora.dtype):
        out.append(Row(name, Tier.GPU, f1.shard_bytes(nbytes, dp), f"{cfg.optimizer.value} states on the adapters' "
                       "DTensor shards", f"{cfg.lora.dtype.value}, 1/{dp}"))
    from memplan.memory import peft

    return [r for r in out if r.bytes or r.component.startswith("weights/fsdp2")] + peft._dora_row(ctx) \
        if adapters else out
