"""A `BudgetPlan` (how to fit a batch into a memory budget) as lines of text, Markdown, HTML and
JSON: the planner's part of `ninlab summary --fit` and of the report. Every format prints
`plan_lines`. Nothing here computes a number."""

from __future__ import annotations

import dataclasses
import html
from typing import Any

from ninlab.analysis.planner import BudgetPlan, PlanOption
from ninlab.units import format_bytes, format_flops
from ninlab.viz.html import html_table
from ninlab.viz.table import TextTable

__all__ = ["plan_html", "plan_lines", "plan_markdown", "plan_table", "plan_to_dict"]


_RECOMMENDATION = "Recommendation"


def plan_table(plan: BudgetPlan) -> TextTable:
    """One row per alternative, in the words every format prints (the terminal and Markdown as a
    line each)."""
    batch = f"{plan.batch_size:,}"
    return TextTable(
        columns=(
            "Alternative",
            "Batch",
            f"Batch {batch}",
            f"Peak at batch {batch}",
            "FLOPs per step",
        ),
        numeric=frozenset({f"Peak at batch {batch}"}),
        rows=tuple(_option_cells(option, plan.batch_size) for option in plan.options),
    )


def _option_cells(option: PlanOption, batch_size: int) -> tuple[str, ...]:
    if option.kind == "accumulation":
        largest = f"batch {batch_size:,} in {option.micro_batches} micro-batches"
    else:
        largest = (
            f"largest batch {'at most ' if option.largest_at_most else ''}{option.largest_batch:,}"
        )
    compute = format_flops(option.step_flops)
    if option.recomputed_flops:
        compute += f", {format_flops(option.recomputed_flops)} of it recomputed"
    return (
        option.name,
        largest,
        "fits" if option.fits_requested else "does not fit",
        f"{'at least ' if option.peak_lower_bound else ''}{format_bytes(option.peak_bytes)}",
        compute,
    )


def _heading(plan: BudgetPlan) -> str:
    return (
        f"Fitting batch {plan.batch_size:,} into {format_bytes(plan.budget_bytes)} (allocator "
        'level; each figure a prediction at that batch; "at least" and "at most" where a '
        "kernel's workspace is unknown there):"
    )


def plan_lines(plan: BudgetPlan) -> list[str]:
    """A heading, one line per alternative (`plan_table`'s row), and the recommendation."""
    lines = [_heading(plan)]
    for name, largest, fits, peak, compute in plan_table(plan).rows:
        lines.append(
            f"  {name}: {largest}; batch {plan.batch_size:,} {fits} ({peak}); {compute} per step"
        )
    lines.append(f"{_RECOMMENDATION}: {plan.recommendation}")
    return lines


def plan_markdown(plan: BudgetPlan) -> str:
    """The heading and the recommendation in bold, the alternatives as a list."""
    heading, *options, recommendation = plan_lines(plan)
    lines = [
        f"**{heading}**",
        "",
        *(f"- {line.strip()}" for line in options),
        "",
        f"**{recommendation}**",
    ]
    return "\n".join(lines) + "\n"


def plan_html(plan: BudgetPlan) -> str:
    """The alternatives as a table under the heading, then the recommendation."""
    return (
        html_table(plan_table(plan), caption=_heading(plan))
        + f"<p><b>{_RECOMMENDATION}:</b> {html.escape(plan.recommendation)}</p>"
    )


def plan_to_dict(plan: BudgetPlan) -> dict[str, Any]:
    return {
        "budget_bytes": plan.budget_bytes,
        "batch_size": plan.batch_size,
        "options": [
            {
                **{
                    f.name: getattr(option, f.name)
                    for f in dataclasses.fields(option)
                    if f.name != "spec"
                },
                "step": option.spec.as_dict(),
            }
            for option in plan.options
        ],
        "recommended": plan.recommended.name if plan.recommended else None,
        "recommendation": plan.recommendation,
    }
