"""Charts of the accountant's results: what each picture shows is a small frozen dataclass built
from a results object in one place (`*_chart` functions), and one drawing function per dataclass.

The report shows the same dataclasses' numbers beside the pictures, so a chart can never disagree
with the table next to it; drawing code only places what it is given and computes nothing.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from ninlab.agg import matplotlib  # Agg, and $MPLBACKEND checked, before pyplot

# isort: split
import matplotlib.pyplot as plt
from matplotlib import patches, ticker
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ninlab.analysis.batch import BatchFit, BatchScaling
from ninlab.analysis.categories import CATEGORIES, CATEGORY_COLORS
from ninlab.analysis.memory_report import MemoryReport
from ninlab.analysis.summary import LayerSummary, Summary
from ninlab.errors import NinlabError
from ninlab.outputs import atomic_write, output_path
from ninlab.units import BYTE_UNITS, FLOP_UNITS, format_bytes, format_count, format_flops

if TYPE_CHECKING:
    from ninlab.studies.compare import Comparison
    from ninlab.studies.memory import BatchStudy

__all__ = [
    "CHART_BUILDERS",
    "AxisPicture",
    "BatchChart",
    "Chart",
    "CompareChart",
    "ComparePanel",
    "FieldChart",
    "FlopsChart",
    "GeometryChart",
    "SavedChart",
    "TimelineChart",
    "batch_chart",
    "chart_of_kind",
    "chart_path",
    "chart_png",
    "chart_svg",
    "compare_chart",
    "draw",
    "field_chart",
    "flops_chart",
    "geometry_chart",
    "save_chart",
    "saved_chart",
    "timeline_chart",
]


# -- the geometry picture: which input rows and columns a layer's windows read ---------------------


@dataclass(frozen=True)
class AxisPicture:
    """One spatial axis of a layer's input, in the coordinates of `ninlab.analysis.geometry` (real
    input at 0..input_size-1, padding before it negative)."""

    axis: str  # "height" or "width"
    input_size: int
    padding_before: int
    padding_after: int
    output_size: int
    textbook_output: float
    windows: tuple[tuple[int, int], ...]  # first and last position of every window, in order
    unread: tuple[int, ...]  # real positions no window reads


class _Picture:
    """A chart draws itself under a Jupyter cell: `_repr_png_` gives the PNG `save_chart` writes."""

    def _repr_png_(self) -> bytes:
        return chart_png(self)  # every subclass is one of the Chart dataclasses


@dataclass(frozen=True)
class GeometryChart(_Picture):
    model: str
    layer: str
    layer_type: str
    height: AxisPicture
    width: AxisPicture
    explanation: str  # the layer's arithmetic, as `ninlab summary --explain` prints it


def _axis_picture(axis: str, layer: LayerSummary, index: int) -> AxisPicture:
    window = layer.axes[index]
    params = window.params
    # Window i starts i strides after the first padded position (see
    # ninlab.analysis.geometry's docstring).
    starts = [i * params.stride - params.padding_before for i in range(window.output_size)]
    return AxisPicture(
        axis=axis,
        input_size=window.input_size,
        padding_before=params.padding_before,
        padding_after=params.padding_after,
        output_size=window.output_size,
        textbook_output=window.textbook_output,
        windows=tuple((start, start + params.span - 1) for start in starts),
        unread=window.unread_positions(),
    )


def geometry_chart(summary: Summary, *, layer: str | None = None) -> GeometryChart:
    """The picture of one conv or pooling layer (by default the first whose size is rounded,
    down or up, else the first window layer)."""
    window_layers = [row for row in summary.layers if row.axes]
    if len(summary.input_size) != 3:
        raise NinlabError(
            "the geometry picture needs two spatial axes (input CxHxW), not "
            f"{len(summary.input_size) - 1}"
        )
    if not window_layers:
        raise NinlabError(f"{summary.model} has no convolution or pooling layer to draw")
    if layer is None:
        rounded = (
            row
            for row in window_layers
            if any(w.textbook_output != w.output_size or w.unread_real for w in row.axes)
        )
        chosen = next(rounded, window_layers[0])
    else:
        chosen = next((row for row in window_layers if row.name == layer), None)
        if chosen is None:
            raise NinlabError(
                f"layer {layer!r} is not a convolution or pooling layer of {summary.model}; "
                f"choose one of {', '.join(row.name for row in window_layers)}"
            )
    return GeometryChart(
        model=summary.model,
        layer=chosen.name,
        layer_type=chosen.type,
        height=_axis_picture("height", chosen, 0),
        width=_axis_picture("width", chosen, 1),
        explanation=chosen.explanation,
    )


# -- receptive field growth ------------------------------------------------------------------------


@dataclass(frozen=True)
class FieldChart(_Picture):
    """Receptive field of every conv and pooling layer's output, in network-input pixels."""

    model: str
    input_size: tuple[int, ...]  # spatial sizes of the network input
    layers: tuple[str, ...]
    layer_types: tuple[str, ...]
    sizes: tuple[tuple[int, ...], ...]  # per layer, one field size per spatial axis
    jumps: tuple[tuple[int, ...], ...]  # per layer, the distance between neighbouring outputs


