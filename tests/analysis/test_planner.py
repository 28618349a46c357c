"""The budget planner: each alternative is a real step (predicted == measured), checkpointing's
compute is the step's plus what it recomputes, and the recommendation fits the requested batch."""

import dataclasses

import pytest
import torch
from torch import nn

from ninlab.analysis import planner
from ninlab.analysis.batch import fit_batch
from ninlab.analysis.measure import measure
from ninlab.analysis.planner import ALTERNATIVE_KINDS, BudgetPlan, plan_budget
from ninlab.analysis.predict import predict_memory
from ninlab.analysis.step import StepSpec
from ninlab.analysis.trace import record_step
from ninlab.errors import NinlabError
from ninlab.optimizers import OptimizerSpec

INPUT = (3, 8, 8)


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU()),
        nn.Sequential(
            nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        ),
        nn.Linear(16, 10),
    )


def test_a_plan_when_the_batch_does_not_fit_as_given() -> None:
    batch = 16
    given = predict_memory(net(), input_size=INPUT, batch_size=batch, optimizer="sgd-momentum")
    budget = given.allocator_peak_bytes - 1  # one byte short
    plan = plan_budget(
        net(), input_size=INPUT, optimizer="sgd-momentum", budget=budget, batch_size=batch
    )
    options = {option.name: option for option in plan.options}
    as_given = options["as given"]
    assert not as_given.fits_requested and as_given.largest_batch < batch
    assert set(options) >= {
        "bf16 autocast",
        "checkpoint 0",
        "checkpoint 1",
        "checkpoint all blocks",
        "sgd",
        "adam",
    }
    for name in ("checkpoint 0", "checkpoint 1", "checkpoint all blocks"):
        option = options[name]
        assert option.recomputed_flops > 0
        assert option.step_flops == as_given.step_flops + option.recomputed_flops
    assert options["checkpoint all blocks"].recomputed_flops == (
        options["checkpoint 0"].recomputed_flops + options["checkpoint 1"].recomputed_flops
    )
    best = plan.recommended
    assert best is not None and best.fits_requested and best.peak_bytes <= budget
    assert plan.recommendation.startswith(f"use {best.name}: batch {batch} fits")
    # the recommended step and checkpointing are real steps: measured, they peak as predicted
    for option in (best, options["checkpoint all blocks"]):
        predicted = predict_memory(net(), option.spec, batch_size=batch)
        assert (
            measure(net(), option.spec, batch_size=batch).live_peak_bytes
            == predicted.live_peak_bytes
        )


def test_every_kind_of_alternative_is_listed_once_and_ranked_apart() -> None:
    kinds = [kind.kind for kind in ALTERNATIVE_KINDS]
    assert kinds == ["autocast", "checkpointing", "accumulation", "optimizer"]
    # the tie-break prefers what changes the least: accumulation, bf16, checkpointing, optimizer
    preferences = sorted(ALTERNATIVE_KINDS, key=lambda kind: kind.preference)
    assert [kind.kind for kind in preferences] == [
        "accumulation",
        "autocast",
        "checkpointing",
        "optimizer",
    ]
    assert (
        len({kind.preference for kind in ALTERNATIVE_KINDS}) == len(kinds)
        and min(k.preference for k in ALTERNATIVE_KINDS) > 0
    )
    plan = plan_budget(
        net(), input_size=INPUT, optimizer="sgd-momentum", budget="1GiB", batch_size=4
    )
    assert [option.kind for option in plan.options] == [
        "as given",
        "autocast",
        "checkpointing",
        "checkpointing",
        "checkpointing",
        "checkpointing",
        "accumulation",
        "optimizer",
        "optimizer",
    ]


def test_each_options_compute_is_that_of_its_own_recorded_step() -> None:
    """The plan reads an option's FLOPs from the recording its prediction made: the same as a
    recording of that step of its own."""
    batch = 16
    model = net()
    plan = plan_budget(
        model, input_size=INPUT, optimizer="sgd-momentum", budget=1 << 20, batch_size=batch
    )
    assert len(plan.options) > 5
    for option in plan.options:
        step = record_step(model, option.spec, batch)
        ops = step.recording.ops[step.step_start :]
        assert option.step_flops == sum(op.flops for op in ops) > 0
        assert option.recomputed_flops == sum(op.flops for op in ops if op.phase == "recompute")


