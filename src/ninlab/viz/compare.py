"""A `Comparison` (`ninlab.studies.compare`) as a terminal table, Markdown, HTML or JSON: one
table of every metric, each variant against the first. Nothing here computes a number."""

from __future__ import annotations

import dataclasses
from typing import Any

from rich.console import Console

from ninlab.outputs import json_text
from ninlab.studies.compare import Comparison, Metric, Unit
from ninlab.units import format_bytes, format_count, format_flops
from ninlab.viz.html import html_table
from ninlab.viz.table import TextTable, markdown_table, rich_table, wide_console

__all__ = [
    "comparison_dict",
    "comparison_html",
    "comparison_json",
    "comparison_markdown",
    "comparison_table",
    "print_comparison",
]


# -- formatting -----------------------------------------------------------------------------------


def _format(unit: Unit, value: Any) -> str:
    if value is None:
        return ""
    if unit == "count":
        return format_count(value)
    if unit == "flops":
        return format_flops(value)
    if unit == "bytes":
        return format_bytes(value)
    if unit == "size":
        return "x".join(map(str, value))
    if unit == "pixels":
        return " x ".join(map(str, sorted(set(value), key=value.index))) + " px" if value else ""
    if unit == "fraction":
        return f"{value:.2%}"
    return f"{value:.1f} s"


def _format_difference(unit: Unit, difference: Any, first: Any) -> str:
    if difference is None:
        return ""
    if unit == "size":
        return "x".join(f"{d:+d}" for d in difference[1:]) if any(difference) else "same"
    if unit == "pixels":
        return _format(unit, tuple(f"{d:+d}" for d in difference)) if any(difference) else "same"
    if not difference:
        return "same"
    sign = "+" if difference > 0 else "-"
    if unit == "fraction":
        return f"{difference * 100:+.2f} points"
    magnitude = _format(unit, abs(difference))
    relative = f", {difference / first:+.1%}" if first else ""
    return f"{sign}{magnitude}{relative}"


def _cells(comparison: Comparison, metric: Metric) -> list[str]:
    first = comparison.variants[0].value(metric)
    cells = []
    for index, variant in enumerate(comparison.variants):
        text = _format(metric.unit, variant.value(metric))
        if index:
            difference = _format_difference(
                metric.unit, comparison.difference(metric, variant), first
            )
            text += f"\n({difference})" if difference else ""  # a note under the value
        cells.append(text)
    return cells


def _title(comparison: Comparison) -> str:
    title = (
        f"Batch {comparison.batch_size} x {'x'.join(map(str, comparison.input_size))}, "
        f"{comparison.dtype}, optimizer {comparison.optimizer}; differences from the first column "
        "in brackets"
    )
    if comparison.preset:
        trained = comparison.variants[0].training
        config = trained.config if trained else None
        if config is not None:
            title += (
                f". Trained with preset {comparison.preset}: "
                f"{config.image_size}x{config.image_size}, {config.epochs} "
                f"epoch{'s' if config.epochs != 1 else ''}, batch {config.batch_size}"
            )
    return title


def comparison_table(comparison: Comparison) -> TextTable:
    """Every metric a row, every variant a column (right-aligned), the one table every format
    prints."""
    variants = tuple(variant.spec for variant in comparison.variants)
    return TextTable(
        columns=("", *variants),
        numeric=frozenset(variants),
        rows=tuple((metric.label, *_cells(comparison, metric)) for metric in comparison.metrics),
    )


def _notes(comparison: Comparison) -> list[str]:
    return [f"{v.spec}: {v.description}" for v in comparison.variants if v.description]


def print_comparison(comparison: Comparison, *, console: Console | None = None) -> None:
    console = console or wide_console()
    console.print(rich_table(comparison_table(comparison), title=_title(comparison)))
    for note in _notes(comparison):
        console.print(note, highlight=False, markup=False)


def comparison_markdown(comparison: Comparison) -> str:
    lines = [f"**{_title(comparison)}**", "", *markdown_table(comparison_table(comparison))]
    return "\n".join(lines) + "\n"


def comparison_html(comparison: Comparison) -> str:
    """The terminal's table as HTML, for a notebook (`display(comparison)` in Jupyter)."""
    table = comparison_table(comparison)
    return html_table(table, caption=_title(comparison), notes=_notes(comparison))


def comparison_dict(comparison: Comparison) -> dict[str, Any]:
    """Exact numbers (bytes in bytes, FLOPs in FLOPs) and each difference from the first variant."""
    variants = []
    for variant in comparison.variants:
        row: dict[str, Any] = {
            "spec": variant.spec,
            "description": variant.description,
            "last_field_layer": variant.last_field_layer,
        }
        for metric in comparison.metrics:
            value, difference = variant.value(metric), comparison.difference(metric, variant)
            row[metric.key] = list(value) if isinstance(value, tuple) else value
            row[f"{metric.key}_difference"] = (
                list(difference) if isinstance(difference, tuple) else difference
            )
        if variant.training:
            row["training"] = {
                "config": dataclasses.asdict(variant.training.config),
                "output_dir": variant.training.output_dir,
            }
        variants.append(row)
    return {
        "input_size": list(comparison.input_size),
        "batch_size": comparison.batch_size,
        "dtype": comparison.dtype,
        "optimizer": comparison.optimizer,
        "preset": comparison.preset,
        "variants": variants,
    }


def comparison_json(comparison: Comparison) -> str:
    return json_text(comparison_dict(comparison), indent=2)