def field_chart(summary: Summary) -> FieldChart:
    rows = [row for row in summary.layers if row.is_leaf and row.receptive_field]
    if not rows:
        raise NinlabError(
            f"{summary.model} has no convolution or pooling layer with a receptive field to draw"
        )
    return FieldChart(
        model=summary.model,
        input_size=summary.input_size[1:],
        layers=tuple(row.name for row in rows),
        layer_types=tuple(row.type for row in rows),
        sizes=tuple(tuple(f.size for f in row.receptive_field or ()) for row in rows),
        jumps=tuple(tuple(f.jump for f in row.receptive_field or ()) for row in rows),
    )


# -- FLOPs per layer -------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlopsChart(_Picture):
    """Forward and backward FLOPs of every leaf layer that has any (see `convention`); an
    inference's summary has no backward, and its chart shows none."""

    model: str
    mode: str  # "train" or "infer"
    batch_size: int
    layers: tuple[str, ...]
    layer_types: tuple[str, ...]
    forward_flops: tuple[int, ...]
    backward_flops: tuple[int, ...]
    total_forward_flops: int
    total_backward_flops: int
    convention: str


def flops_chart(summary: Summary) -> FlopsChart:
    rows = [
        row for row in summary.layers if row.is_leaf and (row.forward_flops or row.backward_flops)
    ]
    return FlopsChart(
        model=summary.model,
        mode="train" if summary.loss else "infer",  # a summary names its loss where it trains
        batch_size=summary.batch_size,
        layers=tuple(row.name for row in rows),
        layer_types=tuple(row.type for row in rows),
        forward_flops=tuple(row.forward_flops for row in rows),
        backward_flops=tuple(row.backward_flops for row in rows),
        total_forward_flops=summary.totals.forward_flops,
        total_backward_flops=summary.totals.backward_flops,
        convention=summary.flop_convention,
    )


# -- memory: the step op by op, what each layer keeps for backward, batch size against a budget ----


@dataclass(frozen=True)
class TimelineChart(_Picture):
    """Bytes alive after each op of one step, by category (only categories that hold any bytes)."""

    model: str
    mode: str  # "train" or "infer"
    batch_size: int
    step_name: str  # e.g. "training step (sgd)" or "inference (no_grad)"
    categories: tuple[str, ...]
    series_bytes: tuple[tuple[int, ...], ...]  # per category, one value per op
    total_bytes: tuple[int, ...]  # per op, all categories
    allocator_bytes: tuple[int, ...]  # per op, what the allocator holds (kernel workspace included)
    phases: tuple[tuple[str, int, int], ...]  # (phase, first op, last op)
    peak_op: int
    peak_bytes: int  # the live-storage peak
    peak_label: (
        str  # the op and the layer running it, e.g. "threshold_backward in 4.5 (ReLU), backward"
    )
    allocator_peak_op: int
    allocator_peak_bytes: int


def timeline_chart(report: MemoryReport) -> TimelineChart:
    if report.timeline is None or report.peak is None or report.allocator is None:
        raise NinlabError(
            f"{report.model} could not be traced on fake tensors, so its memory has no op-by-op "
            "timeline to draw; see the report's notes for the measured peak"
        )
    timeline, peak = report.timeline, report.peak
    categories = tuple(name for name in CATEGORIES if any(timeline.series(name)))
    module = peak.module or "outside any module"
    return TimelineChart(
        model=report.model,
        mode=report.spec.mode,
        batch_size=report.batch_size,
        step_name=report.spec.title,
        categories=categories,
        series_bytes=tuple(timeline.series(name) for name in categories),
        total_bytes=timeline.totals(),
        allocator_bytes=timeline.allocator_totals(),
        phases=tuple((span.phase, span.first_op, span.last_op) for span in timeline.phases),
        peak_op=peak.step_op,
        peak_bytes=report.live_peak_bytes,
        peak_label=(
            f"{peak.op.removeprefix('aten.').removesuffix('.default')} in {module}"
            f"{f' ({peak.module_type})' if peak.module_type else ''}, {peak.phase}"
        ),
        allocator_peak_op=report.allocator.step_op,
        allocator_peak_bytes=report.allocator.peak_bytes,
    )


@dataclass(frozen=True)
class SavedChart(_Picture):
    """Bytes each layer keeps for backward, split by why (`SavedRow.reason`); every storage is
    counted once, at the row the prediction counts it (`counted_bytes`)."""

    model: str
    batch_size: int
    layers: tuple[
        str, ...
    ]  # in forward order, as `SavedLayer.layer` names them ("(model)", "(loss)")
    layer_types: tuple[str, ...]
    reasons: tuple[str, ...]
    bytes_by_reason: tuple[tuple[int, ...], ...]  # per reason, one value per layer
    layer_bytes: tuple[int, ...]  # per layer, all reasons
    total_bytes: int


