"""A `MemoryReport` (with its batch study, when asked for: the largest batch, the line around it,
the planner's alternatives) as terminal text, JSON, Markdown or HTML: the memory section of
`ninlab summary`, and the tables the report shows. Nothing here computes a number."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from ninlab.analysis.categories import CATEGORIES, CATEGORY_MEANINGS
from ninlab.analysis.memory_report import MemoryReport, Trust
from ninlab.outputs import json_text
from ninlab.studies.memory import BatchStudy
from ninlab.units import format_bytes
from ninlab.viz.html import html_list, html_table
from ninlab.viz.render_plan import plan_html, plan_lines, plan_markdown, plan_to_dict
from ninlab.viz.table import TextTable, markdown_table, rich_table, wide_console

__all__ = [
    "breakdown_table",
    "memory_html",
    "memory_json",
    "memory_lines",
    "memory_markdown",
    "memory_to_dict",
    "print_memory",
    "saved_table",
]


def _bytes(count: float) -> str:
    return f"{format_bytes(int(count))} ({int(count):,} bytes)"


def _op_place(op: str, phase: str, module: str, module_type: str = "", node: str = "") -> str:
    layer = f"layer {module} ({module_type})" if module else "outside any module"
    return (
        f"{op.removeprefix('aten.').removesuffix('.default')} in {phase}, "
        f"{layer}{f', {node}' if node else ''}"
    )


def _level(report: MemoryReport, level: str) -> str:
    """A batch result's level in words: on CUDA the allocator's level is its reserved memory."""
    return (
        "allocator: CUDA's reserved" if level == "allocator" and report.cuda is not None else level
    )


def memory_lines(report: MemoryReport, *, study: BatchStudy | None = None) -> list[str]:
    """The section's prose: peaks at both levels, the forum rule beside ours, batch size,
    DDP, notes."""
    scaling, fit = (study.scaling, study.fit) if study is not None else (None, None)
    lines = [f"Memory of one {report.spec.describe(report.batch_size)}:"]
    if report.peak is not None:
        peak = report.peak
        lines.append(
            f"Live tensor peak: {_bytes(report.live_peak_bytes)}, during "
            f"{_op_place(peak.op, peak.phase, peak.module, peak.module_type, peak.autograd_node)}"
        )
    else:
        lines.append(
            f"Live tensor peak: {_bytes(report.live_peak_bytes)} ({report.live_trust.words()})"
        )
    allocator = report.allocator
    if allocator is not None:
        extra = allocator.workspace_bytes or allocator.rounding_bytes
        kind = "kernel workspace" if allocator.workspace_bytes else "block rounding"
        lines.append(
            "Allocator peak: "
            f"{'at least ' if allocator.lower_bound else ''}{_bytes(allocator.peak_bytes)}, "
            "during "
            f"{_op_place(allocator.op, allocator.phase, allocator.module, allocator.module_type)}: "
            f"{format_bytes(allocator.live_bytes)} of tensors + {format_bytes(extra)} of {kind}"
        )
        lines.append(f"Allocator rules: {allocator.method}")
        if allocator.measured:
            lines.append(
                "Measured on this CPU, one call each (no rule gives their blocks): "
                f"{', '.join(allocator.measured)}"
            )
        lines += [f"Not modelled (extra blocks unknown): {note}" for note in allocator.unmodelled]
    else:
        lines.append(
            f"Allocator peak: {_bytes(report.allocator_peak_bytes)} "
            f"({report.allocator_trust.words()})"
        )
    lines.append(
        f"What these figures are: live peak {report.live_trust.kind}, allocator peak "
        f"{report.allocator_trust.kind}"
    )
    # Why a traced step is an estimate (compiled code, a formula the trace does not follow);
    # a lower bound's reasons are its unmodelled kernels, listed above.
    estimates = (t for t in (report.live_trust, report.allocator_trust) if t.kind == "estimate")
    why = dict.fromkeys(
        reason for trust in estimates if not trust.batch_sizes for reason in trust.reasons
    )
    lines += [f"Estimate, because {reason}" for reason in why]
    cuda = report.cuda
    if cuda is not None:
        low, high = cuda.process_bytes
        lines.append(
            f"CUDA: max_memory_allocated {_bytes(cuda.max_allocated_bytes)}, max_memory_reserved "
            f"{_bytes(cuda.max_reserved_bytes)} ({cuda.small_segments} small segments of 2 MiB, "
            f"{cuda.large_segments} large ones of {format_bytes(cuda.large_reserved_bytes)} "
            f"together); with the CUDA context the process needs {format_bytes(low)} to "
            f"{format_bytes(high)}"
        )
        lines.append(f"CUDA context: {cuda.context_source}")
        lines.append(f"cuDNN: {cuda.cudnn_workspace}")
    forum = report.forum
    if forum is not None:
        if report.spec.mode == "train":
            rule = (
                f"2 x activations ({format_bytes(forum.activations_bytes)}) + 3 x parameters "
                f"({format_bytes(forum.parameters_bytes)})"
            )
            why = (
                "it holds a gradient for every activation at once, where backward frees them as "
                f"it goes ({format_bytes(forum.activation_gradients_at_peak_bytes)} alive at our "
                "peak), and has no room for max pooling's int64 indices "
                f"({format_bytes(forum.int64_indices_bytes)}); autograd keeps "
                f"{format_bytes(report.saved_total_bytes)} in all"
            )
        else:
            rule = (
                f"parameters ({format_bytes(forum.parameters_bytes)}) + the two largest "
                f"consecutive activations ({format_bytes(forum.largest_consecutive_pair_bytes)})"
            )
            why = (
                f"it leaves out the input batch ({format_bytes(report.breakdown.input_bytes)}) "
                "and what kernels hold while they run"
            )
        lines.append(
            f"Forum rule: {rule} = {_bytes(forum.rule_bytes)}, {forum.ratio:.2f}x ours: {why}"
        )
    if scaling is not None:
        check = (
            "on the line"
            if scaling.linear
            else (
                "off the line by "
                f"{format_bytes(int(scaling.check_peak_bytes - scaling.check_predicted_bytes))} "
                "(the peak moves to another op)"
            )
        )
        lines.append(
            f"Batch size ({_level(report, scaling.level)} level): "
            f"{format_bytes(int(scaling.fixed_bytes))} fixed + "
            f"{format_bytes(int(scaling.per_sample_bytes))} per sample "
            f"({_through(scaling.trust)} batch {scaling.batch_sizes[0]} and "
            f"{scaling.batch_sizes[1]}; batch {scaling.check_batch_size} is {check})"
        )
    if fit is not None:
        lines.append(
            f"Largest batch within {format_bytes(fit.budget_bytes)} ({_level(report, fit.level)} "
            f"level): {'at most ' if fit.lower_bound else ''}{fit.batch_size:,}, peak "
            f"{'at least ' if fit.lower_bound else ''}{_bytes(fit.peak_bytes)}; batch "
            f"{fit.batch_size + 1:,} would need {format_bytes(fit.next_peak_bytes)} "
            f"({fit.predictions} {'exact predictions' if fit.trust.exact else 'predictions'}"
            f"{'' if fit.trust.exact else f'; the peak is {fit.trust.words()}'})"
        )
    if report.ddp is not None:
        buckets = report.ddp
        gradients = (
            "gradients are views into them"
            if buckets.gradient_as_bucket_view
            else "a second copy of the gradients"
        )
        lines.append(
            f"DDP gradient buckets: {', '.join(format_bytes(b) for b in buckets.bucket_bytes)} "
            f"(first bucket at most {format_bytes(buckets.first_bucket_cap_bytes)}, others "
            f"{format_bytes(buckets.bucket_cap_bytes)}), {gradients}"
        )
    if report.verification is not None:
        lines.append(f"Verification: {report.verification.words()}")
    lines += [f"Note: {note}" for note in report.notes]
    lines += [f"Note: {note}" for note in (study.notes if study is not None else ())]
    return lines


def _through(trust: Trust) -> str:
    """How the batch line's points were found."""
    return "exact at" if trust.exact else f"{trust.kind} at"


