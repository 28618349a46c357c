"""A `BudgetPlan` (how to fit a batch into a memory budget) as lines of text and as JSON: the
planner's part of `ninlab summary --fit`. Nothing here computes a number."""

from __future__ import annotations

import dataclasses
from typing import Any

from ninlab.analysis.planner import BudgetPlan, PlanOption
from ninlab.units import format_bytes, format_flops

__all__ = ["plan_lines", "plan_to_dict"]


def plan_lines(plan: BudgetPlan) -> list[str]:
    """A heading, one line per alternative, and the recommendation."""
    heading = (
        f"Fitting batch {plan.batch_size:,} into {format_bytes(plan.budget_bytes)} (allocator level; "
        "each figure a prediction at that batch; \"at least\" and \"at most\" where a kernel's workspace is "
        "unknown there):"
    )
    lines = [heading, *(f"  {_option_line(option, plan.batch_size)}" for option in plan.options)]
    lines.append(f"Recommendation: {plan.recommendation}")
    return lines


def _option_line(option: PlanOption, batch_size: int) -> str:
    fits = "fits" if option.fits_requested else "does not fit"
    bound = "at most " if option.largest_at_most else ""
    if option.kind == "accumulation":
        largest = f"batch {batch_size:,} in {option.micro_batches} micro-batches"
    else:
        largest = f"largest batch {bound}{option.largest_batch:,}"
    compute = format_flops(option.step_flops)
    if option.recomputed_flops:
        compute += f", {format_flops(option.recomputed_flops)} of it recomputed"
    return (
        f"{option.name}: {largest}; batch {batch_size:,} {fits} "
        f"({'at least ' if option.peak_lower_bound else ''}{format_bytes(option.peak_bytes)}); {compute} per step"
    )


def plan_to_dict(plan: BudgetPlan) -> dict[str, Any]:
    return {
        "budget_bytes": plan.budget_bytes,
        "batch_size": plan.batch_size,
        "options": [
            {**{f.name: getattr(option, f.name) for f in dataclasses.fields(option) if f.name != "spec"},
             "step": option.spec.as_dict()}
            for option in plan.options
        ],
        "recommended": plan.recommended.name if plan.recommended else None,
        "recommendation": plan.recommendation,
    }
