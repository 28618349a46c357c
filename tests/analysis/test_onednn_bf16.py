"""The bf16 oneDNN rules replayed against the profiler's allocation records, one op call at a time
(shapes other than those the rules were read from), and end to end under bf16 autocast."""

from __future__ import annotations

import pytest
import torch
from layer_zoo import LAYER_ZOO
from test_allocator import op_allocations

from ninlab.analysis.allocator import (
    KernelAllocation,
    cpu_kernel_allocations,
    peak_above_start_bytes,
)
from ninlab.analysis.measure import measure
from ninlab.analysis.predict import predict_memory
from ninlab.analysis.step import StepSpec

aten = torch.ops.aten


def bf16_conv(
    batch: int,
    cin: int,
    cout: int,
    size: int,
    kernel: int,
    stride: int = 1,
    groups: int = 1,
    bias: bool = True,
    channels_last: bool = False,
):
    """A bf16 convolution's arguments, forward and backward (as autocast makes them: weights cast
    in their own layout, channels-last models with channels-last weights)."""
    torch.manual_seed(0)
    x = torch.randn(batch, cin, size, size).bfloat16()
    w = torch.randn(cout, cin // groups, kernel, kernel).bfloat16()
    if channels_last:
        x, w = (t.contiguous(memory_format=torch.channels_last) for t in (x, w))
    window = ([stride] * 2, [kernel // 2] * 2, [1, 1], False, [0, 0], groups)
    forward = (x, w, torch.randn(cout).bfloat16() if bias else None, *window)
    grad = torch.randn_like(aten.convolution.default(*forward))
    backward = (grad, x, w, [cout] if bias else None, *window, [True, True, bias])
    return forward, backward


def rule_and_profile(func_name: str, args: tuple) -> tuple[list[int], str, list[int]]:
    allocations, reason = cpu_kernel_allocations(func_name, args)
    func = (
        aten.convolution.default
        if func_name == "aten.convolution.default"
        else aten.convolution_backward.default
    )
    predicted = [a.delta_bytes for a in allocations or ()]
    return predicted, reason, op_allocations(lambda: func(*args))


def peak_above_start_bytes_of(deltas: list[int]) -> int:
    return peak_above_start_bytes(KernelAllocation(delta, "") for delta in deltas)


@pytest.mark.avx512
@pytest.mark.parametrize(
    "shape",
    [
        {"batch": 2, "cin": 40, "cout": 40, "size": 12, "kernel": 5},
        {"batch": 4, "cin": 48, "cout": 48, "size": 14, "kernel": 3, "stride": 2, "bias": False},
        {"batch": 2, "cin": 72, "cout": 72, "size": 9, "kernel": 7},
    ],
)
@pytest.mark.parametrize("channels_last", [False, True])
def test_depthwise_forward_is_exact(shape: dict, channels_last: bool, two_threads: None) -> None:
    forward, _ = bf16_conv(groups=shape["cin"], channels_last=channels_last, **shape)
    predicted, reason, measured = rule_and_profile("aten.convolution.default", forward)
    assert reason == ""
    assert measured == predicted
    assert cpu_kernel_allocations("aten.convolution.default", forward).allocations is not None


@pytest.mark.amx
@pytest.mark.parametrize(
    ("shape", "op"),
    [
        ({"batch": 2, "cin": 96, "cout": 96, "size": 20, "kernel": 1}, "aten.convolution.default"),
        (
            {"batch": 2, "cin": 96, "cout": 96, "size": 20, "kernel": 1},
            "aten.convolution_backward.default",
        ),
        ({"batch": 2, "cin": 64, "cout": 96, "size": 10, "kernel": 3}, "aten.convolution.default"),
        (
            {"batch": 2, "cin": 1, "cout": 96, "size": 48, "kernel": 11, "stride": 4},
            "aten.convolution.default",
        ),
    ],
)
@pytest.mark.parametrize("channels_last", [False, True])
def test_lower_bound_rules_hold_every_block_they_name(
    shape: dict, op: str, channels_last: bool, two_threads: None
) -> None:
    """Where a rule is a lower bound, the kernel takes every block it names, in that order, and
    the rest are blocks of sizes it does not know (scratchpads; these shapes' weights are not
    padded)."""
    forward, backward = bf16_conv(channels_last=channels_last, **shape)
    predicted, reason, measured = rule_and_profile(
        op, forward if op == "aten.convolution.default" else backward
    )
    assert reason.startswith("bf16")
    known = {abs(size) for size in predicted}
    assert [size for size in measured if abs(size) in known] == predicted
    assert peak_above_start_bytes_of(predicted) <= peak_above_start_bytes_of(measured)


@pytest.mark.amx
def test_nin_first_conv_backward_rule_is_a_loose_lower_bound(two_threads: None) -> None:
    """NiN's 11x11 first conv pads its weights (input channels to 16 for backward-data, 32 for
    the weight gradient) and takes a 2 MB scratchpad: the rule counts 3% of the op's peak."""
    _, backward = bf16_conv(batch=2, cin=1, cout=96, size=48, kernel=11, stride=4)
    predicted, reason, measured = rule_and_profile("aten.convolution_backward.default", backward)
    assert reason.startswith("bf16")
    peak = peak_above_start_bytes_of(measured)
    assert 0.03 * peak <= peak_above_start_bytes_of(predicted) <= peak


@pytest.mark.no_amx
@pytest.mark.parametrize("channels_last", [False, True])
def test_without_amx_ungrouped_rules_stand_down_and_the_probe_measures(
    channels_last: bool, two_threads: None
) -> None:
    """On a CPU without AMX (AMD EPYC's AVX-512 bf16 kernels) the AMX rules named blocks the
    kernel never took (an 11x11 conv from one channel: a 165,888-byte peak against 110,592
    measured), so they name none, and a bf16 model of such convolutions is measured call by call:
    the prediction equals `measure`."""
    forward, backward = bf16_conv(
        batch=2, cin=1, cout=96, size=48, kernel=11, stride=4, channels_last=channels_last
    )
    for op, args in (
        ("aten.convolution.default", forward),
        ("aten.convolution_backward.default", backward),
    ):
        allocations, reason = cpu_kernel_allocations(op, args)
        assert allocations is None and "without AMX" in reason
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 32, 11, stride=4), torch.nn.ReLU(), torch.nn.Conv2d(32, 48, 3)
    )
    spec = StepSpec(
        input_size=(1, 48, 48),
        amp="bf16",
        optimizer="sgd",
        memory_format=("channels_last" if channels_last else "contiguous"),
    )
    report, measured = predict_memory(model, spec, batch_size=2), measure(model, spec, batch_size=2)
    assert report.live_peak_bytes == measured.live_peak_bytes
    assert report.held_peak_bytes == pytest.approx(measured.allocator_peak_bytes, rel=0.01)


@pytest.mark.avx512
@pytest.mark.parametrize(
    ("shape", "threads_used", "channels_last"),
    [
        ({"batch": 3, "cin": 40, "cout": 40, "size": 10, "kernel": 5}, 2, True),
        ({"batch": 1, "cin": 24, "cout": 24, "size": 11, "kernel": 7, "bias": False}, 1, True),
        ({"batch": 2, "cin": 64, "cout": 64, "size": 7, "kernel": 7}, 2, True),
        ({"batch": 2, "cin": 120, "cout": 120, "size": 8, "kernel": 3}, 2, True),
        ({"batch": 3, "cin": 48, "cout": 48, "size": 7, "kernel": 3, "bias": False}, 1, True),
        ({"batch": 2, "cin": 120, "cout": 120, "size": 8, "kernel": 5}, 2, False),
        ({"batch": 3, "cin": 24, "cout": 24, "size": 9, "kernel": 7, "bias": False}, 1, False),
        ({"batch": 1, "cin": 16, "cout": 16, "size": 7, "kernel": 3, "bias": False}, 2, False),
        ({"batch": 2, "cin": 40, "cout": 40, "size": 10, "kernel": 3}, 2, False),
    ],
)
def test_depthwise_weight_gradient_is_exact(
    shape: dict, threads_used: int, channels_last: bool
) -> None:
    """The depthwise weight gradient's scratchpads (channels-last 5x5 and 7x7: ConvNeXt's training
    peak; NCHW: EfficientNet's), on shapes their rules were not read from."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads_used)
    try:
        _, backward = bf16_conv(groups=shape["cin"], channels_last=channels_last, **shape)
        predicted, reason, measured = rule_and_profile(
            "aten.convolution_backward.default", backward
        )
    finally:
        torch.set_num_threads(before)
    assert reason == ""
    assert measured == predicted


@pytest.mark.avx512
def test_small_matrix_multiplies_stay_off_onednn() -> None:
    """ATen keeps a bf16 matrix multiply of at most 16^3 multiply-adds off oneDNN: no workspace."""
    a, b = torch.randn(2, 192).bfloat16(), torch.randn(192, 10).bfloat16()
    assert cpu_kernel_allocations("aten.mm.default", (a, b)) == (None, "")
    assert op_allocations(lambda: aten.mm.default(a, b)) == [2 * 10 * 2]
    big = torch.randn(8, 192).bfloat16()
    assert "scratchpad" in cpu_kernel_allocations("aten.mm.default", (big, b))[1]


@pytest.mark.avx512
def test_convnext_bf16_training_peak_is_modelled() -> None:
    """ConvNeXt's bf16 7x7 depthwise weight gradient takes a 16x16 blocked gradient per group and
    one scratchpad (float32 reduction, transposed input and grad_output: the 1.78 MB block):
    modelled, the allocator peak is the measured one (it was 72% under). The brgemm scratchpads of
    its linear layers and strided convs, which no rule gives, are measured one call at a time
    (`ninlab.analysis.kernel_probe`), so nothing is left a lower bound."""
    entry = LAYER_ZOO["convnext_ln"]
    model = entry.factory()
    report = predict_memory(
        model, input_size=entry.input_size, batch_size=2, amp="bf16", optimizer="adam"
    )
    measured = measure(model, report.spec, batch_size=2)
    assert not report.allocator.lower_bound
    assert "aten.mm.default (16x)" in report.allocator.measured
    assert (
        report.allocator.module.endswith("dwconv")
        and report.allocator.op == "aten.convolution_backward.default"
    )
    assert report.allocator_peak_bytes == measured.allocator_peak_bytes
