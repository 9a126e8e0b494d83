"""Tables and lines for people: rich on a terminal (long names fold, never cut), a plain aligned layout
when stdout is a pipe or a file (no truncation, no box drawing, no colour codes; rich is not imported).

``Table`` takes the calls of ``rich.table.Table`` that memplan uses; ``Out.print`` takes strings (with
rich's ``[bold]``-style markup, stripped in the plain layout) and ``Table`` objects. The estimate table
(one row per component and tier, in GiB with the unit written out) is built here too.
"""

from __future__ import annotations

import re
import sys
import textwrap
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from memplan.report.fold import PIPE_WIDTH, WORD_BREAKS, fit_line, fit_text, panels, wrap_words

if TYPE_CHECKING:
    from memplan.estimator import Estimate

MARKUP = re.compile(r"\[/?(?:bold|green|red|yellow|dim|cyan|italic)?\]")
GAP = "  "
"""Between the columns of the plain layout."""


def folded(text: str, indent: str = "  ") -> str:
    """``text`` folded at spaces to ``PIPE_WIDTH`` columns, further lines indented by ``indent``."""
    return textwrap.fill(text, PIPE_WIDTH, subsequent_indent=indent, break_long_words=False, break_on_hyphens=False)


MAX_WORD = 40
"""The widest a column's longest word may force it to be on a terminal; longer words fold."""


def plain(text: str) -> str:
    """``text`` without rich markup tags."""
    return MARKUP.sub("", text)


@dataclass
class Column:
    header: str
    justify: str = "left"
    wrap: int | None = None
    """In the plain layout, a longer cell folds at spaces onto further lines of its row (a pipe has no width)."""

    def fold(self, text: str, width: int | None = None) -> list[str]:
        """The lines of one plain cell, at most ``width`` (default ``wrap``) columns where its words allow."""
        width = self.wrap if width is None else min(width, self.wrap or width)
        if width is None or len(text) <= width:
            return [text]
        return wrap_words(text, width)


@dataclass
class Table:
    """A table to print through ``Out``: columns, rows of strings, and section breaks."""

    title: str | None = None
    title_justify: str = "left"
    caption: str | None = None
    """A line under the table (a legend)."""
    columns: list[Column] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    breaks: set[int] = field(default_factory=set)
    """Row indexes after which a section ends."""

    def add_column(self, header: str, justify: str = "left", wrap: int | None = None, **_: Any) -> None:
        self.columns.append(Column(header, justify, wrap))

    def add_row(self, *cells: str, end_section: bool = False) -> None:
        self.rows.append([str(c) for c in cells])
        if end_section:
            self.breaks.add(len(self.rows) - 1)

    def plain_lines(self) -> list[str]:
        """The plain layout: a header, a rule, the rows, every column as wide as its widest cell, folded to
        ``PIPE_WIDTH`` columns (:func:`fitted_widths`)."""
        cells = [[c.header for c in self.columns], *([plain(x) for x in row] for row in self.rows)]
        limits = fitted_widths(self.columns, cells)
        folded = [[self.columns[i].fold(x, limits[i]) for i, x in enumerate(row)] for row in cells[1:]]
        widths = [max([len(cells[0][i])] + [len(t) for row in folded for t in row[i]]) for i in range(len(self.columns))]
        if len(self.columns) > 2 and sum(widths) + len(GAP) * (len(widths) - 1) > PIPE_WIDTH:
            return self.panel_lines(widths)

        def line(row: list[str]) -> str:
            return GAP.join(x.rjust(w) if c.justify == "right" else x.ljust(w)
                            for x, w, c in zip(row, widths, self.columns, strict=True)).rstrip()

        out = [fit_line(plain(self.title))] if self.title else []
        out += [line(cells[0]), GAP.join("-" * w for w in widths)]
        for i, row in enumerate(folded):
            out += [line([p[k] if k < len(p) else "" for p in row]) for k in range(max(map(len, row)))]
            if i in self.breaks and i != len(cells) - 2:
                out.append("")
        return out + ([fit_line(plain(self.caption))] if self.caption else [])

    def panel_lines(self, widths: list[int]) -> list[str]:
        """A table too wide for ``PIPE_WIDTH`` even folded (many numeric columns: ``memplan models``) as panels:
        the first column repeated beside runs of the others that fit, each titled with the columns it holds."""
        others = list(range(1, len(self.columns)))
        runs = panels(others, widths[0], {k: widths[k] for k in others}, PIPE_WIDTH, len(GAP))
        out: list[str] = []
        for n, run in enumerate(runs):
            part = Table(title=f"{plain(self.title or '')} (columns {run[0] + 1}-{run[-1] + 1} of "
                               f"{len(self.columns)})".lstrip(), breaks=self.breaks,
                         caption=self.caption if n == len(runs) - 1 else None)
            part.columns = [self.columns[0], *(self.columns[k] for k in run)]
            part.rows = [[row[0], *(row[k] for k in run)] for row in self.rows]
            out += ([""] if n else []) + part.plain_lines()
        return out

    def rich(self) -> Any:
        from rich.table import Table as RichTable

        table = RichTable(title=self.title, title_justify=self.title_justify,  # type: ignore[arg-type]
                          caption=self.caption, caption_justify="left")
        for j, c in enumerate(self.columns):
            # A column is never narrower than its longest word, so a component name is never folded mid-name.
            words = [w for row in self.rows for w in plain(row[j]).split()] + c.header.split()
            table.add_column(c.header, justify=c.justify, overflow="fold",  # type: ignore[arg-type]
                             min_width=min(max(map(len, words), default=1), MAX_WORD))
        for i, row in enumerate(self.rows):
            table.add_row(*row, end_section=i in self.breaks)
        return table


