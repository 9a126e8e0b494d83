"""LoRA, QLoRA and DoRA: the adapter tensors peft adds, and the model states of an adapter job.

LoRA (Hu et al. 2021, Sec. 4.1) freezes a linear weight W (out × in) and trains B·A with
A: r × in and B: out × r, so a targeted module adds r·(in + out) parameters. DoRA (Liu et al.
2024, Sec. 4) adds a magnitude vector of ``out`` elements per module (peft
``lora_magnitude_vector``). QLoRA (Dettmers et al. 2023) trains the same adapters on top of a
4-bit base whose bytes the weights module counts.

Which modules are targeted mirrors peft 0.21 on transformers 5.x (both read from the
installed packages and checked by tests/test_measure_peft.py):

- ``all-linear`` (peft ``_maybe_include_all_linear_layers``): every ``nn.Linear``/``Conv1D`` but
  the output layer; on MoE models also the router and the routed experts, which transformers 5
  stores as fused 3-D parameters and peft targets through ``target_parameters``
  (peft ``utils/transformers_weight_conversion.py``, ``_MOE_TARGET_MODULE_MAPPING``);
- fused experts: gate and up become one ``gate_up_proj`` adapter of rank 2r; targeting only
  one of them is an error in peft, and here;
- Qwen2-MoE-style models (Qwen3-MoE, DeepSeek-V2/V3): peft remaps the names gate_proj, up_proj
  and down_proj to the fused experts, so dense MLPs and shared experts of the same names get no
  adapter;
- peft's ``ParamWrapper`` (experts, router) rejects ``use_dora=True``; so does memplan.

Adapters here are ``Role.OTHER`` tensors: replicated over tensor-parallel ranks (the safe
direction); routed adapters keep ``routed`` and ``copies`` so expert parallelism divides them.
"""

from __future__ import annotations

from collections.abc import Iterable

from memplan.arch.parallel import arch_stage_ranges
from memplan.arch.tensors import PROJECTIONS, Architecture, Role, Tensor
from memplan.catalog.schema import Family
from memplan.config import Job, JobConfig, LoraConfig, Offload, OptimizerKind, ZeroStage
from memplan.dtypes import Dtype
from memplan.errors import MemplanError, did_you_mean
from memplan.memory import optimizer as opt
from memplan.memory.breakdown import Row, Tier
from memplan.memory.context import Context
from memplan.memory.zero import OFFLOAD_TIER, StateBuffer, place
from memplan.units import bits_to_bytes, ceil_div

ALL_LINEAR = "all-linear"
"""peft's shorthand (``INCLUDE_LINEAR_LAYERS_SHORTHAND``) for every linear layer but the output layer."""
FUSED_EXPERT_PAIR = frozenset({"gate", "up"})
"""Routed-expert projections that transformers 5 fuses into ``gate_up_proj``; peft gives the fused
parameter rank 2r (``rank_pattern[...gate_up_proj] = r * 2``)."""
MLP_PROJECTIONS = frozenset({"gate", "up", "down"})
REMAPS_DENSE_MLP = frozenset({Family.QWEN3_MOE, Family.DEEPSEEK, Family.QWEN2_MOE})
"""Families whose transformers model_type maps to ``qwen2_moe`` in ``_MODEL_TO_CONVERSION_PATTERN``:
peft turns the targets gate_proj/up_proj/down_proj into expert parameters only."""
TARGETABLE_ROLES = (Role.LINEAR, Role.ROUTER)
SOURCE = "LoRA (Hu et al. 2021) Sec. 4.1; peft 0.21 LoraModel on transformers 5.x"


def check_targets(lora: LoraConfig) -> None:
    """Reject unknown target names with a suggestion; ``all-linear`` must stand alone."""
    if not lora.targets:
        raise MemplanError("lora.targets is empty; name projections (q,k,v,o,gate,up,down) or 'all-linear'.")
    if ALL_LINEAR in lora.targets:
        if len(lora.targets) > 1:
            raise MemplanError("lora.targets: 'all-linear' already covers every projection; give it alone.")
        return
    for name in lora.targets:
        if name not in PROJECTIONS:
            hint = did_you_mean(name, (*PROJECTIONS, ALL_LINEAR))
            raise MemplanError(f"lora.targets: unknown projection {name!r}.{hint}")


