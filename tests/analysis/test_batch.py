"""ninlab.analysis.batch: the peak as fixed + per-sample bytes, checked at a third size; the largest
batch that fits a budget, found by exact predictions; budgets that are too small or do not parse."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from cnn_zoo import resnet_bn
from corpus.corpus_cases import CASES, SETUPS, spec_fields
from torch import nn

from ninlab.analysis import batch, kernel_probe
from ninlab.analysis.batch import (
    _largest_within,
    _Peaks,
    fit_batch,
    largest_batch,
    memory_vs_batch,
)
from ninlab.analysis.memory_report import MemoryReport
from ninlab.analysis.predict import TracedStep, predict_memory, trace_step
from ninlab.analysis.step import StepSpec, step_spec
from ninlab.errors import NinlabError
from ninlab.models import build_nin

NIN_INPUT = (1, 224, 224)


@pytest.fixture(scope="module")
def nin() -> nn.Module:
    return build_nin()


def test_memory_is_linear_in_the_batch_where_the_peak_stays_put(nin: nn.Module) -> None:
    scaling = memory_vs_batch(
        nin, input_size=NIN_INPUT, batch_sizes=(64, 128), check_batch_size=256
    )
    assert (scaling.fixed_bytes, scaling.per_sample_bytes) == (8_107_832, 7_963_696)
    assert scaling.linear and scaling.check_peak_bytes == 2_046_814_008
    # At batch 1 and 2 Adam's update is the peak; by batch 3 backward is: not one line.
    small = memory_vs_batch(
        nin, input_size=NIN_INPUT, batch_sizes=(1, 2), check_batch_size=3, optimizer="adam"
    )
    assert not small.linear


def test_fit_batch_finds_the_largest_fitting_batch_by_exact_prediction(nin: nn.Module) -> None:
    fit = fit_batch(nin, budget="1GiB", input_size=NIN_INPUT, level="live")
    assert fit.batch_size == 133
    assert fit.peak_bytes <= 1 << 30 < fit.next_peak_bytes
    assert fit.peak_bytes == (
        predict_memory(nin, input_size=NIN_INPUT, batch_size=133).live_peak_bytes
    )
    allocator = fit_batch(nin, budget="1GiB", input_size=NIN_INPUT)
    assert allocator.level == "allocator" and allocator.batch_size < 133
    assert allocator.peak_bytes <= 1 << 30 < allocator.next_peak_bytes
    assert not allocator.lower_bound


def test_a_fit_whose_peak_is_a_lower_bound_is_an_upper_bound_on_the_batch(
    nin: nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under bf16 autocast each convolution's oneDNN scratchpad is measured where its call is
    small enough to run (`ninlab.analysis.kernel_probe`); at the answer it is not, so the peak
    there is at least the figure, and the batch at most the answer."""
    monkeypatch.setattr(kernel_probe, "PROBE_LIMIT_BYTES", 64 << 20)
    fit = fit_batch(nin, budget="1GiB", input_size=NIN_INPUT, amp="bf16")
    assert fit.lower_bound and fit.batch_size > 133
    small = fit_batch(nin, budget="40MiB", input_size=(1, 96, 96), amp="bf16")
    assert not small.lower_bound


def test_a_budget_too_small_for_batch_1_says_by_how_much(nin: nn.Module) -> None:
    needed = predict_memory(nin, input_size=NIN_INPUT, batch_size=1).allocator_peak_bytes
    with pytest.raises(
        NinlabError, match=f"too small for batch 1.*{needed - 10_000_000:,} bytes more"
    ):
        fit_batch(nin, budget="10MB", input_size=NIN_INPUT)


@pytest.mark.parametrize("budget", ["8 GB/s", "lots", "-1GiB", "0.1B", ""])
def test_budgets_that_do_not_parse(nin: nn.Module, budget: str) -> None:
    with pytest.raises(NinlabError):
        fit_batch(nin, budget=budget, input_size=NIN_INPUT)