def _trust_dict(trust: Trust) -> dict[str, Any]:
    return {**trust.__dict__, "words": trust.words()}


def breakdown_table(report: MemoryReport) -> TextTable:
    """What is alive at the live peak, by category, the one table every format prints."""
    total = report.breakdown.total_bytes
    rows = tuple(
        (name.replace("_", " "), f"{nbytes:,}", f"{nbytes / total:.1%}", CATEGORY_MEANINGS[name])
        for name, nbytes in zip(CATEGORIES, report.breakdown.counts())
        if nbytes
    )
    return TextTable(
        ("At the live peak", "Bytes", "Share", "What it is"), frozenset({"Bytes", "Share"}), rows
    )


def saved_table(report: MemoryReport) -> TextTable:
    """What each layer keeps for backward, the one table every format prints (the HTML report too):
    each storage counted once, at the layer that made it (`SavedLayer.layer` names it)."""
    rows = []
    for layer in report.saved_by_layer():
        why = "; ".join(layer.reasons)
        if layer.also_kept_by:
            why += f" (also kept by {', '.join(layer.also_kept_by)}: counted once, here)"
        rows.append(
            (layer.layer, layer.module_type, f"{layer.counted_bytes:,}", f"{layer.share:.1%}", why)
        )
    return TextTable(
        ("Layer", "Type", "Kept for backward", "Share", "Why"),
        frozenset({"Kept for backward", "Share"}),
        tuple(rows),
    )


def _saved_title(report: MemoryReport) -> str:
    return f"Kept for backward: {_bytes(report.saved_total_bytes)}, each storage once"


