"""GaLore and APOLLO: full-parameter training with optimizer states in a low-rank subspace.

GaLore (Zhao et al. 2024, Algorithm 1 and Sec. 4.2): for a projected weight G ∈ R^{m×n},
m ≤ n, a projection P ∈ R^{m×r} (top-r left singular vectors of the gradient, refreshed every
T steps) maps the gradient to R = Pᵀ·G ∈ R^{r×n}; Adam keeps m and v of that r × n shape. The
paper's Table 1 gives GaLore's optimizer memory as mr + 2nr: the projection lies along the
*smaller* side, the states along the *larger* one. galore_torch's ``GaLoreProjector`` (``proj_type
= "std"``) does the same for either orientation: rows ≥ cols projects on the right (P: r × cols,
states: rows × r), else on the left (P: rows × r, states: r × cols). The SVD runs in fp32 and P is
cast back to the gradient's dtype (``get_orthogonal_matrix``); the states are ``zeros_like`` of
the projected gradient, so they too take the gradient's dtype (bf16 in the paper's runs).

Per-layer weight updates (Sec. 4.3; galore's torchrun_main.py ``galore_adamw8bit_per_layer``):
each parameter is stepped by ``register_post_accumulate_grad_hook`` as soon as its gradient is
ready and the gradient is freed, so one gradient is live at a time. 8-bit GaLore
(``GaLoreAdamW8bit``) keeps bitsandbytes block-wise 8-bit states of the low-rank shape.

APOLLO (Zhu et al. 2024, "APOLLO: SGD-like Memory, AdamW-level Performance", Alg. 1): the
same geometry with a random Gaussian projection (no SVD) whose low-rank Adam states only set a
channel-wise (APOLLO) or tensor-wise (APOLLO-Mini, rank 1) gradient scaling. Its reference
implementation (``GradientProjector`` in apollo_torch, "a lazy implementation as we store the
projection matrix") stores P like GaLore, and keeps one norm-growth-limiter scalar per matrix.

Projected matrices: the 2-D attention and MLP weights (galore's ``target_modules_list = ["attn",
"mlp"]``). Embeddings, lm_head, norms, biases, routers and routed experts (3-D parameters in
transformers 5, not ``nn.Linear``) use plain AdamW (8-bit with ``eight_bit``).
Tensor parallelism is not supported by these reference implementations; its bytes here are
the single-GPU bytes divided by tp, rounded up.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from memplan.arch.parallel import sharded_numel
from memplan.arch.tensors import Role, Tensor
from memplan.catalog.schema import Family
from memplan.config import GaloreConfig, OptimizerKind, ZeroStage
from memplan.dtypes import Dtype
from memplan.errors import MemplanError, did_you_mean
from memplan.memory import optimizer as opt
from memplan.memory.breakdown import Row, Tier
from memplan.memory.context import Context
from memplan.memory.zero import OFFLOAD_TIER, StateBuffer, place
from memplan.units import bits_to_bytes, ceil_div

GALORE, APOLLO, APOLLO_MINI = "galore", "apollo", "apollo-mini"
VARIANTS = (GALORE, APOLLO, APOLLO_MINI)
APOLLO_MINI_RANK = 1
"""APOLLO-Mini uses a rank-1 auxiliary space with tensor-wise scaling (APOLLO paper, abstract)."""
NORM_LIMITER_ELEMENTS = 1
"""APOLLO keeps ``state["scaled_grad"]``, one scalar per matrix, for Fira's norm-growth limiter."""
GALORE_PAPER = "GaLore (Zhao et al. 2024) Alg. 1, Sec. 4.2-4.3, Table 1; galore_torch GaLoreProjector"
APOLLO_PAPER = "APOLLO (Zhu et al. 2024) Alg. 1; apollo_torch GradientProjector"


