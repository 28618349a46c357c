"""CPU embedding bags (`aten._embedding_bag`, `aten._embedding_bag_forward_only`): the kernel
makes and frees index temporaries besides its outputs (a ones tensor, a cumsum, a wrapped
scalar, a max; 168 bytes above the outputs for a mean bag of (2, 12) indices, measured on torch
2.13), which depend on the mode and the index layout, so each call is measured.

CPU embedding backward (`aten.embedding_dense_backward`): with the gradient and the indices
contiguous it allocates only its output, with or without `padding_idx` and
`scale_grad_by_freq`, in float32, float64 and bfloat16 (measured on torch 2.13 and 2.14). A
gradient or indices in another layout (a relative position bias's gradient, transposed by the
model) is first copied whole, so the call is measured instead (`ninlab.analysis.kernel_probe`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ninlab.analysis.allocator.registry import OUTPUTS_ONLY, KernelBlocks, allocation_rule

__all__ = ["embedding_backward", "embedding_bag"]


@allocation_rule("aten.embedding_dense_backward.default")
def embedding_backward(args: Sequence[Any]) -> KernelBlocks:
    grad_output, indices = args[0], args[1]
    if grad_output.is_contiguous() and indices.is_contiguous():
        return OUTPUTS_ONLY
    return KernelBlocks(
        None, "embedding backward of a non-contiguous gradient or indices (the kernel's copies)"
    )


@allocation_rule("aten._embedding_bag.default", "aten._embedding_bag_forward_only.default")
def embedding_bag(args: Sequence[Any]) -> KernelBlocks:
    del args  # every call is measured
    return KernelBlocks(None, "embedding bag (the kernel's index temporaries)")
