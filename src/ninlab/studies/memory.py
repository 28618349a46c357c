"""The memory study: the largest batch within a budget (`fit_batch`), the peak's line measured
beside it (`memory_vs_batch`) and, for a training step asked about at a batch size, how to fit
that batch (`plan_budget`). One recipe for `ninlab summary --fit`, `ninlab plot batch` and the
report; where they place the line differs, and the caller says which (`check_batch_size`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from torch import nn

from ninlab.analysis.batch import BatchFit, BatchScaling, fit_batch, memory_vs_batch
from ninlab.analysis.memory_report import MemoryReport
from ninlab.analysis.planner import BudgetPlan, plan_budget
from ninlab.analysis.step import Mode, StepSpec, step_spec

__all__ = ["BatchStudy", "study_batch"]


@dataclass(frozen=True)
class BatchStudy:
    """The largest batch that fits a budget, the peak's line measured beside it (both at the
    allocator level, which is what runs out) and, when asked for, the planner's alternatives."""

    fit: BatchFit
    scaling: BatchScaling
    mode: Mode  # of the step fitted: a training step or an inference
    plan: BudgetPlan | None = None
    notes: tuple[str, ...] = ()  # what the study left out, and why


def study_batch(
    model: nn.Module,
    spec: StepSpec | None = None,
    *,
    budget: int | str,
    check_batch_size: int | None = None,
    plan_batch_size: int | None = None,
    predicted: Iterable[MemoryReport] = (),
    progress: Callable[[str], None] | None = None,
    **fields: Any,
) -> BatchStudy:
    """Fit the batch of the step `spec` describes (or its fields) into `budget`, then measure the
    peak's line. `check_batch_size` is the batch a question was asked at: the line goes through
    the answer and the next size, and is checked there (the summary's words); None draws it for a
    chart, through a quarter and a half of the answer, checked at three quarters, so the points
    spread over the picture. With `plan_batch_size`, also the budget planner's alternatives for
    that batch (many exact predictions). `predicted`: reports of this step already made, which
    the fit reads instead of predicting their batch sizes again (`fit_batch`). `progress`: told
    which part the study works on next (the plan: which alternative), for a command to show."""
    say = progress or (lambda _what: None)
    spec = step_spec(spec, model=model, **fields).at_any_batch()
    say("the largest batch")
    fit = fit_batch(model, spec, budget=budget, level="allocator", predicted=predicted)
    if check_batch_size is None:
        quarter = max(1, fit.batch_size // 4)
        half = max(quarter + 1, fit.batch_size // 2)
        batch_sizes, check_batch_size = (quarter, half), max(half + 1, 3 * fit.batch_size // 4)
    else:
        batch_sizes = (fit.batch_size, fit.batch_size + 1)
    say("the peak's line")
    scaling = memory_vs_batch(
        model,
        spec,
        batch_sizes=batch_sizes,
        check_batch_size=check_batch_size,
        level=fit.level,
        fallback=fit.fallback,
        known=fit.known,
    )
    plan, notes = None, ()
    if plan_batch_size is not None and fit.trust.kind in ("measured", "estimate"):
        # The planner traces each alternative, which a step fake tensors cannot run refuses.
        notes = (
            (
                "no budget plan: its alternatives are traced on fake tensors, and this step "
                "cannot run on them"
            ),
        )
    elif plan_batch_size is not None:
        plan = plan_budget(
            model,
            spec,
            budget=budget,
            batch_size=plan_batch_size,
            given_fit=fit,
            progress=lambda what: say(f"the budget plan at batch {plan_batch_size}: {what}"),
        )
    return BatchStudy(fit, scaling, spec.mode, plan, notes)