def check_variant(galore: GaloreConfig) -> str:
    """The variant name, or a MemplanError naming the choices."""
    if galore.variant not in VARIANTS:
        hint = did_you_mean(galore.variant, VARIANTS)
        raise MemplanError(f"galore.variant: unknown {galore.variant!r}; use one of {', '.join(VARIANTS)}.{hint}")
    return galore.variant


def variant_rank(galore: GaloreConfig) -> int:
    """Projection rank: ``galore.rank``, except APOLLO-Mini, which is rank 1 by definition."""
    return APOLLO_MINI_RANK if check_variant(galore) == APOLLO_MINI else galore.rank


def is_projected(t: Tensor) -> bool:
    """Whether ``t`` gets a low-rank projection: a 2-D, non-routed attention or MLP weight."""
    return t.role is Role.LINEAR and len(t.shape) == 2 and not t.routed and bool(t.projections)


def effective_rank(*, rank: int, rows: int, cols: int) -> int:
    """Rank actually used: r, capped at min(m, n) (an SVD has no more singular vectors)."""
    return min(rank, rows, cols)


def lowrank_state_numel(*, rank: int, rows: int, cols: int) -> int:
    """Elements of ONE low-rank state (m or v) of an m × n matrix.

    Formula: r · max(m, n) (the paper's R_t ∈ R^{r×n} for m ≤ n).
    Source: GaLore Alg. 1 and Table 1 (optimizer states 2nr); galore_torch ``GaLoreProjector.project``.
    """
    return effective_rank(rank=rank, rows=rows, cols=cols) * max(rows, cols)


def projection_numel(*, rank: int, rows: int, cols: int) -> int:
    """Elements of the projection matrix P of an m × n matrix.

    Formula: r · min(m, n) (the paper's P_t ∈ R^{m×r} for m ≤ n).
    Source: GaLore Table 1 (the mr term); galore_torch ``get_orthogonal_matrix``.
    """
    return effective_rank(rank=rank, rows=rows, cols=cols) * min(rows, cols)


def lowrank_state_bytes(tensors: Iterable[Tensor], *, rank: int, state_dtype: Dtype, eight_bit: bool,
                        apollo: bool = False) -> int:
    """Bytes of the low-rank Adam states (m and v) of every projected tensor in ``tensors``.

    Formula: Σ 2 · r·max(m, n) · bits/8 per matrix; 8-bit: bitsandbytes block-wise states of
    r·max(m, n) elements (optimizer.adam8bit_state_bytes); APOLLO adds one norm-limiter scalar.
    Source: GaLore Table 1; galore_torch ``GaLoreAdamW8bit``; APOLLO Alg. 1.
    """
    total = 0
    for t in tensors:
        if not is_projected(t):
            continue
        numel = lowrank_state_numel(rank=rank, rows=t.shape[0], cols=t.shape[1])
        each = opt.adam8bit_state_bytes(numel=numel) if eight_bit else opt.adam_state_bytes(
            numel=numel, state_dtype=state_dtype)
        if apollo:
            each += bits_to_bytes(NORM_LIMITER_ELEMENTS, state_dtype.bits)
        total += each * t.copies
    return total


def projection_bytes(tensors: Iterable[Tensor], *, rank: int, dtype: Dtype) -> int:
    """Bytes of the projection matrices of every projected tensor, in the gradient's dtype.

    Formula: Σ r·min(m, n) · bits/8.
    Source: galore_torch ``get_orthogonal_matrix`` (fp32 SVD, cast back to the gradient dtype);
    apollo_torch ``GradientProjector`` stores its random matrix the same way.
    """
    numel = sum(projection_numel(rank=rank, rows=t.shape[0], cols=t.shape[1]) * t.copies
                for t in tensors if is_projected(t))
    return bits_to_bytes(numel, dtype.bits)


