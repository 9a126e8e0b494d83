"""``memplan measure`` and ``memplan calibrate``: predictions checked against a real model on this machine.

Registered on the main app by importing this module (``memplan.cli.app`` does it last). torch,
transformers and peft are imported only inside the commands, through ``memplan.measure``.
Exit codes: 0 every bounded component within its bound; 1 one or more outside; 2 bad input or the
``measure`` extra missing; 3 an internal error.
"""

from __future__ import annotations

import importlib.util
from typing import Annotated, Any

import typer

from memplan.cli import options as o
from memplan.cli.app import app, console, handled
from memplan.errors import MemplanError

X = "Measurement"
MISSING_EXTRA = "measure needs torch and transformers (and peft for LoRA); install memplan[measure]."
Device = Annotated[str, typer.Option("--device", help="cpu or cuda.", rich_help_panel=X)]
Layers = Annotated[int | None, typer.Option("--layers", help="Build and measure only the first N layers (the output says so).",
                                            rich_help_panel=X)]
DecodeSteps = Annotated[int, typer.Option("--decode-steps", help="Inference: one-token steps after the prefill.",
                                          rich_help_panel=X)]
Attention = Annotated[str | None, typer.Option(
    "--attention", help="sdpa, eager or flash (default: sdpa, or eager with --no-flash-attention).", rich_help_panel=X)]
Dropout = Annotated[bool, typer.Option("--dropout/--no-dropout", help="GPT-2/OPT dropout at p=0.1 in training.",
                                       rich_help_panel=X)]
MeasureFormat = Annotated[str, typer.Option("--format", "-f", help="table or json.", rich_help_panel=o.O)]


def require_extra() -> None:
    """Exit 2 with one sentence when torch or transformers is not importable."""
    from memplan.cli.app import fail

    if any(importlib.util.find_spec(name) is None for name in ("torch", "transformers")):
        raise fail(MISSING_EXTRA)


@app.command()
@handled
def measure(
    model: o.Model,
    gpu: o.Gpu = "h100-sxm-80gb",
    gpus: o.Gpus = 1,
    nodes: o.Nodes = 1,
    cpu_ram: o.CpuRam = None,
    nvme: o.Nvme = None,
    job: o.Job = "full",
    dtype: o.Dtype = "bf16",
    quant: o.Quant = None,
    optimizer: o.Optimizer = "adamw",
    master_weights: o.Master = None,
    grad_dtype: o.GradDtype = None,
    batch: o.Batch = 1,
    seq_len: o.SeqLen = 2048,
    accounting: o.Accounting = "deepspeed",
    zero: o.Zero = 0,
    offload_optimizer: o.OffOpt = "none",
    offload_params: o.OffParams = "none",
    tp: o.Tp = 1,
    pp: o.Pp = 1,
    ep: o.Ep = 1,
    sequence_parallel: o.Sp = False,
    recompute: o.Recompute = "none",
    recompute_layers: o.RecomputeLayers = None,
    flash_attention: o.Flash = True,
    cuda_context: o.CudaContext = None,
    allocator_reserve: o.AllocReserve = None,
    lora_rank: o.LoraRank = 16,
    lora_alpha: o.LoraAlpha = 32.0,
    lora_targets: o.LoraTargets = "q,k,v,o",
    dora: o.Dora = False,
    galore_rank: o.GaloreRank = 128,
    galore_8bit: o.Galore8 = False,
    context: o.Context = 4096,
    kv_dtype: o.KvDtype = None,
    paged: o.Paged = False,
    block_size: o.BlockSize = 16,
    device: Device = "cpu",
    layers: Layers = None,
    decode_steps: DecodeSteps = 4,
    attention: Attention = None,
    dropout: Dropout = False,
    fmt: MeasureFormat = "table",
) -> None:
    """Build the model with random weights, run the job, and put memplan's prediction next to the measurement."""
    o.check_format(fmt, ("table", "json"))
    if attention not in (None, "sdpa", "eager", "flash"):
        raise MemplanError(f"--attention must be sdpa, eager or flash, got {attention!r}.")
    kw = dict(locals())
    overrides = o.job_overrides(**kw)
    overrides.update(attention=attention or ("sdpa" if flash_attention else "eager"), dropout=dropout)
    require_extra()
    from memplan.catalog.resolve import load_model
    from memplan.catalog.store import catalog_gpu
    from memplan.estimator import make_config
    from memplan.measure.job import measure_job

    cfg = make_config(None, **overrides)
    report = measure_job(load_model(model), cfg, catalog_gpu(gpu), o.host_from(cpu_ram, nvme), device=device,
                         layers=layers, decode_steps=decode_steps)
    if fmt == "json":
        from memplan.report.json_out import dumps

        typer.echo(dumps(report.as_dict()))
    else:
        render_report(report, console())
    if not report.ok:
        raise typer.Exit(code=1)