@pytest.mark.parametrize(
    ("fields", "budget"),
    [
        ({"amp": "bf16"}, 28 << 20),  # bf16 convolutions: each probed, the bound below the peak
        ({"optimizer": "sgd:momentum=0.9"}, 40 << 20),  # every kernel has a rule: bound = peak
    ],
)
def test_the_search_on_lower_bounds_answers_what_the_exact_search_answers(
    nin: nn.Module, fields: dict[str, object], budget: int
) -> None:
    """`fit_batch` narrows its range on predictions that probe no kernel; the search on exact
    predictions alone (the slow one) must give the same answer and peaks, both where the
    candidate fits and where a probed kernel's blocks push it over (a budget between the two)."""
    spec = step_spec(model=nin, input_size=(1, 96, 96), **fields)
    exact = _Peaks(nin, spec, "allocator")
    bound = _Peaks(nin, spec, "allocator")
    budgets = [budget]
    assert bound.bound(16) <= exact(16)
    if bound.bound(16) < exact(16):
        budgets.append(bound.bound(16))  # batch 16 fits by its bound, not exactly
    assert len(budgets) == 2 if "amp" in fields else len(budgets) == 1
    for each in budgets:
        fit = fit_batch(nin, spec, budget=each)
        slow = _largest_within(exact, exact.known, each, 1, 1 << 24)
        assert (fit.batch_size, fit.peak_bytes, fit.next_peak_bytes) == (
            slow,
            exact(slow),
            exact(slow + 1),
        )
        assert fit.trust == exact.trust(slow)


