"""One self-contained HTML report of a model: the summary table, the rounding explained, the memory
of a training step and of inference, and every chart, inline (no network access: the CSS and the
SVG charts are in the file). It prints on paper and renders in Jupyter (`Report._repr_html_`).

`build_report` takes the results, computed once (`ninlab.studies.report.study_model`), and makes
the chart data from them (`ninlab.viz.charts`); the HTML shows the same objects' numbers in the
tables every format prints, beside the pictures.
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ninlab.analysis.memory_report import MemoryReport
from ninlab.outputs import output_path, write_text_atomically
from ninlab.studies.report import ModelStudy
from ninlab.units import format_bytes, format_count, format_flops
from ninlab.viz.charts import (
    BatchChart,
    Chart,
    FieldChart,
    FlopsChart,
    GeometryChart,
    SavedChart,
    TimelineChart,
    batch_chart,
    chart_svg,
    field_chart,
    flops_chart,
    geometry_chart,
    saved_chart,
    timeline_chart,
)
from ninlab.viz.html import html_table
from ninlab.viz.render import explanation_lines, layer_table
from ninlab.viz.render_memory import breakdown_table, saved_table
from ninlab.viz.render_plan import plan_html

__all__ = ["Report", "ReportCharts", "build_report", "report_path"]


# -- the report -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReportCharts:
    """The data of every chart in the report; None where the model has nothing to draw (no
    conv or pooling layer, or a model fake tensors cannot run, which has no timeline)."""

    geometry: GeometryChart | None
    field: FieldChart | None
    flops: FlopsChart
    train_timeline: TimelineChart | None
    infer_timeline: TimelineChart | None
    saved: SavedChart | None
    batch: BatchChart | None  # None where the study has no batch (`ModelStudy.batch_note`)


@dataclass(frozen=True)
class Report:
    study: ModelStudy
    charts: ReportCharts

    def html(self) -> str:
        """A complete HTML document."""
        return _document(self)

    def _repr_html_(self) -> str:
        """Jupyter: the report's body, with its (scoped) style sheet."""
        return _body(self)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the HTML document, never leaving a half-written file."""
        path = report_path(path)
        write_text_atomically(path, self.html(), durable=False)
        return path


def report_path(path: str | os.PathLike[str], *, option: str = "-o") -> Path:
    """`path` if the report can be written there (`output_path`: an .html file in a writable
    directory), so a command can refuse a bad `option` before the work."""
    return output_path(path, suffixes=(".html", ".htm"), what="report", option=option)


def build_report(study: ModelStudy, *, layer: str | None = None) -> Report:
    """The report of `study`: the data of every chart (`layer` picks the geometry picture's)."""
    summary, train, infer, batch = study.summary, study.train, study.infer, study.batch
    has_windows = any(row.axes for row in summary.layers)
    charts = ReportCharts(
        geometry=geometry_chart(summary, layer=layer)
        if has_windows and len(summary.input_size) == 3
        else None,
        field=field_chart(summary) if any(row.receptive_field for row in summary.layers) else None,
        flops=flops_chart(summary),
        train_timeline=timeline_chart(train) if train.timeline else None,
        infer_timeline=timeline_chart(infer) if infer.timeline else None,
        saved=saved_chart(train) if train.timeline else None,
        batch=None
        if batch is None
        else batch_chart(batch.scaling, batch.fit, model=summary.model, mode=batch.mode),
    )
    return Report(study, charts)


# -- HTML -----------------------------------------------------------------------------------------

# A backslash ending a line continues the rule on the next one: the CSS has no line break there.
_CSS = """
.ninlab-report { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #222;
  line-height: 1.45; max-width: 72rem; margin: 0 auto; padding: 1rem 1.5rem; font-size: 15px; }
.ninlab-report h1 { font-size: 1.6rem; margin: 0.2rem 0; }
.ninlab-report h2 { font-size: 1.25rem; border-bottom: 1px solid #ccc; padding-bottom: 0.2rem; \
margin-top: 2rem; }
.ninlab-report h3 { font-size: 1.05rem; margin-bottom: 0.3rem; }
.ninlab-report .meta, .ninlab-report .note { color: #555; font-size: 0.9rem; }
.ninlab-report .glance { display: grid; \
grid-template-columns: repeat(auto-fill, minmax(13rem, 1fr)); gap: 0.6rem; }
.ninlab-report .glance div { border: 1px solid #ddd; border-radius: 6px; padding: 0.5rem 0.7rem; }
.ninlab-report .glance b { display: block; font-size: 1.15rem; }
.ninlab-report .glance span { color: #555; font-size: 0.85rem; }
.ninlab-report table { border-collapse: collapse; font-size: 0.85rem; margin: 0.5rem 0; }
.ninlab-report th, .ninlab-report td { border-bottom: 1px solid #e3e3e3; padding: 0.2rem 0.5rem; \
text-align: left; vertical-align: top; }
.ninlab-report th { background: #f4f4f4; }
.ninlab-report td:first-child { white-space: nowrap; }
.ninlab-report figure { margin: 1rem 0; }
.ninlab-report figure svg { max-width: 100%; height: auto; display: block; }
.ninlab-report figcaption { color: #555; font-size: 0.85rem; }
.ninlab-report code { font-size: 0.85rem; background: #f6f6f6; padding: 0 0.2rem; }
.ninlab-report ul.explain li { font-family: ui-monospace, Menlo, Consolas, monospace; \
font-size: 0.8rem; }
@media print {
  .ninlab-report { max-width: none; padding: 0; font-size: 11pt; }
  .ninlab-report figure, .ninlab-report tr, .ninlab-report .glance div { break-inside: avoid; }
  .ninlab-report h2 { break-after: avoid; }
  .ninlab-report .ninlab-table { overflow: visible !important; }
}
"""


def _e(text: object) -> str:
    return html.escape(str(text))


def _shape(size: Sequence[int]) -> str:
    return "x".join(map(str, size))


def _figure(chart: Chart | None, key: str, caption: str) -> str:
    if chart is None:
        return ""
    return (
        f'<figure id="chart-{key}">{chart_svg(chart, id_prefix=key)}'
        f"<figcaption>{caption}</figcaption></figure>"
    )


def _glance(report: Report) -> str:
    summary, train, infer = report.study.summary, report.study.train, report.study.infer
    t = summary.totals
    batch = report.study.batch
    items = [
        (format_count(t.parameters), f"parameters ({format_bytes(t.parameter_bytes)})"),
        (format_flops(t.forward_flops), f"forward FLOPs per batch of {summary.batch_size}"),
        (format_flops(t.training_step_flops), "training-step FLOPs (forward + backward)"),
        (format_bytes(train.live_peak_bytes), f"peak tensor memory, {train.spec.title}"),
        (format_bytes(infer.live_peak_bytes), f"peak tensor memory, {infer.spec.title}"),
        (_shape(summary.smallest_input_size or ()) or "no window", "smallest valid input"),
        (format_bytes(train.allocator_peak_bytes), f"allocator peak, {train.spec.title}"),
    ]
    if batch is not None:
        items.append(
            (
                format_count(batch.fit.batch_size),
                f"largest training batch within {format_bytes(batch.fit.budget_bytes)}",
            )
        )
    return (
        '<div class="glance">'
        + "".join(f"<div><b>{_e(v)}</b><span>{_e(k)}</span></div>" for v, k in items)
        + "</div>"
    )


def _layers_section(report: Report) -> str:
    summary = report.study.summary
    table = html_table(layer_table(summary, wide=True))
    t = summary.totals
    totals = (
        f"<p>Parameters: {_e(format_count(t.parameters))} ({_e(format_count(t.weights))} weights "
        f"+ {_e(format_count(t.biases))} biases; {_e(format_count(t.trainable_parameters))} "
        f"trainable), {_e(format_bytes(t.parameter_bytes))}. FLOPs per batch: forward "
        f"{_e(format_flops(t.forward_flops))}, backward {_e(format_flops(t.backward_flops))}, "
        f"training step {_e(format_flops(t.training_step_flops))} (the optimizer's update is not "
        f"counted). Sum of layer outputs: {_e(format_bytes(t.layer_output_bytes))}.</p>"
    )
    return f"<h2>Layers</h2>{table}{totals}"


def _rounding_section(report: Report) -> str:
    summary = report.study.summary
    lines = "".join(f"<li>{_e(line)}</li>" for line in explanation_lines(summary))
    reach = "".join(
        f"<li>Input {_e(r.axis)}: positions {r.first}..{r.last} can influence the output; "
        f"the last {r.never_read} never do (dropped by rounding).</li>"
        for r in summary.input_reach
        if r.never_read
    )
    geometry = report.charts.geometry
    picture = _figure(
        geometry,
        "geometry",
        "The input grid of one layer: every window of the last output row (blue) and column "
        "(green), the last window in bold red, and the real pixels no window reads shaded red. "
        "Windows start at the top/left, one stride apart; whatever does not fill another stride "
        "is left over at the bottom/right. Nothing is cropped at random.",
    )
    return (
        "<h2>Rounding, layer by layer</h2>"
        "<p>PyTorch starts windows at the top/left and drops the remainder at the bottom/right; "
        "an output exists only while its whole window fits (floor).</p>"
        f'<ul class="explain">{lines}</ul>'
        + (f"<ul>{reach}</ul>" if reach else "")
        + picture
        + _figure(
            report.charts.field,
            "field",
            "Receptive field of each conv and pooling layer's output (solid, left axis) and its "
            "jump, the input distance between neighbouring outputs (dotted, right axis).",
        )
    )


def _flops_section(report: Report) -> str:
    return "<h2>FLOPs per layer</h2>" + _figure(
        report.charts.flops,
        "flops",
        _e(report.study.summary.flop_convention)
        + (
            ". The first layer's backward computes only weight gradients: the input batch "
            "needs none."
        ),
    )


def _layer_or_loss(module: str, module_type: str) -> str:
    return f"{module} ({module_type})" if module else "code outside any module (the loss)"


def _peak_text(report: MemoryReport) -> str:
    if report.peak is None or report.allocator is None:
        figures = (
            f"Live tensor peak {report.live_peak_bytes:,} bytes ({report.live_trust.words()}); "
            f"allocator peak {report.allocator_peak_bytes:,} bytes "
            f"({report.allocator_trust.words()})."
        )
        return " ".join(_e(text) for text in (figures, *report.notes))
    peak, allocator = report.peak, report.allocator
    text = (
        f"Live tensor storage peaks at {_e(format_bytes(report.live_peak_bytes))} "
        f"({report.live_peak_bytes:,} bytes) during <code>{_e(peak.op)}</code> in "
        f"{_e(_layer_or_loss(peak.module, peak.module_type))}, {_e(peak.phase)} phase. The "
        f"allocator holds at most {_e(format_bytes(allocator.peak_bytes))} "
        f"({allocator.peak_bytes:,} bytes), during <code>{_e(allocator.op)}</code> in "
        f"{_e(_layer_or_loss(allocator.module, allocator.module_type))}, {_e(allocator.phase)} "
        f"phase ({_e(format_bytes(allocator.workspace_bytes + allocator.rounding_bytes))} beyond "
        f"the live tensors then: {_e(allocator.method)})."
    )
    if allocator.measured:
        text += (
            ' <span class="note">Measured on this CPU, one call each: '
            f"{_e(', '.join(allocator.measured))}.</span>"
        )
    if allocator.unmodelled:
        text += f' <span class="note">Not modelled: {_e("; ".join(allocator.unmodelled))}.</span>'
    return text


def _memory_section(report: Report) -> str:
    train, infer, study = report.study.train, report.study.infer, report.study.batch
    parts = [
        "<h2>Memory</h2>",
        (
            "<p>Predicted op by op on fake tensors (no memory is allocated to predict it), at two "
            "levels: live tensor storage, each storage counted once and split by category below, "
            "and what the allocator holds, which adds the blocks kernels allocate for themselves "
            "(and, on CUDA, block rounding). Not included: memory cached but free, and the CUDA "
            "context.</p>"
        ),
    ]
    for step, key, chart, caption in (
        (
            train,
            "train-timeline",
            report.charts.train_timeline,
            (
                "From zero_grad through forward, loss, backward and the optimizer step (the "
                "second, steady-state step)."
            ),
        ),
        (
            infer,
            "infer-timeline",
            report.charts.infer_timeline,
            "Inference: activations die as soon as the next layer has used them.",
        ),
    ):
        parts.append(f"<h3>{_e(step.spec.title.capitalize())}, batch {step.batch_size}</h3>")
        parts.append(f"<p>{_peak_text(step)}</p>")
        parts.append(html_table(breakdown_table(step)))
        if step.forum is not None:
            parts.append(
                '<p class="note">The forum post\'s rule of thumb gives '
                f"{_e(format_bytes(step.forum.rule_bytes))} ({step.forum.ratio:.2f} x the "
                "prediction).</p>"
            )
        parts.append(_figure(chart, key, caption))
    if report.charts.saved is not None:
        parts.append("<h3>What each layer keeps for backward</h3>")
        parts.append(
            _figure(
                report.charts.saved,
                "saved",
                "A tensor two layers keep (a ReLU's output is the next conv's input) is counted "
                "once, at the layer that made it.",
            )
        )
        parts.append(html_table(saved_table(train)))
    parts.append("<h3>Batch size</h3>")
    if study is None:
        parts.append(f"<p>No batch size to show: {_e(report.study.batch_note)}.</p>")
        return "".join(parts)
    fit, scaling = study.fit, study.scaling
    parts.append(
        "<p>Training peak (what the allocator holds) = "
        f"{_e(format_bytes(round(scaling.fixed_bytes)))} + "
        f"{_e(format_bytes(round(scaling.per_sample_bytes)))} per sample ({scaling.trust.kind} "
        f"at batch {scaling.batch_sizes[0]} and {scaling.batch_sizes[1]}; at batch "
        f"{scaling.check_batch_size} the line is "
        f"{'exact' if scaling.linear else 'off: the peak moves to another op'}). The largest "
        f"batch within {_e(format_bytes(fit.budget_bytes))} is "
        f"<b>{'at most ' if fit.lower_bound else ''}{fit.batch_size:,}</b> "
        f"({'at least ' if fit.lower_bound else ''}{_e(format_bytes(fit.peak_bytes))}; batch "
        f"{fit.batch_size + 1:,} needs {_e(_over(fit.next_peak_bytes, fit.budget_bytes))})"
        f"{'' if fit.trust.exact else f'; the peak is {_e(fit.trust.words())}'}.</p>"
    )
    parts.append(
        _figure(
            report.charts.batch,
            "batch",
            "Every point is an exact prediction; the line is fitted through two of them.",
        )
    )
    if study.plan is not None:
        parts.append(plan_html(study.plan))
    return "".join(parts)


def _body(report: Report) -> str:
    summary = report.study.summary
    header = (
        f"<h1>{_e(summary.model)}</h1>"
        f'<p class="meta">Batch {summary.batch_size} x {_e(_shape(summary.input_size))}, '
        f"{_e(summary.dtype)}, optimizer {_e(report.study.train.spec.optimizer_name)}. Made by "
        "ninlab from one trace of the model on fake tensors.</p>"
    )
    return (
        f'<div class="ninlab-report"><style>{_CSS}</style>{header}{_glance(report)}'
        f"{_layers_section(report)}{_rounding_section(report)}{_flops_section(report)}"
        f"{_memory_section(report)}</div>"
    )


def _document(report: Report) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>ninlab report: {_e(report.study.summary.model)}</title></head>"
        f"<body>{_body(report)}</body></html>\n"
    )


def _over(needed: int, budget: int) -> str:
    """`needed` in words, in bytes as well where rounding would show it equal to `budget`
    ("8.00 GiB" against an 8.00 GiB budget), so the reason it does not fit is visible."""
    if format_bytes(needed) != format_bytes(budget):
        return format_bytes(needed)
    return f"{format_bytes(needed)}: {needed:,} bytes, over the budget's {budget:,}"
