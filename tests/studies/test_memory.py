"""The memory study: one fit, the line placed where its caller asks, the planner when asked; every
figure the accountant's own."""

import pytest
import torch
from torch import nn

from ninlab.analysis.batch import fit_batch, memory_vs_batch
from ninlab.analysis.planner import plan_budget
from ninlab.analysis.predict import predict_memory
from ninlab.analysis.step import StepSpec
from ninlab.models import build_nin
from ninlab.studies.memory import study_batch

SPEC = StepSpec(input_size=(1, 67, 67))
BUDGET = 64 << 20


@pytest.fixture(scope="module")
def nin() -> nn.Module:
    return build_nin()


def test_a_chart_gets_the_line_spread_below_the_answer(nin: nn.Module) -> None:
    study = study_batch(nin, SPEC, budget=BUDGET)
    fit = fit_batch(nin, SPEC, budget=BUDGET)
    assert study.fit == fit and study.plan is None
    quarter, half = fit.batch_size // 4, fit.batch_size // 2
    assert study.scaling == memory_vs_batch(
        nin,
        SPEC,
        batch_sizes=(quarter, half),
        check_batch_size=3 * fit.batch_size // 4,
        level="allocator",
    )


def _numbers(plan):
    options = [
        (o.name, o.largest_batch, o.peak_bytes, o.fits_requested, o.step_flops)
        for o in plan.options
    ]
    return options, plan.recommendation


@pytest.mark.slow  # the planner predicts every alternative's largest batch
def test_a_question_at_a_batch_gets_the_line_through_the_answer_and_the_plan(
    nin: nn.Module,
) -> None:
    study = study_batch(nin, SPEC, budget=BUDGET, check_batch_size=8, plan_batch_size=8)
    fit = study.fit
    assert study.scaling.batch_sizes == (fit.batch_size, fit.batch_size + 1)
    assert study.scaling.check_batch_size == 8
    assert study.scaling.peaks_bytes == (fit.peak_bytes, fit.next_peak_bytes)
    # Its step functions are made anew by each plan: compared by what they predict.
    assert _numbers(study.plan) == _numbers(plan_budget(nin, SPEC, budget=BUDGET, batch_size=8))


def test_an_answer_of_one_still_spreads_the_line(nin: nn.Module) -> None:
    budget = predict_memory(nin, SPEC, batch_size=1).held_peak_bytes
    study = study_batch(nin, SPEC, budget=budget)
    assert study.fit.batch_size == 1
    assert (study.scaling.batch_sizes, study.scaling.check_batch_size) == ((1, 2), 3)


def test_example_tensors_are_studied_at_any_batch() -> None:
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 5))
    study = study_batch(model, input_size=torch.randn(3, 20), budget="64KiB")
    assert study == study_batch(model, input_size=(20,), budget="64KiB")