def is_targeted(t: Tensor, lora: LoraConfig, family: Family) -> bool:
    """Whether peft puts an adapter on the module holding ``t`` (see the module docstring)."""
    if t.role not in TARGETABLE_ROLES or len(t.shape) != 2:
        return False
    if family in REMAPS_DENSE_MLP and not t.routed and t.projections and t.projections <= MLP_PROJECTIONS:
        return False
    if ALL_LINEAR in lora.targets:
        return True
    if t.role is Role.ROUTER:
        return False
    return bool(t.projections & set(lora.targets))


def adapter_ranks(t: Tensor, lora: LoraConfig) -> tuple[int, int]:
    """(rows of lora_A, columns of lora_B) for a targeted tensor.

    Formula: r and r; a fused expert ``gate_up`` tensor 2r and 2r; an expert gate (or up) stored
    as its own tensor gets its share of the fused adapter: A rows r, B columns 2r.
    Source: peft ``_convert_peft_config_moe`` (rank_pattern r × 2 for ``gate_up_proj``).
    """
    r = lora.rank
    if not (t.routed and t.projections & FUSED_EXPERT_PAIR):
        return r, r
    if ALL_LINEAR not in lora.targets and not set(lora.targets) >= FUSED_EXPERT_PAIR:
        raise MemplanError(
            "lora.targets: peft fuses the experts' gate and up projections into gate_up_proj "
            "(transformers 5); target both 'gate' and 'up' or neither."
        )
    fused = 2 * r
    return (fused, fused) if t.projections >= FUSED_EXPERT_PAIR else (r, fused)


def module_adapters(t: Tensor, lora: LoraConfig) -> list[Tensor]:
    """lora_A (r × in), lora_B (out × r) and, with DoRA, the magnitude (out) of one targeted module.

    Formula: r·(in + out) [+ out] elements per copy.
    Source: Hu et al. 2021 Sec. 4.1; Liu et al. 2024 (DoRA) Eq. 5; peft ``LoraLayer.update_layer``.
    Assumptions: ``t.shape`` is (out, in) for every linear weight, as memplan.arch.build records it.
    """
    out_f, in_f = t.shape
    rank_a, rank_b = adapter_ranks(t, lora)
    if lora.dora and (t.routed or t.role is Role.ROUTER):
        raise MemplanError(
            f"DoRA cannot adapt {t.name}: peft's ParamWrapper (MoE experts and router) does not work with "
            "use_dora=True; target attention projections only, or turn DoRA off."
        )

    def adapter(name: str, shape: tuple[int, ...]) -> Tensor:
        return Tensor(name, shape, role=Role.OTHER, copies=t.copies, routed=t.routed)

    out = [adapter(f"{t.module}.lora_A.weight", (rank_a, in_f)), adapter(f"{t.module}.lora_B.weight", (out_f, rank_b))]
    if lora.dora:
        out.append(adapter(f"{t.module}.lora_magnitude_vector", (out_f,)))
    return out


def adapter_tensors(tensors: Iterable[Tensor], lora: LoraConfig, *, family: Family) -> list[Tensor]:
    """The adapter tensors peft adds to ``tensors`` (any list: a block, a stage, a whole model)."""
    check_targets(lora)
    out: list[Tensor] = []
    for t in tensors:
        if is_targeted(t, lora, family):
            out.extend(module_adapters(t, lora))
    return out


def lora_tensors(arch: Architecture, lora: LoraConfig) -> list[Tensor]:
    """Every adapter tensor of the model (``arch.extra``, e.g. DeepSeek's MTP block, excluded:
    transformers does not instantiate it, so peft never adapts it)."""
    return stage_lora_tensors(arch, lora, pp=1, stage=0)


