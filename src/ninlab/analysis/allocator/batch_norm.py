"""CPU batch norm: `aten.native_batch_norm` (per-channel temporaries, float32, bfloat16 or
float16; channels-last adds per-thread sums; float64 is measured per call) and
`aten.native_batch_norm_backward` (float32, and bfloat16 or float16 with input and gradient in
one layout; the other calls are measured per call): with
contiguous inputs the CPU kernel allocates grad_input twice (once before it checks contiguity,
again in the contiguous branch; aten/src/ATen/native/Normalization.cpp,
batch_norm_backward_cpu_template), so an input-sized block is held through the op."""

from __future__ import annotations

from collections.abc import Sequence
from math import prod
from typing import Any

import torch

from ninlab.analysis.allocator.blocks import KernelAllocation, dense_memory_format, frees
from ninlab.analysis.allocator.registry import KernelBlocks, allocation_rule

__all__ = ["batch_norm_backward_allocations", "batch_norm_forward_allocations"]


@allocation_rule("aten.native_batch_norm.default", "aten._native_batch_norm_legit.default")
def batch_norm_forward(args: Sequence[Any]) -> KernelBlocks:
    # A tracer that runs `func.decompose()` sees Python's decomposition of native_batch_norm
    # (`_native_batch_norm_legit*`) for the same kernel; its arguments line up.
    return _forward_blocks(args, training=args[5])


@allocation_rule("aten._native_batch_norm_legit_no_training.default")
def batch_norm_forward_no_training(args: Sequence[Any]) -> KernelBlocks:
    return _forward_blocks(args, training=False)


def _forward_blocks(args: Sequence[Any], *, training: bool) -> KernelBlocks:
    input = args[0]
    if input.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return KernelBlocks(None, "batch norm forward in float64 (measured per call)")
    parameters = [a for a in args[1:5] if isinstance(a, torch.Tensor)]
    # ATen's mixed-type kernel (a reduced-precision input beside a float32 parameter or running
    # statistic) keeps its statistics in float32; otherwise they take the input's dtype.
    mixed = any(p.dtype == torch.float32 for p in parameters)
    return KernelBlocks(
        batch_norm_forward_allocations(
            input_shape=tuple(input.shape),
            training=training,
            itemsize=input.dtype.itemsize,
            statistics_itemsize=4 if mixed else input.dtype.itemsize,
            half=input.dtype == torch.float16,
            channels_last=dense_memory_format(input) == torch.channels_last,
            threads=torch.get_num_threads(),
        )
    )


@allocation_rule("aten.native_batch_norm_backward.default")
def batch_norm_backward(args: Sequence[Any]) -> KernelBlocks:
    grad_output, input, weight = args[0], args[1], args[2]
    output_mask = tuple(args[9])
    if input.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return KernelBlocks(None, "batch norm backward in float64 (measured per call)")
    contiguous = dense_memory_format(input) == dense_memory_format(grad_output) is not None
    reduced = input.dtype != torch.float32
    if reduced and not contiguous:
        return KernelBlocks(
            None,
            "reduced-precision batch norm backward of an input and a gradient in two layouts "
            "(the float32 copies of a mixed-type kernel; measured per call)",
        )
    if weight is None and reduced and (output_mask[1] or output_mask[2]):
        return KernelBlocks(
            None, "reduced-precision batch norm backward of an affine gradient without a weight"
        )
    # An input of one value per channel and sample, (N, C) or (N, C, 1, 1), takes the kernel's
    # channels-last branch ("NC11 is also channels last"), per-thread sums and all: 128 bytes of
    # them beside a BatchNorm1d(8) on vectors, measured.
    image_size = input.numel() // max(input.shape[0] * input.shape[1], 1)
    channels_last = dense_memory_format(input) == torch.channels_last or image_size == 1
    return KernelBlocks(
        batch_norm_backward_allocations(
            input_shape=tuple(input.shape),
            contiguous=contiguous,
            output_mask=output_mask,
            itemsize=input.dtype.itemsize,
            parameter_itemsize=4 if weight is None else weight.dtype.itemsize,
            channels_last=contiguous and channels_last,
            threads=torch.get_num_threads(),
        )
    )


