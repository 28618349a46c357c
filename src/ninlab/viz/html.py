"""A table as HTML, the one writer of them (a notebook cell, the HTML report): a `TextTable`'s
cells, escaped, with a caption and notes, so HTML shows the words and numbers the terminal and
Markdown print."""

from __future__ import annotations

import html
from collections.abc import Sequence

from ninlab.viz.table import TextTable

__all__ = ["html_list", "html_table", "html_text"]

# Inline styles only: a notebook's own style sheet (Jupyter's classic one centres or right-aligns
# cells) must not decide which columns line up, and no <style> leaks into the rest of the page.
_CELL = "padding:0.15rem 0.5rem;text-align:{align};vertical-align:top;white-space:{wrap}"


def html_text(text: str) -> str:
    """`text` escaped, its leading indent (a nested layer) kept through HTML's
    whitespace collapsing."""
    escaped = html.escape(text)
    stripped = escaped.lstrip(" ")
    return "&nbsp;" * (len(escaped) - len(stripped)) + stripped


def _cell(tag: str, text: str, *, numeric: bool) -> str:
    # A note under the value (`TextTable`) is smaller and may wrap, so a column is as wide as
    # its values, not as its notes: five variants' differences fit a notebook's page.
    value, *notes = text.splitlines() or [""]
    escaped = html_text(value) + "".join(
        f'<br><small style="white-space:normal">{html.escape(note)}</small>' for note in notes
    )
    style = _CELL.format(
        align="right" if numeric else "left", wrap="nowrap" if numeric else "normal"
    )
    return f'<{tag} style="{style}">{escaped}</{tag}>'


def html_table(table: TextTable, *, caption: str = "", notes: Sequence[str] = ()) -> str:
    """`table` (its numeric columns right-aligned), the `caption` above and `notes` as a list
    below; every text is escaped here."""
    right = table.is_numeric()
    head = "".join(_cell("th", column, numeric=r) for column, r in zip(table.columns, right))
    body = "".join(
        "<tr>" + "".join(_cell("td", cell, numeric=r) for cell, r in zip(row, right)) + "</tr>"
        for row in table.rows
    )
    title = (
        f'<caption style="text-align:left;font-weight:bold">{html.escape(caption)}</caption>'
        if caption
        else ""
    )
    table = (
        f'<table class="ninlab">{title}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
    )
    # A table wider than the cell (many variants side by side) scrolls instead of spilling over.
    return f'<div class="ninlab-table" style="overflow-x:auto">{table}{html_list(notes)}</div>'


def html_list(lines: Sequence[str]) -> str:
    """Lines of prose as an escaped bulleted list ("" for none)."""
    items = "".join(f"<li>{html.escape(line)}</li>" for line in lines)
    return f"<ul>{items}</ul>" if items else ""
