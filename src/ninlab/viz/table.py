"""A table as plain-text cells, described once and printed in every format: the terminal (rich),
Markdown, a notebook's HTML (`html.html_table`) and the HTML report. A table's columns are decided
where its rows are made (`render.layer_table`, `render_memory.saved_table`), never by a format."""

from __future__ import annotations

from dataclasses import dataclass

from rich.table import Table

__all__ = ["TextTable", "markdown_table", "rich_table"]


@dataclass(frozen=True)
class TextTable:
    """`rows` of plain-text cells under `columns`; those named in `numeric` are right-aligned. A
    cell's leading spaces are an indent (a nested layer), kept by every format."""

    columns: tuple[str, ...]
    numeric: frozenset[str]
    rows: tuple[tuple[str, ...], ...]

    def is_numeric(self) -> tuple[bool, ...]:
        """For each column, whether it is right-aligned."""
        return tuple(column in self.numeric for column in self.columns)


def rich_table(table: TextTable, *, title: str = "") -> Table:
    """The table for a terminal; the first column (the layer's name) never wraps."""
    shown = Table(title=title or None, title_justify="left")
    for index, (column, numeric) in enumerate(zip(table.columns, table.is_numeric())):
        shown.add_column(column, justify="right" if numeric else "left", no_wrap=index == 0)
    for row in table.rows:
        shown.add_row(*row)
    return shown


def markdown_table(table: TextTable) -> list[str]:
    """The table's Markdown lines: a leading indent becomes non-breaking spaces, a "|" is escaped."""

    def cell(text: str) -> str:
        stripped = text.lstrip(" ")
        return "&nbsp;" * (len(text) - len(stripped)) + stripped.replace("|", "\\|")

    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    return lines + ["| " + " | ".join(cell(text) for text in row) + " |" for row in table.rows]