def gradient_bytes(tensors: Sequence[Tensor], *, grad_dtype: Dtype, per_layer_updates: bool,
                   tp: int = 1, ep: int = 1) -> int:
    """Bytes of gradients held at once on one GPU.

    Formula: Σ P_t · bits/8 over trainable tensors; with per-layer updates max_t P_t · bits/8.
    Source: GaLore Sec. 4.3 ("per-layer weight updates"); galore torchrun_main.py
    (``register_post_accumulate_grad_hook`` steps each parameter, then ``zero_grad``).
    Assumptions: routed experts of a layer form one parameter (transformers 5 fuses them).
    """
    sizes = [sharded_numel(t, tp, ep) for t in tensors]
    if not sizes:
        return 0
    return bits_to_bytes(max(sizes) if per_layer_updates else sum(sizes), grad_dtype.bits)


def svd_workspace_bytes(*, rows: int, cols: int, dtype: Dtype) -> int:
    """Transient bytes of GaLore's subspace refresh for one m × n gradient (every T steps).

    Formula: (m·n if the gradient is not fp32) + m·k + k + k·n fp32 elements, k = min(m, n).
    Source: galore_torch ``get_orthogonal_matrix`` (``matrix.float()``, ``torch.linalg.svd(...,
    full_matrices=False)``). Assumptions: the solver's own scratch space is not counted.
    """
    k = min(rows, cols)
    copy = 0 if dtype is Dtype.FP32 else rows * cols
    return bits_to_bytes(copy + rows * k + k + k * cols, Dtype.FP32.bits)


def update_workspace_bytes(*, rank: int, rows: int, cols: int, dtype: Dtype) -> int:
    """Transient bytes of one projected step: the low-rank gradient, the normalized low-rank update
    and the full-size update projected back (GaLore) or the scaled gradient (APOLLO).

    Formula: (2 · r·max(m, n) + m·n) · bits/8.
    Source: galore_torch ``AdamW.step`` (``project``, ``exp_avg / denom``, ``project_back``);
    APOLLO Alg. 1 (``p.grad * scaling_factor``).
    """
    return bits_to_bytes(2 * lowrank_state_numel(rank=rank, rows=rows, cols=cols) + rows * cols, dtype.bits)


def workspace_bytes(tensors: Iterable[Tensor], *, rank: int, dtype: Dtype, variant: str) -> int:
    """Largest transient of one projected matrix's step: the projection refresh (GaLore's SVD; APOLLO's
    fp32 random matrix, r·min(m, n)) or the update itself, whichever is larger."""
    worst = 0
    for t in tensors:
        if not is_projected(t):
            continue
        m, n = t.shape
        if variant == GALORE:
            refresh = svd_workspace_bytes(rows=m, cols=n, dtype=dtype)
        else:
            refresh = bits_to_bytes(projection_numel(rank=rank, rows=m, cols=n), Dtype.FP32.bits)
        worst = max(worst, refresh, update_workspace_bytes(rank=rank, rows=m, cols=n, dtype=dtype))
    return worst


def _regular_states(ctx: Context, regular: list[Tensor], *, sdtype: Dtype, eight_bit: bool) -> list[StateBuffer]:
    """Plain (8-bit) AdamW states of the tensors that are not projected, scaled to the tp/ep shard."""
    cfg = ctx.cfg
    kind = OptimizerKind.ADAMW_8BIT if eight_bit else OptimizerKind.ADAMW
    full = sum(t.numel for t in regular)
    shard = sum(sharded_numel(t, cfg.tp, cfg.ep) for t in regular)
    tier = OFFLOAD_TIER[cfg.offload_optimizer]
    out = []
    for name, nbytes in opt.state_rows(optimizer=kind, tensors=regular, sdtype=sdtype):
        scaled = ceil_div(nbytes * shard, full) if full else 0
        out.append(StateBuffer(name, scaled, ZeroStage.OPTIMIZER, tier,
                               f"{kind.value} states of non-projected tensors ({sdtype.value})"))
    return out


def _weight_buffers(ctx: Context) -> list[StateBuffer]:
    from memplan.memory import weights

    tier = OFFLOAD_TIER[ctx.cfg.offload_params]
    return [StateBuffer(r.component, r.bytes, ZeroStage.PARAMETERS, tier, r.source, r.note) for r in weights.rows(ctx)]