def saved_chart(report: MemoryReport) -> SavedChart:
    if report.spec.mode != "train":
        raise NinlabError(
            "only a training step keeps tensors for backward; predict with mode='train'"
        )
    layers = report.saved_by_layer()
    by_reason: dict[str, dict[str, int]] = {}  # reason -> layer -> bytes, in forward order
    for row in report.saved:
        if row.counted_bytes:
            kept = by_reason.setdefault(row.reason, {})
            kept[row.module] = kept.get(row.module, 0) + row.counted_bytes
    return SavedChart(
        model=report.model,
        batch_size=report.batch_size,
        layers=tuple(layer.layer for layer in layers),
        layer_types=tuple(layer.module_type if layer.module else "" for layer in layers),
        reasons=tuple(by_reason),
        bytes_by_reason=tuple(
            tuple(kept.get(layer.module, 0) for layer in layers) for kept in by_reason.values()
        ),
        layer_bytes=tuple(layer.counted_bytes for layer in layers),
        total_bytes=report.saved_total_bytes,
    )


@dataclass(frozen=True)
class BatchChart(_Picture):
    """Predicted peaks at a few batch sizes, the line through them, a budget and the largest
    batch under it; every point is an exact prediction."""

    model: str
    mode: str
    level: str  # "allocator" (what runs out) or "live" (tensor storage alone)
    batch_sizes: tuple[int, ...]  # sorted, each once
    peaks_bytes: tuple[int, ...]
    fixed_bytes: float  # the line: fixed + per_sample x batch (from `BatchScaling`)
    per_sample_bytes: float
    budget_bytes: int
    fit_batch_size: int
    fit_peak_bytes: int
    next_peak_bytes: int  # at fit_batch_size + 1, over the budget


def batch_chart(scaling: BatchScaling, fit: BatchFit, *, model: str, mode: str) -> BatchChart:
    if scaling.level != fit.level:
        raise NinlabError(
            f"the line ({scaling.level} level) and the fit ({fit.level} level) must count the "
            "same memory"
        )
    points = dict(zip(scaling.batch_sizes, scaling.peaks_bytes))
    points[scaling.check_batch_size] = scaling.check_peak_bytes
    points[fit.batch_size] = fit.peak_bytes
    points[fit.batch_size + 1] = fit.next_peak_bytes
    sizes = tuple(sorted(points))
    return BatchChart(
        model=model,
        mode=mode,
        level=fit.level,
        batch_sizes=sizes,
        peaks_bytes=tuple(points[size] for size in sizes),
        fixed_bytes=scaling.fixed_bytes,
        per_sample_bytes=scaling.per_sample_bytes,
        budget_bytes=fit.budget_bytes,
        fit_batch_size=fit.batch_size,
        fit_peak_bytes=fit.peak_bytes,
        next_peak_bytes=fit.next_peak_bytes,
    )


# -- variants side by side -------------------------------------------------------------------------


@dataclass(frozen=True)
class ComparePanel:
    label: str
    unit: str  # a `ninlab.studies.compare.Metric` unit
    values: tuple[float, ...]  # one per variant, in the comparison's order


@dataclass(frozen=True)
class CompareChart(_Picture):
    title: str
    variants: tuple[str, ...]
    panels: tuple[ComparePanel, ...]


def compare_chart(comparison: Comparison) -> CompareChart:
    """One panel per metric of the comparison table; sizes and fields along the height axis."""
    panels = []
    for metric in comparison.metrics:
        values = [variant.value(metric) for variant in comparison.variants]
        if metric.unit == "size":
            values, label = [value[1] for value in values], f"{metric.label}, height"
        elif metric.unit == "pixels":
            values, label = (
                [value[0] if value else 0 for value in values],
                f"{metric.label}, height",
            )
        else:
            label = metric.label
        panels.append(ComparePanel(label, metric.unit, tuple(values)))
    return CompareChart(
        title=(
            f"Variants at batch {comparison.batch_size} x "
            f"{'x'.join(map(str, comparison.input_size))}, {comparison.dtype}"
            + (f"; trained with preset {comparison.preset}" if comparison.preset else "")
        ),
        variants=tuple(variant.spec for variant in comparison.variants),
        panels=tuple(panels),
    )


# -- drawing ---------------------------------------------------------------------------------------

_TITLE_SIZE = 10
_FORWARD_COLOR = "#4C72B0"
_BACKWARD_COLOR = "#DD8452"


class _ScaledLocator(ticker.Locator):
    """Round tick values in one unit (a power of 1024 bytes or of 1000 FLOPs), so that labels read
    '256.00 MiB' or '1.50 GiB' rather than '268435456' or '214.75 MiB'."""

    def __init__(self, unit_sizes: Sequence[int], *, binary: bool) -> None:
        self.unit_sizes = unit_sizes
        self.binary = binary

    def __call__(self) -> Sequence[float]:
        low, high = self.axis.get_view_interval()
        return self.tick_values(low, high)

    def tick_values(self, vmin: float, vmax: float) -> Sequence[float]:
        largest = max(abs(vmin), abs(vmax))
        unit = next((size for size in self.unit_sizes if largest >= size), 1)
        # Below three units the steps are fractions of the unit: with binary units only quarters
        # and halves (256 MiB, 512 MiB) are round numbers in the unit below.
        steps = (
            [2.5, 5, 10] if self.binary and largest < 3 * unit and unit > 1 else [1, 2, 2.5, 5, 10]
        )
        locator = ticker.MaxNLocator(nbins=6, steps=steps)
        return [value * unit for value in locator.tick_values(vmin / unit, vmax / unit)]