def stage_targets(arch: Architecture, lora: LoraConfig, *, pp: int, stage: int) -> list[Tensor]:
    """The base tensors peft adapts on one pipeline stage (its blocks; pre/post on the end stages)."""
    check_targets(lora)
    if arch.spec.family is Family.PARAMS_ONLY:
        raise MemplanError("LoRA adapters need the model's layer shapes; params:N models know only a parameter count.")
    tensors: list[Tensor] = list(arch.pre) if stage == 0 else []
    for i in arch_stage_ranges(arch, pp)[stage]:
        tensors.extend(arch.layers[i].tensors)
    if stage == pp - 1:
        tensors.extend(arch.post)
    return [t for t in tensors if is_targeted(t, lora, arch.spec.family)]


_STAGE_ADAPTERS: dict[tuple, tuple[Architecture, tuple[Tensor, ...]]] = {}
_STAGE_ADAPTERS_LIMIT = 1024


def stage_lora_tensors(arch: Architecture, lora: LoraConfig, *, pp: int, stage: int) -> list[Tensor]:
    """Adapter tensors on one pipeline stage. Memoized per (architecture, LoRA config, pp, stage), the arguments
    being all it reads (a sweep asks again under every dtype, optimizer and size); the architecture is kept with
    its entry and compared by identity, so a recycled ``id`` cannot hit."""
    key = (id(arch), lora, pp, stage)
    hit = _STAGE_ADAPTERS.get(key)
    if hit is None or hit[0] is not arch:
        adapters = tuple(a for t in stage_targets(arch, lora, pp=pp, stage=stage) for a in module_adapters(t, lora))
        if len(_STAGE_ADAPTERS) >= _STAGE_ADAPTERS_LIMIT:
            _STAGE_ADAPTERS.clear()
        hit = _STAGE_ADAPTERS[key] = (arch, adapters)
    return list(hit[1])


def lora_params(arch: Architecture, lora: LoraConfig) -> int:
    """Trainable parameters peft reports (``print_trainable_parameters``) for ``lora`` on ``arch``."""
    return sum(t.numel for t in lora_tensors(arch, lora))


def lora_module_params(*, rank: int, in_features: int, out_features: int, dora: bool = False) -> int:
    """Adapter parameters of one module.

    Formula: r·(in + out), plus ``out`` with DoRA (for a q projection: r·(D + N·H)).
    Source: Hu et al. 2021 Sec. 4.1; Liu et al. 2024 Sec. 4 (magnitude vector m ∈ R^{1×out}).
    """
    return rank * (in_features + out_features) + (out_features if dora else 0)


def per_rank(adapters: Iterable[Tensor], *, ep: int) -> list[Tensor]:
    """Adapters one GPU holds: routed copies divided over ``ep`` (rounded up), the rest replicated."""
    out = []
    for t in adapters:
        copies = ceil_div(t.copies, ep) if t.routed else t.copies
        out.append(Tensor(t.name, t.shape, t.role, t.projections, copies, t.routed))
    return out


_RANK_ADAPTERS: dict[tuple, tuple[Architecture, tuple[Tensor, ...], int, dict[tuple, list[tuple[str, int]]]]] = {}


def rank_adapters(arch: Architecture, lora: LoraConfig, *, pp: int, stage: int, ep: int) -> tuple[tuple[Tensor, ...], int]:
    """(the adapters one GPU of ``stage`` holds, their parameter count): ``per_rank`` of ``stage_lora_tensors``.
    Memoized per (architecture, LoRA config, pp, stage, ep), all it reads, like ``stage_lora_tensors`` (a sweep
    asks again under every dtype, optimizer and size); the architecture is kept and compared by identity."""
    hit = _rank_entry(arch, lora, pp, stage, ep)
    return hit[1], hit[2]


def rank_state_rows(arch: Architecture, lora: LoraConfig, *, pp: int, stage: int, ep: int, optimizer: OptimizerKind,
                    sdtype: Dtype) -> list[tuple[str, int]]:
    """``optimizer.state_rows`` over ``rank_adapters``, memoized with them per optimizer and state dtype."""
    hit = _rank_entry(arch, lora, pp, stage, ep)
    if (optimizer, sdtype) not in hit[3]:
        hit[3][(optimizer, sdtype)] = opt.state_rows(optimizer=optimizer, tensors=hit[1], sdtype=sdtype)
    return list(hit[3][(optimizer, sdtype)])