def test_a_plan_given_the_step_s_fit_is_the_plan_that_searches_it() -> None:
    """`given_fit` (the study fits the step as given first): the plan reads it instead of
    searching again, and is the plan it would have made; a fit of another budget is refused."""
    batch = 16
    model = net()
    fields = {"input_size": INPUT, "optimizer": "sgd-momentum", "batch_size": batch}
    budget = predict_memory(model, **fields).allocator_peak_bytes - 1  # type: ignore[arg-type]
    fit = fit_batch(model, input_size=INPUT, optimizer="sgd-momentum", budget=budget)
    searched, given = (
        plan_budget(model, budget=budget, given_fit=known, **fields)  # type: ignore[arg-type]
        for known in (None, fit)
    )

    def numbers(plan: BudgetPlan) -> list[tuple[object, ...]]:
        # every field but the step, whose functions are built anew for each plan
        return [
            tuple(getattr(option, f.name) for f in dataclasses.fields(option) if f.name != "spec")
            for option in plan.options
        ]

    assert given.options[0].largest_batch == fit.batch_size < batch
    assert numbers(given) == numbers(searched)
    assert given.recommendation == searched.recommendation
    with pytest.raises(NinlabError, match="the fit it was given"):
        plan_budget(model, budget=budget + 1, given_fit=fit, **fields)  # type: ignore[arg-type]


def test_an_alternative_that_is_the_step_as_given_is_not_traced_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """ "sgd-momentum" is "sgd:momentum=0.9" by another name: the plan gives it the numbers of the
    step as given, which are that step's own (its fit and prediction), without tracing it."""
    batch = 16
    model = net()
    fields = {"input_size": INPUT, "batch_size": batch}
    budget = predict_memory(model, optimizer="sgd-momentum", **fields).allocator_peak_bytes - 1  # type: ignore[arg-type]
    traced = []
    original = planner.trace_step

    def counted(model: nn.Module, spec: StepSpec, **kwargs: object) -> object:
        traced.append(spec.optimizer)
        return original(model, spec, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(planner, "trace_step", counted)
    said: list[str] = []
    plan = plan_budget(
        model, optimizer="sgd:momentum=0.9", budget=budget, progress=said.append, **fields
    )
    options = {option.name: option for option in plan.options}
    renamed = options["sgd-momentum"]
    assert renamed.spec.optimizer == OptimizerSpec("sgd-momentum")
    assert OptimizerSpec("sgd-momentum") not in traced and OptimizerSpec("adam") in traced
    fit = fit_batch(model, input_size=INPUT, optimizer="sgd-momentum", budget=budget)
    assert (renamed.largest_batch, renamed.peak_bytes) == (fit.batch_size, budget + 1)
    assert renamed.largest_batch < batch and not renamed.fits_requested
    assert (renamed.step_flops, renamed.recomputed_flops) == (
        options["as given"].step_flops,
        0,
    )
    # the plan says what it works on next: each kind of alternative, then each by name
    assert said[0] == "as given"
    assert [what for what in said if what in options] == list(options)
    assert {"autocast", "checkpointing", "accumulation", "optimizer"} <= set(said)


def test_a_plan_of_example_tensors_is_for_their_batch() -> None:
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 5))
    plan = plan_budget(model, input_size=torch.randn(3, 20), budget="64KiB")
    sized = plan_budget(model, input_size=(20,), budget="64KiB", batch_size=3)
    assert plan.batch_size == 3
    assert (plan.recommendation, plan.skipped) == (sized.recommendation, sized.skipped)
    # The options differ only in the spec's dtype, which the examples give: float32.
    assert [dataclasses.replace(o, spec=None) for o in plan.options] == [
        dataclasses.replace(o, spec=None) for o in sized.options
    ]
    with pytest.raises(NinlabError, match="differs from the example inputs' batch, 3"):
        plan_budget(model, input_size=torch.randn(3, 20), budget="64KiB", batch_size=4)