class _UnitFormatter(ticker.Formatter):
    """Every tick of an axis in one unit, its largest tick's ("768 MiB" beside "1,024 MiB", never
    beside "1.00 GiB"), with as few decimals as the ticks need; zero is "0 B" or "0 FLOP"."""

    def __init__(self, units: Sequence[tuple[str, int]], base: str) -> None:
        self.units, self.base = units, base
        self.unit, self.size, self.decimals = base, 1, 0

    def set_locs(self, locs: Sequence[float]) -> None:
        super().set_locs(locs)
        largest = max((abs(value) for value in locs), default=0)
        self.unit, self.size = next(
            ((unit, size) for unit, size in self.units if largest >= size), (self.base, 1)
        )
        scaled = [value / self.size for value in locs]
        self.decimals = next(
            (d for d in (0, 1, 2) if all(abs(round(v, d) - v) < 1e-6 for v in scaled)), 2
        )

    def __call__(self, value: float, pos: int | None = None) -> str:
        if value == 0:
            return f"0 {self.base}"
        return f"{value / self.size:,.{self.decimals}f} {self.unit}"


def _byte_axis(axis: matplotlib.axis.Axis) -> None:
    axis.set_major_locator(_ScaledLocator([size for _, size in BYTE_UNITS], binary=True))
    axis.set_major_formatter(_UnitFormatter(BYTE_UNITS, "B"))


def _flop_axis(axis: matplotlib.axis.Axis) -> None:
    axis.set_major_locator(_ScaledLocator([size for _, size in FLOP_UNITS], binary=False))
    axis.set_major_formatter(_UnitFormatter(FLOP_UNITS, "FLOP"))


def _draw_geometry(chart: GeometryChart) -> Figure:
    figure, (whole, corner) = plt.subplots(
        1, 2, figsize=(11, 5.6), gridspec_kw={"width_ratios": [1, 1]}
    )
    height, width = chart.height, chart.width
    for axes, zoomed in ((whole, False), (corner, True)):
        _draw_grid(axes, height, width, zoomed=zoomed)
    whole.set_title("whole input", fontsize=9)
    corner.set_title("bottom-right corner, one square per pixel", fontsize=9)
    title = (
        f"{chart.model}, layer {chart.layer} ({chart.layer_type}): input "
        f"{height.input_size}x{width.input_size} -> output "
        f"{height.output_size}x{width.output_size}"
    )
    figure.suptitle(title, fontsize=_TITLE_SIZE)
    handles = [
        patches.Patch(facecolor="#F2F2F2", edgecolor="#999999", label="padding / past the edge"),
        patches.Patch(
            facecolor="none", edgecolor="#1F77B4", label="windows of the last output row"
        ),
        patches.Patch(
            facecolor="none", edgecolor="#2CA02C", label="windows of the last output column"
        ),
        patches.Patch(facecolor="none", edgecolor="#D62728", linewidth=2, label="last window"),
        patches.Patch(facecolor="#D62728", alpha=0.35, label="real pixels never read"),
    ]
    figure.legend(handles=handles, loc="lower center", ncol=5, fontsize=8, frameon=False)
    figure.text(0.5, 0.075, _wrap(chart.explanation, 150), ha="center", va="center", fontsize=8)
    figure.tight_layout(rect=(0, 0.12, 1, 0.95))
    return figure


def _wrap(text: str, width: int) -> str:
    lines, line = [], ""
    for word in text.split(" "):
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return "\n".join([*lines, line])


def _draw_grid(axes: Axes, height: AxisPicture, width: AxisPicture, *, zoomed: bool) -> None:
    """x is the width axis (columns), y the height axis (rows), row 0 at the top as in an image."""
    # Padded extent, widened to include a ceil-mode window that runs past the padded edge.
    x_low, x_high = (
        -width.padding_before,
        max(width.input_size + width.padding_after, width.windows[-1][1] + 1),
    )
    y_low, y_high = (
        -height.padding_before,
        max(height.input_size + height.padding_after, height.windows[-1][1] + 1),
    )
    axes.add_patch(
        patches.Rectangle(
            (x_low, y_low), x_high - x_low, y_high - y_low, facecolor="#F2F2F2", edgecolor="#999999"
        )
    )
    axes.add_patch(
        patches.Rectangle(
            (0, 0),
            width.input_size,
            height.input_size,
            facecolor="white",
            edgecolor="black",
            linewidth=1.2,
        )
    )
    for row in height.unread:
        axes.add_patch(
            patches.Rectangle(
                (0, row), width.input_size, 1, facecolor="#D62728", alpha=0.35, linewidth=0
            )
        )
    for column in width.unread:
        axes.add_patch(
            patches.Rectangle(
                (column, 0), 1, height.input_size, facecolor="#D62728", alpha=0.35, linewidth=0
            )
        )
    last_row, last_column = height.windows[-1], width.windows[-1]
    for index, columns in enumerate(width.windows[:-1]):
        axes.add_patch(_window(columns, last_row, "#1F77B4", index))
    for index, rows in enumerate(height.windows[:-1]):
        axes.add_patch(_window(last_column, rows, "#2CA02C", index))
    axes.add_patch(_window(last_column, last_row, "#D62728", 0, last=True))
    if not zoomed and max(x_high - x_low, y_high - y_low) <= 64:
        _pixel_grid(axes, x_low, x_high, y_low, y_high)
    if zoomed:
        # Enough to show the last three windows, the padding and every trailing unread pixel.
        x_from = max(x_low, width.windows[max(len(width.windows) - 3, 0)][0] - 1)
        y_from = max(y_low, height.windows[max(len(height.windows) - 3, 0)][0] - 1)
        side = max(x_high - x_from, y_high - y_from)
        axes.set_xlim(x_high - side, x_high)
        axes.set_ylim(y_high, y_high - side)
        axes.xaxis.set_major_locator(ticker.MaxNLocator(integer=True, nbins=8))
        axes.yaxis.set_major_locator(ticker.MaxNLocator(integer=True, nbins=8))
        _pixel_grid(axes, x_high - side, x_high, y_high - side, y_high)
    else:
        axes.set_xlim(x_low, x_high)
        axes.set_ylim(y_high, y_low)
    axes.set_aspect("equal")
    axes.set_xlabel("input column (pixels; grey: padding or past the edge)")
    axes.set_ylabel("input row (pixels)")