def _rank_entry(arch: Architecture, lora: LoraConfig, pp: int, stage: int, ep: int) -> tuple:
    key = (id(arch), lora, pp, stage, ep)
    hit = _RANK_ADAPTERS.get(key)
    if hit is None or hit[0] is not arch:
        adapters = tuple(per_rank(stage_lora_tensors(arch, lora, pp=pp, stage=stage), ep=ep))
        if len(_RANK_ADAPTERS) >= _STAGE_ADAPTERS_LIMIT:
            _RANK_ADAPTERS.clear()
        hit = _RANK_ADAPTERS[key] = (arch, adapters, sum(t.numel for t in adapters), {})
    return hit


def adapter_bytes(*, numel: int, dtype: Dtype) -> int:
    """Bytes of adapter weights, or of their gradients (autograd makes ``p.grad`` in ``p``'s dtype).

    Formula: P_adapter · bits(dtype) / 8.
    Source: peft ``get_peft_model(autocast_adapter_dtype=True)`` upcasts bf16/fp16 adapters to fp32
    (peft ``cast_adapter_dtype``); QLoRA's qlora.py casts them to bf16 (``module.to(torch.bfloat16)``).
    Assumptions: ``lora.dtype`` says which of the two a job uses.
    """
    return bits_to_bytes(numel, dtype.bits)


def adapter_master_weights(cfg: JobConfig) -> bool:
    """Whether an fp32 master copy of the adapters exists: only when ``master_weights=True`` is set
    and the adapters are 16-bit. peft + the HF Trainer keep none (torch.autocast computes in bf16,
    the optimizer updates the adapters in place); DeepSpeed's bf16/fp16 engines keep one."""
    return bool(cfg.master_weights) and cfg.lora.dtype.is_16bit


def adapter_state_dtype(cfg: JobConfig) -> Dtype:
    """dtype of the adapters' full-precision optimizer states.

    QLoRA with AdamW: fp32, as bitsandbytes' ``paged_adamw_32bit`` (QLoRA's qlora.py default
    ``--optim paged_adamw_32bit``) allocates fp32 states whatever the parameter dtype. Otherwise
    ``torch.optim`` rules (``zeros_like(p)``; fp32 with a master copy), see optimizer.state_dtype.
    """
    if cfg.job is Job.QLORA and cfg.optimizer is OptimizerKind.ADAMW:
        return Dtype.FP32
    master = adapter_master_weights(cfg)
    return opt.state_dtype(optimizer=cfg.optimizer, weight_dtype=cfg.lora.dtype, master_weights=master)


def dora_workspace_bytes(*, in_features: int, out_features: int, adapter_dtype: Dtype, compute_dtype: Dtype,
                         dequantized: bool) -> int:
    """Transient bytes of one DoRA module's weight norm, computed in every forward pass.

    Formula: in·in·a (identity ``x_eye``) + out·in·a (ΔW = B·A) [+ out·in·c (ΔW cast to the compute
    dtype, when a ≠ c)] + out·in·c (W + s·ΔW) [+ out·in·c (a 4-bit W dequantized)], with a and c
    the adapter and compute widths.
    Source: peft tuners/lora/dora.py ``DoraLinearLayer.get_lora_weight`` (``torch.eye(in)`` pushed
    through lora_A and lora_B), ``get_weight_norm`` and ``forward``; the norm is detached
    (Liu et al. 2024, Sec. 4.3), so none of it is saved for backward.
    Assumptions: modules run one at a time, so a job's workspace is the largest module's.
    """
    a, c = adapter_dtype.bits, compute_dtype.bits
    full = out_features * in_features
    total = bits_to_bytes(in_features * in_features, a) + bits_to_bytes(full, a) + bits_to_bytes(full, c)
    if a != c:
        total += bits_to_bytes(full, c)
    if dequantized:
        total += bits_to_bytes(full, c)
    return total