@pytest.mark.parametrize("fields", [{}, {"amp": "bf16"}], ids=["float32", "bf16"])
def test_a_fit_reads_the_reports_it_is_given_where_it_would_predict(
    nin: nn.Module, fields: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`predicted=`: reports the caller already has (the budget planner's at the requested
    batch) answer for their batch sizes, and the fit is the one made without them."""
    spec = step_spec(model=nin, input_size=(1, 96, 96), **fields)
    alone = fit_batch(nin, spec, budget="40MiB")
    answer = alone.batch_size
    given = [predict_memory(nin, spec, batch_size=size) for size in (answer, answer + 1)]
    asked: list[tuple[int, bool]] = []
    read = TracedStep.report

    def counted(traced: TracedStep, *, probe_kernels: bool) -> MemoryReport:
        asked.append((traced.step.batch_size, probe_kernels))
        return read(traced, probe_kernels=probe_kernels)

    monkeypatch.setattr(TracedStep, "report", counted)
    fit = fit_batch(nin, spec, budget="40MiB", predicted=given)
    # The search starts from the largest report given, and so asks fewer batch sizes.
    assert dataclasses.replace(fit, predictions=alone.predictions) == alone
    assert fit.predictions <= alone.predictions
    assert (answer, True) not in asked and (answer + 1, True) not in asked
    assert asked  # the search still predicted the other sizes it asks about


def test_a_fit_traces_each_batch_size_once(nin: nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under bf16 the bounds the search reads are not exact (oneDNN's blocks are probed): the
    exact peaks at the answer and the next size probe the recordings of those bounds, not new
    traces, and give the fit a trace per size would."""
    spec = step_spec(model=nin, input_size=(1, 96, 96), amp="bf16")
    traced: list[int] = []

    def counted(*args: object, **keywords: object) -> object:
        traced.append(keywords["batch_size"])  # type: ignore[arg-type]
        return trace_step(*args, **keywords)  # type: ignore[arg-type]

    monkeypatch.setattr(batch, "trace_step", counted)
    fit = fit_batch(nin, spec, budget="40MiB")
    assert fit.trust.exact
    assert sorted(traced) == sorted(set(traced)) and fit.batch_size + 1 in traced
    exact = [predict_memory(nin, spec, batch_size=b) for b in (fit.batch_size, fit.batch_size + 1)]
    assert (fit.peak_bytes, fit.next_peak_bytes) == tuple(r.allocator_peak_bytes for r in exact)


def test_the_largest_batch_alone_is_the_fits_answer_probing_no_other_size(
    nin: nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`largest_batch` (the planner's question) answers what `fit_batch` does, and what its peak
    is, with no exact prediction the fit does not make; it skips the next size's where the
    search did not ask it (its lower bound is over the budget already; ResNet-50 under bf16 in
    2 GiB). Here, NiN's scratchpads exceed a sample's bytes, so the exact search goes below the
    candidate and asks the next size itself."""
    spec = step_spec(model=nin, input_size=(1, 96, 96), amp="bf16")
    fit = fit_batch(nin, spec, budget="40MiB")
    probed: list[int] = []
    read = TracedStep.report

    def counted(traced: TracedStep, *, probe_kernels: bool) -> MemoryReport:
        if probe_kernels:
            probed.append(traced.step.batch_size)
        return read(traced, probe_kernels=probe_kernels)

    monkeypatch.setattr(TracedStep, "report", counted)
    assert largest_batch(nin, spec, budget="40MiB") == (fit.batch_size, fit.trust)
    assert fit.batch_size in probed and set(probed) <= set(fit.known)


def test_example_tensors_give_a_sample_to_questions_at_other_batches() -> None:
    # Refused as "batch size 1 differs from the example inputs' batch, 3; drop batch_size", a
    # batch_size nobody gave: the search and the line ask at batches of their own.
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 5))
    example = torch.randn(3, 20)
    fit = fit_batch(model, input_size=example, budget="64KiB")
    assert fit == fit_batch(model, input_size=(20,), budget="64KiB")
    scaling = memory_vs_batch(model, input_size=example)
    assert scaling == memory_vs_batch(model, input_size=(20,))


# Corpus cases whose ops stay the same from batch to batch, the batch a dimension of each
# recurrent, attention, embedding and convolution op (a conv net with batch norm among them).
_GUIDED_CASES = ("lstm", "mha-key-padding-mask", "transformer-encoder", "embedding", "resnet_bn")


def _corpus_step(name: str, setup: str) -> tuple[nn.Module, StepSpec]:
    if name == "resnet_bn":
        model: nn.Module = resnet_bn()
        return model, step_spec(model=model, input_size=(3, 16, 16), **SETUPS[setup])
    (case,) = (case for case in CASES if case.name == name)
    torch.manual_seed(0)
    model = case.build()
    return model, step_spec(model=model, **spec_fields(case, setup))


# Under bf16 oneDNN's LSTM workspace is laid out in rounded parts (45,056, 57,344 and 151,552
# bytes at batch 2, 3 and 9: off the line by 20,480), so there the line misses; a guess is only
# where the search looks, and the search's answer is held below.
@pytest.mark.parametrize(
    ("name", "setup"),
    [
        (name, setup)
        for name in _GUIDED_CASES
        for setup in ("sgd", "bf16")
        if (name, setup) != ("lstm", "bf16")
    ],
)
def test_the_lines_through_two_batches_give_each_ops_bytes_at_others(name: str, setup: str) -> None:
    """The search's guesses (`_Peaks.guess`) read each op's bytes at other batches from the lines
    through two reports: held against real traces at batch 5 and 9, the line through 2 and 3
    reaches each one's live peak exactly there, and the guess from one report (the
    planner's, at the batch it asks about) is the batch itself or one above it."""
    model, spec = _corpus_step(name, setup)
    peak = _Peaks(model, spec, "live")
    for size in (2, 3):
        peak(size)
    for size in (5, 9):
        report = predict_memory(model, spec, batch_size=size)
        assert peak.guess(report.live_peak_bytes, (2, 3)) == size
        alone = _Peaks(model, spec, "live", predicted=(report,))
        assert alone.guess(report.live_peak_bytes, (size,)) in (size, size + 1)


@pytest.mark.parametrize("setup", ["sgd", "bf16"])
@pytest.mark.parametrize("name", _GUIDED_CASES)
def test_the_guided_search_answers_what_the_exact_search_answers(name: str, setup: str) -> None:
    """Guesses only say where to look: from the planner's report at batch 4 and its unprobed
    twin, `largest_batch` answers what the search on exact predictions alone answers (the slow
    one: every size it asks probed), at a budget a byte short of batch 12's peak and at that
    peak; so does `fit_batch`, which starts from batch 1."""
    model, spec = _corpus_step(name, setup)
    traced = trace_step(model, spec, batch_size=4)
    assert isinstance(traced, TracedStep)
    unprobed = traced.report(probe_kernels=False)
    report = traced.report(probe_kernels=True)
    exact = _Peaks(model, spec, "allocator")
    for budget in (exact(12) - 1, exact(12)):
        slow = _largest_within(exact, exact.known, budget, 1, 1 << 24)
        guided = largest_batch(
            model, spec, budget=budget, predicted=(report,), unprobed=(unprobed,)
        )
        assert guided == (slow, exact.trust(slow))
        fit = fit_batch(model, spec, budget=budget)
        assert (fit.batch_size, fit.peak_bytes, fit.next_peak_bytes) == (
            slow,
            exact(slow),
            exact(slow + 1),
        )