def batch_norm_forward_allocations(
    *,
    input_shape: Sequence[int],
    training: bool,
    itemsize: int = 4,
    statistics_itemsize: int = 4,
    half: bool = False,
    channels_last: bool = False,
    threads: int = 1,
) -> tuple[KernelAllocation, ...]:
    """CPU `aten.native_batch_norm`: the output, then (training) the saved mean and inverse std
    in the statistics' dtype (`statistics_itemsize`: float32, or a reduced-precision input's
    own where no parameter or running statistic is float32), and, with running statistics or
    without, two per-channel blocks for the batch's mean and variance sums, in the statistics'
    dtype (float32 for a float16 input, `half`), a channels-last input's per-thread float32
    sums inside them, then two float32 per-channel blocks; in evaluation two float32 per-channel
    blocks for the folded scale and shift. Measured for 16 channels, 1 and 2 threads, on torch
    2.8, 2.13 and 2.14.1, every input and parameter dtype the kernel takes: training
    [out, 64, 64, 64, 64, -64, -64, 64, 64, -64, -64] (all bf16: [out, 32, 32, 32, 32, -32, -32,
    64, 64, -64, -64]), channels-last with 2 threads [out, 64, 64, 64, 64, 128, -128, -64, -64,
    64, 64, -64, -64]; evaluation [out, 64, 64, -64, -64], any layout and dtype. (An instance
    norm is a training batch norm without running statistics, in inference too: its sums were
    missed, the allocator level 0.989 of the real one.)"""
    channels = input_shape[1]
    allocations = [KernelAllocation(prod(input_shape) * itemsize, "output", output=0)]
    if training:
        statistic_bytes = channels * statistics_itemsize
        sum_bytes = channels * (4 if half else statistics_itemsize)
        per_thread = [KernelAllocation(threads * channels * 4, "per-thread sums")]
        sums = [
            KernelAllocation(sum_bytes, "batch mean sums"),
            KernelAllocation(sum_bytes, "batch variance sums"),
        ]
        float32 = [KernelAllocation(channels * 4, "float32 per-channel")] * 2
        allocations += [
            KernelAllocation(statistic_bytes, "saved mean", output=1),
            KernelAllocation(statistic_bytes, "saved inverse std", output=2),
            *sums,
            *((*per_thread, *frees(per_thread)) if channels_last else ()),
            *frees(sums),
            *float32,
            *frees(float32),
        ]
    else:
        folded = [
            KernelAllocation(channels * 4, "folded scale"),
            KernelAllocation(channels * 4, "folded shift"),
        ]
        allocations += [*folded, *frees(folded)]
    return tuple(allocations)


def batch_norm_backward_allocations(
    *,
    input_shape: Sequence[int],
    contiguous: bool,
    output_mask: Sequence[bool] = (True, True, True),
    itemsize: int = 4,
    parameter_itemsize: int = 4,
    channels_last: bool = False,
    threads: int = 1,
) -> tuple[KernelAllocation, ...]:
    """CPU `aten.native_batch_norm_backward`. With input and grad_output contiguous in the same
    memory format, grad_input is allocated first, then again in the contiguous branch, and the
    first is freed at the end: measured [input bytes, C*4, C*4, input bytes, -input bytes], then
    in channels-last per-thread float32 sums, two per channel (16 channels, 2 threads: 256
    bytes). Otherwise (float32) a per-channel sum of grad_output is the only temporary. A bfloat16
    or float16 input (`itemsize` 2; the mixed-type kernel autocast runs, its weight float32, or
    one of the input's dtype, `parameter_itemsize`) takes the same path, its weight's and bias's
    gradients in the weight's dtype, and in channels-last three float32 per-channel blocks around
    the sums: measured over layouts, output masks, 1 and 2 threads, training or not,
    [.., C*4, C*4, C*4, sums, -sums, -C*4, -C*4, -C*4]."""
    input_bytes = prod(input_shape) * itemsize
    channel_bytes = input_shape[1] * 4
    parameter_bytes = input_shape[1] * parameter_itemsize
    allocations: list[KernelAllocation] = []
    if output_mask[0]:
        if contiguous:
            allocations.append(KernelAllocation(input_bytes, "grad_input (discarded)"))
        else:
            allocations.append(KernelAllocation(input_bytes, "grad_input", output=0))
    if output_mask[1]:
        allocations.append(KernelAllocation(parameter_bytes, "grad_weight", output=1))
    if output_mask[2]:
        allocations.append(KernelAllocation(parameter_bytes, "grad_bias", output=2))
    if contiguous:
        if output_mask[0]:
            allocations += [
                KernelAllocation(input_bytes, "grad_input", output=0),
                KernelAllocation(-input_bytes, "free discarded grad_input"),
            ]
        if channels_last:
            sums = [KernelAllocation(threads * 2 * channel_bytes, "per-thread sums")]
            # A reduced-precision input's kernel holds three float32 per-channel blocks around.
            around = [KernelAllocation(channel_bytes, "float32 per-channel")] * 3 * (itemsize != 4)
            allocations += [*around, *sums, *frees(sums), *frees(around)]
    else:
        grad_output_sum = KernelAllocation(channel_bytes, "sum of grad_output")
        allocations += [grad_output_sum, *frees([grad_output_sum])]
    return tuple(allocations)
