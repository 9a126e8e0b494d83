"""``memplan measure`` output: what ran, then prediction next to measurement per component."""

from __future__ import annotations

from typing import Any


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
    from memplan.report.table import Table

    for line in header(report):
        con.print(line, highlight=False)
    table = Table(title="prediction vs measurement (bytes; error = predicted − measured)", title_justify="left")
    for name in ("component", "predicted", "measured", "error", "error %", "bound", "result"):
        table.add_column(name, justify="left" if name in ("component", "bound", "result") else "right")
    table.add_column("how", justify="left")
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
