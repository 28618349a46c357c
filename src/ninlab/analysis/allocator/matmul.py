"""The rule of CPU matrix multiplies (`mm`, `addmm`, `bmm`, `baddbmm`). Linear layers need none
in float32: `addmm`/`mm` copy nothing when their operands come from other ops. In bfloat16 they
follow `ninlab.analysis.allocator.onednn_bf16` (exact when too small for oneDNN, else a lower
bound); in float16, or with operands of two dtypes, oneDNN's brgemm scratchpad is not known."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ninlab.analysis.allocator.onednn_bf16 import bf16_matmul_allocations
from ninlab.analysis.allocator.registry import OUTPUTS_ONLY, KernelBlocks, allocation_rule

__all__ = ["biased_matmul", "matmul"]


@allocation_rule("aten.mm.default", "aten.bmm.default")
def matmul(args: Sequence[Any]) -> KernelBlocks:
    return _blocks(args[0], args[1], args)


@allocation_rule("aten.addmm.default", "aten.baddbmm.default")
def biased_matmul(args: Sequence[Any]) -> KernelBlocks:
    # addmm(bias, first, second, ...)
    return _blocks(args[1], args[2], args)


def _blocks(first: torch.Tensor, second: torch.Tensor, args: Sequence[Any]) -> KernelBlocks:
    if first.dtype == second.dtype == torch.bfloat16:
        return bf16_matmul_allocations(
            batch=first.shape[0] if first.dim() == 3 else 1,
            rows=first.shape[-2],
            inner=first.shape[-1],
            columns=second.shape[-1],
            output_shape=(*first.shape[:-1], second.shape[-1]),
        )
    reduced = any(
        isinstance(a, torch.Tensor) and a.dtype in (torch.bfloat16, torch.float16) for a in args
    )
    if reduced:
        return KernelBlocks(None, "bf16 or fp16 matrix multiply (oneDNN's brgemm scratchpad)")
    return OUTPUTS_ONLY
