"""ninlab.analysis.batch: the peak as fixed + per-sample bytes, checked at a third size; the largest
batch that fits a budget, found by exact predictions; budgets that are too small or do not parse."""

from __future__ import annotations

import pytest
from torch import nn

from ninlab.analysis import kernel_probe
from ninlab.analysis.batch import fit_batch, memory_vs_batch
from ninlab.analysis.predict import predict_memory
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