def lowrank_buffers(ctx: Context) -> list[StateBuffer]:
    """Gradients, low-rank states, projections, optional master copy and plain AdamW states on one GPU."""
    cfg, g = ctx.cfg, ctx.cfg.galore
    variant, rank = check_variant(g), variant_rank(g)
    projected = [t for t in ctx.tensors if is_projected(t)]
    regular = [t for t in ctx.tensors if not is_projected(t)]
    sdtype = opt.state_dtype(optimizer=cfg.optimizer, weight_dtype=cfg.dtype, master_weights=cfg.uses_master_weights)
    eight_bit = g.eight_bit or cfg.optimizer is OptimizerKind.ADAMW_8BIT
    tp, tier = cfg.tp, OFFLOAD_TIER[cfg.offload_optimizer]
    source = GALORE_PAPER if variant == GALORE else APOLLO_PAPER
    states = lowrank_state_bytes(projected, rank=rank, state_dtype=sdtype, eight_bit=eight_bit,
                                 apollo=variant != GALORE)
    grads = gradient_bytes(ctx.tensors, grad_dtype=cfg.gradient_dtype, per_layer_updates=g.per_layer_updates,
                           tp=tp, ep=cfg.ep)
    proj = projection_bytes(projected, rank=rank, dtype=cfg.gradient_dtype)
    out = [StateBuffer("gradients", grads, ZeroStage.GRADIENTS, Tier.GPU, source,
                       "one tensor at a time (per-layer updates)" if g.per_layer_updates else ""),
           StateBuffer("optimizer/lowrank_states", ceil_div(states, tp), ZeroStage.OPTIMIZER, tier, source,
                       f"{variant} rank {rank}, {'8-bit' if eight_bit else sdtype.value}"),
           StateBuffer("optimizer/lowrank_projection", ceil_div(proj, tp), ZeroStage.OPTIMIZER, tier, source)]
    if cfg.uses_master_weights:
        numel = sum(sharded_numel(t, tp, cfg.ep) for t in ctx.tensors)
        out.append(StateBuffer("optimizer/master_fp32", bits_to_bytes(numel, Dtype.FP32.bits),
                               ZeroStage.OPTIMIZER, tier, "fp32 master copy (master_weights=True)"))
    return out + _regular_states(ctx, regular, sdtype=sdtype, eight_bit=eight_bit)


def rows(ctx: Context) -> list[Row]:
    """Every non-activation row of a GaLore/APOLLO job on the reported GPU: weights, gradients,
    optimizer states and projections (ZeRO-placed like full training), and the step's workspace."""
    cfg, g = ctx.cfg, ctx.cfg.galore
    variant, rank = check_variant(g), variant_rank(g)
    if ctx.arch.spec.family is Family.PARAMS_ONLY:
        raise MemplanError("GaLore/APOLLO project each weight matrix and need its shape; "
                           "params:N models know only a parameter count.")
    if g.per_layer_updates and cfg.world_size > 1:
        raise MemplanError("GaLore/APOLLO per-layer weight updates run on one GPU only (GaLore README: "
                           "--single_gpu); set galore.per_layer_updates=false for multi-GPU jobs.")
    buffers = _weight_buffers(ctx) + lowrank_buffers(ctx)
    out = [place(b, zero=cfg.zero, dp=cfg.dp, gpus_per_node=cfg.gpus_per_node) for b in buffers]
    projected = [t for t in ctx.tensors if is_projected(t)]
    work = ceil_div(workspace_bytes(projected, rank=rank, dtype=cfg.gradient_dtype, variant=variant), cfg.tp)
    source = GALORE_PAPER if variant == GALORE else APOLLO_PAPER
    return [*out, Row("optimizer/lowrank_workspace", Tier.GPU, work, source, "transient: largest projected matrix")]