class Out:
    """Where people-facing output goes: rich on a terminal, plain text otherwise."""

    def __init__(self, terminal: bool | None = None) -> None:
        self.terminal = is_terminal() if terminal is None else terminal
        self._console: Any = None

    @property
    def console(self) -> Any:
        if self._console is None:
            from rich.console import Console

            self._console = Console(soft_wrap=False)
        return self._console

    def print(self, obj: Any = "", **kwargs: Any) -> None:
        if self.terminal:
            self.console.print(obj.rich() if isinstance(obj, Table) else obj, **kwargs)
            return
        text = "\n".join(obj.plain_lines()) if isinstance(obj, Table) else fit_text(plain(str(obj)))
        sys.stdout.write(text + "\n")


def min_width(column: Column, texts: list[str]) -> int:
    """The narrowest ``column`` may fold to: its header and its longest word, a word past ``MAX_WORD`` counted
    by its longest piece (``WORD_BREAKS``)."""
    words = [w for t in texts for w in t.split()] + column.header.split()
    return max((len(w) if len(w) <= MAX_WORD else max(map(len, WORD_BREAKS.findall(w))) for w in words), default=1)


def fitted_widths(columns: list[Column], cells: list[list[str]]) -> list[int | None]:
    """Each column's fold width so the plain table fits ``PIPE_WIDTH`` columns: the widest column gives up a
    column at a time, none below its longest word, until the table fits (None: the column keeps its width).

    Nothing is cut: a cell folds onto further lines of its row."""
    natural = [max(len(line) for row in cells for line in columns[i].fold(row[i])) for i in range(len(columns))]
    floors = [min_width(c, [row[i] for row in cells[1:]]) for i, c in enumerate(columns)]
    widths = list(natural)
    budget = PIPE_WIDTH - len(GAP) * (len(columns) - 1)
    while sum(widths) > budget:
        room = [i for i, w in enumerate(widths) if w > floors[i]]
        if not room:
            break
        widest = max(room, key=lambda i: widths[i])
        widths[widest] -= 1
    return [None if w == n else w for w, n in zip(widths, natural, strict=True)]


def piped(text: str, indent: str | None = None, hang: int = 2) -> str:
    """``text`` as a pipe or a file gets it, folded to ``PIPE_WIDTH`` columns; as is on a terminal."""
    return text if is_terminal() else fit_text(text, indent, hang)


def is_terminal() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


TIER_LABEL = {"gpu": "GPU", "cpu": "CPU RAM", "nvme": "NVMe"}
TIER_LEGEND = "GPU rows are bytes per GPU; CPU RAM and NVMe rows, per node."
"""The estimate table's caption: what the short tier labels (``TIER_LABEL``) count, so that the table fits 80
columns in a pipe with every component name whole."""


def fmt_gib(n_bytes: int) -> str:
    from memplan.units import GiB

    return f"{n_bytes / GiB:,.2f} GiB"