def _pixel_grid(axes: Axes, x_low: int, x_high: int, y_low: int, y_high: int) -> None:
    axes.set_xticks(range(x_low, x_high + 1), minor=True)
    axes.set_yticks(range(y_low, y_high + 1), minor=True)
    axes.grid(which="minor", color="#CCCCCC", linewidth=0.4)
    axes.tick_params(which="minor", length=0)


def _window(
    columns: tuple[int, int], rows: tuple[int, int], color: str, index: int, *, last: bool = False
) -> patches.Rectangle:
    """A translucent box, so overlapping windows show darker; neighbours are inset by different
    amounts so that edges falling on the same pixel border stay apart. The last window is bold."""
    inset = 0.0 if last else (0.08, 0.2, 0.32)[index % 3]
    return patches.Rectangle(
        (columns[0] + inset, rows[0] + inset),
        columns[1] - columns[0] + 1 - 2 * inset,
        rows[1] - rows[0] + 1 - 2 * inset,
        facecolor="none" if last else matplotlib.colors.to_rgba(color, 0.07),
        edgecolor=matplotlib.colors.to_rgba(color, 0.9),
        linewidth=2.2 if last else 0.8,
    )


def _draw_field(chart: FieldChart) -> Figure:
    figure, axes = plt.subplots(figsize=(max(7.0, 0.35 * len(chart.layers) + 3), 4.8))
    positions = range(len(chart.layers))
    axis_names = (
        ("height", "width")
        if len(chart.input_size) == 2
        else tuple(f"axis {i}" for i in range(len(chart.input_size)))
    )
    same = all(len(set(size)) == 1 for size in chart.sizes) and len(set(chart.input_size)) == 1
    shown = [0] if same else range(len(chart.input_size))
    for axis in shown:
        label = "field size" if same else f"field size ({axis_names[axis]})"
        axes.plot(
            positions, [size[axis] for size in chart.sizes], "o-", color=_FORWARD_COLOR, label=label
        )
        axes.axhline(
            chart.input_size[axis],
            color="#555555",
            linestyle="--",
            linewidth=1,
            label=f"input {axis_names[axis] if not same else 'size'} ({chart.input_size[axis]} px)",
        )
    jumps = axes.twinx()
    for axis in shown:
        jumps.step(
            positions,
            [jump[axis] for jump in chart.jumps],
            where="mid",
            color=_BACKWARD_COLOR,
            linestyle=":",
            label="jump" if same else f"jump ({axis_names[axis]})",
        )
    jumps.set_ylabel("jump: input pixels between neighbouring outputs", color=_BACKWARD_COLOR)
    jumps.set_ylim(bottom=0)
    axes.set_ylim(bottom=0)
    axes.set_xticks(list(positions))
    axes.set_xticklabels(
        [f"{name} {kind}" for name, kind in zip(chart.layers, chart.layer_types)],
        rotation=60,
        ha="right",
        fontsize=8,
    )
    axes.set_xlabel("layer (conv and pooling, in forward order)")
    axes.set_ylabel("receptive field (input pixels)")
    axes.grid(True, axis="y", alpha=0.3)
    lines = axes.get_legend_handles_labels()
    more = jumps.get_legend_handles_labels()
    axes.legend(lines[0] + more[0], lines[1] + more[1], loc="upper left", fontsize=8)
    axes.set_title(f"{chart.model}: receptive field of each layer's output", fontsize=_TITLE_SIZE)
    figure.tight_layout()
    return figure


