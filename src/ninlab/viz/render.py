"""A `Summary` as a terminal table, JSON, Markdown, CSV or HTML; `ninlab summary`'s output, the
summary with its memory section (`render_memory`) after it. Nothing here computes a number."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rich.console import Console

from ninlab.analysis.memory_report import MemoryReport
from ninlab.analysis.summary import LayerSummary, Summary
from ninlab.outputs import json_text
from ninlab.studies.memory import BatchStudy
from ninlab.units import format_bytes, format_count, format_flops
from ninlab.viz.html import html_table
from ninlab.viz.render_memory import memory_markdown, memory_to_dict, print_memory
from ninlab.viz.table import TextTable, markdown_table, rich_table, wide_console

__all__ = [
    "explanation_lines",
    "layer_table",
    "print_summary",
    "summary_csv",
    "summary_html",
    "summary_json",
    "summary_markdown",
    "summary_to_dict",
]


def _layer_dict(layer: LayerSummary) -> dict[str, Any]:
    return {
        "name": layer.name,
        "type": layer.type,
        "depth": layer.depth,
        "output_shape": list(layer.output_shape) if layer.output_shape else None,
        "output_shapes": [list(shape) for shape in layer.output_shapes],
        "output_bytes": layer.output_bytes,
        "parameters": layer.parameters,
        "weights": layer.weights,
        "biases": layer.biases,
        "trainable_parameters": layer.trainable_parameters,
        "frozen_parameters": layer.frozen_parameters,
        "buffer_elements": layer.buffer_elements,
        "forward_flops": layer.forward_flops,
        "backward_flops": layer.backward_flops,
        "rounding": layer.rounding,
        "explanation": layer.explanation,
        "windows": [
            {
                "input_size": w.input_size,
                "output_size": w.output_size,
                "textbook_output": w.textbook_output,
                "trailing_unread_real": w.trailing_unread_real,
                "trailing_unread_padding": w.trailing_unread_padding,
                "unread_real": w.unread_real,
                "overhang": w.overhang,
            }
            for w in layer.axes
        ],
        "receptive_field": (
            [{"size": f.size, "jump": f.jump, "start": f.start} for f in layer.receptive_field]
            if layer.receptive_field
            else None
        ),
        "is_leaf": layer.is_leaf,
    }


def summary_to_dict(summary: Summary) -> dict[str, Any]:
    """Every number the table shows, under stable names (bytes in bytes, FLOPs in FLOPs)."""
    totals = summary.totals
    return {
        "model": summary.model,
        "input_size": list(summary.input_size),
        "input_sizes": [list(size) for size in summary.input_sizes],
        "input_dtype": summary.input_dtype,
        "batch_size": summary.batch_size,
        "dtype": summary.dtype,
        "loss": summary.loss or None,
        "flop_convention": summary.flop_convention,
        "layers": [_layer_dict(layer) for layer in summary.layers],
        "totals": {name: getattr(totals, name) for name in totals.__dataclass_fields__},
        "smallest_input_size": list(summary.smallest_input_size)
        if summary.smallest_input_size
        else None,
        "input_reach": [
            {
                "axis": r.axis,
                "input_size": r.input_size,
                "first": r.first,
                "last": r.last,
                "count": r.count,
                "never_read": r.never_read,
            }
            for r in summary.input_reach
        ],
    }


def summary_json(
    summary: Summary, *, memory: MemoryReport | None = None, study: BatchStudy | None = None
) -> str:
    """The summary's numbers; with `memory`, its memory section (and `study`'s) under "memory"."""
    data = summary_to_dict(summary)
    if memory is not None:
        data["memory"] = memory_to_dict(memory, study=study)
    return json_text(data, indent=2)


def _shapes(layer: LayerSummary) -> str:
    """Every output's shape: "2x10" for one, "2x20x16, 1x2x16, 1x2x16" for an LSTM's three."""
    return ", ".join("x".join(map(str, shape)) for shape in layer.output_shapes)


def _field(layer: LayerSummary) -> str:
    """The receptive field of a window layer's output, "3 (jump 1)", one number per axis when
    they differ."""
    if not layer.receptive_field:
        return ""
    fields = layer.receptive_field
    if len({(f.size, f.jump) for f in fields}) == 1:
        return f"{fields[0].size} (jump {fields[0].jump})"
    return (
        " x ".join(f"{f.size}" for f in fields)
        + " (jump "
        + " x ".join(f"{f.jump}" for f in fields)
        + ")"
    )


@dataclass(frozen=True)
class _LayerColumn:
    title: str
    numeric: bool
    cell: Callable[[LayerSummary], str]
    wide: bool = False  # only in the wide table (the HTML report has a page's width)


_LAYER_COLUMNS = (
    _LayerColumn(
        "Layer", False, lambda layer: "  " * max(layer.depth - 1, 0) + (layer.name or "(model)")
    ),
    _LayerColumn("Type", False, lambda layer: layer.type),
    _LayerColumn("Output shape", False, _shapes),
    _LayerColumn("Rounding", False, lambda layer: layer.rounding),
    _LayerColumn("Params", True, lambda layer: format_count(layer.parameters)),
    _LayerColumn("Forward FLOPs", True, lambda layer: format_flops(layer.forward_flops)),
    _LayerColumn(
        "Backward FLOPs", True, lambda layer: format_flops(layer.backward_flops), wide=True
    ),
    _LayerColumn("Output size", True, lambda layer: format_bytes(layer.output_bytes)),
    _LayerColumn("Receptive field", True, _field, wide=True),
)


def layer_table(summary: Summary, *, wide: bool = False) -> TextTable:
    """The summary's per-layer table, the one every format prints: the layers under the model (the
    model itself when it has none, a bare nn.LSTM), nested ones indented. `wide` adds each layer's
    backward FLOPs and receptive field."""
    columns = [column for column in _LAYER_COLUMNS if wide or not column.wide]
    layers = summary.layers[1:] or summary.layers
    return TextTable(
        columns=tuple(column.title for column in columns),
        numeric=frozenset(column.title for column in columns if column.numeric),
        rows=tuple(tuple(column.cell(layer) for column in columns) for layer in layers),
    )


def _header(summary: Summary) -> str:
    inputs = " and ".join("x".join(map(str, size)) for size in summary.input_sizes)
    kind = f" {summary.input_dtype} inputs" if summary.input_dtype != summary.dtype else ""
    return f"{summary.model}: batch {summary.batch_size} x {inputs}{kind}, {summary.dtype}"


def _total_lines(summary: Summary) -> list[str]:
    t = summary.totals
    if summary.loss:
        flops = (
            f"FLOPs per batch: forward (inference) {format_flops(t.forward_flops)}, "
            f"backward {format_flops(t.backward_flops)}, "
            f"training step {format_flops(t.training_step_flops)} (optimizer update not counted; "
            f"loss: {summary.loss})"
        )
    else:
        flops = (
            f"FLOPs per batch: forward (inference) {format_flops(t.forward_flops)} (no training "
            "step)"
        )
    if t.uncounted_products:
        flops += f"; leaves out {' and '.join(t.uncounted_products)}, as FlopCounterMode does"
    lines = [
        (
            f"Parameters: {format_count(t.parameters)} ({format_count(t.weights)} weights + "
            f"{format_count(t.biases)} biases; {format_count(t.trainable_parameters)} trainable, "
            f"{format_count(t.frozen_parameters)} frozen), {format_bytes(t.parameter_bytes)}"
        ),
        f"Buffers: {format_count(t.buffer_elements)} elements, {format_bytes(t.buffer_bytes)}",
        flops,
        f"Sum of layer outputs: {format_bytes(t.layer_output_bytes)}",
    ]
    if summary.smallest_input_size:
        lines.append(f"Smallest valid input: {'x'.join(map(str, summary.smallest_input_size))}")
    lines += [
        f"Input {reach.axis}: positions {reach.first}..{reach.last} can influence the output; "
        f"the last {reach.never_read} never do (dropped by rounding)"
        for reach in summary.input_reach
        if reach.never_read
    ]
    lines.append(f"Convention: {summary.flop_convention}")
    return lines


def explanation_lines(summary: Summary) -> list[str]:
    """The arithmetic behind every rounded shape, and each window layer's receptive field."""
    lines = []
    for layer in summary.layers:
        if not layer.axes:
            continue
        field = ""
        if layer.receptive_field:
            f = layer.receptive_field[0]
            field = f" [receptive field {f.size}, jump {f.jump}]"
        lines.append(f"{layer.name} {layer.type}: {layer.explanation}{field}")
    return lines