def estimate_table(est: Estimate) -> Table:
    from memplan.memory.breakdown import Tier

    cfg = est.config
    title = (f"{est.model.name} · {cfg.job.value} · {cfg.gpus_per_node}×{cfg.nodes} {est.gpu.name} · "
             f"{est.arch.params / 1e9:,.2f} B params")
    table = Table(title=title, caption=TIER_LEGEND)
    for name in ("tier", "component", "memory", "bytes"):
        table.add_column(name, justify="right" if name in ("memory", "bytes") else "left")
    for tier in Tier:
        rows = [r for r in est.rows if r.tier is tier]
        if not rows and tier is not Tier.GPU:
            continue
        label = TIER_LABEL[tier.value]
        for r in rows:
            table.add_row(label, r.component, fmt_gib(r.bytes), f"{r.bytes:,}")
        total, top, cap = est.total(tier), est.peak(tier), est.capacity(tier)
        verdict = "[green]FITS[/green]" if top <= cap else "[red]DOES NOT FIT[/red]"
        table.add_row(label, "rows summed (not alive together)", fmt_gib(total), f"{total:,}")
        table.add_row(label, f"[bold]peak[/bold] ({est.peak_phase(tier).value}) of {fmt_gib(cap)} capacity",
                      f"[bold]{fmt_gib(top)}[/bold]", verdict, end_section=True)
    for name in est.not_modelled:
        table.add_row(TIER_LABEL["gpu"], f"{name}", "[yellow]not modelled[/yellow]", "needs the model's dimensions")
    return table


def capacity_line(gpu: Any) -> str:
    """One sentence: the GPU capacity every engine budgets from and what kind of figure it is
    (``memplan.catalog.capacity``), next to nvidia-smi's total."""
    from memplan.catalog.capacity import gpu_capacity

    cap = gpu_capacity(gpu)
    return (f"GPU capacity {fmt_gib(cap.bytes)} ({cap.bytes:,} B): {cap.kind}; nvidia-smi total "
            f"{fmt_gib(gpu.memory_bytes)}.")


def render_estimate(est: Estimate, out: Any) -> None:
    out.print(estimate_table(est))
    head = est.headroom_bytes
    if est.fits:
        out.print(f"[green]FITS[/green]: headroom {fmt_gib(head)} on the {est.binding_tier.value} tier "
                  f"(peak at {est.peak_phase(est.binding_tier).value}).")
    else:
        out.print(f"[red]DOES NOT FIT[/red]: {fmt_gib(-head)} over capacity on the {est.binding_tier.value} tier "
                  f"(peak at {est.peak_phase(est.binding_tier).value}).")
    out.print(f"{est.engine_reason[:1].upper()}{est.engine_reason[1:]}.")
    out.print(capacity_line(est.gpu))
    for warning in est.warnings:
        out.print(f"[yellow]Warning[/yellow]: {warning}.")
    if est.serving:
        sv = est.serving
        sglang = est.config.engine is not None and est.config.engine.value == "sglang"
        blocks, cap = ("pages", "max_running_requests") if sglang else ("blocks", "max_num_seqs")
        out.print(f"KV pool: {fmt_gib(sv['kv_pool_bytes'])}, {sv['kv_pool_blocks']:,} {blocks} of {sv['block_size']} = "
                  f"{sv['kv_pool_tokens']:,} tokens; at {est.config.infer.context:,} tokens per sequence "
                  f"{sv['max_concurrency']:,} concurrent ({cap} {sv['max_num_seqs']:,}); longest "
                  f"sequence {sv['max_context']:,} tokens.")
    if est.not_modelled:
        out.print(f"[yellow]Not modelled[/yellow]: {', '.join(est.not_modelled)} "
                  "(a params-only model has no dimensions); the verdict excludes them.")
    assumed = assumed_host(est)
    if assumed:
        out.print(f"Assumed (memplan's defaults; set --cpu-ram / --nvme / --dtype): {assumed}.")


def assumed_host(est: Estimate) -> str:
    """What the verdict rests on that nobody gave (``Estimate.assumptions``: the host's CPU RAM and NVMe per
    node, the dtype a GPU without bf16 gets), in words; '' when everything was given."""
    given, parts = est.assumptions, []
    if "cpu_ram_bytes" in given:
        parts.append(f"{fmt_gib(given['cpu_ram_bytes'])} of CPU RAM per node")
    if "nvme_bytes" in given:
        parts.append(f"{fmt_gib(given['nvme_bytes'])} of NVMe per node" if given["nvme_bytes"] else "no NVMe")
    if "dtype" in given:
        parts.append(f"dtype {given['dtype']}")
    return ", ".join(parts)


def render_rows(rows: list[dict[str, Any]], title: str, out: Any) -> None:
    """Catalog listings (``memplan models``, ``memplan gpus``): one row per entry, every name in full."""
    table = Table(title=f"{len(rows)} {title}")
    for key in rows[0] if rows else []:
        table.add_column(key, justify="right" if isinstance(rows[0][key], int | float) else "left")
    for row in rows:
        table.add_row(*(f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v) for v in row.values()))
    out.print(table)