def _draw_flops(chart: FlopsChart) -> Figure:
    count = len(chart.layers)
    figure, axes = plt.subplots(figsize=(8.5, max(3.0, 0.32 * count + 1.8)))
    positions = list(range(count))
    series = [("forward", chart.forward_flops, _FORWARD_COLOR)]
    if chart.mode == "train":
        series.append(("backward", chart.backward_flops, _BACKWARD_COLOR))
    bar = 0.8 / len(series)
    for index, (label, flops, color) in enumerate(series):
        offset = (index - (len(series) - 1) / 2) * bar
        places = [position + offset for position in positions]
        axes.barh(places, flops, height=bar, color=color, label=label)
        for place, value in zip(places, flops):
            axes.text(value, place, f" {format_flops(value)}", va="center", fontsize=6.5)
    axes.set_xlim(0, max((max(flops, default=0) for _, flops, _ in series), default=0) * 1.2 or 1)
    axes.set_yticks(positions)
    axes.set_yticklabels(
        [f"{name} {kind}" for name, kind in zip(chart.layers, chart.layer_types)], fontsize=8
    )
    axes.invert_yaxis()  # first layer on top, as in the summary table
    _flop_axis(axes.xaxis)
    axes.set_xlabel(f"FLOPs per batch of {chart.batch_size} (2 per multiply-accumulate)")
    axes.set_ylabel("layer")
    axes.grid(True, axis="x", alpha=0.3)
    axes.legend(loc="lower right", fontsize=8)
    totals = f"total forward {format_flops(chart.total_forward_flops)}, " + (
        f"backward {format_flops(chart.total_backward_flops)}"
        if chart.mode == "train"
        else "an inference: no backward"
    )
    axes.set_title(f"{chart.model}: FLOPs per layer ({totals})", fontsize=_TITLE_SIZE)
    figure.tight_layout()
    return figure


def _words(name: str) -> str:
    return name.replace("_", " ")


def _draw_timeline(chart: TimelineChart) -> Figure:
    figure, axes = plt.subplots(figsize=(11, 5.2))
    positions = range(len(chart.total_bytes))
    axes.stackplot(
        positions,
        chart.series_bytes,
        labels=[_words(name) for name in chart.categories],
        colors=[CATEGORY_COLORS[name] for name in chart.categories],
        alpha=0.85,
    )
    axes.plot(positions, chart.total_bytes, color="black", linewidth=0.8, label="total alive")
    axes.plot(
        positions,
        chart.allocator_bytes,
        color="black",
        linestyle=":",
        linewidth=1,
        label="allocator holds\n(kernel workspace too)",
    )
    axes.plot(
        [chart.allocator_peak_op], [chart.allocator_peak_bytes], "v", color="#555555", markersize=7
    )
    axes.annotate(
        f"allocator {format_bytes(chart.allocator_peak_bytes)}",
        xy=(chart.allocator_peak_op, chart.allocator_peak_bytes),
        xytext=(0, 8),
        textcoords="offset points",
        ha="center",
        fontsize=7,
        color="#333333",
    )
    above = matplotlib.transforms.blended_transform_factory(axes.transData, axes.transAxes)
    for phase, first, last in chart.phases:
        if first:
            axes.axvline(first - 0.5, color="#333333", linestyle="--", linewidth=0.8)
        narrow = last - first < 0.06 * len(positions)
        axes.text(
            (first + last) / 2,
            1.01,
            _words(phase),
            transform=above,
            ha="center" if not narrow else "left",
            va="bottom",
            fontsize=8,
            rotation=60 if narrow else 0,
            rotation_mode="anchor",
        )
    axes.plot([chart.peak_op], [chart.peak_bytes], "v", color="#D62728", markersize=9)
    right_half = chart.peak_op > len(positions) / 2
    axes.annotate(
        f"live peak {format_bytes(chart.peak_bytes)}\n{chart.peak_label}",
        xy=(chart.peak_op, chart.peak_bytes),
        # In the empty band at the top (the axis ends at 1.25 x the highest peak, above the
        # allocator's label), just beside the peak on the side with room: a short arrow, never
        # one across the chart.
        xytext=(chart.peak_op + (-0.03 if right_half else 0.03) * len(positions), 0.92),
        textcoords=above,
        ha="right" if right_half else "left",
        va="center",
        fontsize=8,
        arrowprops={"arrowstyle": "->", "color": "#D62728"},
        bbox={"boxstyle": "round", "facecolor": "white", "edgecolor": "#D62728"},
    )
    top = max(chart.peak_bytes, chart.allocator_peak_bytes) * 1.25
    axes.set_xlim(-0.5, len(positions) - 0.5)
    axes.set_ylim(0, top)
    _byte_axis(axes.yaxis)
    axes.set_xlabel("op of the step, in the order it ran (aten ops)")
    axes.set_ylabel("memory alive after the op")
    axes.grid(True, axis="y", alpha=0.3)
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    axes.set_title(
        f"{chart.model}: memory during one {chart.step_name}, batch {chart.batch_size} "
        "(live tensor storage, stacked by category)",
        fontsize=_TITLE_SIZE,
        pad=42,
    )
    figure.tight_layout()
    return figure


def _short_reason(reason: str) -> str:
    """'conv keeps its input, to compute the weight gradient' -> 'conv keeps its input'."""
    return re.split(r"[,:(]", reason, maxsplit=1)[0].strip()


