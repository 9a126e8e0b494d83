"""``memplan measure``: predictions checked against a real model on this machine.

torch, transformers and peft are imported only inside the command, through ``memplan.measure``.
Exit codes: 0 every bounded component within its bound; 1 one or more outside; 2 bad input or the
``measure`` extra missing; 3 an internal error.
"""

from __future__ import annotations

from typing import Annotated

import typer

from memplan.cli.convert import host, job_config
from memplan.cli.core import Command, command_app, handled, require_extra
from memplan.cli.opts import Model, Opts, options
from memplan.errors import MemplanError
from memplan.options import OUTPUT

app = command_app()
X = "Measurement"
Device = Annotated[str, typer.Option("--device", help="cpu or cuda.", rich_help_panel=X)]
Layers = Annotated[int | None, typer.Option("--layers", help="Build and measure only the first N layers (the output says so).",
                                            rich_help_panel=X)]
DecodeSteps = Annotated[int, typer.Option("--decode-steps", help="Inference: one-token steps after the prefill.",
                                          rich_help_panel=X)]
CUSTOM = {"attention": {"help": "sdpa, eager or flash (default: sdpa, or eager with --no-flash-attention).", "panel": X},
          "dropout": {"help": "GPT-2/OPT dropout at p=0.1 in training.", "panel": X},
          "fmt": {"help": "table or json.", "panel": OUTPUT}}


@app.command(cls=Command)
@handled
@options("hardware", "job", "parallelism", "recompute", "recompute_layers", "flash_attention", "cuda_context",
         "allocator_reserve", "lora_rank", "lora_alpha", "lora_targets", "dora", "galore_rank", "galore_8bit", "context",
         "kv_dtype", "paged", "block_size", "attention", "dropout", "fmt", custom=CUSTOM,
         exclude=("engine", "quant_map", "global_batch", "global_batch_tokens", "grad_accum", "optimizer_gpu_layers",
                  "shard_group"))
def measure(model: Model, device: Device = "cpu", layers: Layers = None, decode_steps: DecodeSteps = 4, *,
            opts: Opts) -> None:
    """Build the model with random weights, run the job, and put memplan's prediction next to the measurement."""
    from memplan.report import emit

    emit.check_format(opts.fmt, ("table", "json"))
    if opts.attention not in (None, "sdpa", "eager", "flash"):
        raise MemplanError(f"--attention must be sdpa, eager or flash, got {opts.attention!r}.")
    cfg = job_config(opts, attention=opts.attention or ("sdpa" if opts.flash_attention else "eager"))
    require_extra()
    from memplan.catalog.resolve import load_model
    from memplan.catalog.store import catalog_gpu
    from memplan.measure.job import measure_job

    report = measure_job(load_model(model), cfg, catalog_gpu(opts.gpu), host(opts), device=device, layers=layers,
                         decode_steps=decode_steps)
    emit.measure(report, opts.fmt)
    raise typer.Exit(code=0 if report.ok else 1)
