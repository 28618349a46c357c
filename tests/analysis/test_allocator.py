"""The CPU workspace rules replayed against the profiler's allocation records, one op call at a
time, and the pitfalls the rules rest on."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from cnn_zoo import resnet_bn
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

from ninlab.analysis.allocator import (
    KernelAllocation,
    cpu_kernel_allocations,
    peak_above_start_bytes,
)
from ninlab.analysis.allocator.conv_call import conv_backend
from ninlab.analysis.allocator.onednn_float32 import mkldnn_conv_forward_allocations
from ninlab.analysis.measure import measure
from ninlab.analysis.predict import predict_memory

aten = torch.ops.aten


@pytest.fixture
def threads() -> Iterator[Callable[[int], None]]:
    """Set the intra-op thread count for one test (oneDNN's choices depend on it)."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def op_allocations(call: Callable[[], tuple[torch.Tensor, ...] | torch.Tensor]) -> list[int]:
    """Allocations of one op call whose outputs are kept alive until the records are read."""
    kept: list[object] = []

    def keep() -> object:
        kept.append(call())
        return None

    keep()
    kept.clear()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        keep()
    records = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    return [e.nbytes() for e in sorted(records, key=lambda e: e.start_ns())]


def deltas(allocations: tuple[KernelAllocation, ...] | None) -> list[int]:
    assert allocations is not None
    return [allocation.delta_bytes for allocation in allocations]


def without_scratchpads(measured: list[int], predicted: list[int]) -> tuple[list[int], list[int]]:
    """Split off blocks of sizes the rule does not predict (oneDNN scratchpads, not modelled)."""
    known = {abs(size) for size in predicted}
    return [s for s in measured if abs(s) in known], [
        s for s in measured if abs(s) not in known and s > 0
    ]


def conv_forward(
    batch: int,
    cin: int,
    cout: int,
    size: int,
    kernel: int,
    stride: int = 1,
    padding: int = 0,
    groups: int = 1,
    bias: bool = True,
):
    torch.manual_seed(0)
    x = torch.randn(batch, cin, size, size)
    w = torch.randn(cout, cin // groups, kernel, kernel)
    b = torch.randn(cout) if bias else None
    args = (x, w, b, [stride] * 2, [padding] * 2, [1, 1], False, [0, 0], groups)
    return args, lambda: aten.convolution.default(*args)


@pytest.mark.avx512
@pytest.mark.parametrize(
    "shape",
    [
        {
            "batch": 2,
            "cin": 1,
            "cout": 96,
            "size": 64,
            "kernel": 11,
            "stride": 4,
        },  # NiN's first conv: input read as is
        {"batch": 2, "cin": 96, "cout": 96, "size": 26, "kernel": 1},  # NiN's 1x1 convs
        {"batch": 2, "cin": 96, "cout": 256, "size": 26, "kernel": 5, "padding": 2},
        {
            "batch": 2,
            "cin": 384,
            "cout": 10,
            "size": 5,
            "kernel": 3,
            "padding": 1,
        },  # 10 classes: padded channels and bias
        {"batch": 2, "cin": 17, "cout": 24, "size": 16, "kernel": 3},  # both channel counts padded
        {"batch": 2, "cin": 16, "cout": 10, "size": 16, "kernel": 3, "bias": False},
        {
            "batch": 2,
            "cin": 64,
            "cout": 64,
            "size": 16,
            "kernel": 3,
            "padding": 1,
            "groups": 64,
        },  # depthwise
        # depthwise with channels not a multiple of the block: groups padded in every blocked copy
        {"batch": 2, "cin": 24, "cout": 24, "size": 16, "kernel": 3, "padding": 1, "groups": 24},
        {
            "batch": 2,
            "cin": 72,
            "cout": 72,
            "size": 16,
            "kernel": 5,
            "stride": 2,
            "padding": 2,
            "groups": 72,
        },
        {"batch": 2, "cin": 64, "cout": 128, "size": 16, "kernel": 3, "padding": 1, "groups": 4},
        # a 1x1 kernel pads an input of fewer channels than a block (squeeze-excitation's expand)
        {"batch": 2, "cin": 6, "cout": 96, "size": 1, "kernel": 1},
        {"batch": 2, "cin": 3, "cout": 16, "size": 8, "kernel": 1},
    ],
)
def test_conv_forward_allocations_match_the_profiler(
    shape: dict[str, int], threads: Callable[[int], None]
) -> None:
    threads(2)
    args, call = conv_forward(**shape)
    assert conv_backend(*args) == "Mkldnn"
    assert op_allocations(call) == deltas(
        cpu_kernel_allocations("aten.convolution.default", args).allocations
    )


def test_nin_1x1_conv_holds_two_extra_activation_blocks() -> None:
    """Why NiN's inference allocator peak is 45% above its live peak."""
    allocations = mkldnn_conv_forward_allocations(
        input_shape=(128, 96, 54, 54),
        weight_shape=(96, 96, 1, 1),
        output_shape=(128, 96, 54, 54),
        bias=True,
    )
    activation = 128 * 96 * 54 * 54 * 4
    assert activation == 143_327_232
    # blocked input, weights, blocked result
    assert peak_above_start_bytes(allocations) == 2 * activation + 96 * 96 * 4
    assert [s.output for s in allocations].count(0) == 1


def conv_backward(
    batch: int,
    cin: int,
    cout: int,
    size: int,
    kernel: int,
    stride: int = 1,
    padding: int = 0,
    groups: int = 1,
    mask=(True, True, True),
):
    torch.manual_seed(0)
    x = torch.randn(batch, cin, size, size)
    w = torch.randn(cout, cin // groups, kernel, kernel)
    out = aten.convolution.default(
        x, w, None, [stride] * 2, [padding] * 2, [1, 1], False, [0, 0], groups
    )
    grad = torch.randn_like(out)
    args = (
        grad,
        x,
        w,
        [cout],
        [stride] * 2,
        [padding] * 2,
        [1, 1],
        False,
        [0, 0],
        groups,
        list(mask),
    )
    return args, lambda: aten.convolution_backward.default(*args)


@pytest.mark.avx512
@pytest.mark.parametrize(
    "shape",
    [
        {"batch": 2, "cin": 16, "cout": 16, "size": 32, "kernel": 3, "padding": 1},
        {"batch": 2, "cin": 17, "cout": 24, "size": 16, "kernel": 3},
        {
            "batch": 2,
            "cin": 3,
            "cout": 16,
            "size": 32,
            "kernel": 3,
            "padding": 1,
        },  # input channels under a block
        {
            "batch": 2,
            "cin": 96,
            "cout": 10,
            "size": 8,
            "kernel": 3,
            "padding": 1,
            "mask": (False, True, True),
        },
        {
            "batch": 16,
            "cin": 96,
            "cout": 96,
            "size": 8,
            "kernel": 1,
        },  # 1x1 stays on oneDNN with batch >= 16
        {"batch": 2, "cin": 64, "cout": 64, "size": 16, "kernel": 3, "padding": 1, "groups": 64},
        {"batch": 2, "cin": 24, "cout": 24, "size": 16, "kernel": 3, "padding": 1, "groups": 24},
        {
            "batch": 2,
            "cin": 24,
            "cout": 24,
            "size": 16,
            "kernel": 3,
            "stride": 2,
            "padding": 1,
            "groups": 24,
        },
        {
            "batch": 2,
            "cin": 32,
            "cout": 64,
            "size": 16,
            "kernel": 3,
            "padding": 1,
            "groups": 4,
            "mask": (True, True, False),
        },
    ],
)
def test_conv_backward_allocations_match_the_profiler(
    shape: dict, threads: Callable[[int], None]
) -> None:
    threads(1)  # one thread: no scratchpad for reducing weight gradients across threads
    args, call = conv_backward(**shape)
    predicted = cpu_kernel_allocations("aten.convolution_backward.default", args).allocations
    assert op_allocations(call) == deltas(predicted)


@pytest.mark.avx512
@pytest.mark.parametrize(
    "shape",
    [
        # fitted on: oneDNN's batch split (a scratchpad or none), the one-block bias extra
        {"batch": 2, "cin": 96, "cout": 96, "size": 54, "kernel": 1},  # NiN's 1x1: split
        {"batch": 16, "cin": 96, "cout": 96, "size": 8, "kernel": 1},  # not split
        {"batch": 2, "cin": 16, "cout": 16, "size": 16, "kernel": 3, "padding": 1},
        {
            "batch": 2,
            "cin": 96,
            "cout": 10,
            "size": 8,
            "kernel": 3,
            "padding": 1,
        },  # one block, not split
        {"batch": 1, "cin": 32, "cout": 32, "size": 64, "kernel": 3, "padding": 1},  # rows split
        # not fitted on
        {"batch": 3, "cin": 48, "cout": 8, "size": 30, "kernel": 5, "padding": 2},
        {
            "batch": 2,
            "cin": 3,
            "cout": 16,
            "size": 32,
            "kernel": 3,
            "padding": 1,
            "mask": (False, True, True),
        },
        {
            "batch": 2,
            "cin": 1,
            "cout": 96,
            "size": 224,
            "kernel": 11,
            "stride": 4,
            "mask": (False, True, True),
        },  # NiN's first
        # 1x1 kernels on squeeze-excitation's 1x1 maps: a padded input under a block, the
        # one-block bias extra (fitted on), then not fitted on
        {"batch": 2, "cin": 6, "cout": 96, "size": 1, "kernel": 1},
        {"batch": 2, "cin": 96, "cout": 6, "size": 1, "kernel": 1},
        {"batch": 2, "cin": 4, "cout": 16, "size": 1, "kernel": 1},
        {"batch": 2, "cin": 12, "cout": 12, "size": 8, "kernel": 1},
        {"batch": 4, "cin": 8, "cout": 40, "size": 7, "kernel": 1},
        {"batch": 2, "cin": 24, "cout": 10, "size": 6, "kernel": 1},
        {"batch": 2, "cin": 96, "cout": 6, "size": 32, "kernel": 1},
    ],
)
def test_conv_backward_weight_gradient_scratchpad_with_two_threads(
    shape: dict, threads: Callable[[int], None]
) -> None:
    """With several threads oneDNN may split the batch (or, in NCHW, batch x rows) and reduce the
    per-thread weight gradients in a scratchpad; whether it does is its own cost model, redone in
    `onednn_weight_gradient_batch_threads`."""
    threads(2)
    args, call = conv_backward(**shape)
    assert op_allocations(call) == deltas(
        cpu_kernel_allocations("aten.convolution_backward.default", args).allocations
    )


@pytest.mark.avx512
@pytest.mark.parametrize(
    "shape",
    [
        {"batch": 2, "cin": 16, "cout": 16, "size": 32, "kernel": 3, "stride": 2, "padding": 1},
        # (a strided 1x1, ResNet's downsampling shortcut, is measured: oneDNN's unit-stride copy)
        {"batch": 2, "cin": 3, "cout": 10, "size": 32, "kernel": 3, "stride": 2, "padding": 1},
        {"batch": 2, "cin": 16, "cout": 96, "size": 32, "kernel": 7, "stride": 2, "padding": 3},
    ],
)
def test_strided_conv_backward_allocations_match_the_profiler(
    shape: dict, threads: Callable[[int], None]
) -> None:
    threads(2)
    args, call = conv_backward(**shape)
    assert op_allocations(call) == deltas(
        cpu_kernel_allocations("aten.convolution_backward.default", args).allocations
    )


def test_unmodelled_convolutions_say_why() -> None:
    x, w = torch.randn(2, 16, 8, 8), torch.randn(16, 16, 3, 3)
    window = ([1, 1], [1, 1], [1, 1], False, [0, 0], 1)
    assert (
        cpu_kernel_allocations("aten.convolution.default", (x, w, None, *window)).unmodelled == ""
    )
    bf16 = (x.bfloat16(), w.bfloat16(), None, *window)
    assert cpu_kernel_allocations(
        "aten.convolution.default", bf16
    ).unmodelled  # not exact: a lower bound at most
    grad = torch.randn(2, 16, 4, 4).to(memory_format=torch.channels_last)
    patchify = (torch.randn(16, 16, 2, 2), None, [2, 2], [0, 0], *window[2:])
    channels_last = (grad, x.to(memory_format=torch.channels_last), *patchify, [True, True, True])
    assert (
        "channels-last"
        in cpu_kernel_allocations("aten.convolution_backward.default", channels_last).unmodelled
    )
    depthwise, _ = conv_backward(
        batch=2, cin=32, cout=32, size=4, kernel=5, padding=2, groups=32, mask=(False, False, True)
    )
    assert (
        "depthwise bias gradient"
        in cpu_kernel_allocations("aten.convolution_backward.default", depthwise).unmodelled
    )


@pytest.mark.avx512
@pytest.mark.parametrize(
    ("shape", "threads_used"),
    [
        # fitted on: EfficientNet's 5x5 depthwise convs on 4x4 maps
        (
            {"batch": 2, "cin": 96, "cout": 96, "size": 4, "kernel": 5, "padding": 2, "groups": 96},
            2,
        ),
        (
            {
                "batch": 2,
                "cin": 64,
                "cout": 64,
                "size": 8,
                "kernel": 5,
                "stride": 2,
                "padding": 2,
                "groups": 64,
            },
            2,
        ),
        # not fitted on: padded channels, 7x7, one buffer past 256 positions a thread, batch 1,
        # one thread
        (
            {"batch": 2, "cin": 24, "cout": 24, "size": 8, "kernel": 5, "padding": 2, "groups": 24},
            2,
        ),
        (
            {
                "batch": 2,
                "cin": 40,
                "cout": 40,
                "size": 23,
                "kernel": 7,
                "padding": 3,
                "groups": 40,
            },
            2,
        ),
        (
            {"batch": 1, "cin": 32, "cout": 32, "size": 8, "kernel": 5, "padding": 2, "groups": 32},
            2,
        ),
        (
            {
                "batch": 2,
                "cin": 32,
                "cout": 32,
                "size": 9,
                "kernel": 5,
                "stride": 2,
                "padding": 2,
                "groups": 32,
            },
            1,
        ),
        (
            {
                "batch": 3,
                "cin": 20,
                "cout": 20,
                "size": 12,
                "kernel": 5,
                "padding": 2,
                "groups": 20,
                "mask": (True, True, False),
            },
            2,
        ),
    ],
)
def test_depthwise_weight_gradient_over_3x3_runs_gemm(
    shape: dict, threads_used: int, threads: Callable[[int], None]
) -> None:
    """ONEDNN_VERBOSE: an NCHW depthwise weight gradient runs jit_dw for 1x1 and 3x3 kernels,
    oneDNN's gemm kernel (per-thread weight-reduction and im2col buffers) for larger ones."""
    threads(threads_used)
    args, call = conv_backward(**shape)
    assert op_allocations(call) == deltas(
        cpu_kernel_allocations("aten.convolution_backward.default", args).allocations
    )


def conv_channels_last(
    batch: int,
    cin: int,
    cout: int,
    size: int,
    kernel: int,
    stride: int = 1,
    groups: int = 1,
    bias: bool = False,
    weight_channels_last: bool = True,
):
    """A channels-last convolution's arguments, forward (as `conv_forward`) and backward."""
    torch.manual_seed(0)
    x = torch.randn(batch, cin, size, size).contiguous(memory_format=torch.channels_last)
    w = torch.randn(cout, cin // groups, kernel, kernel)
    if weight_channels_last:
        w = w.contiguous(memory_format=torch.channels_last)
    window = ([stride] * 2, [kernel // 2] * 2, [1, 1], False, [0, 0], groups)
    forward = (x, w, torch.randn(cout) if bias else None, *window)
    grad = torch.randn_like(aten.convolution.default(*forward))
    backward = (grad, x, w, [cout] if bias else None, *window, [True, True, bias])
    return forward, backward


@pytest.mark.avx512
@pytest.mark.parametrize(
    ("shape", "threads_used"),
    [
        ({"batch": 2, "cin": 32, "cout": 32, "size": 16, "kernel": 3}, 2),
        (
            {"batch": 2, "cin": 32, "cout": 32, "size": 16, "kernel": 3, "stride": 2},
            1,
        ),  # scratchpad by threads
        (
            {
                "batch": 2,
                "cin": 32,
                "cout": 32,
                "size": 16,
                "kernel": 3,
                "weight_channels_last": False,
            },
            2,
        ),  # weight copied
        (
            {"batch": 2, "cin": 24, "cout": 40, "size": 16, "kernel": 3, "bias": True},
            2,
        ),  # output channels padded
        (
            {"batch": 2, "cin": 3, "cout": 32, "size": 16, "kernel": 4, "stride": 4, "bias": True},
            2,
        ),  # ConvNeXt's stem
        (
            {
                "batch": 2,
                "cin": 24,
                "cout": 24,
                "size": 16,
                "kernel": 3,
                "groups": 24,
                "bias": True,
            },
            2,
        ),  # depthwise
    ],
)
def test_channels_last_conv_forward_allocations_match_the_profiler(
    shape: dict, threads_used: int, threads: Callable[[int], None]
) -> None:
    threads(threads_used)
    forward, _ = conv_channels_last(**shape)
    assert op_allocations(lambda: aten.convolution.default(*forward)) == deltas(
        cpu_kernel_allocations("aten.convolution.default", forward).allocations
    )


@pytest.mark.avx512
@pytest.mark.parametrize(
    "shape",
    [
        {
            "batch": 2,
            "cin": 32,
            "cout": 32,
            "size": 16,
            "kernel": 7,
            "groups": 32,
            "bias": True,
        },  # ConvNeXt's 7x7
        {"batch": 4, "cin": 24, "cout": 24, "size": 16, "kernel": 7, "groups": 24},
        {
            "batch": 2,
            "cin": 40,
            "cout": 40,
            "size": 12,
            "kernel": 7,
            "stride": 2,
            "groups": 40,
            "bias": True,
        },
        {"batch": 2, "cin": 32, "cout": 32, "size": 16, "kernel": 5, "groups": 32},
        {"batch": 2, "cin": 24, "cout": 24, "size": 16, "kernel": 3, "groups": 24, "bias": True},
        {"batch": 2, "cin": 24, "cout": 24, "size": 16, "kernel": 3, "stride": 2, "groups": 24},
    ],
)
def test_channels_last_depthwise_backward_allocations_match_the_profiler(
    shape: dict, threads: Callable[[int], None]
) -> None:
    threads(2)
    _, backward = conv_channels_last(**shape)
    measured = op_allocations(lambda: aten.convolution_backward.default(*backward))
    assert measured == deltas(
        cpu_kernel_allocations("aten.convolution_backward.default", backward).allocations
    )


def conv_channels_last_backward(
    batch: int,
    cin: int,
    cout: int,
    size: int,
    kernel: int,
    stride: int = 1,
    padding: int | None = None,
    bias: bool = False,
    mask: tuple[bool, ...] = (True, True, False),
    contiguous: str = "",
):
    """An ungrouped convolution_backward's arguments with input, weight and grad_output
    channels-last but the one `contiguous` names (NCHW, as ATen would copy it); "same" padding
    unless given."""
    torch.manual_seed(0)
    x = torch.randn(batch, cin, size, size).contiguous(memory_format=torch.channels_last)
    w = torch.randn(cout, cin, kernel, kernel).contiguous(memory_format=torch.channels_last)
    window = (
        [stride] * 2,
        [kernel // 2 if padding is None else padding] * 2,
        [1, 1],
        False,
        [0, 0],
        1,
    )
    grad = torch.randn_like(aten.convolution.default(x, w, None, *window))
    tensors = {"grad_output": grad, "input": x, "weight": w}
    if contiguous:
        tensors[contiguous] = tensors[contiguous].contiguous()
    return (
        tensors["grad_output"],
        tensors["input"],
        tensors["weight"],
        [cout] if bias else None,
        *window,
        list(mask),
    )


@pytest.mark.avx512
@pytest.mark.parametrize(
    "shape",
    [
        # fitted on: the batch split by oneDNN's cost model (a reduction scratchpad or none)
        {"batch": 2, "cin": 16, "cout": 16, "size": 16, "kernel": 3},  # split over the batch
        {"batch": 2, "cin": 32, "cout": 32, "size": 16, "kernel": 3},  # split over channel blocks
        {"batch": 2, "cin": 32, "cout": 32, "size": 16, "kernel": 1},  # 1x1 kernel's own split
        {
            "batch": 2,
            "cin": 24,
            "cout": 40,
            "size": 16,
            "kernel": 3,
            "bias": True,
            "mask": (True, True, True),
        },  # padded bias
        # not fitted on
        {"batch": 8, "cin": 64, "cout": 128, "size": 28, "kernel": 3},
        {
            "batch": 2,
            "cin": 48,
            "cout": 48,
            "size": 56,
            "kernel": 3,
            "bias": True,
            "mask": (False, True, True),
        },
        {
            "batch": 2,
            "cin": 16,
            "cout": 24,
            "size": 32,
            "kernel": 3,
            "bias": True,
            "mask": (True, True, True),
        },
        {"batch": 2, "cin": 96, "cout": 96, "size": 54, "kernel": 1},  # NiN's 1x1
        {
            "batch": 2,
            "cin": 10,
            "cout": 10,
            "size": 5,
            "kernel": 1,
        },  # NiN's 10-class 1x1: channels under a block
        {
            "batch": 2,
            "cin": 24,
            "cout": 40,
            "size": 16,
            "kernel": 1,
            "bias": True,
            "mask": (True, True, True),
        },  # padded bias in the scratchpad
        {
            "batch": 2,
            "cin": 3,
            "cout": 32,
            "size": 32,
            "kernel": 3,
            "mask": (False, True, False),
        },  # a first layer
        {
            "batch": 2,
            "cin": 3,
            "cout": 32,
            "size": 32,
            "kernel": 4,
            "stride": 4,
            "padding": 0,
            "bias": True,
            "mask": (False, True, True),
        },  # ConvNeXt's stem
        {
            "batch": 2,
            "cin": 32,
            "cout": 64,
            "size": 16,
            "kernel": 3,
            "stride": 2,
            "mask": (False, True, False),
        },
        {
            "batch": 2,
            "cin": 48,
            "cout": 80,
            "size": 28,
            "kernel": 3,
            "stride": 2,
        },  # brgconv_strided
        {
            "batch": 4,
            "cin": 112,
            "cout": 64,
            "size": 16,
            "kernel": 3,
            "stride": 2,
            "bias": True,
            "mask": (True, True, True),
        },
        {
            "batch": 2,
            "cin": 256,
            "cout": 512,
            "size": 14,
            "kernel": 1,
            "stride": 2,
            "mask": (True, False, False),
        },
        {
            "batch": 2,
            "cin": 40,
            "cout": 80,
            "size": 28,
            "kernel": 1,
            "stride": 2,
            "bias": True,
            "mask": (True, True, True),
        },  # reduce to unit stride
        {
            "batch": 2,
            "cin": 64,
            "cout": 128,
            "size": 32,
            "kernel": 1,
            "stride": 2,
            "mask": (False, True, False),
        },
        {
            "batch": 2,
            "cin": 32,
            "cout": 64,
            "size": 16,
            "kernel": 3,
            "contiguous": "weight",
        },  # weight copied
        {
            "batch": 4,
            "cin": 128,
            "cout": 32,
            "size": 8,
            "kernel": 1,
            "contiguous": "grad_output",
        },  # grad_output copied
        {
            "batch": 2,
            "cin": 16,
            "cout": 16,
            "size": 16,
            "kernel": 3,
            "bias": True,
            "mask": (False, True, True),
        },  # one-block bias
        {
            "batch": 2,
            "cin": 3,
            "cout": 16,
            "size": 32,
            "kernel": 3,
            "stride": 2,
            "bias": True,
            "mask": (False, True, True),
        },
    ],
)
def test_channels_last_conv_backward_allocations_match_the_profiler(
    shape: dict, threads: Callable[[int], None]
) -> None:
    threads(2)
    args = conv_channels_last_backward(**shape)
    assert cpu_kernel_allocations("aten.convolution_backward.default", args).unmodelled == ""
    measured = op_allocations(lambda: aten.convolution_backward.default(*args))
    assert measured == deltas(
        cpu_kernel_allocations("aten.convolution_backward.default", args).allocations
    )


@pytest.mark.avx512
def test_channels_last_backward_data_scratchpad_grows_with_threads(
    threads: Callable[[int], None],
) -> None:
    threads(1)
    args = conv_channels_last_backward(batch=2, cin=32, cout=32, size=16, kernel=3)
    assert op_allocations(lambda: aten.convolution_backward.default(*args)) == deltas(
        cpu_kernel_allocations("aten.convolution_backward.default", args).allocations
    )


@pytest.mark.avx512
@pytest.mark.parametrize(
    "shape",
    [
        {
            "batch": 2,
            "cin": 32,
            "cout": 64,
            "size": 16,
            "kernel": 2,
            "stride": 2,
            "padding": 0,
        },  # patchify
        {"batch": 2, "cin": 48, "cout": 80, "size": 28, "kernel": 3, "stride": 2, "padding": 0},
        {"batch": 4, "cin": 112, "cout": 64, "size": 15, "kernel": 3, "stride": 2},  # odd input
    ],
)
def test_unmodelled_channels_last_backward_says_why(
    shape: dict, threads: Callable[[int], None]
) -> None:
    """Left out: brgconv_strided's scratchpad where kernel and stride are equal (patchify), the
    padding is not "same" or the stride does not divide the input follows no rule found."""
    threads(2)
    args = conv_channels_last_backward(**shape)
    assert (
        "not of a measured kind"
        in cpu_kernel_allocations("aten.convolution_backward.default", args).unmodelled
    )


@pytest.mark.avx512
def test_unmodelled_bf16_convolution_says_why() -> None:
    """PyTorch runs a bfloat16 convolution on oneDNN only where oneDNN has AVX-512 (with AVX2
    it is Slow2d, and the reason says so instead)."""
    x, w = torch.randn(2, 16, 8, 8), torch.randn(16, 16, 3, 3)
    window = ([1, 1], [1, 1], [1, 1], False, [0, 0], 1)
    bf16 = (x.bfloat16(), w.bfloat16(), None, *window)
    assert "bf16" in cpu_kernel_allocations("aten.convolution.default", bf16).unmodelled


@pytest.mark.canary
def test_one_thread_small_batch_1x1_conv_is_a_matrix_multiply(
    threads: Callable[[int], None],
) -> None:
    """PyTorch runs a 1x1 conv on one thread at batch < 16 as Slow2d, allocating only its output."""
    threads(1)
    args, call = conv_forward(batch=2, cin=96, cout=96, size=16, kernel=1)
    assert conv_backend(*args) == "Slow2d"
    assert cpu_kernel_allocations("aten.convolution.default", args).allocations is None
    assert op_allocations(call) == [2 * 96 * 16 * 16 * 4]  # the output, nothing else


def test_the_backend_is_asked_again_where_the_settings_it_reads_change(
    threads: Callable[[int], None],
) -> None:
    """`conv_backend` remembers PyTorch's answer per call signature, the thread count and
    oneDNN's switch among it: the same 1x1 call is Slow2d on one thread or with oneDNN off,
    Mkldnn on two, whatever was asked before."""
    args, _ = conv_forward(batch=2, cin=96, cout=96, size=16, kernel=1)
    for count, backend in ((2, "Mkldnn"), (1, "Slow2d"), (2, "Mkldnn")):
        threads(count)
        assert conv_backend(*args) == backend
    torch.backends.mkldnn.enabled = False
    try:
        assert conv_backend(*args) == "Slow2d"
    finally:
        torch.backends.mkldnn.enabled = True
    assert conv_backend(*args) == "Mkldnn"


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("thread_count", [1, 2])
def test_batch_norm_forward(
    training: bool,
    layout: torch.memory_format,
    dtype: torch.dtype,
    thread_count: int,
    threads: Callable[[int], None],
) -> None:
    """Channels-last training adds a float32 sum per channel and thread (the 24 channels here:
    192 bytes with 2 threads); bf16 input, bf16 output, float32 statistics."""
    threads(thread_count)
    x = torch.randn(4, 24, 5, 5, dtype=dtype).contiguous(memory_format=layout)
    args = (
        x,
        torch.ones(24),
        torch.zeros(24),
        torch.zeros(24),
        torch.ones(24),
        training,
        0.1,
        1e-5,
    )
    allocations = cpu_kernel_allocations("aten.native_batch_norm.default", args).allocations
    assert op_allocations(lambda: aten.native_batch_norm.default(*args)) == deltas(allocations)
    assert (
        cpu_kernel_allocations("aten._native_batch_norm_legit.default", args).allocations
        == allocations
    )


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("parameters", ["float32", "the input's", "none"])
@pytest.mark.parametrize("running_stats", [True, False])
def test_batch_norm_forward_of_every_dtype_with_or_without_running_stats(
    layout: torch.memory_format,
    dtype: torch.dtype,
    parameters: str,
    running_stats: bool,
    threads: Callable[[int], None],
) -> None:
    """Without running statistics (an instance norm's batch norm, in inference too) the kernel
    still sums the batch's mean and variance: the rule left them out, an instance norm's
    inference allocator level 0.989 of the real one. Statistics take the input's dtype where no
    parameter or running statistic is float32 (a model in bf16 or float16)."""
    threads(2)
    x = torch.randn(4, 24, 5, 5, dtype=dtype).contiguous(memory_format=layout)
    own = dtype if parameters == "the input's" else torch.float32
    weight = None if parameters == "none" else torch.ones(24, dtype=own)
    stats = (torch.zeros(24, dtype=own), torch.ones(24, dtype=own)) if running_stats else ()
    for training in (True, False) if running_stats else (True,):
        args = (x, weight, weight, *(stats or (None, None)), training, 0.1, 1e-5)
        allocations = cpu_kernel_allocations("aten.native_batch_norm.default", args).allocations
        measured = op_allocations(functools.partial(aten.native_batch_norm.default, *args))
        assert measured == deltas(allocations)


@pytest.mark.parametrize("thread_count", [1, 2])
def test_channels_last_batch_norm_backward_sums_per_thread(
    thread_count: int, threads: Callable[[int], None]
) -> None:
    threads(thread_count)
    x = torch.randn(4, 24, 5, 5).contiguous(memory_format=torch.channels_last)
    grad = torch.randn_like(x)
    args = (
        grad,
        x,
        torch.ones(24),
        None,
        None,
        x.mean((0, 2, 3)),
        torch.ones(24),
        True,
        1e-5,
        [True, True, True],
    )
    measured = op_allocations(lambda: aten.native_batch_norm_backward.default(*args))
    assert measured == deltas(
        cpu_kernel_allocations("aten.native_batch_norm_backward.default", args).allocations
    )
    assert measured[-2:] == [thread_count * 2 * 24 * 4, -thread_count * 2 * 24 * 4]


def _reduced_batch_norm_backward(
    shape: tuple[int, ...],
    *,
    dtype: torch.dtype = torch.bfloat16,
    parameters: torch.dtype | None = torch.float32,
    channels_last: bool = False,
    grad_channels_last: bool | None = None,
    training: bool = True,
    mask: tuple[bool, bool, bool] = (True, True, True),
) -> tuple[object, ...]:
    """A batch norm backward's arguments as the forward before it leaves them: a bfloat16 or
    float16 input, its weight, bias and running statistics float32 (autocast's mixed-type
    kernel) or of the input's dtype, or absent (None)."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(shape).to(dtype).contiguous(memory_format=memory_format)
    if grad_channels_last is not None:
        memory_format = torch.channels_last if grad_channels_last else torch.contiguous_format
    grad = torch.randn(shape).to(dtype).contiguous(memory_format=memory_format)
    channels = shape[1]
    weight, bias, mean, var = (
        (None,) * 4
        if parameters is None
        else (
            torch.rand(channels, dtype=parameters) + 0.5,
            torch.zeros(channels, dtype=parameters),
            torch.zeros(channels, dtype=parameters),
            torch.ones(channels, dtype=parameters),
        )
    )
    _, saved_mean, saved_invstd = aten.native_batch_norm.default(
        x, weight, bias, mean, var, training, 0.1, 1e-5
    )
    saved = (saved_mean, saved_invstd) if training else (None, None)
    return (grad, x, weight, mean, var, *saved, training, 1e-5, list(mask))


@pytest.mark.parametrize("thread_count", [1, 2])
@pytest.mark.parametrize(
    ("shape", "fields"),
    [
        ((4, 24, 5, 5), {}),
        ((4, 24, 5, 5), {"channels_last": True}),
        ((2, 3, 4, 4), {"channels_last": True, "mask": (True, False, False)}),
        ((8, 64, 14, 14), {"channels_last": True, "mask": (False, True, True)}),
        ((3, 16, 9, 7), {"dtype": torch.float16}),
        ((3, 16, 9, 7), {"dtype": torch.float16, "channels_last": True}),
        ((5, 32, 6, 6), {"parameters": torch.bfloat16, "channels_last": True}),
        ((5, 32, 6, 6), {"parameters": torch.bfloat16}),
        ((4, 24, 5, 5), {"training": False, "channels_last": True}),
        ((4, 24, 5, 5), {"parameters": None, "mask": (True, False, False)}),
        ((8, 16), {}),  # vectors: the channels-last branch
        ((8, 16, 1, 1), {"mask": (True, False, False)}),
        ((4, 16, 10), {}),
        ((1, 32, 7, 7), {"channels_last": True}),
    ],
)
def test_reduced_precision_batch_norm_backward_blocks(
    shape: tuple[int, ...],
    fields: dict[str, Any],
    thread_count: int,
    threads: Callable[[int], None],
) -> None:
    """bfloat16 and float16 batch norm backward (what autocast's convolutions hand it) with input
    and gradient in one layout: the float32 kernel's blocks, weight and bias gradients in the
    weight's dtype, and in channels-last three float32 per-channel blocks around the per-thread
    sums, exactly as the profiler records them."""
    threads(thread_count)
    args = _reduced_batch_norm_backward(shape, **fields)
    blocks = cpu_kernel_allocations("aten.native_batch_norm_backward.default", args)
    assert blocks.unmodelled == ""
    assert op_allocations(lambda: aten.native_batch_norm_backward.default(*args)) == deltas(
        blocks.allocations
    )


@pytest.mark.parametrize("memory_format", ["contiguous", "channels_last"])
def test_a_bf16_conv_net_with_batch_norm_is_exact_without_probing_its_backward(
    memory_format: str,
) -> None:
    """Under bf16 autocast every batch norm backward of a residual net (its convolutions hand it
    bfloat16, its weight float32) is priced by the rule, not probed, and the step's allocator
    peak is the measured one."""
    model = resnet_bn()
    fields = {"input_size": (3, 16, 16), "amp": "bf16", "memory_format": memory_format}
    report = predict_memory(model, batch_size=4, optimizer="sgd", **fields)
    assert report.allocator is not None
    assert not any("batch_norm" in op for op in report.allocator.measured)
    measured = measure(model, report.spec, batch_size=4)
    assert report.allocator_trust.exact
    assert report.allocator_peak_bytes == measured.allocator_peak_bytes


def test_reduced_precision_batch_norm_backward_in_two_layouts_is_measured() -> None:
    """An input and a gradient in two layouts take the kernel's mixed-type copies (a float32
    copy of a channels-last input, 8,192 bytes for this 4,096), measured per call."""
    args = _reduced_batch_norm_backward((2, 16, 8, 8), channels_last=True, grad_channels_last=False)
    assert "two layouts" in (
        cpu_kernel_allocations("aten.native_batch_norm_backward.default", args).unmodelled
    )
    assert 8192 in op_allocations(lambda: aten.native_batch_norm_backward.default(*args))


@pytest.mark.parametrize("expanded_grad", [False, True])
def test_batch_norm_backward_allocates_grad_input_twice_when_contiguous(
    expanded_grad: bool,
) -> None:
    x = torch.randn(4, 16, 8, 8)
    weight, mean, invstd = torch.ones(16), x.mean((0, 2, 3)), torch.ones(16)
    grad = torch.ones(()).expand_as(x) if expanded_grad else torch.randn_like(x)
    args = (grad, x, weight, None, None, mean, invstd, True, 1e-5, [True, True, True])
    measured = op_allocations(lambda: aten.native_batch_norm_backward.default(*args))
    predicted = cpu_kernel_allocations("aten.native_batch_norm_backward.default", args).allocations
    assert measured == deltas(predicted)
    extra = peak_above_start_bytes(predicted) - (x.numel() * 4 + 2 * 64)
    assert extra == (64 if expanded_grad else x.numel() * 4)


# --- pitfalls -------------------------------------------------------------------------------


class _Seen(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.canary
def test_inference_mode_hands_a_dispatch_mode_undecomposed_composites() -> None:
    """PyTorch decomposes conv2d and max_pool2d before a dispatch mode sees them, except under
    inference_mode."""
    pool, conv, x = torch.nn.MaxPool2d(2), torch.nn.Conv2d(3, 4, 3), torch.randn(1, 3, 8, 8)
    with _Seen() as no_grad_seen, torch.no_grad():
        pool(conv(x))
    with _Seen() as inference_seen, torch.inference_mode():
        pool(conv(x))
    assert "aten.max_pool2d_with_indices.default" in no_grad_seen.ops
    assert {"aten.conv2d.default", "aten.max_pool2d.default"} <= set(inference_seen.ops)


@pytest.mark.canary
@pytest.mark.parametrize("guard", [torch.no_grad, torch.inference_mode])
def test_cpu_max_pool_allocates_int64_indices_without_grad(guard: Callable[[], object]) -> None:
    """PyTorch's CPU max pool allocates (then frees) int64 indices even when no gradient is kept."""
    x = torch.randn(2, 16, 12, 12)
    output_bytes = 2 * 16 * 6 * 6 * 4
    with guard():  # type: ignore[attr-defined]
        measured = op_allocations(lambda: torch.nn.functional.max_pool2d(x, 2))
    assert measured == [
        output_bytes,
        2 * output_bytes,
        -2 * output_bytes,
    ]  # output, int64 indices freed


@pytest.mark.canary
def test_cpu_dropout_mask_is_float32() -> None:
    """PyTorch's CPU dropout draws its mask with bernoulli_ into a float32 tensor."""
    x = torch.randn(2, 16, 12, 12, requires_grad=True)
    masks: list[torch.dtype] = []

    class Masks(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            if func is aten.bernoulli_.float:
                masks.append(args[0].dtype)
            return func(*args, **(kwargs or {}))

    with Masks():
        torch.nn.functional.dropout(x, 0.5, training=True)
    assert masks == [torch.float32]  # CUDA's fused native_dropout keeps a bool mask instead


@pytest.mark.avx512
@pytest.mark.parametrize(
    ("query", "keys", "threads_used"),
    [
        ((4, 4, 256, 24), 256, 2),  # blocks of 64 queries
        ((4, 4, 64, 16), 64, 1),  # blocks of 32 queries, one thread
        ((2, 2, 800, 32), 600, 2),  # blocks of 256 queries, keys under one block of 512
    ],
)
def test_flash_attention_allocations_match_the_profiler(
    query: tuple[int, ...], keys: int, threads_used: int, threads: Callable[[int], None]
) -> None:
    threads(threads_used)
    torch.manual_seed(0)
    batch, heads, _, head_size = query
    q, k, v = (
        torch.randn(query),
        torch.randn(batch, heads, keys, head_size),
        torch.randn(batch, heads, keys, head_size),
    )
    forward = aten._scaled_dot_product_flash_attention_for_cpu.default
    backward = aten._scaled_dot_product_flash_attention_for_cpu_backward.default
    out, lse = forward(q, k, v)[:2]
    backward_args = (torch.randn_like(out), q, k, v, out, lse, 0.0, False)
    assert op_allocations(lambda: forward(q, k, v)) == deltas(
        cpu_kernel_allocations(str(forward), (q, k, v)).allocations
    )
    assert op_allocations(lambda: backward(*backward_args)) == deltas(
        cpu_kernel_allocations(str(backward), backward_args).allocations
    )


@pytest.mark.avx512
@pytest.mark.parametrize("mask_shape", [(256, 256), (4, 4, 256, 256), (4, 1, 1, 256)])
def test_flash_attention_allocations_do_not_depend_on_the_mask(
    mask_shape: tuple[int, ...], threads: Callable[[int], None]
) -> None:
    """An `attn_mask` reaches the CPU flash kernel as a keyword (a bool mask first becomes a
    float one through `where`, an op the trace sees); the kernel adds it to each score block in
    place, so its blocks are those of the unmasked call, which the rule gives from query and key."""
    threads(2)
    torch.manual_seed(0)
    q, k, v = (torch.randn(4, 4, 256, 24) for _ in range(3))
    mask = torch.randn(mask_shape)
    forward = aten._scaled_dot_product_flash_attention_for_cpu.default
    backward = aten._scaled_dot_product_flash_attention_for_cpu_backward.default
    out, lse = forward(q, k, v, attn_mask=mask)[:2]
    backward_args = (torch.randn_like(out), q, k, v, out, lse, 0.0, False)
    assert op_allocations(lambda: forward(q, k, v, attn_mask=mask)) == deltas(
        cpu_kernel_allocations(str(forward), (q, k, v)).allocations
    )
    measured = op_allocations(lambda: backward(*backward_args, attn_mask=mask))
    assert measured == deltas(cpu_kernel_allocations(str(backward), backward_args).allocations)


@pytest.mark.parametrize(
    ("shape", "dim", "dtype"),
    [
        ((4, 4, 64, 64), -1, torch.float32),
        ((3, 5, 7, 9), 1, torch.float32),
        ((2, 100, 37), -1, torch.bfloat16),
    ],
)
def test_safe_softmax_holds_bool_masks(
    shape: tuple[int, ...], dim: int, dtype: torch.dtype
) -> None:
    """The softmax of attention's math path (a mask that needs a gradient) allocates bool masks
    of the -inf scores and rows beside its output."""
    x = torch.randn(shape, dtype=dtype)
    args = (x, dim)
    assert op_allocations(lambda: aten._safe_softmax.default(*args)) == deltas(
        cpu_kernel_allocations("aten._safe_softmax.default", args).allocations
    )


@pytest.mark.parametrize(
    ("grad_layout", "spatial"),
    [
        (
            torch.contiguous_format,
            7,
        ),  # channels-last input, NCHW gradient: indices and grad_input copied
        (torch.channels_last, 7),  # layouts agree: nothing copied
        (torch.contiguous_format, 3),  # a 1x1 gradient, contiguous strides: grad_input copied
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_max_pool_backward_copies_where_the_layouts_disagree(
    grad_layout: torch.memory_format, spatial: int, dtype: torch.dtype
) -> None:
    x = torch.randn(4, 24, spatial, spatial, dtype=dtype).contiguous(
        memory_format=torch.channels_last
    )
    window = ([3, 3], [2, 2], [0, 0], [1, 1], False)
    _, indices = aten.max_pool2d_with_indices.default(x, *window)
    grad = torch.randn(indices.shape, dtype=dtype).contiguous(memory_format=grad_layout)
    args = (grad, x, *window, indices)
    measured = op_allocations(lambda: aten.max_pool2d_with_indices_backward.default(*args))
    rule = cpu_kernel_allocations("aten.max_pool2d_with_indices_backward.default", args).allocations
    if rule is None:  # only its output
        assert measured == [x.numel() * x.element_size()]
    else:
        assert measured == deltas(rule)
        assert len(measured) > 1


def test_a_one_channel_input_runs_in_the_layout_its_strides_suggest() -> None:
    """One channel makes NCHW and channels-last strides both contiguous; ATen picks the layout
    from the strides (suggest_memory_format), and so does the rule: NCHW strides take the NCHW
    path, exact, and channels-last strides the channels-last one, whose brgemm scratchpad for one
    input channel under an 11x11 kernel (3,137,552 bytes on 72x72 here) no rule gives."""
    window = ([4, 4], [0, 0], [1, 1], False, [0, 0], 1)
    weight = torch.randn(96, 1, 11, 11)
    nchw = (torch.randn(2, 1, 72, 72), weight, None, *window)
    assert op_allocations(lambda: aten.convolution.default(*nchw)) == deltas(
        cpu_kernel_allocations("aten.convolution.default", nchw).allocations
    )
    channels_last = (
        torch.empty(2, 1, 72, 72, memory_format=torch.channels_last).normal_(),
        weight,
        None,
        *window,
    )
    assert (
        "one input channel"
        in cpu_kernel_allocations("aten.convolution.default", channels_last).unmodelled
    )
    three_channels = (
        torch.randn(2, 3, 72, 72).contiguous(memory_format=torch.channels_last),
        torch.randn(96, 3, 7, 7),
        None,
        *window,
    )
    assert cpu_kernel_allocations("aten.convolution.default", three_channels).unmodelled == ""
    eleven = (three_channels[0], torch.randn(96, 3, 11, 11), None, *window)
    assert (
        "kernel over 7x7" in cpu_kernel_allocations("aten.convolution.default", eleven).unmodelled
    )
