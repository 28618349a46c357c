"""A table as HTML for a notebook cell: the cells of a terminal table, escaped, with a caption and
notes. The renderers of each result (`render`, `render_memory`, `compare`) give it the same cells
their terminal and Markdown tables print, so a notebook shows the same words and numbers."""

from __future__ import annotations

import html
from collections.abc import Collection, Sequence

__all__ = ["html_list", "html_table", "html_text"]

# Inline styles only: a notebook's own style sheet (Jupyter's classic one centres or right-aligns
# cells) must not decide which columns line up, and no <style> leaks into the rest of the page.
_CELL = "padding:0.15rem 0.5rem;text-align:{align};vertical-align:top;white-space:{wrap}"


def html_text(text: str) -> str:
    """`text` escaped, its leading indent (a nested layer) kept through HTML's whitespace collapsing."""
    escaped = html.escape(text)
    stripped = escaped.lstrip(" ")
    return "&nbsp;" * (len(escaped) - len(stripped)) + stripped


def _cell(tag: str, text: str, *, numeric: bool) -> str:
    escaped = html_text(text)
    style = _CELL.format(align="right" if numeric else "left", wrap="nowrap" if numeric else "normal")
    return f'<{tag} style="{style}">{escaped}</{tag}>'


def html_table(
    columns: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    numeric: Collection[str] = (),
    caption: str = "",
    notes: Sequence[str] = (),
) -> str:
    """`rows` of plain-text cells under `columns` (those named in `numeric` right-aligned), the
    `caption` above and `notes` as a list below; every text is escaped here."""
    right = [column in numeric for column in columns]
    head = "".join(_cell("th", column, numeric=r) for column, r in zip(columns, right))
    body = "".join(
        "<tr>" + "".join(_cell("td", cell, numeric=r) for cell, r in zip(row, right)) + "</tr>" for row in rows
    )
    title = f'<caption style="text-align:left;font-weight:bold">{html.escape(caption)}</caption>' if caption else ""
    table = f'<table class="ninlab">{title}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
    # A table wider than the cell (many variants side by side) scrolls instead of spilling over.
    return f'<div style="overflow-x:auto">{table}{html_list(notes)}</div>'


def html_list(lines: Sequence[str]) -> str:
    """Lines of prose as an escaped bulleted list ("" for none)."""
    items = "".join(f"<li>{html.escape(line)}</li>" for line in lines)
    return f"<ul>{items}</ul>" if items else ""
