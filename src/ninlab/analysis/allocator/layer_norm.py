"""Layer norm's backward on CPU: its per-thread sums of the weight's and bias's gradients.

`native_layer_norm_backward` makes its outputs (grad_input, then the weight's and the bias's
gradients, each where `output_mask` asks), then, when either parameter's gradient is asked, one
block of two partial sums per thread, each as long as the normalized size, in the input's dtype,
freed before it returns. Read off the profiler's allocation records on torch 2.13.0 and 2.8.0
CPU, float32 and bfloat16, 1 and 2 threads: 2 threads x 2 x 64 x 4 = 1,024 bytes for a
`LayerNorm(64)` in float32 at any batch, 48 for `LayerNorm(6)` on one thread; none under a mask of
grad_input alone (no affine parameters). Given a tensor that is not contiguous (ConvNeXt's permuted
map) the kernel copies it first, which this rule does not follow: that call is measured.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import prod
from typing import Any

import torch

from ninlab.analysis.allocator.blocks import KernelAllocation, frees
from ninlab.analysis.allocator.registry import KernelBlocks, allocation_rule

__all__ = ["layer_norm_backward_allocations"]


def layer_norm_backward_allocations(
    *,
    input_shape: Sequence[int],
    normalized_shape: Sequence[int],
    itemsize: int,
    parameter_itemsize: int,
    output_mask: Sequence[bool],
    threads: int,
) -> tuple[KernelAllocation, ...]:
    """The blocks of CPU `aten.native_layer_norm_backward` on contiguous tensors, in order."""
    normalized = prod(normalized_shape)
    allocations = []
    if output_mask[0]:
        allocations.append(KernelAllocation(prod(input_shape) * itemsize, "grad_input", output=0))
    for index, what in ((1, "grad_weight"), (2, "grad_bias")):
        if output_mask[index]:
            allocations.append(
                KernelAllocation(normalized * parameter_itemsize, what, output=index)
            )
    if output_mask[1] or output_mask[2]:
        sums = KernelAllocation(threads * 2 * normalized * itemsize, "per-thread partial sums")
        allocations += [sums, *frees([sums])]
    return tuple(allocations)


@allocation_rule("aten.native_layer_norm_backward.default")
def layer_norm_backward(args: Sequence[Any]) -> KernelBlocks:
    _, x, normalized_shape, _, _, weight, bias, output_mask = args[:8]
    if not all(t.is_contiguous() for t in args if isinstance(t, torch.Tensor)):
        return KernelBlocks(None, "layer norm backward of a tensor not contiguous (its copy)")
    parameter = weight if weight is not None else bias
    return KernelBlocks(
        layer_norm_backward_allocations(
            input_shape=x.shape,
            normalized_shape=normalized_shape,
            itemsize=x.dtype.itemsize,
            parameter_itemsize=(parameter if parameter is not None else x).dtype.itemsize,
            output_mask=output_mask,
            threads=torch.get_num_threads(),
        )
    )
