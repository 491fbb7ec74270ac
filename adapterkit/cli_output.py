"""What the `adapterkit` command line prints: tables in one style, status lines, one-line errors.

Tables and results go to stdout (a pipe gets them whole, never wrapped); status lines and errors go to
stderr, so `adapterkit eval ... > results.md` keeps only the table. Imports no torch.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Sequence
from numbers import Real


def cell(value: object) -> str:
    """A table cell: floats below 10 with 4 decimals (accuracies, losses), integers with separators."""
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value)
    if isinstance(value, float):
        return "nan" if value != value else f"{value:.4f}" if abs(value) < 10 else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def print_table(
    headers: Sequence[str], rows: Sequence[Sequence[object]], *, title: str | None = None
) -> None:
    """A Markdown table on stdout (rich, no colours): numbers right-aligned, one row per line.

    Example:
        >>> print_table(["domain", "accuracy"], [["gtsrb", 0.9712]])
        | domain | accuracy |
        |--------|----------|
        | gtsrb  |   0.9712 |
    """
    from rich import box
    from rich.console import Console
    from rich.table import Table

    numeric = [bool(rows) and all(isinstance(r[i], Real) for r in rows) for i in range(len(headers))]
    table = Table(box=box.MARKDOWN, title=title, title_justify="left", show_edge=True, pad_edge=True)
    for header, num in zip(headers, numeric, strict=True):
        table.add_column(header, justify="right" if num else "left", no_wrap=True)
    for row in rows:
        table.add_row(*(cell(v) for v in row))
    out = Console(file=io.StringIO(), width=10_000, color_system=None, highlight=False)
    out.print(table)  # rendered off-screen: a pipe, a file or a narrow terminal all get whole rows
    lines = [line.rstrip() for line in out.file.getvalue().splitlines()]
    print("\n".join(line for line in lines if line))


def status(message: str) -> None:
    """A progress line on stderr (what is being done, on how many threads)."""
    print(message, file=sys.stderr, flush=True)


def error_line(command: str | None, message: str) -> str:
    """`adapterkit CMD: error: MESSAGE` on one line (library messages may span lines)."""
    prefix = f"adapterkit {command}" if command else "adapterkit"
    return f"{prefix}: error: {' '.join(str(message).split())}"
