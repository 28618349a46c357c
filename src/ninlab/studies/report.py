"""What the HTML report shows, each result computed once: the summary, the memory of a training
step and of its inference, the largest training batch within a budget with the line around it,
and, when asked for, how to fit the batch (`ninlab.viz.report` draws and writes it)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from ninlab.analysis.batch import BudgetTooLarge
from ninlab.analysis.memory_report import MemoryReport
from ninlab.analysis.step import StepSpec, batch_size_of, step_spec
from ninlab.analysis.summary import Summary
from ninlab.studies.costs import study_costs
from ninlab.studies.memory import BatchStudy, study_batch
from ninlab.units import budget_bytes

__all__ = ["DEFAULT_BATCH_SIZE", "DEFAULT_BUDGET", "ModelStudy", "study_model"]

DEFAULT_BUDGET = "8GiB"  # a common laptop or consumer GPU's memory
DEFAULT_BATCH_SIZE = 128  # d2l's


@dataclass(frozen=True)
class ModelStudy:
    summary: Summary
    train: MemoryReport
    infer: MemoryReport
    # With the planner's alternatives for the batch, when asked for. None where even the largest
    # batch searched fits the budget (a small model): `batch_note` says so instead.
    batch: BatchStudy | None
    batch_note: str = ""


def study_model(
    model: nn.Module,
    spec: StepSpec | None = None,
    *,
    batch_size: int | None = None,
    budget: int | str = DEFAULT_BUDGET,
    model_name: str | None = None,
    plan: bool = False,
    progress: Callable[[str], None] | None = None,
    **fields: Any,
) -> ModelStudy:
    """Summarize `model`, predict the memory of the training step `spec` describes (or its
    fields, as keywords) and of its inference at `batch_size` (None: the example tensors'
    batch, given as the input, else `DEFAULT_BATCH_SIZE`), and find the largest training batch
    under `budget`. With `plan`, also the budget planner's alternatives for `batch_size`
    (`ninlab.analysis.planner`: many predictions). `progress`: told which part the study works
    on next, for a command to show."""
    say = progress or (lambda _what: None)
    name = model_name or type(model).__name__
    spec = step_spec(spec, model=model, **fields).replace(mode="train")
    if batch_size is None:
        batch_size = DEFAULT_BATCH_SIZE if spec.example_batch is None else spec.example_batch
    batch_size = batch_size_of(spec, batch_size)
    spec = spec.at_any_batch()
    budget = budget_bytes(budget)
    say(f"the summary and the memory of a training step and an inference at batch {batch_size}")
    costs = study_costs(model, spec, batch_size=batch_size, model_name=name)
    assert costs.train is not None and costs.infer is not None  # both asked for
    try:
        batch = study_batch(
            model,
            spec,
            budget=budget,
            plan_batch_size=batch_size if plan else None,
            progress=progress,
        )
    except BudgetTooLarge as error:
        # The rest of the report stands without a batch to show.
        return ModelStudy(costs.summary, costs.train, costs.infer, None, str(error))
    return ModelStudy(costs.summary, costs.train, costs.infer, batch)
