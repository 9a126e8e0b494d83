"""Print a command's answer in the format asked for: ``table`` for people, ``json`` and ``csv`` for programs.

Only the chosen renderer is imported (``--format json`` never imports rich). Each function writes stdout.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from memplan.errors import MemplanError


def write(text: str) -> None:
    """``text`` on stdout as is (the caller adds the newline)."""
    sys.stdout.write(text)


def check_format(fmt: str, allowed: tuple[str, ...] = ("table", "json", "csv")) -> str:
    if fmt not in allowed:
        raise MemplanError(f"--format must be one of {', '.join(allowed)}, got {fmt!r}.")
    return fmt


def check_plot(path: Path | None) -> None:
    """Validate ``--plot``'s file type (and that matplotlib is there) before any work is done."""
    if path is not None:
        import importlib.util

        from memplan.report.plots import check_path

        check_path(path)
        if importlib.util.find_spec("matplotlib") is None:
            raise MemplanError("--plot needs matplotlib; install it with pip install 'memplan[plot]'.")


def out() -> Any:
    from memplan.report.table import Out

    return Out()


def estimate(est: Any, fmt: str, extra: dict[str, Any]) -> None:
    if fmt == "json":
        from memplan.report.json_out import dumps, estimate_dict

        write(dumps({**estimate_dict(est), **extra}) + "\n")
    elif fmt == "csv":
        from memplan.report.csv_out import estimate_record, records_to_csv

        write(records_to_csv([{**estimate_record(est), **extra}]))
    else:
        from memplan.report.table import render_estimate

        o = out()
        render_estimate(est, o)
        for key, value in extra.items():
            o.print(f"{key.replace('_', ' ')}: {value:,}")


def plan(result: Any, fmt: str) -> None:
    if fmt == "json":
        from memplan.report.json_out import dumps
        from memplan.report.plan_out import plan_dict

        write(dumps(plan_dict(result)) + "\n")
    elif fmt == "csv":
        from memplan.report.csv_out import estimate_record, records_to_csv
        from memplan.report.plan_out import choice_line, plan_cost

        records = [{"rank": i + 1, **estimate_record(c.estimate), "step_time_s": c.step_time_s,
                    "tokens_per_s": c.tokens_per_s, **(plan_cost(c) or {}), "configuration": choice_line(c)}
                   for i, c in enumerate(result.candidates)]
        write(records_to_csv(records) if records else "status\ninfeasible\n")
    else:
        from memplan.report.plan_out import render_plan

        render_plan(result, out())


def rows(items: list[dict[str, Any]], fmt: str, *, title: str) -> None:
    """A catalog listing (models, GPUs)."""
    if fmt == "json":
        from memplan.report.json_out import dumps

        write(dumps(items) + "\n")
    elif fmt == "csv":
        from memplan.report.csv_out import records_to_csv

        write(records_to_csv(items))
    else:
        from memplan.report.table import render_rows

        render_rows(items, title, out())


def sweep(result: Any, fmt: str, csv_path: Path | None, *, pivot: bool = False) -> None:
    """Fit matrices (table), every record (csv, json); the CSV also to ``csv_path``; n/a reasons on stderr.
    ``pivot``: the fit matrices compactly, wrapped to the screen (table), or as one CSV (``report.pivot``)."""
    from memplan.report.csv_out import records_to_csv
    from memplan.report.sweep_out import matrices, render_matrices, sweep_dict

    if pivot:
        from memplan.report.pivot import pivot_csv, render_pivot

        spec = result.spec
        if fmt == "csv":
            write(pivot_csv(matrices(result)))
        else:
            render_pivot(matrices(result), out(), yes_no=spec.metric == "fits" and len(spec.batches) == 1)
        invalid_reasons(result.cells)
        return

    streamed = result.streamed_rows is not None  # rows already written by report.sweep_stream
    csv_text = records_to_csv(result.records) if (csv_path is not None or fmt == "csv") and not streamed else ""
    if csv_path is not None and not streamed:
        try:
            csv_path.write_text(csv_text, encoding="utf-8")
        except OSError as exc:
            raise MemplanError(f"--out: cannot write {csv_path}: {exc.strerror or exc}.") from None
        sys.stderr.write(f"memplan: wrote {len(result.records):,} rows to {csv_path}\n")
    if fmt == "csv":
        if not streamed:
            write(csv_text)
    elif fmt == "json":
        from memplan.report.json_out import dumps
        from memplan.report.schemas import validated

        write(dumps(validated("sweep", sweep_dict(result))) + "\n")
    else:
        render_matrices(matrices(result), out())
    invalid_reasons(result.cells)


def invalid_reasons(cells: list[Any], *, most: int = 5) -> None:
    """Why cells are n/a, one line per distinct reason on stderr (the CSV has it per row)."""
    from collections import Counter

    reasons = Counter(c.error for c in cells if c.error)
    for reason, n in reasons.most_common(most):
        sys.stderr.write(f"memplan: {n} cell{'s' if n > 1 else ''} n/a: {reason}\n")
    if len(reasons) > most:
        sys.stderr.write(f"memplan: ... and {len(reasons) - most} more reasons (see the CSV's error column).\n")


def plot(obj: Any, path: Path | None, **kwargs: Any) -> None:
    if path is not None:
        from memplan.report.plots import maybe_plot

        maybe_plot(obj, path, **kwargs)


def measure(report: Any, fmt: str) -> None:
    if fmt == "json":
        from memplan.report.json_out import dumps

        write(dumps(report.as_dict()) + "\n")
    else:
        from memplan.report.measure_out import render_report

        render_report(report, out())


def lines(items: list[str]) -> None:
    """Plain lines (no markup), e.g. ``calibrate``'s fields."""
    write("".join(f"{line}\n" for line in items))


def note(text: str) -> None:
    """One ``memplan:`` line on stderr that is not an error (the answer is still on stdout)."""
    sys.stderr.write(f"memplan: {text}\n")