def _draw_saved(chart: SavedChart) -> Figure:
    count = len(chart.layers)
    figure, axes = plt.subplots(figsize=(10, max(3.2, 0.3 * count + 2.2)))
    positions = list(range(count))
    left = [0] * count
    palette = plt.get_cmap("tab10")
    for index, (reason, values) in enumerate(zip(chart.reasons, chart.bytes_by_reason)):
        axes.barh(
            positions,
            values,
            left=left,
            height=0.7,
            color=palette(index % 10),
            label=_short_reason(reason),
        )
        left = [a + b for a, b in zip(left, values)]  # where the next segment of each bar starts
    for position, nbytes in zip(positions, chart.layer_bytes):
        axes.text(nbytes, position, f" {format_bytes(nbytes)}", va="center", fontsize=7)
    axes.set_xlim(0, max(chart.layer_bytes) * 1.18)
    axes.set_yticks(positions)
    axes.set_yticklabels(
        [f"{name} {kind}".strip() for name, kind in zip(chart.layers, chart.layer_types)],
        fontsize=8,
    )
    axes.invert_yaxis()
    _byte_axis(axes.xaxis)
    axes.set_xlabel(f"bytes kept for backward, batch {chart.batch_size}")
    axes.set_ylabel("layer (forward order)")
    axes.grid(True, axis="x", alpha=0.3)
    axes.legend(loc="lower right", fontsize=8)
    axes.set_title(
        f"{chart.model}: what each layer keeps for backward (total "
        f"{format_bytes(chart.total_bytes)}; a tensor two layers keep counts once)",
        fontsize=_TITLE_SIZE,
    )
    figure.tight_layout()
    return figure


def _draw_batch(chart: BatchChart) -> Figure:
    figure, axes = plt.subplots(figsize=(9, 5))
    axes.axline(
        (0, chart.fixed_bytes),
        slope=chart.per_sample_bytes,
        color=_FORWARD_COLOR,
        linewidth=1,
        label=(
            f"{format_bytes(round(chart.fixed_bytes))} + "
            f"{format_bytes(round(chart.per_sample_bytes))} per sample"
        ),
    )
    axes.plot(
        chart.batch_sizes,
        chart.peaks_bytes,
        "o",
        color=_FORWARD_COLOR,
        label="predicted peak (exact)",
    )
    axes.axhline(
        chart.budget_bytes,
        color="#D62728",
        linestyle="--",
        linewidth=1.2,
        label=f"budget {format_bytes(chart.budget_bytes)}",
    )
    axes.axvline(chart.fit_batch_size, color="#2CA02C", linestyle=":", linewidth=1.2)
    axes.plot(
        [chart.fit_batch_size],
        [chart.fit_peak_bytes],
        "*",
        color="#2CA02C",
        markersize=14,
        label=f"largest batch that fits: {chart.fit_batch_size}",
    )
    axes.annotate(
        f"batch {chart.fit_batch_size}: {format_bytes(chart.fit_peak_bytes)}\n"
        f"batch {chart.fit_batch_size + 1}: {format_bytes(chart.next_peak_bytes)} (over)",
        xy=(chart.fit_batch_size, chart.fit_peak_bytes),
        xytext=(12, -90),
        textcoords="offset points",
        ha="left",
        fontsize=8,
        arrowprops={"arrowstyle": "->", "color": "#2CA02C"},
        bbox={"boxstyle": "round", "facecolor": "white", "edgecolor": "#2CA02C"},
    )
    axes.set_xlim(0, max(chart.batch_sizes) * 1.4)  # room for the note right of the answer
    axes.set_ylim(0, max(chart.budget_bytes, *chart.peaks_bytes) * 1.15)
    _byte_axis(axes.yaxis)
    axes.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    axes.set_xlabel("batch size (samples)")
    axes.set_ylabel(
        f"predicted peak memory, {'training step' if chart.mode == 'train' else 'inference'}"
    )
    axes.grid(True, alpha=0.3)
    axes.legend(loc="upper left", fontsize=8)
    counted = "what the allocator holds" if chart.level == "allocator" else "live tensor storage"
    axes.set_title(
        f"{chart.model}: peak memory against batch size ({counted})", fontsize=_TITLE_SIZE
    )
    figure.tight_layout()
    return figure


# Axis name and value label of each comparison unit (see `ninlab.studies.compare.Metric`).
_UNIT_AXES: dict[str, tuple[str, Callable[[float], str]]] = {
    "count": ("count", lambda value: format_count(round(value))),
    "flops": ("FLOPs per batch", lambda value: format_flops(round(value))),
    "bytes": ("peak memory", lambda value: format_bytes(round(value))),
    "pixels": ("input pixels", lambda value: f"{value:g} px"),
    "size": ("input pixels", lambda value: f"{value:g} px"),
    "fraction": ("test accuracy", lambda value: f"{value:.1%}"),
    "seconds": ("seconds", lambda value: f"{value:.0f} s"),
}


