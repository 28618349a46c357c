"""Each allocator rule covers only the calls it knows: a covered call's blocks equal what the
kernel allocates on this CPU (measured by `kernel_probe`, the profiler's records of that one op),
and a call outside the rule (a layout, dtype or argument it does not read) gives a reason, so the
predictor measures it instead of trusting a rule that ignores what it was not told."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from ninlab.analysis.allocator import cpu_kernel_allocations, peak_above_start_bytes
from ninlab.analysis.allocator.registry import OUTPUTS_ONLY
from ninlab.analysis.kernel_probe import KernelCall, measured_allocations

aten = torch.ops.aten


def _peaks(op: str, args: list[Any], kwargs: dict[str, Any] | None = None) -> tuple[Any, int]:
    """The rule's blocks for the call, and the most the kernel holds above its start, measured."""
    func = getattr(getattr(aten, op.split(".")[1]), op.split(".")[2])
    result = func(*args, **(kwargs or {}))
    outputs = result if isinstance(result, tuple) else (result,)
    measured = measured_allocations(KernelCall.of(op, args, outputs, kwargs))
    assert not isinstance(measured, str), measured
    return cpu_kernel_allocations(op, args), peak_above_start_bytes(measured)


def _output_bytes(op: str, args: list[Any]) -> int:
    func = getattr(getattr(aten, op.split(".")[1]), op.split(".")[2])
    result = func(*args)
    outputs = result if isinstance(result, tuple) else (result,)
    return sum(t.untyped_storage().nbytes() for t in outputs if isinstance(t, torch.Tensor))


