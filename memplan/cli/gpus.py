"""``memplan gpus``: the built-in GPU catalog."""

from __future__ import annotations

from typing import Annotated

import typer

from memplan.cli.core import Command, command_app, handled
from memplan.cli.opts import Contains, Opts, options
from memplan.options import size_or_none

app = command_app()
MinMemory = Annotated[str | None, typer.Option("--min-memory", help="Only GPUs with at least this memory, e.g. 40GiB.")]
Vendor = Annotated[str | None, typer.Option("--vendor", help="nvidia or amd.")]


@app.command(cls=Command)
@handled
@options("fmt")
def gpus(contains: Contains = None, *, opts: Opts, min_memory: MinMemory = None, vendor: Vendor = None) -> None:
    """List the built-in GPU catalog."""
    from memplan.catalog.listing import gpu_rows
    from memplan.report import emit

    emit.check_format(opts.fmt)
    check_vendor(vendor)
    rows = gpu_rows(contains=contains, min_memory=size_or_none(min_memory, "--min-memory"), vendor=vendor)
    emit.rows(rows, opts.fmt, title="GPUs")


def check_vendor(vendor: str | None) -> None:
    """``--vendor`` must name a vendor of the catalog (as ``models --family`` must name a family)."""
    from memplan.catalog.index import load
    from memplan.errors import MemplanError, did_you_mean

    known = sorted({str(g.get("vendor", "")).lower() for g in load()["gpus"].values() if isinstance(g, dict)} - {""})
    if vendor is not None and vendor.lower() not in known:
        raise MemplanError(f"no catalog GPU of vendor {vendor!r}.{did_you_mean(vendor, known)} Vendors: {', '.join(known)}.")
