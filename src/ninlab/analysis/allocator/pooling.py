"""CPU max pooling's backward (`aten.max_pool2d_with_indices_backward`): copies of grad_output,
indices and grad_input where their layouts disagree with the one PyTorch suggests for grad_output
(`max_pool_backward_allocations`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ninlab.analysis.allocator.blocks import KernelAllocation, frees
from ninlab.analysis.allocator.registry import OUTPUTS_ONLY, KernelBlocks, allocation_rule
from ninlab.analysis.torch_internals import suggest_memory_format

__all__ = ["max_pool_backward_allocations"]


@allocation_rule("aten.max_pool2d_with_indices_backward.default")
def max_pool_backward(args: Sequence[Any]) -> KernelBlocks:
    allocations = max_pool_backward_allocations(args[0], args[1], args[7])
    return OUTPUTS_ONLY if allocations is None else KernelBlocks(allocations)


def max_pool_backward_allocations(
    grad_output: torch.Tensor, input: torch.Tensor, indices: torch.Tensor
) -> tuple[KernelAllocation, ...] | None:
    """`aten.max_pool2d_with_indices_backward` on CPU: grad_input takes the input's layout, but
    the kernel runs in the layout PyTorch suggests for grad_output and makes each of grad_output,
    indices and grad_input contiguous in it (aten/src/ATen/native/cpu/MaxPoolKernel.cpp), so where
    the layouts disagree it works on copies: held through the op, grad_input's copied back. NiN in
    channels-last under bf16 autocast: a gradient of a 1x1 map arrives NCHW-strided, and its pool
    copies grad_input (884,736 bytes at batch 128). Measured, 256 channels 7x7 to 3x3 at batch
    128, channels-last input, NCHW grad_output: [3,211,264 (grad_input), 2,359,296 (indices),
    3,211,264 (grad_input), -3,211,264, -2,359,296]. None: no copies."""
    if input.dim() != 4:
        return None
    layout = suggest_memory_format(grad_output)
    copies = [
        KernelAllocation(
            tensor.numel() * tensor.dtype.itemsize, f"copy of {name} in the kernel's layout"
        )
        for name, tensor in (("grad_output", grad_output), ("indices", indices))
        if not tensor.is_contiguous(memory_format=layout)
    ]
    grad_input_bytes = input.numel() * input.dtype.itemsize
    grad_input = torch.empty(input.shape, device="meta", memory_format=suggest_memory_format(input))
    if not grad_input.is_contiguous(memory_format=layout):
        copies.append(
            KernelAllocation(grad_input_bytes, "copy of grad_input in the kernel's layout")
        )
    if not copies:
        return None
    return (
        KernelAllocation(grad_input_bytes, "grad_input", output=0),
        *copies,
        *frees(reversed(copies)),
    )