def _dora_targets(ctx: Context) -> list[tuple[Tensor, bool]]:
    """The stage's targeted modules, each with whether its base weight is stored quantized (its layer's
    format, ``weights.layer_format``; dequantized in every forward)."""
    from memplan.memory.weights import layer_format

    cfg, family = ctx.cfg, ctx.arch.spec.family
    ends = (ctx.arch.pre if ctx.stage == 0 else ()) + (ctx.arch.post if ctx.stage == cfg.pp - 1 else ())
    placed = [(t, i) for i, layer in ctx.layers for t in layer.tensors] + [(t, None) for t in ends]
    return [(t, layer_format(cfg, i) is not None) for t, i in placed if is_targeted(t, cfg.lora, family)]


def _dora_row(ctx: Context) -> list[Row]:
    cfg = ctx.cfg
    if not cfg.lora.dora:
        return []
    targeted = _dora_targets(ctx)
    if not targeted:
        return []
    compute = cfg.dtype if cfg.dtype.bits >= Dtype.FP16.bits else Dtype.BF16
    worst = max(dora_workspace_bytes(in_features=t.shape[1], out_features=t.shape[0], adapter_dtype=cfg.lora.dtype,
                                     compute_dtype=compute, dequantized=quantized) for t, quantized in targeted)
    return [Row("runtime/dora_workspace", Tier.GPU, worst, "peft tuners/lora/dora.py (weight norm per forward)",
                "transient: largest targeted module")]


def _weight_buffers(ctx: Context) -> list[StateBuffer]:
    """The frozen base weights, as the weights module counts them (QLoRA: 4-bit), placed like any weights."""
    from memplan.memory import weights

    tier = OFFLOAD_TIER[ctx.cfg.offload_params]
    return [StateBuffer(r.component, r.bytes, ZeroStage.PARAMETERS, tier, r.source, r.note) for r in weights.rows(ctx)]


def adapter_buffers(ctx: Context) -> list[StateBuffer]:
    """Adapter weights, gradients, optional fp32 master copy and optimizer states on one GPU."""
    cfg, lora = ctx.cfg, ctx.cfg.lora
    numel = rank_adapters(ctx.arch, lora, pp=cfg.pp, stage=ctx.stage, ep=cfg.ep)[1]
    opt_tier = OFFLOAD_TIER[cfg.offload_optimizer]
    grad_tier = Tier.GPU if cfg.offload_optimizer is Offload.NONE else opt_tier
    state_tier, note = opt_tier, ""
    if lora.paged_optimizer:
        state_tier, note = Tier.CPU, "paged optimizer: counted as fully paged out to CPU RAM"
    nbytes = adapter_bytes(numel=numel, dtype=lora.dtype)
    out = [StateBuffer("weights/lora_adapters", nbytes, ZeroStage.PARAMETERS, OFFLOAD_TIER[cfg.offload_params],
                       SOURCE, f"{numel} adapter parameters in {lora.dtype.value}"),
           StateBuffer("gradients/lora_adapters", nbytes, ZeroStage.GRADIENTS, grad_tier, SOURCE)]
    if adapter_master_weights(cfg):
        out.append(StateBuffer("optimizer/lora_master_fp32", bits_to_bytes(numel, Dtype.FP32.bits),
                               ZeroStage.OPTIMIZER, state_tier, "fp32 master copy (master_weights=True)"))
    sdtype = adapter_state_dtype(cfg)
    for name, sbytes in rank_state_rows(ctx.arch, lora, pp=cfg.pp, stage=ctx.stage, ep=cfg.ep,
                                        optimizer=cfg.optimizer, sdtype=sdtype):
        out.append(StateBuffer(name, sbytes, ZeroStage.OPTIMIZER, state_tier,
                               f"{cfg.optimizer.value} states of the adapters ({sdtype.value})", note))
    return out


def rows(ctx: Context) -> list[Row]:
    """Every non-activation row of a LoRA/QLoRA job: frozen weights, adapters, their gradients and
    optimizer states (ZeRO-partitioned and offloaded like full training), and DoRA's workspace."""
    cfg = ctx.cfg
    buffers = _weight_buffers(ctx) + adapter_buffers(ctx)
    out = [place(b, zero=cfg.zero, dp=cfg.dp, gpus_per_node=cfg.gpus_per_node) for b in buffers]
    return out + _dora_row(ctx)