def print_summary(
    summary: Summary,
    *,
    explain: bool = False,
    memory: MemoryReport | None = None,
    study: BatchStudy | None = None,
    console: Console | None = None,
) -> None:
    """The table and totals (`explain`: the rounding's arithmetic); with `memory`, its memory
    section (and `study`'s) after a blank line."""
    console = console or wide_console()
    console.print(rich_table(layer_table(summary), title=_header(summary)))
    for line in _total_lines(summary):
        console.print(line, highlight=False)
    if explain:
        console.print()
        console.print(
            "Why each size is what it is (PyTorch starts windows at the top/left and drops the "
            "remainder at the bottom/right; nothing is random):",
            highlight=False,
        )
        for line in explanation_lines(summary):
            console.print("  " + line, highlight=False, markup=False)
    if memory is not None:
        console.print()
        print_memory(memory, study=study, console=console)


def summary_markdown(
    summary: Summary,
    *,
    explain: bool = False,
    memory: MemoryReport | None = None,
    study: BatchStudy | None = None,
) -> str:
    out = [f"**{_header(summary)}**", "", *markdown_table(layer_table(summary)), ""]
    out += [f"- {line}" for line in _total_lines(summary)]
    if explain:
        out += ["", "Rounding, layer by layer:", ""] + [
            f"- `{line}`" for line in explanation_lines(summary)
        ]
    text = "\n".join(out) + "\n"
    if memory is not None:
        text += "\n" + memory_markdown(memory, study=study)
    return text


def summary_html(summary: Summary) -> str:
    """The terminal table as HTML, for a notebook (`display(summary)` in Jupyter)."""
    return html_table(layer_table(summary), caption=_header(summary), notes=_total_lines(summary))


def summary_csv(summary: Summary) -> str:
    """One row per module with exact integers (no units), for spreadsheets."""
    fields = [
        "name",
        "type",
        "depth",
        "output_shape",
        "output_bytes",
        "parameters",
        "weights",
        "biases",
        "trainable_parameters",
        "frozen_parameters",
        "buffer_elements",
        "forward_flops",
        "backward_flops",
        "rounding",
        "explanation",
    ]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for layer in summary.layers:
        row = _layer_dict(layer)
        row["output_shape"] = _shapes(layer)
        writer.writerow({key: row[key] for key in fields})
    return buffer.getvalue()
