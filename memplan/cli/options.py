"""Options shared by commands that describe a job (estimate, plan, measure), as Annotated aliases."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from memplan.errors import MemplanError
from memplan.units import parse_size

J = "Job"
P = "Parallelism and ZeRO"
M = "Memory-saving techniques"
F = "Fine-tuning"
I = "Inference"  # noqa: E741
H = "Hardware"
O = "Output"  # noqa: E741

Model = Annotated[str, typer.Argument(help="Catalog name, path to config.json (or its directory), hf:org/name, or params:7B.")]
Gpu = Annotated[str, typer.Option("--gpu", "-g", help="GPU catalog name (see 'memplan gpus').", rich_help_panel=H)]
Gpus = Annotated[int, typer.Option("--gpus", help="GPUs per node.", rich_help_panel=H)]
Nodes = Annotated[int, typer.Option("--nodes", help="Number of nodes.", rich_help_panel=H)]
CpuRam = Annotated[str | None, typer.Option("--cpu-ram", help="CPU RAM per node, e.g. 1TiB (default 1024GiB).", rich_help_panel=H)]
Nvme = Annotated[str | None, typer.Option("--nvme", help="NVMe capacity per node for offload, e.g. 30TB (default 0).", rich_help_panel=H)]
Job = Annotated[str, typer.Option("--job", "-j", help="pretrain, full, lora, qlora, galore or infer.", rich_help_panel=J)]
Dtype = Annotated[str | None, typer.Option("--dtype", help="Weight/compute dtype: fp32, bf16, fp16, fp8 (default bf16; "
                                           "fp16 on a GPU without bf16).", rich_help_panel=J)]
Quant = Annotated[str | None, typer.Option("--quant", help="Weight quantization: int8, nf4, nf4-dq, fp4, gptq-4bit, awq-4bit, q4_k_m, ...", rich_help_panel=J)]
Optimizer = Annotated[str, typer.Option("--optimizer", help="adamw, adamw-bf16, adamw-8bit, adafactor, sgd, sgd-momentum, lion.", rich_help_panel=J)]
Master = Annotated[bool | None, typer.Option("--master-weights/--no-master-weights", help="fp32 master copy (default: on for 16-bit training).", rich_help_panel=J)]
GradDtype = Annotated[str | None, typer.Option("--grad-dtype", help="Gradient dtype (default: the weights' dtype).", rich_help_panel=J)]
Batch = Annotated[int, typer.Option("--batch", "-b", help="Micro-batch size per GPU (inference: concurrent sequences).", rich_help_panel=J)]
SeqLen = Annotated[int, typer.Option("--seq-len", "-s", help="Training sequence length in tokens.", rich_help_panel=J)]
Accounting = Annotated[str, typer.Option("--accounting", help="paper (ZeRO Fig. 1 model states) or deepspeed (what DeepSpeed allocates).", rich_help_panel=J)]
Zero = Annotated[int, typer.Option("--zero", help="ZeRO stage 0-3.", rich_help_panel=P)]
OffOpt = Annotated[str, typer.Option("--offload-optimizer", help="none, cpu or nvme.", rich_help_panel=P)]
OffParams = Annotated[str, typer.Option("--offload-params", help="none, cpu or nvme.", rich_help_panel=P)]
Tp = Annotated[int, typer.Option("--tp", help="Tensor-parallel degree.", rich_help_panel=P)]
Pp = Annotated[int, typer.Option("--pp", help="Pipeline-parallel degree.", rich_help_panel=P)]
Ep = Annotated[int, typer.Option("--ep", help="Expert-parallel degree (MoE).", rich_help_panel=P)]
Sp = Annotated[bool, typer.Option("--sequence-parallel/--no-sequence-parallel", help="Megatron sequence parallelism.", rich_help_panel=P)]
Recompute = Annotated[str, typer.Option("--recompute", help="Activation recomputation: none, selective, full.", rich_help_panel=M)]
OptGpuLayers = Annotated[int | None, typer.Option("--optimizer-gpu-layers", help="ZeRO-3 partial optimizer offload: keep the "
                                                 "optimizer states of the first N layers on the GPU (DeepSpeed offload_optimizer.ratio).",
                                                 rich_help_panel=P)]
QuantMap = Annotated[str | None, typer.Option("--quant-map", help="Per-layer weight formats, e.g. 0-39=int8,40-79=nf4 "
                                              "(none = 16-bit); every layer once.", rich_help_panel=J)]
OffloadLayers = Annotated[str | None, typer.Option("--offload-layers", help="Inference: layers whose weights live in CPU RAM "
                                                   "and stream over PCIe (accelerate device_map), e.g. 70-79.", rich_help_panel=I)]
RecomputeLayers = Annotated[int | None, typer.Option("--recompute-layers", help="Checkpoint only this many layers.", rich_help_panel=M)]
Flash = Annotated[bool, typer.Option("--flash-attention/--no-flash-attention", help="Flash/SDPA attention (no s² scores).", rich_help_panel=M)]
Attention = Annotated[str | None, typer.Option("--attention", help="Attention kernel: flash, sdpa or eager (default: flash).", rich_help_panel=M)]
Dropout = Annotated[bool, typer.Option("--dropout/--no-dropout", help="Dropout on at every site the model has (masks are saved).", rich_help_panel=M)]
LossFp32 = Annotated[bool, typer.Option("--loss-fp32/--no-loss-fp32", help="Upcast logits to fp32 for the loss (Hugging Face does).", rich_help_panel=M)]
ActAccounting = Annotated[str, typer.Option("--activation-accounting", help="autograd (what PyTorch saves) or paper (Korthikanti et al. 2022).", rich_help_panel=M)]
PagedOptimizer = Annotated[bool, typer.Option("--paged-optimizer/--no-paged-optimizer", help="bitsandbytes paged optimizer states counted in CPU RAM.", rich_help_panel=F)]
LoraDtype = Annotated[str | None, typer.Option("--lora-dtype", help="Adapter dtype (default: fp32 for LoRA as peft does, bf16 for QLoRA).", rich_help_panel=F)]
CudaContext = Annotated[str | None, typer.Option("--cuda-context", help="CUDA context size, e.g. 512MiB.", rich_help_panel=M)]
AllocReserve = Annotated[float | None, typer.Option("--allocator-reserve", help="Allocator reserve, % of allocated bytes.", rich_help_panel=M)]
SafetyMargin = Annotated[float, typer.Option("--safety-margin", help="Keep this % of each GPU's memory free, shown as the row runtime/safety_margin (default 0: none).", rich_help_panel=M)]
LoraRank = Annotated[int, typer.Option("--lora-rank", help="LoRA rank r.", rich_help_panel=F)]
LoraAlpha = Annotated[float, typer.Option("--lora-alpha", help="LoRA alpha.", rich_help_panel=F)]
LoraTargets = Annotated[str, typer.Option("--lora-targets", help="Comma list of q,k,v,o,gate,up,down, or all-linear.", rich_help_panel=F)]
Dora = Annotated[bool, typer.Option("--dora/--no-dora", help="DoRA magnitude vectors.", rich_help_panel=F)]
GaloreRank = Annotated[int, typer.Option("--galore-rank", help="GaLore/APOLLO projection rank.", rich_help_panel=F)]
Galore8 = Annotated[bool, typer.Option("--galore-8bit/--no-galore-8bit", help="8-bit GaLore states.", rich_help_panel=F)]
Context = Annotated[int, typer.Option("--context", "-c", help="Tokens per sequence held in the KV cache.", rich_help_panel=I)]
KvDtype = Annotated[str | None, typer.Option("--kv-dtype", help="KV-cache dtype: bf16, fp16, fp8, int8, int4.", rich_help_panel=I)]
Paged = Annotated[bool, typer.Option("--paged/--no-paged", help="vLLM-style paged KV blocks.", rich_help_panel=I)]
BlockSize = Annotated[int, typer.Option("--block-size", help="Tokens per paged KV block.", rich_help_panel=I)]
Format = Annotated[str, typer.Option("--format", "-f", help="table, json or csv.", rich_help_panel=O)]


def size_or_none(text: str | None, field: str) -> int | None:
    return None if text is None else parse_size(text, field=field)


def lora_targets(text: str) -> tuple[str, ...]:
    items = tuple(t.strip() for t in text.split(",") if t.strip())
    if not items:
        raise MemplanError("--lora-targets: give at least one of q,k,v,o,gate,up,down or all-linear.")
    return items


def check_format(fmt: str, allowed: tuple[str, ...] = ("table", "json", "csv")) -> str:
    if fmt not in allowed:
        raise MemplanError(f"--format must be one of {', '.join(allowed)}, got {fmt!r}.")
    return fmt


def job_overrides(**kw: Any) -> dict[str, Any]:
    """JobConfig fields from the shared options, nested sub-configs filled in."""
    return {
        "job": kw["job"], "dtype": kw["dtype"], "quant": kw["quant"], "optimizer": kw["optimizer"],
        "master_weights": kw["master_weights"], "grad_dtype": kw["grad_dtype"], "zero": kw["zero"],
        "offload_optimizer": kw["offload_optimizer"], "offload_params": kw["offload_params"],
        "accounting": kw["accounting"], "gpus_per_node": kw["gpus"], "nodes": kw["nodes"],
        "tp": kw["tp"], "pp": kw["pp"], "ep": kw["ep"], "micro_batch": kw["batch"], "seq_len": kw["seq_len"],
        "recompute": kw["recompute"], "recompute_layers": kw["recompute_layers"],
        "flash_attention": kw["flash_attention"], "sequence_parallel": kw["sequence_parallel"],
        "attention": kw.get("attention"), "dropout": kw.get("dropout", False), "loss_fp32": kw.get("loss_fp32", True),
        "activation_accounting": kw.get("activation_accounting", "autograd"),
        "cuda_context_bytes": size_or_none(kw["cuda_context"], "--cuda-context"),
        "allocator_reserve_pct": kw["allocator_reserve"], "safety_margin_pct": kw.get("safety_margin", 0.0),
        "lora": {"rank": kw["lora_rank"], "alpha": kw["lora_alpha"], "targets": lora_targets(kw["lora_targets"]),
                 "dora": kw["dora"], "paged_optimizer": kw.get("paged_optimizer", False),
                 **({"dtype": kw["lora_dtype"]} if kw.get("lora_dtype") else {})},
        "galore": {"rank": kw["galore_rank"], "eight_bit": kw["galore_8bit"]},
        "infer": {"context": kw["context"], "kv_dtype": kw["kv_dtype"], "paged": kw["paged"],
                  "block_size": kw["block_size"]},
    }


def layer_set(text: str, num_layers: int, flag: str) -> list[int]:
    """Layer indices from '0-39,70,72-79' (each within the model's layers): ``memplan.preflight.layer_ranges``."""
    from memplan.preflight import layer_ranges

    return layer_ranges(text, num_layers, flag)


def quant_map(text: str, num_layers: int) -> tuple[str | None, ...]:
    """A per-layer format map from '0-39=int8,40-79=nf4' (none/bf16/fp16 = 16-bit); every layer exactly once."""
    fmts: dict[int, str | None] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        layers, sep, fmt = part.partition("=")
        if not sep or not fmt.strip():
            raise MemplanError(f"--quant-map: expected LAYERS=FORMAT such as 0-39=int8, got {part!r}.")
        name = fmt.strip()
        for i in layer_set(layers, num_layers, "--quant-map"):
            if i in fmts:
                raise MemplanError(f"--quant-map: layer {i} is given twice.")
            fmts[i] = None if name.lower() in ("none", "bf16", "fp16", "16bit") else name
    if len(fmts) != num_layers:
        raise MemplanError(f"--quant-map covers {len(fmts)} of the model's {num_layers} layers; give every layer a format.")
    return tuple(fmts[i] for i in range(num_layers))


def layer_overrides(model: Any, overrides: dict[str, Any], *, quant_map_text: str | None,
                    offload_text: str | None, optimizer_gpu_layers: int | None) -> dict[str, Any]:
    """Add the per-layer fields (``--quant-map``, ``--offload-layers``, ``--optimizer-gpu-layers``) to ``overrides``."""
    out = dict(overrides)
    if optimizer_gpu_layers is not None:
        out["optimizer_gpu_layers"] = optimizer_gpu_layers
    if quant_map_text is None and offload_text is None:
        return out
    layers = model.num_hidden_layers or 0
    if not layers:
        raise MemplanError(f"per-layer options need the model's layers; {model.name} knows only a parameter count.")
    if quant_map_text is not None:
        out["quant_map"] = quant_map(quant_map_text, layers)
    if offload_text is not None:
        off = set(layer_set(offload_text, layers, "--offload-layers"))
        out["infer"] = {**out["infer"], "offload_map": tuple(i in off for i in range(layers))}
    return out


def host_from(cpu_ram: str | None, nvme: str | None) -> Any:
    from memplan.catalog.schema import HostSpec

    data: dict[str, int] = {}
    ram = size_or_none(cpu_ram, "--cpu-ram")
    if ram is not None:
        if ram <= 0:
            raise MemplanError("--cpu-ram must be positive.")
        data["cpu_ram_bytes"] = ram
    nv = size_or_none(nvme, "--nvme")
    if nv is not None:
        data["nvme_bytes"] = nv
    return HostSpec(**data)
