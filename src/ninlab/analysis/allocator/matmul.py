"""The rule of CPU matrix multiplies (`mm`, `addmm`, `bmm`, `baddbmm`). It covers matrices the
math library reads as they are: dense in their last two dims, row-major or transposed (a weight's
`.t()`). In float32 and float64 such a call allocates only its outputs, whatever the batch strides
(a batch broadcast over) and the bias's layout (copied into the output): linear layers need no
rule. In bfloat16 it follows `ninlab.analysis.allocator.onednn_bf16` (exact when too small for
oneDNN, else a lower bound) where, besides, the batches lie one after the other and the bias is a
contiguous row or the output's shape. In float16, or with operands of two dtypes, oneDNN's brgemm
scratchpad is not known. Any other matrix (an expanded one with zero strides, such as the gradient
of a sum; a slice with a step) is first copied by the kernel, so the call is measured instead
(`ninlab.analysis.kernel_probe`). Measured on each layout named here, torch 2.13 and 2.14."""

from __future__ import annotations

from collections.abc import Sequence
from math import prod
from typing import Any

import torch

from ninlab.analysis.allocator.onednn_bf16 import bf16_matmul_allocations
from ninlab.analysis.allocator.registry import OUTPUTS_ONLY, KernelBlocks, allocation_rule

__all__ = ["biased_matmul", "matmul", "read_in_place"]


@allocation_rule("aten.mm.default", "aten.bmm.default")
def matmul(args: Sequence[Any]) -> KernelBlocks:
    return _blocks(args[0], args[1], None, args)


@allocation_rule("aten.addmm.default", "aten.baddbmm.default")
def biased_matmul(args: Sequence[Any]) -> KernelBlocks:
    # addmm(bias, first, second, ...)
    return _blocks(args[1], args[2], args[0], args)


def read_in_place(matrix: torch.Tensor) -> bool:
    """Whether the math library reads the last two dims of `matrix` without a copy: dense,
    row-major or transposed."""
    rows, columns = matrix.shape[-2:]
    row_stride, column_stride = matrix.stride()[-2:]
    row_major = column_stride == 1 and row_stride >= max(1, columns)
    transposed = row_stride == 1 and column_stride >= max(1, rows)
    return row_major or transposed


def _batches_apart(matrix: torch.Tensor) -> bool:
    return matrix.dim() < 3 or matrix.shape[0] == 1 or matrix.stride(0) >= prod(matrix.shape[1:])


def _bias_read_in_place(bias: torch.Tensor, output_shape: Sequence[int]) -> bool:
    row = bias.dim() == 1 and bias.shape[0] == output_shape[-1]
    return bias.is_contiguous() and (row or tuple(bias.shape) == tuple(output_shape))


def _blocks(
    first: torch.Tensor,
    second: torch.Tensor,
    bias: torch.Tensor | None,
    args: Sequence[Any],
) -> KernelBlocks:
    copied = KernelBlocks(
        None,
        "a matrix multiply's operand the math library does not read as it is (the kernel's "
        "copy of it)",
    )
    if not (read_in_place(first) and read_in_place(second)):
        return copied
    output_shape = (*first.shape[:-1], second.shape[-1])
    if first.dtype == second.dtype == torch.bfloat16:
        if not (_batches_apart(first) and _batches_apart(second)) or (
            bias is not None and not _bias_read_in_place(bias, output_shape)
        ):
            return copied
        return bf16_matmul_allocations(
            batch=first.shape[0] if first.dim() == 3 else 1,
            rows=first.shape[-2],
            inner=first.shape[-1],
            columns=second.shape[-1],
            output_shape=output_shape,
        )
    dtypes = {a.dtype for a in args if isinstance(a, torch.Tensor)}
    if dtypes & {torch.bfloat16, torch.float16}:
        return KernelBlocks(None, "bf16 or fp16 matrix multiply (oneDNN's brgemm scratchpad)")
    if len(dtypes) > 1 or dtypes - {torch.float32, torch.float64}:
        return KernelBlocks(None, "a matrix multiply other than float32, float64 or bfloat16")
    return OUTPUTS_ONLY
