"""The rule of the two convolution ops (`aten.convolution`, `aten.convolution_backward`) on CPU:
parse the call once, then hand it to the rules of the kernel that runs it.

Which backend runs a convolution is PyTorch's choice (`conv_backend`): with one thread and a batch
under 16, 1x1 convolutions take the `Slow2d` path, a matrix multiply with no workspace. On the
oneDNN (mkldnn) path, 2-d, untransposed, undilated float32 calls follow
`ninlab.analysis.allocator.onednn_float32` and bfloat16 ones
`ninlab.analysis.allocator.onednn_bf16`; any other call (`ConvCall.outside_the_rules` names
them) gets the reason its blocks are not known, and the predictor measures it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ninlab.analysis.allocator.conv_call import ConvCall
from ninlab.analysis.allocator.onednn_bf16 import bf16_conv_blocks
from ninlab.analysis.allocator.onednn_float32 import float32_conv_blocks
from ninlab.analysis.allocator.registry import OUTPUTS_ONLY, KernelBlocks, allocation_rule

__all__ = ["convolution", "convolution_backward"]


@allocation_rule("aten.convolution.default")
def convolution(args: Sequence[Any]) -> KernelBlocks:
    return _blocks(ConvCall.forward(args))


@allocation_rule("aten.convolution_backward.default")
def convolution_backward(args: Sequence[Any]) -> KernelBlocks:
    return _blocks(ConvCall.backward(args))


def _blocks(conv: ConvCall) -> KernelBlocks:
    if (outside := conv.outside_the_rules) is not None:
        return KernelBlocks(None, outside)
    backend = conv.backend
    if backend == "Slow2d" and tuple(conv.weight.shape[2:]) == (1, 1):
        # An unstrided 1x1 convolution as a matrix multiply: no workspace, unless a tensor is
        # laid out otherwise (XCiT's channels-last input at batch 1: copied, 8,192 bytes).
        tensors = (conv.input, conv.weight, conv.grad_output)
        if all(t is None or t.is_contiguous() for t in tensors):
            return OUTPUTS_ONLY
        return KernelBlocks(None, "Slow2d 1x1 convolution of a tensor not contiguous")
    if backend != "Mkldnn":
        return KernelBlocks(None, f"convolution on the {backend} backend")
    dtypes = (conv.input.dtype, conv.weight.dtype)
    if dtypes == (torch.bfloat16, torch.bfloat16):
        return bf16_conv_blocks(conv)
    if dtypes == (torch.float32, torch.float32):
        return float32_conv_blocks(conv)
    return KernelBlocks(
        None, "bf16 or fp16 oneDNN convolution (other formats and AMX/brgemm scratchpads)"
    )