def _matrices(dtype: torch.dtype) -> dict[str, tuple[str, list[Any]]]:
    a, b = torch.randn(64, 48, dtype=dtype), torch.randn(48, 40, dtype=dtype)
    x, y = torch.randn(3, 64, 48, dtype=dtype), torch.randn(3, 48, 40, dtype=dtype)
    return {
        "mm": ("aten.mm.default", [a, b]),
        "mm, first transposed": ("aten.mm.default", [a.t().contiguous().t(), b]),
        "mm, second transposed": ("aten.mm.default", [a, b.t().contiguous().t()]),
        "addmm, row bias": ("aten.addmm.default", [torch.randn(40, dtype=dtype), a, b]),
        "addmm, transposed bias": (
            "aten.addmm.default",
            [torch.randn(40, 64, dtype=dtype).t(), a, b],
        ),
        "addmm, strided bias": ("aten.addmm.default", [torch.randn(80, dtype=dtype)[::2], a, b]),
        "bmm": ("aten.bmm.default", [x, y]),
        "bmm, broadcast batch": (
            "aten.bmm.default",
            [x, torch.randn(48, 40, dtype=dtype).expand(3, 48, 40)],
        ),
        "bmm, interleaved batches": (
            "aten.bmm.default",
            [x.transpose(0, 1).contiguous().transpose(0, 1), y],
        ),
        "baddbmm, row bias": ("aten.baddbmm.default", [torch.randn(40, dtype=dtype), x, y]),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_matrix_multiply_of_matrices_read_as_they_are_allocates_only_its_outputs(
    dtype: torch.dtype,
) -> None:
    for name, (op, args) in _matrices(dtype).items():
        blocks, measured = _peaks(op, args)
        assert blocks.allocations is None and not blocks.unmodelled, name
        assert measured == _output_bytes(op, args), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_a_matrix_multiply_of_a_copied_operand_is_measured(dtype: torch.dtype) -> None:
    """An expanded operand (the gradient of a sum: zero strides) or a slice with a step along
    its rows is copied whole by the kernel: the rule says so, and the probe finds the copy."""
    a, b = torch.randn(64, 48, dtype=dtype), torch.randn(48, 40, dtype=dtype)
    for args in (
        [torch.ones((), dtype=dtype).expand(64, 48), b],
        [a[:, ::2], b[::2]],
    ):
        blocks, measured = _peaks("aten.mm.default", args)
        assert blocks.allocations is None and "does not read as it is" in blocks.unmodelled
        assert measured > _output_bytes("aten.mm.default", args)


def test_embedding_backward_of_a_transposed_gradient_is_measured() -> None:
    op = "aten.embedding_dense_backward.default"
    grad, indices = torch.randn(8, 16, 32), torch.randint(0, 50, (8, 16))
    for scale_by_frequency in (False, True):
        blocks, measured = _peaks(op, [grad, indices, 50, 3, scale_by_frequency])
        assert blocks.allocations is None and not blocks.unmodelled
        assert measured == 50 * 32 * 4
    transposed = grad.transpose(0, 1).contiguous().transpose(0, 1)
    blocks, measured = _peaks(op, [transposed, indices, 50, -1, False])
    assert blocks.allocations is None and "non-contiguous" in blocks.unmodelled
    assert measured == 50 * 32 * 4 + grad.nbytes  # the output, and the gradient's copy


def _attention(dtype: torch.dtype, causal: bool) -> tuple[list[Any], list[Any]]:
    q = torch.randn(2, 4, 64, 16, dtype=dtype)
    k, v = torch.randn(2, 4, 96, 16, dtype=dtype), torch.randn(2, 4, 96, 16, dtype=dtype)
    forward = [q, k, v, 0.0, causal]
    out, lse = aten._scaled_dot_product_flash_attention_for_cpu.default(*forward)
    return forward, [torch.randn_like(out), q, k, v, out, lse, 0.0, causal]


@pytest.mark.parametrize("causal", [False, True])
def test_float32_flash_attention_follows_its_rule_causal_or_not(causal: bool) -> None:
    forward, backward = _attention(torch.float32, causal)
    for op, args in (
        ("aten._scaled_dot_product_flash_attention_for_cpu.default", forward),
        ("aten._scaled_dot_product_flash_attention_for_cpu_backward.default", backward),
    ):
        blocks, measured = _peaks(op, args)
        assert blocks.allocations is not None and not blocks.unmodelled
        assert peak_above_start_bytes(blocks.allocations) == measured


def test_flash_attention_backward_copies_a_gradient_not_laid_out_as_b_l_h_d() -> None:
    """`nn.MultiheadAttention` and HF ViT give the gradient as (B, L, H, D) transposed: no copy
    (the rule once counted one whatever the layout: ViT's allocator 1.013)."""
    _, backward = _attention(torch.float32, causal=False)
    grad = backward[0].transpose(1, 2).contiguous().transpose(1, 2)
    op = "aten._scaled_dot_product_flash_attention_for_cpu_backward.default"
    blocks, measured = _peaks(op, [grad, *backward[1:]])
    assert peak_above_start_bytes(blocks.allocations) == measured
    _, with_copy = _peaks(op, backward)
    assert with_copy - measured == grad.nbytes


def test_flash_attention_outside_the_rule_is_measured() -> None:
    """bfloat16 keeps float32 buffers of its own (the rule used to say "outputs only" for it);
    dropout draws a mask: both go to the probe, a mask given by keyword with them."""
    forward, backward = _attention(torch.bfloat16, causal=False)
    for op, args in (
        ("aten._scaled_dot_product_flash_attention_for_cpu.default", forward),
        ("aten._scaled_dot_product_flash_attention_for_cpu_backward.default", backward),
    ):
        blocks, measured = _peaks(op, args)
        assert blocks.allocations is None and "float32 without dropout" in blocks.unmodelled
        assert measured > _output_bytes(op, args)
    q = torch.randn(2, 4, 64, 16)
    with_dropout = [q, q, q, 0.1, False]
    blocks = cpu_kernel_allocations(
        "aten._scaled_dot_product_flash_attention_for_cpu.default", with_dropout
    )
    assert blocks.allocations is None and blocks.unmodelled
    mask = {"attn_mask": torch.zeros(64, 96, dtype=torch.bfloat16)}
    _, measured = _peaks("aten._scaled_dot_product_flash_attention_for_cpu.default", forward, mask)
    assert measured > 0


@pytest.mark.parametrize("dtype", [torch.float64])
def test_batch_norm_forward_in_another_dtype_is_measured(dtype: torch.dtype) -> None:
    """float32, bfloat16 and float16 have a rule (test_allocator.py checks it)."""
    x = torch.randn(4, 16, 5, 5, dtype=dtype)
    stats = [torch.zeros(16, dtype=dtype), torch.ones(16, dtype=dtype)]
    args = [x, torch.ones(16, dtype=dtype), torch.zeros(16, dtype=dtype), *stats, True, 0.1, 1e-5]
    blocks, measured = _peaks("aten.native_batch_norm.default", args)
    assert blocks.allocations is None and "float64" in blocks.unmodelled
    assert measured > x.nbytes  # beyond its output: the kernel's own temporaries


def _channels_last(*shape: int) -> torch.Tensor:
    return torch.randn(shape).contiguous(memory_format=torch.channels_last)


def _conv_backward(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, **window: Any
) -> tuple[Any, int]:
    stride, padding, groups = window["stride"], window["padding"], window.get("groups", 1)
    undilated = [[1, 1], False, [0, 0], groups, [True, True, True]]
    return _peaks(
        "aten.convolution_backward.default",
        [grad, x, weight, [weight.shape[0]], stride, padding, *undilated],
    )


def test_float32_convolutions_outside_the_measured_kinds_are_measured() -> None:
    """PVT-v2's kinds (training 0.908 before): a depthwise backward on a map smaller than its
    kernel, a channels-last patch embedding to one pixel, an NCHW backward whose gradient
    arrives channels-last. On the next larger map, or with an NCHW gradient, the rule holds."""
    for size, ruled in ((2, False), (3, True)):
        x, weight = _channels_last(2, 256, size, size), torch.randn(256, 1, 3, 3)
        blocks, measured = _conv_backward(x, x, weight, stride=[1, 1], padding=[1, 1], groups=256)
        assert (blocks.allocations is not None) is ruled
        if ruled:
            assert peak_above_start_bytes(blocks.allocations) == measured
    for size, ruled in ((4, False), (8, True)):
        args = [_channels_last(2, 64, size, size), torch.randn(64, 64, 4, 4), torch.randn(64)]
        blocks, measured = _peaks(
            "aten.convolution.default", [*args, [4, 4], [0, 0], [1, 1], False, [0, 0], 1]
        )
        assert (blocks.allocations is not None) is ruled
        if ruled:
            assert peak_above_start_bytes(blocks.allocations) == measured
    x, weight = torch.randn(2, 64, 8, 8), torch.randn(64, 64, 3, 3)
    for grad, ruled in ((_channels_last(2, 64, 8, 8), False), (torch.randn(2, 64, 8, 8), True)):
        blocks, measured = _conv_backward(grad, x, weight, stride=[1, 1], padding=[1, 1])
        assert (blocks.allocations is not None) is ruled
        if ruled:
            assert peak_above_start_bytes(blocks.allocations) == measured


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "mask", [[True, True, True], [True, True, False], [False, False, True], [True, False, False]]
)
def test_layer_norm_backward_follows_its_rule(
    mask: list[bool], dtype: torch.dtype, threads: int
) -> None:
    """The per-thread partial sums of the weight's and bias's gradients, at any batch."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for rows, features in ((1, 6), (64, 64), (4096, 192)):
            x = torch.zeros(rows, features, dtype=dtype)
            statistic = torch.zeros(rows, 1, dtype=dtype)
            weight = torch.zeros(features, dtype=dtype)
            args = [x, x, [features], statistic, statistic, weight, weight, mask]
            blocks, measured_peak = _peaks("aten.native_layer_norm_backward.default", args)
            assert blocks.unmodelled == ""
            assert peak_above_start_bytes(blocks.allocations) == measured_peak
            sums = threads * 2 * features * dtype.itemsize if mask[1] or mask[2] else 0
            assert (
                measured_peak - _output_bytes("aten.native_layer_norm_backward.default", args)
                == sums
            )
    finally:
        torch.set_num_threads(before)


def test_layer_norm_backward_of_a_permuted_map_is_measured() -> None:
    """ConvNeXt's layer norm over channels of a permuted map: the kernel copies it first."""
    x = torch.zeros(2, 16, 8, 8).permute(0, 2, 3, 1)
    statistic, weight = torch.zeros(2, 8, 8, 1), torch.zeros(16)
    args = [x, x, [16], statistic, statistic, weight, weight, [True, True, True]]
    blocks, measured_peak = _peaks("aten.native_layer_norm_backward.default", args)
    assert blocks.allocations is None and "not contiguous" in blocks.unmodelled
    output_bytes = _output_bytes("aten.native_layer_norm_backward.default", args)
    assert measured_peak > output_bytes + 2 * torch.get_num_threads() * 16 * 4


