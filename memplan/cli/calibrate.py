"""``memplan calibrate``: measure this GPU's fixed costs and store them as its profile."""

from __future__ import annotations

from typing import Annotated

import typer

from memplan.cli.core import Command, command_app, handled, require_extra

app = command_app()
Gpu = Annotated[str | None, typer.Option("--gpu", "-g", help="Catalog name of this GPU (default: from its name).")]
Format = Annotated[str, typer.Option("--format", "-f", help="table or json.")]
DryRun = Annotated[bool, typer.Option("--dry-run", help="Measure and print, do not write the profile.")]
FIELDS = ("gpu", "device_name", "driver", "cuda", "torch", "cuda_context_bytes", "driver_overhead_bytes",
          "cublas_workspace_bytes", "allocator_reserve_pct")


@app.command(cls=Command)
@handled
def calibrate(gpu: Gpu = None, fmt: Format = "table", dry_run: DryRun = False) -> None:
    """Measure the CUDA context, cuBLAS workspace and allocator reserve of this GPU and store them as its profile."""
    from memplan.report import emit

    emit.check_format(fmt, ("table", "json"))
    require_extra("calibrate")
    from memplan.measure.calibrate import calibrate as run_calibration
    from memplan.measure.calibrate import save_profile

    profile = run_calibration(gpu)
    path = None if dry_run else save_profile(profile["gpu"], profile)
    if fmt == "json":
        from memplan.report.json_out import dumps

        emit.write(dumps({**profile, "path": None if path is None else str(path)}) + "\n")
        return
    emit.lines([f"{k}: {profile[k]:,}" if isinstance(profile[k], int) else f"{k}: {profile[k]}" for k in FIELDS]
               + ["profile not written (--dry-run)" if path is None else f"profile written to {path}"])
