"""Megatron-Core knobs memplan models beyond the distributed optimizer: ``--recompute-modules`` and the
precision-aware optimizer. One sentence per broken rule, or None (``engines.rules``)."""

from __future__ import annotations

from memplan.config import JobConfig, OptimizerKind, Recompute
from memplan.dtypes import Dtype
from memplan.memory.megatron_recompute import MODELLED


def recompute_modules_rule(cfg: JobConfig) -> str | None:
    """``recompute_modules`` acts in ``selective`` layers on the modules a model has; whole-submodule checkpoints
    ("mlp", "moe", "shared_experts") are not modelled (``memory.megatron_recompute``)."""
    mods = cfg.engine_config.recompute_modules
    if mods is None:
        return None
    if not mods:
        return "engine_config.recompute_modules is empty: name at least one module (Megatron's default is core_attn)."
    other = sorted(set(mods) - MODELLED)
    if other:
        return (f"engine_config.recompute_modules {', '.join(other)} (a whole-submodule checkpoint) is not modelled by "
                f"memplan; it models {', '.join(sorted(MODELLED))}: drop it or use --recompute full.")
    return None


def selective_rule(cfg: JobConfig, modes: tuple[Recompute, ...]) -> str | None:
    """``recompute_modules`` acts in ``selective`` layers: an estimate whose modes (``recompute`` and
    ``recompute_map``), or a plan whose searched modes, include none moves no byte with it. Not part of
    ``engines.rules.violation``: the planner chooses each layer's mode after the engine's rules filter the rest."""
    if cfg.engine_config.recompute_modules is None or Recompute.SELECTIVE in modes:
        return None
    return ("engine_config.recompute_modules acts with Megatron's --recompute-granularity selective: add "
            "--recompute selective.")


def recompute_modules_model_rule(cfg: JobConfig, *, mla: bool, moe: bool) -> str | None:
    """A module the model does not have moves no byte: mla_up_proj needs MLA, moe_act routed experts, layernorm a
    norm Megatron does not fuse (``memory.megatron_recompute.separate_norms``)."""
    mods = set(cfg.engine_config.recompute_modules or ())
    if "mla_up_proj" in mods and not mla:
        return "engine_config.recompute_modules mla_up_proj recomputes MLA's up-projections; this model has no MLA."
    if "layernorm" in mods and not (mla or moe):
        return ("engine_config.recompute_modules layernorm recomputes the norms Megatron keeps as modules of their own "
                "(MLA's input norm, MoE layers' pre-MLP norm); this model's are fused into the next linear "
                "(TELayerNormColumnParallelLinear), so it moves no byte: drop it.")
    if "moe_act" in mods and not moe:
        return "engine_config.recompute_modules moe_act recomputes the routed experts' activation; this model has none."
    return None


def fp8_rule(cfg: JobConfig) -> str | None:
    """``fp8_recipe`` scales fp8 tensors: it acts with fp8 training (``perf.fp8`` or ``dtype: fp8``) only;
    Megatron-Core reads it with ``--fp8-format`` (transformer_config.py ``fp8_recipe``)."""
    if cfg.engine_config.fp8_recipe != "delayed" and not (cfg.perf.fp8 or cfg.dtype is Dtype.FP8):
        return (f"engine_config.fp8_recipe {cfg.engine_config.fp8_recipe} acts with fp8 training: set perf.fp8 (or "
                "--dtype fp8), or drop it.")
    return None


def fp8_input_store_model_rule(cfg: JobConfig, *, swiglu: bool) -> str | None:
    """Megatron-Core raises "Storing activation input in FP8 is supported only for SwiGLU" (transformer_config.py
    ``__post_init__``) for ``activation_func_fp8_input_store`` on any other activation."""
    if cfg.engine_config.activation_func_fp8_input_store and not swiglu:
        return ("engine_config.activation_func_fp8_input_store stores the SwiGLU's input in fp8; this model's MLP is "
                "not a SwiGLU (Megatron-Core refuses it): drop it.")
    return None


def precision_aware_rule(cfg: JobConfig) -> str | None:
    """The precision-aware optimizer's dtypes need it on; it runs TransformerEngine's FusedAdam over 16-bit params
    with fp32 masters (megatron/core/optimizer/optimizer_config.py, training/arguments.py)."""
    knobs = cfg.engine_config
    lowered = [n for n in ("exp_avg_dtype", "exp_avg_sq_dtype") if getattr(knobs, n) != "fp32"]
    if lowered and not knobs.use_precision_aware_optimizer:
        return (f"engine_config.{lowered[0]} acts with Megatron's --use-precision-aware-optimizer: add "
                "--use-precision-aware-optimizer.")
    if not knobs.store_param_remainders and not knobs.use_precision_aware_optimizer:
        return ("engine_config.store_param_remainders acts with Megatron's --use-precision-aware-optimizer: add "
                "--use-precision-aware-optimizer or drop --no-store-param-remainders.")
    if knobs.use_precision_aware_optimizer:
        if cfg.optimizer is not OptimizerKind.ADAMW:
            return "Megatron's precision-aware optimizer is TransformerEngine's FusedAdam: use --optimizer adamw."
        if cfg.dtype not in (Dtype.BF16, Dtype.FP16, Dtype.FP8) or not cfg.uses_master_weights:
            return ("Megatron's precision-aware optimizer keeps fp32 main params beside 16-bit ones: train in bf16/fp16 "
                    "(or fp8) with master weights.")
        remainders = knobs.store_param_remainders and cfg.dtype is not Dtype.FP16  # fp8 keeps bf16 params
        if not lowered and not remainders:
            return ("--use-precision-aware-optimizer with fp32 moments and no param remainders (fp16 params, or "
                    "--no-store-param-remainders) moves no byte: lower --exp-avg-dtype/--exp-avg-sq-dtype or drop it.")
    return None