def test_a_slow2d_1x1_convolution_of_a_channels_last_input_is_measured() -> None:
    """XCiT's 1x1 convolution at batch 1 runs on Slow2d as a matrix multiply, which copies a
    channels-last input first (8,192 bytes beyond its outputs in backward, found by the survey)."""
    x = torch.randn(1, 64, 4, 4).contiguous(memory_format=torch.channels_last)
    weight, grad = torch.randn(128, 64, 1, 1), torch.randn(1, 128, 4, 4)
    args = [grad, x, weight, [128], [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [False, True, True]]
    blocks, measured_peak = _peaks("aten.convolution_backward.default", args)
    assert blocks.allocations is None and "not contiguous" in blocks.unmodelled
    assert measured_peak > _output_bytes("aten.convolution_backward.default", args)
    contiguous = [grad, x.contiguous(), *args[2:]]
    blocks, measured_peak = _peaks("aten.convolution_backward.default", contiguous)
    assert blocks.allocations is None and blocks.unmodelled == ""  # outputs only
    assert measured_peak == _output_bytes("aten.convolution_backward.default", contiguous)


def test_a_strided_1x1_float32_convolution_forward_is_measured() -> None:
    """oneDNN's 1x1 kernel may copy a strided input to unit stride first, by its own heuristics
    (FastViT's stem, 3->16 stride 2 on 64x64: an inference 0.86 of its allocator peak; its weight
    gradient's scratchpad on 32x32: 54,592 bytes where the rule gave 6,272): each call is
    measured, and the prediction holds; unstrided, the rule's."""
    x, weight = torch.randn(2, 3, 64, 64), torch.randn(16, 3, 1, 1)
    strided, measured = _peaks(
        "aten.convolution.default", [x, weight, None, [2, 2], [0, 0], [1, 1], False, [0, 0], 1]
    )
    assert strided.allocations is None and "1x1" in strided.unmodelled
    assert measured > _output_bytes(
        "aten.convolution.default", [x, weight, None, [2, 2], [0, 0], [1, 1], False, [0, 0], 1]
    )
    grad = torch.randn(2, 16, 32, 32)
    backward = [
        grad,
        x,
        weight,
        [16],
        [2, 2],
        [0, 0],
        [1, 1],
        False,
        [0, 0],
        1,
        [False, True, True],
    ]
    weight_gradient, measured = _peaks("aten.convolution_backward.default", backward)
    assert weight_gradient.allocations is None and "1x1" in weight_gradient.unmodelled
    # On 32x32 (on 64x64 the real channels-last kernel crashes the process, torch 2.14.1).
    small = (torch.randn(2, 16, 16, 16), torch.randn(2, 3, 32, 32), weight)
    channels_last = [t.contiguous(memory_format=torch.channels_last) for t in small]
    weight_gradient, measured = _peaks(
        "aten.convolution_backward.default", [*channels_last, *backward[3:]]
    )
    assert weight_gradient.allocations is None and "1x1" in weight_gradient.unmodelled
    unstrided, measured = _peaks(
        "aten.convolution.default", [x, weight, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1]
    )
    assert unstrided.allocations is not None
    assert peak_above_start_bytes(unstrided.allocations) == measured
    from ninlab.analysis.measure import measure
    from ninlab.analysis.predict import predict_memory

    model = torch.nn.Conv2d(3, 16, 1, stride=2, bias=False)
    report = predict_memory(model, input_size=(3, 64, 64), batch_size=2, mode="infer")
    assert report.allocator_trust.exact
    assert (
        report.allocator_peak_bytes
        == measure(model, report.spec, batch_size=2).allocator_peak_bytes
    )


def _indexing_calls(dtype: torch.dtype) -> dict[str, list[Any]]:
    values, indices = torch.randn(4, 32, dtype=dtype), torch.randint(0, 32, (4, 8))
    source, rows = values[:, :8].contiguous(), torch.randint(0, 4, (6,))
    return {
        "aten.gather.default": [values, 1, indices],
        "aten.scatter_.src": [torch.zeros(4, 32, dtype=dtype), 1, indices, source],
        "aten.scatter_add_.default": [torch.zeros(4, 32, dtype=dtype), 1, indices, source],
        "aten.index_add_.default": [values.clone(), 0, rows, torch.randn(6, 32, dtype=dtype)],
    }


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("op", sorted(_indexing_calls(torch.float32)))
def test_gather_and_scatter_of_reduced_precision_values_are_measured(
    op: str, dtype: torch.dtype
) -> None:
    """They work in a float32 copy (the survey that found them outputs-only saw float32): a
    bf16 gather's backward, a scatter_add into zeros, was 0.87 to 0.91 of the allocator peak."""
    elements = 0 if "_." in op else 4 * 8  # in place: no output of its own
    blocks, measured = _peaks(op, _indexing_calls(dtype)[op])
    assert blocks.allocations is None and "bfloat16 or float16" in blocks.unmodelled
    assert measured > elements * dtype.itemsize
    blocks, measured = _peaks(op, _indexing_calls(torch.float32)[op])
    assert blocks == OUTPUTS_ONLY and measured == elements * 4


def test_all_of_a_tensor_that_is_not_bool_is_measured() -> None:
    """`all` compares a float tensor with zero into a bool copy first (the survey saw masks)."""
    blocks, measured = _peaks("aten.all.default", [torch.randn(4, 32)])
    assert blocks.allocations is None and measured > 128
    blocks, measured = _peaks("aten.all.default", [torch.randn(4, 32) > 0])
    assert blocks == OUTPUTS_ONLY and measured == 1
