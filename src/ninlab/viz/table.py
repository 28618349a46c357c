"""A table as plain-text cells, described once and printed in every format: the terminal (rich),
Markdown, HTML (`html.html_table`, for a notebook and the report). A table's columns are decided
where its rows are made (`render.layer_table`, `render_memory.saved_table`,
`compare.comparison_table`, ...), never by a format."""

from __future__ import annotations

from dataclasses import dataclass

from rich.console import Console, JustifyMethod
from rich.table import Table

__all__ = ["TextTable", "markdown_table", "rich_table", "wide_console"]


@dataclass(frozen=True)
class TextTable:
    """`rows` of plain-text cells under `columns`; those named in `numeric` are right-aligned. A
    cell's leading spaces are an indent (a nested layer), kept by every format; its lines after
    the first are a note under its value (a comparison's difference), which HTML may wrap and
    Markdown, a line per row, puts after it."""

    columns: tuple[str, ...]
    numeric: frozenset[str]
    rows: tuple[tuple[str, ...], ...]

    def is_numeric(self) -> tuple[bool, ...]:
        """For each column, whether it is right-aligned."""
        return tuple(column in self.numeric for column in self.columns)


def wide_console() -> Console:
    """A terminal's own width; 200 columns when piped, so a saved table is not wrapped."""
    console = Console()
    return console if console.is_terminal else Console(width=200)


def rich_table(
    table: TextTable, *, title: str = "", title_justify: JustifyMethod = "left"
) -> Table:
    """The table for a terminal; the first column (the layer's name) never wraps."""
    shown = Table(title=title or None, title_justify=title_justify)
    for index, (column, numeric) in enumerate(zip(table.columns, table.is_numeric())):
        shown.add_column(column, justify="right" if numeric else "left", no_wrap=index == 0)
    for row in table.rows:
        shown.add_row(*row)
    return shown


def markdown_table(table: TextTable) -> list[str]:
    """The table's Markdown lines: a leading indent becomes non-breaking spaces, a "|"
    is escaped."""

    def cell(text: str) -> str:
        stripped = text.lstrip(" ")
        line = " ".join(stripped.splitlines())
        return "&nbsp;" * (len(text) - len(stripped)) + line.replace("|", "\\|")

    header = "|" + "".join(f" {column} |" if column else " |" for column in table.columns)
    lines = [header, "|" + "---|" * len(table.columns)]
    return lines + ["| " + " | ".join(cell(text) for text in row) + " |" for row in table.rows]
