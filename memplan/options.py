"""Every option that describes a job, declared once, grouped as ``--help`` shows them. ``memplan.cli.convert``
turns them into a ``JobConfig`` (``job_config``) and a ``SearchSpace`` (``search_space``); ``memplan.report.flags``
turns request changes back into them (a plan's suggestions). Nothing else maps options to fields.

The declarations import no command-line library, so the report can read them below the CLI; a command takes
groups with ``memplan.cli.opts.options``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memplan.config import Accounting, Engine, Job, Offload, OptimizerImpl, OptimizerKind, Recompute
from memplan.config_train import pp_schedule_name
from memplan.dtypes import Dtype
from memplan.errors import MemplanError
from memplan.units import GiB, KiB, MiB, TiB, parse_size

HARDWARE, JOB, PARALLEL, MEMORY, FINETUNE, INFER, ENGINE, SERVE, PERF, OUTPUT = (
    "Hardware", "Job", "Parallelism and ZeRO", "Memory-saving techniques", "Fine-tuning", "Inference",
    "Training-engine knobs", "Serving-engine knobs (vLLM, SGLang, llama.cpp, transformers)", "Step time (training plans)",
    "Output")
COST = "Cost and speed"


def size_or_none(text: str | None, field: str) -> int | None:
    return None if text is None else parse_size(text, field=field)


def lora_targets(text: str) -> tuple[str, ...]:
    items = tuple(t.strip() for t in text.split(",") if t.strip())
    if not items:
        raise MemplanError("--lora-targets: give at least one of q,k,v,o,gate,up,down or all-linear.")
    return items


def recompute_modules(text: str) -> tuple[str, ...]:
    """Megatron ``--recompute-modules`` as a comma list (Megatron's own flag takes them space-separated)."""
    items = tuple(t.strip() for t in text.replace(" ", ",").split(",") if t.strip())
    if not items:
        raise MemplanError("--recompute-modules: give at least one of core_attn, layernorm, mla_up_proj, moe_act.")
    return items


def quant_name(text: str | None) -> str | None:
    """``none``/``bf16``/``fp16``/``16bit`` mean unquantized weights."""
    return None if text is None or text.lower() in ("none", "bf16", "fp16", "16bit") else text


def quant_text(value: str | None) -> str:
    """A weight format as ``--quant`` reads it back (:func:`quant_name`): None (16-bit weights) is ``none``."""
    return "none" if value is None else value


def size_text(nbytes: int) -> str:
    """Bytes as a size ``parse_size`` reads back exactly: the largest binary unit that divides them (``512GiB``),
    else bytes (``1000B``)."""
    for unit, scale in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if nbytes and nbytes % scale == 0:
            return f"{nbytes // scale}{unit}"
    return f"{nbytes}B" if nbytes else "0"


@dataclass(frozen=True)
class Opt:
    """One option: its flags, type, default, help and panel; where its value goes in a JobConfig (``field``,
    a dotted path) and in a SearchSpace (``dim``); ``convert`` turns the text into the field's value."""

    flags: tuple[str, ...]
    kind: Any
    default: Any
    help: str
    panel: str
    field: str | None = None
    dim: str | None = None
    convert: Callable[[Any], Any] | None = None
    item: Callable[[str], Any] | None = None
    """Reads one choice of a comma list (default: as ``kind``)."""
    base: str = "first"
    """With ``lists``: what the base JobConfig takes from the choices: ``first``, ``single`` (only when one is
    given) or ``none`` (the search space alone decides)."""
    infer_dim: str | None = None
    """The SearchSpace field the option sets in an inference plan, where that differs from ``dim``."""
    hardware: str | None = None
    """The plan request's hardware field the option sets (``gpu``: the GPU's catalog name, ``cpu_ram_bytes``,
    ``nvme_bytes``; ``gpus_per_node``, ``nodes``), as a suggestion's ``hardware.*`` change names it."""
    text: Callable[[Any], str] | None = None
    """Writes one value back as the option's text, the inverse of ``convert``/``item`` (default: as typed)."""


def _floats(text: str, flag: str) -> tuple[float, ...]:
    """Comma-separated non-negative numbers (``3,1``) as floats; a MemplanError naming ``flag`` otherwise."""
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise MemplanError(f"{flag}: expected comma-separated numbers such as 3,1, got {text!r}.") from None
    if not values or any(v < 0 for v in values) or not any(values):
        raise MemplanError(f"{flag}: give non-negative shares, not all zero, got {text!r}.")
    return values


def _o(flags: str | tuple[str, ...], kind: Any, default: Any, help: str, panel: str, **kw: Any) -> Opt:
    return Opt((flags,) if isinstance(flags, str) else flags, kind, default, help, panel, **kw)


OPTS: dict[str, Opt] = {
    "gpu": _o(("--gpu", "-g"), str, "h100-sxm-80gb", "GPU catalog name or alias (see 'memplan gpus').", HARDWARE,
              hardware="gpu"),
    "gpus": _o("--gpus", int, 1, "GPUs per node.", HARDWARE, field="gpus_per_node", hardware="gpus_per_node"),
    "nodes": _o("--nodes", int, 1, "Number of nodes.", HARDWARE, field="nodes", hardware="nodes"),
    "cpu_ram": _o("--cpu-ram", str, None, "CPU RAM per node, e.g. 1TiB (default 1024GiB).", HARDWARE,
                  hardware="cpu_ram_bytes", text=size_text),
    "nvme": _o("--nvme", str, None, "NVMe capacity per node for offload, e.g. 30TB (default 0).", HARDWARE,
               hardware="nvme_bytes", text=size_text),
    "job": _o(("--job", "-j"), Job, Job.FULL, "pretrain, full, lora, qlora, galore or infer.", JOB, field="job"),
    "engine": _o("--engine", Engine, None, "Engine that runs the job (default: the job's usual engine).", JOB,
                 field="engine", dim="engines", base="single"),
    "dtype": _o("--dtype", Dtype, None, "Weight/compute dtype: fp32, bf16, fp16, fp8 (default bf16; fp16 on a GPU "
                "without bf16).", JOB, field="dtype"),
    "quant": _o("--quant", str, None, "Weight quantization: int8, nf4, nf4-dq, fp4, gptq-4bit, awq-4bit, q4_k_m, ... "
                "(none = 16-bit).", JOB, field="quant", dim="quant", item=quant_name, base="single", text=quant_text),
    "quant_map": _o("--quant-map", str, None, "Per-layer weight formats, e.g. 0-39=int8,40-79=nf4 (none = 16-bit); "
                    "every layer once.", JOB),
    "bnb_integration": _o("--bnb-integration", str, None, "Who builds the bitsandbytes layers: transformers (default) "
                          "or lightning (Lightning Fabric, as litgpt: lm_head quantized too, fp16 quantization state).",
                          JOB, field="bnb_integration"),
    "bnb_version": _o("--bnb-version", str, None, "bitsandbytes release (e.g. 0.42.0), for what its 4-bit matmul keeps "
                      "for backward: up to 0.43.1 its input, past backward; from 0.43.2 nothing (default: kept, freed).",
                      JOB, field="bnb_version"),
    "optimizer": _o("--optimizer", OptimizerKind, OptimizerKind.ADAMW, "adamw, adamw-bf16, adamw-8bit, adafactor, sgd, "
                    "sgd-momentum, lion.", JOB, field="optimizer", dim="optimizer"),
    "master_weights": _o("--master-weights/--no-master-weights", bool, None, "fp32 master copy (default: on for 16-bit "
                         "training).", JOB, field="master_weights"),
    "grad_dtype": _o("--grad-dtype", Dtype, None, "Gradient dtype (default: the weights' dtype).", JOB, field="grad_dtype"),
    "batch": _o(("--batch", "-b"), int, 1, "Micro-batch size per GPU (inference: concurrent sequences).", JOB,
                field="micro_batch", dim="micro_batch", infer_dim="batch"),
    "global_batch": _o("--global-batch", int, None, "Sequences per optimizer step.", JOB, dim="global_batch"),
    "grad_accum": _o("--grad-accum", int, None, "Micro-batches per optimizer step per data-parallel replica (gradient "
                     "accumulation; a pipeline's m, which sets its micro-batches in flight; default 1).", JOB,
                     field="grad_accum"),
    "global_batch_tokens": _o("--global-batch-tokens", int, None, "Tokens per optimizer step the plans are compared at "
                              "(default: 4,194,304 pre-training, 131,072 fine-tuning); or --global-batch.", JOB,
                              dim="global_batch_tokens"),
    "seq_len": _o(("--seq-len", "-s"), int, 2048, "Training sequence length in tokens.", JOB, field="seq_len"),
    "accounting": _o("--accounting", Accounting, Accounting.DEEPSPEED, "paper (ZeRO Fig. 1 model states) or deepspeed "
                     "(what DeepSpeed allocates).", JOB, field="accounting"),
    "zero": _o("--zero", int, 0, "ZeRO stage 0-3.", PARALLEL, field="zero", dim="zero", base="none"),
    "offload_optimizer": _o("--offload-optimizer", Offload, Offload.NONE, "none, cpu or nvme.", PARALLEL,
                            field="offload_optimizer", dim="offload_optimizer", base="none"),
    "offload_params": _o("--offload-params", Offload, Offload.NONE, "none, cpu or nvme.", PARALLEL,
                         field="offload_params", dim="offload_params", base="none"),
    "tp": _o("--tp", int, 1, "Tensor-parallel degree.", PARALLEL, field="tp", dim="tp", base="none"),
    "pp": _o("--pp", int, 1, "Pipeline-parallel degree.", PARALLEL, field="pp", dim="pp", base="none"),
    "ep": _o("--ep", int, 1, "Expert-parallel degree (MoE; plan: Megatron or DeepSpeed engines).", PARALLEL, field="ep",
             dim="ep", base="none"),
    "cp": _o("--cp", int, 1, "Context-parallel degree: each sequence split over this many GPUs (engines megatron, "
             "fsdp2, deepspeed).", PARALLEL, field="cp", dim="cp", base="none"),
    "cp_comm": _o("--cp-comm", str, None, "Context-parallel exchange: ring, ulysses or allgather (Megatron's "
                  "--cp-comm-type p2p, a2a, allgather also accepted; default ring).", PARALLEL, field="cp_comm",
                  dim="cp_comm", base="none"),
    "sequence_parallel": _o("--sequence-parallel/--no-sequence-parallel", bool, False, "Megatron sequence parallelism.",
                            PARALLEL, field="sequence_parallel"),
    "optimizer_gpu_layers": _o("--optimizer-gpu-layers", int, None, "ZeRO-3 partial optimizer offload: keep the optimizer "
                               "states of the first N layers on the GPU (DeepSpeed offload_optimizer.ratio).", PARALLEL,
                               field="optimizer_gpu_layers"),
    "recompute": _o("--recompute", Recompute, Recompute.NONE, "Activation recomputation: none, selective (Megatron: "
                    "the attention core), op (torchtitan op-level SAC: keep every other matmul output), full.", MEMORY,
                    field="recompute", dim="recompute", base="none"),
    "offload_activations": _o("--offload-activations/--no-offload-activations", bool, None, "Saved activations to "
                              "pinned CPU memory as the engine runs it (pytorch/fsdp2 save_on_cpu, deepspeed "
                              "cpu_checkpointing, megatron --cpu-offloading); plan: tried where it runs.", MEMORY,
                              field="offload_activations", dim="offload_activations"),
    "recompute_layers": _o("--recompute-layers", int, None, "Checkpoint only this many layers.", MEMORY,
                           field="recompute_layers"),
    "per_layer_offload": _o("--per-layer-offload/--no-per-layer-offload", bool, True, "Choose per layer where weights "
                            "(inference) or optimizer states (training, ZeRO-3 partial offload) live: GPU or CPU.", MEMORY,
                            dim="per_layer_offload"),
    "per_layer_quant": _o("--per-layer-quant", bool, False, "Choose each layer's weight format among the --quant choices "
                          "(LQ-LoRA-style; inference, or lora/qlora with --objective max-quality).", MEMORY,
                          dim="per_layer_quant"),
    "flash_attention": _o("--flash-attention/--no-flash-attention", bool, True, "Flash/SDPA attention (no s² scores).",
                          MEMORY, field="flash_attention"),
    "attention": _o("--attention", str, None, "Attention kernel: flash, sdpa or eager (default: flash).", MEMORY,
                    field="attention"),
    "dropout": _o("--dropout/--no-dropout", bool, False, "Dropout on at every site the model has (masks are saved).",
                  MEMORY, field="dropout"),
    "loss_fp32": _o("--loss-fp32/--no-loss-fp32", bool, True, "Upcast logits to fp32 for the loss (Hugging Face does).",
                    MEMORY, field="loss_fp32"),
    "activation_accounting": _o("--activation-accounting", str, "autograd", "autograd (what PyTorch saves) or paper "
                                "(Korthikanti et al. 2022).", MEMORY, field="activation_accounting"),
    "cuda_context": _o("--cuda-context", str, None, "CUDA context size, e.g. 512MiB.", MEMORY, field="cuda_context_bytes",
                       convert=lambda t: size_or_none(t, "--cuda-context"), text=size_text),
    "allocator_reserve": _o("--allocator-reserve", float, None, "Allocator reserve, % of allocated bytes (default: the "
                            "GPU profile's, else the catalog's).", MEMORY, field="allocator_reserve_pct"),
    "safety_margin": _o("--safety-margin", float, 0.0, "Keep this % of each GPU's memory free, shown as the row "
                        "runtime/safety_margin (default 0: none).", MEMORY, field="safety_margin_pct"),
    "lora_rank": _o("--lora-rank", int, 16, "LoRA rank r.", FINETUNE, field="lora.rank"),
    "lora_dropout": _o("--lora-dropout", float, 0.0, "peft lora_dropout: each adapted module saves its dropout output "
                       "and mask when > 0.", FINETUNE, field="lora.dropout"),
    "lora_alpha": _o("--lora-alpha", float, 32.0, "LoRA alpha.", FINETUNE, field="lora.alpha"),
    "lora_targets": _o("--lora-targets", str, "q,k,v,o", "Comma list of q,k,v,o,gate,up,down, or all-linear.", FINETUNE,
                       field="lora.targets", convert=lora_targets),
    "lora_dtype": _o("--lora-dtype", Dtype, None, "Adapter dtype (default: fp32 for LoRA as peft does, bf16 for QLoRA).",
                     FINETUNE, field="lora.dtype"),
    "dora": _o("--dora/--no-dora", bool, False, "DoRA magnitude vectors.", FINETUNE, field="lora.dora"),
    "paged_optimizer": _o("--paged-optimizer/--no-paged-optimizer", bool, False, "bitsandbytes paged optimizer states "
                          "counted in CPU RAM.", FINETUNE, field="lora.paged_optimizer"),
    "galore_rank": _o("--galore-rank", int, 128, "GaLore/APOLLO projection rank.", FINETUNE, field="galore.rank"),
    "galore_8bit": _o("--galore-8bit/--no-galore-8bit", bool, False, "8-bit GaLore states.", FINETUNE,
                      field="galore.eight_bit"),
    "context": _o(("--context", "-c"), int, 4096, "Tokens per sequence held in the KV cache.", INFER,
                  field="infer.context", dim="context"),
    "kv_dtype": _o("--kv-dtype", Dtype, None, "KV-cache dtype: bf16, fp16, fp8, int8, int4.", INFER,
                   field="infer.kv_dtype", dim="kv_dtype"),
    "paged": _o("--paged/--no-paged", bool, False, "vLLM-style paged KV blocks.", INFER, field="infer.paged"),
    "block_size": _o("--block-size", int, 16, "Tokens per paged KV block.", INFER, field="infer.block_size"),
    "offload_layers": _o("--offload-layers", str, None, "Inference: layers whose weights live in CPU RAM and stream over "
                         "PCIe (accelerate device_map), e.g. 70-79.", INFER),
    "max_context": _o("--max-context", bool, False, "Report the largest context that fits (infer).", INFER),
    "max_batch": _o("--max-batch", bool, False, "Report the largest batch that fits.", INFER),
    "optimizer_impl": _o("--optimizer-impl", OptimizerImpl, None, "torch AdamW path (engines pytorch, fsdp2): foreach "
                         "(the CUDA default), for-loop or fused; sets the optimizer step's temporaries.", ENGINE,
                         field="optimizer_impl"),
    "kept_output": _o("--kept-output", str, None, "What the training loop keeps of the model output until after the "
                      "optimizer step: none (default), logits or logits_fp32.", ENGINE, field="kept_output"),
    "module_layout": _o("--module-layout", str, None, "Whose modules and training loop the job runs: hf (transformers + "
                        "peft, default) or litgpt (fused qkv, LoRAQKVLinear, logits held until the next forward).",
                        ENGINE, field="module_layout"),
    "previous_seq_len": _o("--previous-seq-len", int, None, "With --module-layout litgpt: tokens per sequence of the "
                           "micro-batch before the peak one, whose output the loop holds through the next forward "
                           "(default: --seq-len; 0: the longest comes first).", ENGINE, field="previous_seq_len"),
    "transformers_version": _o("--transformers-version", str, None, "transformers release the training job runs, "
                               "4.37-4.40, for the buffers and masks those releases hold (default: current).", ENGINE,
                               field="transformers_version"),
    "bucket_cap_mb": _o("--bucket-cap-mb", int, None, "pytorch (DDP) bucket_cap_mb (default 25).", ENGINE,
                        field="engine_config.bucket_cap_mb"),
    "gradient_as_bucket_view": _o("--gradient-as-bucket-view/--no-gradient-as-bucket-view", bool, None, "pytorch (DDP): "
                                  "gradients are views into the buckets (default off).", ENGINE,
                                  field="engine_config.gradient_as_bucket_view"),
    "reshard_after_forward": _o("--reshard-after-forward/--no-reshard-after-forward", bool, None, "fsdp2: free each "
                                "unit's gathered parameters after its forward (default on).", ENGINE,
                                field="engine_config.reshard_after_forward"),
    "fsdp_prefetch": _o("--fsdp-prefetch", int, None, "fsdp2: units gathered ahead of the current one (default 1).",
                        ENGINE, field="engine_config.fsdp_prefetch"),
    "sharding_strategy": _o("--sharding-strategy", str, None, "fsdp1 ShardingStrategy: FULL_SHARD (default), "
                            "SHARD_GRAD_OP or NO_SHARD.", ENGINE, field="engine_config.sharding_strategy"),
    "use_orig_params": _o("--use-orig-params/--no-use-orig-params", bool, None, "fsdp1: LoRA adapters share their "
                          "block's FlatParameter, whose whole gradient then exists (default on, as Lightning and "
                          "accelerate).", ENGINE, field="engine_config.use_orig_params"),
    "no_sync": _o("--fsdp-no-sync/--fsdp-sync-each-batch", bool, None, "fsdp1: keep unsharded gradients over the "
                  "accumulation micro-batches (FSDP no_sync, default on).", ENGINE, field="engine_config.no_sync"),
    "limit_all_gathers": _o("--limit-all-gathers/--no-limit-all-gathers", bool, None, "fsdp1: at most two "
                            "all-gathers in flight (default on).", ENGINE, field="engine_config.limit_all_gathers"),
    "reduce_bucket_size": _o("--reduce-bucket-size", int, None, "deepspeed reduce_bucket_size, elements (default 5e8).",
                             ENGINE, field="engine_config.reduce_bucket_size"),
    "allgather_bucket_size": _o("--allgather-bucket-size", int, None, "deepspeed allgather_bucket_size, elements "
                                "(default 5e8).", ENGINE, field="engine_config.allgather_bucket_size"),
    "overlap_comm": _o("--overlap-comm/--no-overlap-comm", bool, None, "deepspeed overlap_comm (default: on for ZeRO-3, "
                       "else off).", ENGINE, field="engine_config.overlap_comm"),
    "contiguous_gradients": _o("--contiguous-gradients/--no-contiguous-gradients", bool, None, "deepspeed "
                               "contiguous_gradients (default on).", ENGINE, field="engine_config.contiguous_gradients"),
    "stage3_max_live_parameters": _o("--stage3-max-live-parameters", int, None, "deepspeed ZeRO-3 gathered parameters "
                                     "kept at once, elements (default 1e9).", ENGINE,
                                     field="engine_config.stage3_max_live_parameters"),
    "stage3_prefetch_bucket_size": _o("--stage3-prefetch-bucket-size", int, None, "deepspeed ZeRO-3 parameters fetched "
                                      "ahead, elements (default 5e7).", ENGINE,
                                      field="engine_config.stage3_prefetch_bucket_size"),
    "stage3_param_persistence_threshold": _o("--stage3-param-persistence-threshold", int, None, "deepspeed ZeRO-3: "
                                             "smaller parameters stay gathered, elements (default 1e5).", ENGINE,
                                             field="engine_config.stage3_param_persistence_threshold"),
    "use_distributed_optimizer": _o("--use-distributed-optimizer/--no-use-distributed-optimizer", bool, None,
                                    "megatron: shard fp32 main params and Adam states over data parallelism.", ENGINE,
                                    field="engine_config.use_distributed_optimizer"),
    "pp_return_outputs": _o("--pp-return-outputs/--no-pp-return-outputs", bool, None, "fsdp2 with --pp: torch "
                            "pipelining's schedule.step(return_outputs=...): the last stage keeps and returns every "
                            "micro-batch's logits (default on, torch's; torchtitan passes off).", ENGINE,
                            field="engine_config.pp_return_outputs"),
    "hsdp_shard_size": _o("--hsdp-shard-size", int, None, "fsdp2 hybrid sharding (HSDP): shard over this many "
                          "data-parallel ranks, replicate across the groups (default: shard over all).", ENGINE,
                          field="engine_config.hsdp_shard_size"),
    "pp_schedule": _o("--pp-schedule", str, None, "fsdp2 with pp > 1: torch.distributed.pipelining schedule, as "
                      "torchtitan names it: 1F1B, Interleaved1F1B, GPipe, LoopedBFS, InterleavedZeroBubble, "
                      "ZBVZeroBubble or DualPipeV (default 1F1B, Interleaved1F1B with --virtual-stages > 1; plan: "
                      "a comma list to choose among).", ENGINE, field="engine_config.pp_schedule",
                      dim="pp_schedules", item=pp_schedule_name, base="none"),
    "mics_shard_size": _o("--mics-shard-size", int, None, "deepspeed MiCS (ZeRO-3): partition all states within groups "
                          "of this many ranks (default: off).", ENGINE, field="engine_config.mics_shard_size"),
    "zero_hpz_partition_size": _o("--zero-hpz-partition-size", int, None, "deepspeed ZeRO++ hpZ (ZeRO-3): secondary "
                                  "16-bit parameter partition within groups of this many ranks (default 1: off).",
                                  ENGINE, field="engine_config.zero_hpz_partition_size"),
    "cpu_offloading_num_layers": _o("--cpu-offloading-num-layers", int, None, "megatron --cpu-offloading: layers whose "
                                    "activations go to the CPU (default: all but the last).", ENGINE,
                                    field="engine_config.cpu_offloading_num_layers"),
    "recompute_modules": _o("--recompute-modules", str, None, "megatron --recompute-modules with --recompute selective, "
                            "comma-separated: core_attn, layernorm, mla_up_proj, moe_act (default core_attn).", ENGINE,
                            field="engine_config.recompute_modules", convert=recompute_modules),
    "use_precision_aware_optimizer": _o("--use-precision-aware-optimizer/--no-use-precision-aware-optimizer", bool, None,
                                        "megatron: TransformerEngine FusedAdam with the dtypes below (default off).",
                                        ENGINE, field="engine_config.use_precision_aware_optimizer"),
    "exp_avg_dtype": _o("--exp-avg-dtype", str, None, "megatron precision-aware optimizer: Adam m dtype, fp32, bf16 or "
                        "fp16 (default fp32).", ENGINE, field="engine_config.exp_avg_dtype"),
    "exp_avg_sq_dtype": _o("--exp-avg-sq-dtype", str, None, "megatron precision-aware optimizer: Adam v dtype, fp32, "
                           "bf16 or fp16 (default fp32).", ENGINE, field="engine_config.exp_avg_sq_dtype"),
    "store_param_remainders": _o("--store-param-remainders/--no-store-param-remainders", bool, None, "megatron "
                                 "precision-aware optimizer: fp32 main params as 16-bit remainders of bf16 params "
                                 "(default on).", ENGINE, field="engine_config.store_param_remainders"),
    "fp8_recipe": _o("--fp8-recipe", str, None, "megatron fp8 training: delayed, tensorwise, mxfp8 or blockwise "
                     "(default delayed); sizes TransformerEngine's fp8 saved inputs.", ENGINE,
                     field="engine_config.fp8_recipe"),
    "activation_func_fp8_input_store": _o("--activation-func-fp8-input-store/--no-activation-func-fp8-input-store",
                                          bool, None, "megatron: the SwiGLU keeps its input in fp8 for backward "
                                          "(default off).", ENGINE, field="engine_config.activation_func_fp8_input_store"),
    "microbatch_group_size_per_vp_stage": _o("--microbatch-group-size-per-virtual-pipeline-stage", int, None,
                                             "megatron with --pp and --virtual-stages: micro-batches each model chunk "
                                             "runs in a row, pp to the micro-batches per step (default pp).", ENGINE,
                                             field="engine_config.microbatch_group_size_per_vp_stage"),
    "overlap_moe_expert_parallel_comm": _o("--overlap-moe-expert-parallel-comm/--no-overlap-moe-expert-parallel-comm",
                                           bool, None, "megatron MoE with --ep and --virtual-stages: overlap the "
                                           "expert all-to-alls of two micro-batches (one more warm-up forward; "
                                           "default off).", ENGINE,
                                           field="engine_config.overlap_moe_expert_parallel_comm"),
    "nccl_buffsize": _o("--nccl-buffsize", str, None, "NCCL_BUFFSIZE the training job runs with, e.g. 4MiB (default: "
                        "NCCL's 4 MiB); sizes runtime/nccl_communicators.", ENGINE, field="engine_config.nccl_buffsize",
                        convert=lambda t: size_or_none(t, "--nccl-buffsize"), text=size_text),
    "nccl_max_nchannels": _o("--nccl-max-nchannels", int, None, "NCCL_MAX_NCHANNELS (default: 32 per communicator, "
                             "as on 8 x H100).", ENGINE, field="engine_config.nccl_max_nchannels"),
    "nccl_nvls_enable": _o("--nccl-nvls-enable", int, None, "NCCL_NVLS_ENABLE: 0, 1 or 2 (NCCL's default: NVLink "
                           "SHARP buffers where the GPUs sit on an NVSwitch).", ENGINE,
                           field="engine_config.nccl_nvls_enable"),
    "nccl_nvls_chunksize": _o("--nccl-nvls-chunksize", str, None, "NCCL_NVLS_CHUNKSIZE, e.g. 128KiB (NCCL's default; "
                              "NCCL < 2.21: 512KiB).", ENGINE, field="engine_config.nccl_nvls_chunksize",
                              convert=lambda t: size_or_none(t, "--nccl-nvls-chunksize"), text=size_text),
    "shard_group": _o("--shard-group", str, None, "Plan: state sharding to choose among, comma-separated: full (all "
                      "data-parallel ranks), node (fsdp2 HSDP / deepspeed MiCS within a node), hpz (deepspeed ZeRO++) "
                      "(default: each the engine runs, on several nodes).", PARALLEL, dim="shard"),
    "gpu_memory_utilization": _o("--gpu-memory-utilization", float, None, "vllm: share of GPU memory the instance may "
                                 "use (default 0.9).", SERVE, field="serve.gpu_memory_utilization"),
    "max_num_batched_tokens": _o("--max-num-batched-tokens", int, None, "vllm: tokens per scheduler step (default: "
                                 "vLLM's for the GPU).", SERVE, field="serve.max_num_batched_tokens"),
    "max_num_seqs": _o("--max-num-seqs", int, None, "vllm: sequences per step (default: vLLM's for the GPU).", SERVE,
                       field="serve.max_num_seqs"),
    "kv_block_size": _o("--kv-block-size", int, None, "vllm block_size: tokens per KV-cache block (default 16).", SERVE,
                        field="serve.block_size"),
    "enforce_eager": _o("--enforce-eager/--no-enforce-eager", bool, None, "vllm: no CUDA graphs (no graph memory).",
                        SERVE, field="serve.enforce_eager"),
    "max_model_len": _o("--max-model-len", int, None, "vllm: longest sequence served (default: the model's "
                        "max_position_embeddings).", SERVE, field="serve.max_model_len"),
    "mem_fraction_static": _o("--mem-fraction-static", float, None, "sglang: share of free memory for weights and "
                              "the KV pool (default: SGLang's for the GPU).", SERVE, field="serve.mem_fraction_static"),
    "chunked_prefill_size": _o("--chunked-prefill-size", int, None, "sglang: tokens per prefill chunk (default: "
                               "SGLang's for the GPU).", SERVE, field="serve.chunked_prefill_size"),
    "max_running_requests": _o("--max-running-requests", int, None, "sglang: requests served at once (default: "
                               "SGLang's cap from the pool).", SERVE, field="serve.max_running_requests"),
    "page_size": _o("--page-size", int, None, "sglang: tokens per KV page (default 1).", SERVE,
                    field="serve.page_size"),
    "cuda_graph_max_bs": _o("--cuda-graph-max-bs", int, None, "sglang: largest CUDA-graph batch (default: SGLang's "
                            "for the GPU and tp).", SERVE, field="serve.cuda_graph_max_bs"),
    "n_gpu_layers": _o(("--n-gpu-layers", "-ngl"), int, None, "llamacpp: repeating layers on the GPU (default: all).",
                       SERVE, field="serve.n_gpu_layers"),
    "n_ctx": _o("--n-ctx", int, None, "llamacpp -c: KV-cache context (default: --context).", SERVE, field="serve.n_ctx"),
    "n_batch": _o("--n-batch", int, None, "llamacpp -b: logical batch (default 2048).", SERVE, field="serve.n_batch"),
    "n_ubatch": _o("--n-ubatch", int, None, "llamacpp -ub: physical batch, sizes the compute buffers (default 512).",
                   SERVE, field="serve.n_ubatch"),
    "cache_type_k": _o("--cache-type-k", str, None, "llamacpp -ctk: f16 (default), q8_0, q4_0, ...", SERVE,
                       field="serve.cache_type_k"),
    "cache_type_v": _o("--cache-type-v", str, None, "llamacpp -ctv: f16 (default), q8_0, q4_0 (needs flash attention).",
                       SERVE, field="serve.cache_type_v"),
    "tensor_split": _o(("--tensor-split", "-ts"), str, None, "llamacpp -ts: layer shares per GPU of the --pp layer "
                       "split (-sm layer), e.g. 3,1 (default: equal).", SERVE, field="serve.tensor_split",
                       convert=lambda t: _floats(t, "--tensor-split")),
    "flash_attn": _o("--flash-attn/--no-flash-attn", bool, None, "llamacpp -fa (default on).", SERVE,
                     field="serve.flash_attn"),
    "ggml_sched_max_copies": _o("--ggml-sched-max-copies", int, None, "llamacpp build option GGML_SCHED_MAX_COPIES: "
                                "input copies of pipeline parallelism over a full --pp layer split (default 4; 1: off).",
                                SERVE, field="serve.ggml_sched_max_copies"),
    "op_offload": _o("--op-offload/--no-op-offload", bool, None, "llamacpp --no-op-offload: keep the CPU layers' ops "
                     "of large batches on the CPU under -ngl partial offload (default: offloaded to the first GPU).",
                     SERVE, field="serve.op_offload"),
    "llama_set_rows": _o("--llama-set-rows/--no-llama-set-rows", bool, None, "llamacpp LLAMA_SET_ROWS: KV writes by "
                         "ggml_set_rows with index inputs in the compute buffers (default on, llama.cpp since Aug 2025; "
                         "off: older builds or LLAMA_SET_ROWS=0).", SERVE, field="serve.llama_set_rows"),
    "swa_full": _o("--swa-full/--no-swa-full", bool, None, "llamacpp --swa-full: full-size SWA cache of Gemma-2/3 "
                   "(also llama.cpp builds before May 2025).", SERVE, field="serve.swa_full"),
    "cache_implementation": _o("--cache-implementation", str, None, "transformers generate: dynamic (default), "
                               "static, or legacy (the tuple cache of transformers < 4.36).", SERVE,
                               field="serve.cache_implementation"),
    "prompt_tokens": _o("--prompt-tokens", int, None, "Prompt length for the time to first token (default: --context).",
                        SERVE, field="serve.prompt_tokens"),
    "hbm_efficiency": _o("--hbm-efficiency", float, None, "Share of peak HBM bandwidth decode reaches (default: per GPU "
                         "generation).", SERVE, field="serve.hbm_efficiency"),
    "compute_efficiency": _o("--compute-efficiency", float, None, "Share of peak FLOP/s prefill reaches (default: per "
                             "GPU generation).", SERVE, field="serve.compute_efficiency"),
    "mfu": _o("--mfu", float, None, "Fraction of the dense peak the layers' GEMMs reach (default: from the GPU "
              "generation and the GEMM shape).", PERF, field="perf.mfu"),
    "cluster": _o("--cluster", str, None, "Fabric preset: dgx-v100, dgx-a100, dgx-h100, h800, dgx-b200 or pcie-ethernet "
                  "(default: from the GPU).", PERF, field="perf.cluster"),
    "intra_node_gbps": _o("--intra-node-gbps", float, None, "GPU-to-GPU bus bandwidth inside a node, GB/s per GPU "
                          "(default: the fabric's).", PERF, field="perf.intra_node_gbps"),
    "inter_node_gbps": _o("--inter-node-gbps", float, None, "Bus bandwidth across nodes, GB/s per GPU (default: the "
                          "fabric's).", PERF, field="perf.inter_node_gbps"),
    "intra_node_latency_us": _o("--intra-node-latency-us", float, None, "Collective latency inside a node, µs "
                                "(default: the fabric's).", PERF, field="perf.intra_node_latency_us"),
    "inter_node_latency_us": _o("--inter-node-latency-us", float, None, "Collective latency across nodes, µs "
                                "(default: the fabric's).", PERF, field="perf.inter_node_latency_us"),
    "comm_overlap": _o("--comm-overlap", float, None, "Share (0-1) of data-parallel/ZeRO and expert traffic hidden "
                       "behind compute (default: the engine's).", PERF, field="perf.comm_overlap"),
    "virtual_stages": _o("--virtual-stages", int, None, "Interleaved 1F1B: model chunks per pipeline stage (Megatron "
                         "virtual pipeline; default 1).", PERF, field="perf.virtual_stages"),
    "train_tokens": _o("--train-tokens", int, None, "Tokens to train: each plan reports the days and GPU-hours they "
                       "take.", PERF),
    "usd_per_hour": _o("--usd-per-hour", float, None, "Price of one GPU per hour, USD, for the cost columns "
                       "(default: the GPU catalog's price_per_hour_usd).", COST),
    "speed": _o("--speed", bool, False, "Add the step time, tokens/s and the price per step and per 1M trained or "
                "served tokens to every row (a scalar step-time model per row: slower).", COST),
    "pivot": _o("--pivot", bool, False, "The fit matrix (models × GPUs) compactly, its GPU columns wrapped to the "
                "screen (80 columns in a pipe); with --format csv, as one CSV.", OUTPUT),
    "fmt": _o(("--format", "-f"), str, "table", "table, json or csv.", OUTPUT),
    "plot": _o("--plot", Path, None, "Draw the breakdown per tier against capacity (.png, .svg or .pdf; needs "
               "memplan[plot]).", OUTPUT),
}

GROUPS: dict[str, tuple[str, ...]] = {
    "hardware": ("gpu", "gpus", "nodes", "cpu_ram", "nvme"),
    "job": ("job", "engine", "dtype", "quant", "quant_map", "optimizer", "master_weights", "grad_dtype", "batch",
            "global_batch", "global_batch_tokens", "grad_accum", "seq_len", "accounting"),
    "quant_integration": ("bnb_integration", "bnb_version"),
    "parallelism": ("zero", "offload_optimizer", "offload_params", "tp", "pp", "ep", "cp", "cp_comm", "sequence_parallel",
                    "optimizer_gpu_layers", "shard_group"),
    "memory": ("recompute", "recompute_layers", "offload_activations", "per_layer_offload", "per_layer_quant",
               "flash_attention", "attention",
               "dropout", "loss_fp32", "activation_accounting", "cuda_context", "allocator_reserve", "safety_margin"),
    "finetune": ("lora_rank", "lora_dropout", "lora_alpha", "lora_targets", "lora_dtype", "dora", "paged_optimizer",
                 "galore_rank", "galore_8bit"),
    "inference": ("context", "kv_dtype", "paged", "block_size", "offload_layers", "max_context", "max_batch"),
    "engine_knobs": ("optimizer_impl", "kept_output", "module_layout", "previous_seq_len", "transformers_version",
                     "bucket_cap_mb",
                     "gradient_as_bucket_view",
                     "reshard_after_forward",
                     "fsdp_prefetch", "pp_return_outputs", "sharding_strategy", "use_orig_params", "no_sync", "limit_all_gathers",
                     "reduce_bucket_size", "allgather_bucket_size", "overlap_comm",
                     "contiguous_gradients", "stage3_max_live_parameters", "stage3_prefetch_bucket_size",
                     "stage3_param_persistence_threshold", "use_distributed_optimizer", "hsdp_shard_size",
                     "pp_schedule", "mics_shard_size", "zero_hpz_partition_size", "cpu_offloading_num_layers",
                     "recompute_modules",
                     "use_precision_aware_optimizer", "exp_avg_dtype", "exp_avg_sq_dtype", "store_param_remainders",
                     "fp8_recipe", "activation_func_fp8_input_store", "microbatch_group_size_per_vp_stage",
                     "overlap_moe_expert_parallel_comm",
                     "nccl_buffsize", "nccl_max_nchannels", "nccl_nvls_enable", "nccl_nvls_chunksize"),
    "serving": ("gpu_memory_utilization", "max_num_batched_tokens", "max_num_seqs", "kv_block_size", "enforce_eager",
                "max_model_len", "mem_fraction_static", "chunked_prefill_size", "max_running_requests", "page_size",
                "cuda_graph_max_bs", "n_gpu_layers", "n_ctx", "n_batch", "n_ubatch", "cache_type_k",
                "cache_type_v", "tensor_split", "flash_attn", "ggml_sched_max_copies", "op_offload",
                "llama_set_rows", "swa_full", "cache_implementation"),
    "serving_time": ("prompt_tokens", "hbm_efficiency", "compute_efficiency"),
    "perf": ("mfu", "cluster", "intra_node_gbps", "inter_node_gbps", "intra_node_latency_us", "inter_node_latency_us",
             "comm_overlap", "virtual_stages", "train_tokens"),
    "output": ("fmt", "plot"),
    "sweep_report": ("usd_per_hour", "speed", "pivot"),
}

PLAN_DECIDES: dict[str, str] = {
    "quant_map": "plan chooses each layer's weight format itself: give the formats with --quant and add "
                 "--per-layer-quant",
    "sequence_parallel": "plan turns Megatron sequence parallelism on wherever tp > 1, where it never costs time",
    "optimizer_gpu_layers": "plan chooses per layer which optimizer states stay on the GPU (--per-layer-offload; "
                            "a recipe can fix the split with search.per_layer_offload: false)",
    "recompute_layers": "plan chooses the recompute mode of each layer among the --recompute choices",
    "offload_layers": "plan chooses where each layer's weights live (--per-layer-offload)",
    "max_context": "use --objective max-context",
    "max_batch": "use --objective max-batch (or max-concurrency for serving)",
    "grad_accum": "plan derives each layout's micro-batches per step from --global-batch (sequences per step)",
}
"""Options of ``memplan estimate`` that ``memplan plan`` does not take because the plan decides what they set:
given to plan, each is refused with this sentence (exit 2), never dropped."""