def print_memory(
    report: MemoryReport, *, study: BatchStudy | None = None, console: Console | None = None
) -> None:
    console = console or wide_console()
    lines = memory_lines(report, study=study)
    console.print(lines[0], highlight=False, markup=False)
    if report.peak is not None:
        console.print(rich_table(breakdown_table(report)))
    if report.saved:
        console.print(rich_table(saved_table(report), title=_saved_title(report)))
    for line in lines[1:]:
        console.print(line, highlight=False, markup=False)
    if study is not None and study.plan is not None:
        for line in plan_lines(study.plan):  # as they are, however long
            console.print(line, highlight=False, markup=False, emoji=False, soft_wrap=True)


def memory_markdown(report: MemoryReport, *, study: BatchStudy | None = None) -> str:
    lines = memory_lines(report, study=study)
    out = [f"**{lines[0]}**", ""]
    if report.peak is not None:
        out += [*markdown_table(breakdown_table(report)), ""]
    if report.saved:
        out += [_saved_title(report), "", *markdown_table(saved_table(report)), ""]
    out += [f"- {line}" for line in lines[1:]]
    text = "\n".join(out) + "\n"
    if study is not None and study.plan is not None:
        text += "\n" + plan_markdown(study.plan)
    return text


def memory_html(report: MemoryReport, *, study: BatchStudy | None = None) -> str:
    """The terminal section as HTML, for a notebook (`display(report)` in Jupyter): what is alive at
    the peak, what each layer keeps for backward, then the peaks, the forum's rule and the batch."""
    lines = memory_lines(report, study=study)
    tables = []
    if report.peak is not None:
        tables.append(html_table(breakdown_table(report), caption=lines[0]))
    if report.saved:
        tables.append(html_table(saved_table(report), caption=_saved_title(report)))
    prose = lines[1:] if tables else lines
    plan = plan_html(study.plan) if study is not None and study.plan is not None else ""
    return "<div>" + "".join(tables) + html_list(prose) + plan + "</div>"


def memory_to_dict(report: MemoryReport, *, study: BatchStudy | None = None) -> dict[str, Any]:
    """Every number of the report and its study under stable names (bytes in bytes); the
    timeline per op."""
    scaling, fit = (study.scaling, study.fit) if study is not None else (None, None)
    data: dict[str, Any] = {
        "model": report.model,
        "setup": {**report.spec.as_dict(), "batch_size": report.batch_size},
        "live_peak_bytes": report.live_peak_bytes,
        "allocator_peak_bytes": report.allocator_peak_bytes,
        "peak": dict(report.peak.__dict__) if report.peak else None,
        "breakdown_bytes": dict(zip(CATEGORIES, report.breakdown.counts())),
        "category_meanings": dict(CATEGORY_MEANINGS),
        "allocator": dict(report.allocator.__dict__) if report.allocator else None,
        "cuda": {**report.cuda.__dict__, "process_bytes": report.cuda.process_bytes}
        if report.cuda
        else None,
        "saved_for_backward": [dict(row.__dict__) for row in report.saved],
        "saved_total_bytes": report.saved_total_bytes,
        "forum_rule": dict(report.forum.__dict__) if report.forum else None,
        "ddp": {**report.ddp.__dict__, "total_bytes": report.ddp.total_bytes}
        if report.ddp
        else None,
        "fallback": dict(report.fallback.__dict__) if report.fallback else None,
        "live_trust": _trust_dict(report.live_trust),
        "allocator_trust": _trust_dict(report.allocator_trust),
        "verification": {
            **report.verification.__dict__,
            "verified": report.verification.verified,
            "words": report.verification.words(),
        }
        if report.verification
        else None,
        "notes": list(report.notes),
        "batch_scaling": {
            **scaling.__dict__,
            "linear": scaling.linear,
            "trust": _trust_dict(scaling.trust),
        }
        if scaling
        else None,
        "fit": {
            # `known`: the search's working figures, which depend on its path, not an answer.
            **{name: value for name, value in fit.__dict__.items() if name != "known"},
            "trust": _trust_dict(fit.trust),
            "fallback": dict(fit.fallback.__dict__) if fit.fallback else None,
        }
        if fit
        else None,
        "study_notes": list(study.notes) if study is not None else [],
        "timeline": None,
    }
    if report.timeline is not None:
        timeline = report.timeline
        data["timeline"] = {
            "start_bytes": dict(zip(CATEGORIES, timeline.start.counts())),
            "phases": [dict(span.__dict__) for span in timeline.phases],
            "ops": [point.op for point in timeline.points],
            "modules": [point.module for point in timeline.points],
            "allocator_bytes": list(timeline.allocator_totals()),
            "alive_bytes": {name: list(timeline.series(name)) for name in CATEGORIES},
        }
    data["plan"] = plan_to_dict(study.plan) if study is not None and study.plan else None
    return data


def memory_json(report: MemoryReport, *, study: BatchStudy | None = None) -> str:
    return json_text(memory_to_dict(report, study=study), indent=2)