def _bytes(value: int | None) -> str:
    return "—" if value is None else f"{value:,}"


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value:+.2f}%"


def _verdict(ok: bool | None) -> str:
    return {True: "ok", False: "OUTSIDE", None: ""}[ok]


def header(report: Any) -> list[str]:
    """What ran, said plainly: the model, the truncation, the job, the kernels and the device."""
    cfg, spec, info = report.cfg, report.spec, report.info
    shape = (f"batch {cfg.micro_batch} × context {cfg.infer.context}" if cfg.job.value == "infer"
             else f"batch {cfg.micro_batch} × seq {cfg.seq_len}")
    count = spec.num_hidden_layers or 0
    lines = [f"memplan measure: {report.model} → built {spec.name} ({count} layer{'' if count == 1 else 's'}, "
             f"{info.get('parameters', 0):,} parameters, random weights)",
             f"job {cfg.job.value}, {cfg.dtype.value}, {cfg.optimizer.value if cfg.job.trains else 'no optimizer'}, "
             f"attention {cfg.attention}, {shape}, on {report.device} ({info.get('device_name', '')})",
             f"torch {info.get('torch')}, transformers {info.get('transformers')}"
             + (f", peft {info['peft']}" if "peft" in info else "") + (f", driver {info['driver']}" if "driver" in info else "")]
    return lines + [f"note: {note}" for note in report.notes]


def render_report(report: Any, con: Any) -> None:
    from rich.table import Table

    for line in header(report):
        con.print(line, highlight=False)
    table = Table(title="prediction vs measurement (bytes; error = predicted − measured)", title_justify="left")
    for name in ("component", "predicted", "measured", "error", "error %", "bound", "result"):
        table.add_column(name, justify="left" if name in ("component", "bound", "result") else "right")
    table.add_column("how", justify="left", overflow="fold")
    for line in report.lines:
        table.add_row(line.component, _bytes(line.predicted), _bytes(line.measured), _bytes(line.error_bytes),
                      _pct(line.error_pct), line.bound, _verdict(line.ok), line.note)
    con.print(table)
    phases = ", ".join(f"{k} {v:,}" for k, v in report.phases_measured.items())
    con.print(f"measured peak per phase: {phases}", highlight=False)
    if report.scaling:
        con.print(scaling_sentence(report.scaling), highlight=False)
    failures = report.failures
    con.print(f"{len(failures)} bounded component(s) outside their bound: {', '.join(f.component for f in failures)}"
              if failures else "every bounded component is within its bound", highlight=False)


def scaling_sentence(scaling: dict[str, Any]) -> str:
    """One sentence on whether the truncated measurement extrapolates linearly to the whole model."""
    n, total = scaling["layers"], scaling["of"]
    if scaling.get("linear") is None or "period" not in scaling:
        return f"measured {n} of {total} layers: {scaling.get('note', '')}"
    verdict = "linear: exact" if scaling["linear"] else f"NOT linear in {', '.join(scaling['nonlinear'])}"
    per = sum(scaling["per_period_bytes"].values())
    return (f"measured {n} of {total} layers; memplan's prediction for all {total} layers "
            f"{scaling['predicted_bytes']['all_layers']:,} B = {n}-layer prediction + {per:,} B per "
            f"{scaling['period']} layer(s) ({verdict})")


@app.command()
@handled
def calibrate(
    gpu: Annotated[str | None, typer.Option("--gpu", "-g", help="Catalog name of this GPU (default: from its name).")] = None,
    fmt: MeasureFormat = "table",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Measure and print, do not write the profile.")] = False,
) -> None:
    """Measure the CUDA context, cuBLAS workspace and allocator reserve of this GPU and store them as its profile."""
    o.check_format(fmt, ("table", "json"))
    require_extra()
    from memplan.measure.calibrate import calibrate as run_calibration
    from memplan.measure.calibrate import save_profile

    profile = run_calibration(gpu)
    path = None if dry_run else save_profile(profile["gpu"], profile)
    if fmt == "json":
        from memplan.report.json_out import dumps

        typer.echo(dumps({**profile, "path": None if path is None else str(path)}))
        return
    con = console()
    for key in ("gpu", "device_name", "driver", "cuda", "torch", "cuda_context_bytes", "driver_overhead_bytes",
                "cublas_workspace_bytes", "allocator_reserve_pct"):
        value = profile[key]
        con.print(f"{key}: {value:,}" if isinstance(value, int) else f"{key}: {value}", highlight=False)
    con.print("profile not written (--dry-run)" if path is None else f"profile written to {path}", highlight=False)