def _draw_compare(chart: CompareChart) -> Figure:
    columns = min(3, len(chart.panels))
    rows = -(-len(chart.panels) // columns)
    figure, grid = plt.subplots(
        rows, columns, figsize=(4.2 * columns, 3.3 * rows + 0.4), squeeze=False
    )
    colors = [plt.get_cmap("tab10")(index % 10) for index in range(len(chart.variants))]
    positions = list(range(len(chart.variants)))
    for axes, panel in zip(grid.flat, chart.panels):
        axes.bar(positions, panel.values, color=colors)
        name, label = _UNIT_AXES[panel.unit]
        for position, value in zip(positions, panel.values):
            axes.text(position, value, label(value), ha="center", va="bottom", fontsize=7)
        axes.set_title(panel.label, fontsize=9)
        axes.set_xticks(positions)
        axes.set_xticklabels(chart.variants, rotation=30, ha="right", fontsize=7)
        axes.set_ylim(0, max(max(panel.values, default=0) * 1.18, 1e-9))
        if panel.unit == "bytes":
            _byte_axis(axes.yaxis)
        elif panel.unit == "flops":
            _flop_axis(axes.yaxis)
        else:
            axes.yaxis.set_major_formatter(
                ticker.FuncFormatter(lambda value, _, label=label: label(value))
            )
        axes.set_ylabel(name, fontsize=8)
        axes.set_xlabel("variant", fontsize=8)
        axes.tick_params(axis="y", labelsize=7)
        axes.grid(True, axis="y", alpha=0.3)
    for axes in list(grid.flat)[len(chart.panels) :]:
        axes.set_visible(False)
    figure.suptitle(chart.title, fontsize=_TITLE_SIZE)
    figure.tight_layout()
    return figure


Chart = (
    GeometryChart | FieldChart | FlopsChart | TimelineChart | SavedChart | BatchChart | CompareChart
)

_DRAWERS: dict[type, Callable[..., Figure]] = {
    GeometryChart: _draw_geometry,
    FieldChart: _draw_field,
    FlopsChart: _draw_flops,
    TimelineChart: _draw_timeline,
    SavedChart: _draw_saved,
    BatchChart: _draw_batch,
    CompareChart: _draw_compare,
}


# How each kind of `ninlab plot` (`ninlab.studies.charts.CHART_KINDS`) is drawn from its source.
CHART_BUILDERS: dict[str, Callable[[Any, str | None, str], Chart]] = {
    "geometry": lambda summary, layer, model: geometry_chart(summary, layer=layer),
    "receptive-field": lambda summary, layer, model: field_chart(summary),
    "flops": lambda summary, layer, model: flops_chart(summary),
    "timeline": lambda report, layer, model: timeline_chart(report),
    "saved": lambda report, layer, model: saved_chart(report),
    "batch": lambda study, layer, model: batch_chart(
        study.scaling, study.fit, model=model, mode=study.mode
    ),
}


def chart_of_kind(
    kind: str, source: Summary | MemoryReport | BatchStudy, *, layer: str | None, model: str
) -> Chart:
    """Chart `kind` drawn from `source`, the result `ninlab.studies.charts.chart_source` gives;
    `layer` picks the geometry picture's layer, `model` names the model in the batch chart."""
    return CHART_BUILDERS[kind](source, layer, model)


def draw(chart: Chart) -> Figure:
    """A matplotlib figure of the chart; the caller closes it (`plt.close(figure)`)."""
    return _DRAWERS[type(chart)](chart)


def chart_path(path: str | os.PathLike[str], *, option: str = "-o") -> Path:
    """`path` if a chart can be written there (`output_path`: a .png or .svg in a writable
    directory), so a command can refuse a bad `option` before computing anything."""
    return output_path(path, suffixes=(".png", ".svg"), what="chart", option=option)


def save_chart(chart: Chart, path: str | os.PathLike[str]) -> Path:
    """Write the chart as PNG or SVG (by the file's suffix), never leaving a half-written file."""
    path = chart_path(path)
    suffix = path.suffix.lower()
    figure = draw(chart)
    try:
        with atomic_write(path, durable=False) as out:
            _save_figure(figure, out, suffix)
    finally:
        plt.close(figure)
    return path


def chart_png(chart: Chart) -> bytes:
    """The chart as the PNG `save_chart` writes (what a notebook shows)."""
    figure = draw(chart)
    buffer = io.BytesIO()
    try:
        _save_figure(figure, buffer, ".png")
    finally:
        plt.close(figure)
    return buffer.getvalue()


def _save_figure(figure: Figure, out: BinaryIO, suffix: str) -> None:
    figure.savefig(out, format=suffix[1:], dpi=130, metadata=_METADATA[suffix])


# No dates or versions in the files, so the same results give the same bytes.
_METADATA = {".png": {"Software": None}, ".svg": {"Date": None, "Creator": None}}


def chart_svg(chart: Chart, *, id_prefix: str) -> str:
    """The chart as an inline `<svg>` element for HTML (no XML prolog; ids prefixed with
    `id_prefix`, so several charts in one page never share an id)."""
    figure = draw(chart)
    buffer = io.StringIO()
    try:
        # A fixed salt makes matplotlib's generated ids, so the whole page, the same on every run.
        with plt.rc_context({"svg.fonttype": "none", "svg.hashsalt": id_prefix}):
            figure.savefig(buffer, format="svg", metadata=_METADATA[".svg"])
    finally:
        plt.close(figure)
    text = buffer.getvalue()
    text = text[text.index("<svg") :]
    text = re.sub(r"<metadata>.*?</metadata>", "", text, flags=re.DOTALL)  # RDF boilerplate
    # matplotlib's ids are unique within one file only; prefix them and every reference to them.
    text = re.sub(r'id="([^"]+)"', rf'id="{id_prefix}-\1"', text)
    text = re.sub(r'(href="#|url\(#)([^")]+)', rf"\1{id_prefix}-\2", text)
    # Its style sheet says `*{...}`, which inline would restyle every SVG on the page (a
    # notebook's too): give the chart the id itself and scope the rule to it.
    return text.replace("<svg ", f'<svg id="{id_prefix}" ', 1).replace("*{", f"#{id_prefix} *{{")
