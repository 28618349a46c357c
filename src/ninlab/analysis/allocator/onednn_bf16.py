"""The CPU allocator blocks of oneDNN's bfloat16 kernels (convolutions and matrix multiplies under
bf16 autocast) beyond their outputs: `bf16_conv_blocks` for a convolution call, and
`bf16_matmul_allocations` for a matrix multiply (`ninlab.analysis.allocator.matmul`).

Read off the PyTorch profiler's allocation records (`profile_memory=True`), one op at a time, on
this machine (torch 2.13.0 CPU, AVX-512 with AMX, 1 and 2 threads), with `ONEDNN_VERBOSE=1`
naming each kernel and memory format; tests/analysis/test_onednn_bf16.py replays them.

What a rule gives is exact where its `KernelBlocks.unmodelled` is empty, and otherwise a lower
bound: on oneDNN's brgemm kernels every block it lists is taken, in order, and the missing ones are
scratchpads and padding. The predictor measures each call of such a kernel on its own
(`ninlab.analysis.kernel_probe`), so a lower bound here is what a report shows only where that
call is too large to run; convolutions on 1x1 images (squeeze-excitation) and with few channels run
other kernels (channel-blocked, no channels-last copies), whose peaks the rules stayed under in
every shape tried (40 ops, forward and backward, both layouts). Exact:

* depthwise convolution forward, channels-last (oneDNN's brdgmm_dw: the output written in place,
  weights with their groups padded to 16) and NCHW (the float32 blocked path at 2 bytes an element:
  channel-blocked copies of input and result, groups padded to 16, plus a float32 copy of the bias,
  4 bytes per padded channel and 128, whenever there is a bias);
* depthwise backward at stride 1 ("same" padding), 3x3, 5x5 and 7x7, either layout. Channels-last
  5x5 and 7x7 (with fewer threads than channels) run oneDNN's jit_bf16 backward-weights kernel,
  which treats each group as 16x16 channels (a blocked weight gradient of C x 256 x k x k x 2
  bytes) and takes one scratchpad for a float32 reduction of it and transposed copies of one
  image's input and grad_output (ConvNeXt's 1.78 MB block for 32 channels 7x7 at 8x8, its bf16
  training peak); the others take float32 buffers per thread
  (`_nchw_depthwise_weight_gradient_scratchpad_bytes`);
* matrix multiplies too small for oneDNN (ATen sends bf16 `mm`/`addmm`/`bmm` to oneDNN only when
  the product of their sizes exceeds 16^3): no workspace.

A lower bound, with the reason in `unmodelled`:

* ungrouped convolutions (oneDNN's AMX brgconv kernels): bfloat16 runs in channels-last layout even
  for NCHW tensors, so an NCHW forward copies its input into channels-last (unless it has one
  channel), computes a channels-last result, copies that into a dense tensor and makes it
  contiguous (two output-sized blocks at once: NiN's inference peak), and its backward does the
  same for grad_output and grad_input, then copies grad_output and input again for the weight
  gradient. Not modelled: the brgemm scratchpads (from 16 KB for a 1x1 to 10 MB for NiN's 11x11
  first convolution at 224x224), which oneDNN sizes from its blocking heuristics and which do not
  grow monotonically with the spatial size (96->96 3x3, one thread: 115 KB at 12x12, 336 KB at
  26x26, 180 KB at 54x54), nor the padding of its reordered weights (output channels to 16, 32 or
  48, input channels to 16 or 32, picked by shape); the rules count the weights unpadded.
* strided depthwise backward (backward-data on the channels-last brgemm path, as in float32, and
  weight-gradient scratchpads measured at stride 1 only) and more than 2 threads.
* matrix multiplies on oneDNN: the AMX brgemm scratchpad (copied B blocks, a float32 accumulator, a
  tile buffer per thread; e.g. 128x64 by 64x256 takes 42,624 bytes with 2 threads, 37,888 with
  one), sized by blocking heuristics; only the output is counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import prod

import torch

from ninlab.analysis.allocator.blocks import (
    KernelAllocation,
    frees,
    pad,
)
from ninlab.analysis.allocator.conv_call import ConvCall
from ninlab.analysis.allocator.registry import OUTPUTS_ONLY, KernelBlocks
from ninlab.analysis.torch_internals import amx_tiles_supported

__all__ = [
    "MKLDNN_MATMUL_MIN_SIZE",
    "bf16_conv_backward_allocations",
    "bf16_conv_blocks",
    "bf16_conv_forward_allocations",
    "bf16_matmul_allocations",
]

_ITEMSIZE = 2  # bfloat16
_GROUP_BLOCK = 16  # depthwise groups are padded to this many in every blocked copy (AVX-512)

MKLDNN_MATMUL_MIN_SIZE = 16 * 16 * 16
"""ATen sends a bf16 matrix multiply to oneDNN only when the product of its sizes (m x k x n, times
the batch for bmm) exceeds this (aten/src/ATen/native/mkldnn/Utils: mkldnn_gemm_min_size)."""

_DEPTHWISE_SCRATCHPAD = "bf16 depthwise backward-weights scratchpad"
_BRGEMM_SCRATCHPAD = (
    "bf16 oneDNN convolution: AMX brgemm scratchpad and weight padding (sized by oneDNN's "
    "blocking heuristics)"
)
_GROUPED = KernelBlocks(None, "grouped bf16 oneDNN convolution (neither ungrouped nor depthwise)")
# The ungrouped rules below describe oneDNN's AMX brgconv kernels. A CPU with AVX-512 bf16 but no
# AMX (AMD EPYC) runs other kernels, which skip some of the copies the rules name (an 11x11 conv
# from one channel: 110,592 bytes at its peak against the rules' 165,888), so there the rules are
# not even a lower bound, and each call is measured (the kernel probe) as an unknown kernel's.
_AMX = amx_tiles_supported()
_UNGROUPED_WITHOUT_AMX = KernelBlocks(
    None, "ungrouped bf16 oneDNN convolution on a CPU without AMX (rules read off AMX kernels)"
)


def bf16_conv_blocks(conv: ConvCall) -> KernelBlocks:
    """The blocks of a bfloat16 convolution call on the oneDNN backend (2-d), or why they are only
    a lower bound or not known."""
    if conv.grad_output is None:
        channels_last = conv.channels_last
        return bf16_conv_forward_allocations(
            input_shape=tuple(conv.input.shape),
            weight_shape=tuple(conv.weight.shape),
            output_shape=conv.output_shape,
            groups=conv.groups,
            bias=conv.bias is not None,
            channels_last=channels_last,
            copies_input=channels_last and conv.copies_input,
            copies_weight=channels_last and conv.copies_weight,
        )
    return bf16_conv_backward_allocations(
        grad_output_shape=tuple(conv.grad_output.shape),
        input_shape=tuple(conv.input.shape),
        weight_shape=tuple(conv.weight.shape),
        groups=conv.groups,
        channels_last=conv.channels_last,
        output_mask=conv.output_mask,
        threads=torch.get_num_threads(),
    )


def _bytes(shape: Sequence[int]) -> int:
    return prod(shape) * _ITEMSIZE


def _is_depthwise(weight_shape: Sequence[int], groups: int) -> bool:
    return groups > 1 and weight_shape[1] == 1 and weight_shape[0] == groups


def bf16_conv_forward_allocations(
    *,
    input_shape: Sequence[int],
    weight_shape: Sequence[int],
    output_shape: Sequence[int],
    groups: int,
    bias: bool,
    channels_last: bool,
    copies_input: bool = False,
    copies_weight: bool = False,
) -> KernelBlocks:
    """oneDNN bf16 convolution forward, ungrouped or depthwise (other grouped ones: not known).

    Measured, 96->96 1x1 at batch 2 on 26x26, 2 threads: NCHW [24,624 (scratchpad), 259,584
    (channels-last input), 18,432 (weights), 259,584 (channels-last result), -18,432, -259,584,
    -24,624, 259,584 (dense copy), 259,584 (contiguous output), -259,584, -259,584]; channels-last
    [259,584 (output), 24,624, 18,432, -18,432, -24,624]. Depthwise 24 channels 7x7, bias, NCHW:
    [256, 32,768, 3,136, 32,768, -3,136, -32,768, -256, 24,576, -32,768].
    """
    input_bytes, output_bytes = _bytes(input_shape), _bytes(output_shape)
    copies = []
    if copies_input:
        copies.append(KernelAllocation(input_bytes, "channels-last copy of the input"))
    if copies_weight:
        copies.append(KernelAllocation(_bytes(weight_shape), "channels-last copy of the weight"))
    if _is_depthwise(weight_shape, groups):
        return KernelBlocks(
            _depthwise_forward(input_shape, weight_shape, output_shape, bias, channels_last, copies)
        )
    if groups > 1:
        return _GROUPED
    if not _AMX:
        return _UNGROUPED_WITHOUT_AMX
    weights = KernelAllocation(_bytes(weight_shape), "reordered weights (unpadded: a lower bound)")
    if channels_last:
        output = KernelAllocation(output_bytes, "output", output=0)
        allocations = (*copies, output, weights, *frees([weights]), *frees(copies))
        return KernelBlocks(allocations, _BRGEMM_SCRATCHPAD)
    # NCHW: oneDNN's bf16 kernels run on channels-last (acdb) copies; one channel is both layouts.
    workspace = [KernelAllocation(input_bytes, "channels-last input")] if input_shape[1] > 1 else []
    workspace.append(weights)
    result = KernelAllocation(output_bytes, "channels-last result")
    dense = KernelAllocation(output_bytes, "dense copy of the result")
    allocations = (
        *workspace,
        result,
        *frees(workspace[::-1]),
        dense,
        KernelAllocation(output_bytes, "output (contiguous clone)", output=0),
        *frees([dense, result]),
    )
    return KernelBlocks(allocations, _BRGEMM_SCRATCHPAD)


def _depthwise_forward(
    input_shape: Sequence[int],
    weight_shape: Sequence[int],
    output_shape: Sequence[int],
    bias: bool,
    channels_last: bool,
    copies: list[KernelAllocation],
) -> tuple[KernelAllocation, ...]:
    channels, kernel = weight_shape[0], prod(weight_shape[2:])
    padded = pad(channels, _GROUP_BLOCK)
    weights = KernelAllocation(padded * kernel * _ITEMSIZE, "reordered weights (groups padded)")
    if channels_last:
        output = KernelAllocation(_bytes(output_shape), "output", output=0)
        return (*copies, output, weights, *frees([weights]), *frees(copies))
    batch, _, *in_spatial = input_shape
    out_spatial = output_shape[2:]
    workspace = [KernelAllocation(4 * padded + 128, "float32 bias")] if bias else []
    workspace += [
        KernelAllocation(batch * padded * prod(in_spatial) * _ITEMSIZE, "blocked input"),
        weights,
    ]
    result = KernelAllocation(batch * padded * prod(out_spatial) * _ITEMSIZE, "blocked result")
    return (
        *workspace,
        result,
        *frees(workspace[::-1]),
        KernelAllocation(_bytes(output_shape), "output", output=0),
        *frees([result]),
    )


def bf16_conv_backward_allocations(
    *,
    grad_output_shape: Sequence[int],
    input_shape: Sequence[int],
    weight_shape: Sequence[int],
    groups: int,
    channels_last: bool,
    output_mask: Sequence[bool] = (True, True, True),
    threads: int = 2,
) -> KernelBlocks:
    """oneDNN bf16 convolution backward (`aten.convolution_backward`), ungrouped or depthwise
    (other grouped ones: not known): grad_input (output_mask[0]), then the weight and
    bias gradients.

    Measured, 96->96 1x1 at batch 2 on 26x26, 2 threads, NCHW: [259,584 (channels-last
    grad_output), 18,432 (weights), 259,584 (channels-last grad_input), 24,752 (scratchpad),
    -24,752, -18,432, -259,584, 259,584 (dense), 259,584 (grad_input), -259,584, -259,584,
    259,584 (channels-last grad_output), 259,584 (channels-last input), 18,432 (blocked
    grad_weight), 679,344 (scratchpad), 192 (blocked grad_bias), -679,344, -259,584, -259,584, 192
    (grad_bias), 18,432 (grad_weight), -18,432, -192]; channels-last: [259,584 (grad_input),
    18,432, 24,752, -24,752, -18,432, 18,432, 679,344, 192, -679,344, 192, 18,432 (grad_weight),
    18,432 (its channels-last copy), -18,432, -18,432, -192].
    """
    if _is_depthwise(weight_shape, groups):
        return _depthwise_backward(
            grad_output_shape, input_shape, weight_shape, channels_last, output_mask, threads
        )
    if groups > 1:
        return _GROUPED
    if not _AMX:
        return _UNGROUPED_WITHOUT_AMX
    input_bytes, output_bytes, weight_bytes = (
        _bytes(input_shape),
        _bytes(grad_output_shape),
        _bytes(weight_shape),
    )
    weights = KernelAllocation(weight_bytes, "weights for backward-data (unpadded: a lower bound)")
    one_channel = input_shape[1] == 1
    allocations: list[KernelAllocation] = []
    if output_mask[0]:
        grad_input = KernelAllocation(input_bytes, "grad_input", output=0)
        if channels_last:
            allocations += [grad_input, weights, *frees([weights])]
        else:
            grad_output = KernelAllocation(output_bytes, "channels-last grad_output")
            computed = KernelAllocation(input_bytes, "channels-last grad_input")
            allocations += [grad_output, weights, computed, *frees([weights, grad_output])]
            if one_channel:  # channels-last is NCHW already: no contiguous clone
                allocations += [grad_input, *frees([computed])]
            else:
                dense = KernelAllocation(input_bytes, "dense copy of grad_input")
                allocations += [dense, grad_input, *frees([dense, computed])]
    if output_mask[1] or output_mask[2]:
        copies = []
        if not channels_last:
            copies.append(KernelAllocation(output_bytes, "channels-last grad_output"))
            if not one_channel:
                copies.append(KernelAllocation(input_bytes, "channels-last input"))
        blocked = KernelAllocation(weight_bytes, "blocked grad_weight (unpadded: a lower bound)")
        bias_bytes = weight_shape[0] * _ITEMSIZE
        blocked_bias = [KernelAllocation(bias_bytes, "blocked grad_bias")] if output_mask[2] else []
        gradients = [KernelAllocation(bias_bytes, "grad_bias", output=2)] if output_mask[2] else []
        if output_mask[1]:
            gradients.append(KernelAllocation(weight_bytes, "grad_weight", output=1))
            if channels_last:
                copy = KernelAllocation(weight_bytes, "channels-last copy of grad_weight")
                gradients += [copy, *frees([copy])]
        allocations += [
            *copies,
            blocked,
            *blocked_bias,
            *frees(copies[::-1]),
            *gradients,
            *frees([blocked, *blocked_bias]),
        ]
    return KernelBlocks(tuple(allocations), _BRGEMM_SCRATCHPAD)


def _depthwise_backward(
    grad_output_shape: Sequence[int],
    input_shape: Sequence[int],
    weight_shape: Sequence[int],
    channels_last: bool,
    output_mask: Sequence[bool],
    threads: int,
) -> KernelBlocks:
    """Depthwise backward. grad_input: channels-last, the output and weights with their groups
    padded; NCHW, the float32 blocked path at 2 bytes an element. Measured, 24 channels 3x3 at
    batch 2 on 8x8: channels-last [6,144, 576, -576, 576, 2,976 (scratchpad), 48, -2,976, 48, 432,
    432, -432, -576, -48]; NCHW [8,192, 576, 8,192, -576, -8,192, 6,144, -8,192, 8,192, 8,192,
    576, 1,536 (scratchpad), 48, -1,536, -8,192, -8,192, 48, 432, -576, -48]. 32 channels 7x7,
    channels-last: [8,192, 3,136, -3,136, 802,816 (16x16 blocked grad_weight per group),
    1,780,104 (float32 reduction and transposition buffers), 64, -1,780,104, 64, 3,136, 3,136,
    -3,136, -802,816, -64]."""
    channels, kernel = weight_shape[0], prod(weight_shape[2:])
    batch = input_shape[0]
    padded = pad(channels, _GROUP_BLOCK)
    # A strided backward-data runs another kernel (channels-last brgemm, as in float32), and the
    # weight-gradient scratchpads were measured at stride 1 ("same" padding) only.
    unstrided = tuple(grad_output_shape[2:]) == tuple(input_shape[2:])
    weight_bytes, padded_weight_bytes = channels * kernel * _ITEMSIZE, padded * kernel * _ITEMSIZE
    allocations: list[KernelAllocation] = []
    blocked_grad_output = KernelAllocation(
        batch * padded * prod(grad_output_shape[2:]) * _ITEMSIZE, "blocked grad_output"
    )
    blocked_input = KernelAllocation(
        batch * padded * prod(input_shape[2:]) * _ITEMSIZE, "blocked input"
    )
    if output_mask[0]:
        grad_input = KernelAllocation(_bytes(input_shape), "grad_input", output=0)
        weights = KernelAllocation(padded_weight_bytes, "weights for backward-data (groups padded)")
        if channels_last:
            allocations += [grad_input, weights, *frees([weights])]
        else:
            computed = KernelAllocation(blocked_input.delta_bytes, "blocked grad_input")
            allocations += [
                blocked_grad_output,
                weights,
                computed,
                *frees([weights, blocked_grad_output]),
                grad_input,
                *frees([computed]),
            ]
    if not (output_mask[1] or output_mask[2]):
        return KernelBlocks(tuple(allocations))
    bias_bytes = channels * _ITEMSIZE
    grad_bias = bool(output_mask[2])
    blocked_bias = [KernelAllocation(bias_bytes, "blocked grad_bias")] if grad_bias else []
    bias_output = [KernelAllocation(bias_bytes, "grad_bias", output=2)] if grad_bias else []
    gradient = KernelAllocation(weight_bytes, "grad_weight", output=1)
    if channels_last and kernel > 9:
        # jit_bf16 backward-weights: each group as 16x16 channels, reduced in float32.
        blocked_16x16 = KernelAllocation(
            channels * 256 * kernel * _ITEMSIZE, "16x16 blocked grad_weight"
        )
        scratchpad = KernelAllocation(
            _depthwise_weight_gradient_scratchpad_bytes(
                grad_output_shape, input_shape, weight_shape, grad_bias
            ),
            "float32 reduction and transposition buffers",
        )
        blocked = KernelAllocation(weight_bytes, "blocked grad_weight")
        allocations += [
            blocked_16x16,
            scratchpad,
            *blocked_bias,
            *frees([scratchpad]),
            *bias_output,
            blocked,
            gradient,
            *frees([blocked, blocked_16x16, *blocked_bias]),
        ]
        # Measured with one thread per group at most, at stride 1 ("same" padding); elsewhere
        # oneDNN may split the work (and its buffers) otherwise.
        exact = unstrided and threads < channels
        return KernelBlocks(tuple(allocations), "" if exact else _DEPTHWISE_SCRATCHPAD)
    blocked = KernelAllocation(padded_weight_bytes, "blocked grad_weight (groups padded)")
    if channels_last:  # 3x3 and smaller
        # A float32 weight-gradient buffer per thread (groups padded), and with a bias a per-thread
        # float32 bias buffer and one more: measured for 3x3, 16 to 64 channels, 4x4 to 16x16,
        # 1 and 2 threads (24 channels with bias, 2 threads: 2,976), whatever the size.
        scratchpad_bytes = 4 * kernel * padded * threads + 128
        if grad_bias:
            scratchpad_bytes += 4 * (1 + threads) * channels + 256
        scratchpad = KernelAllocation(scratchpad_bytes, "scratchpad")
        copy = KernelAllocation(weight_bytes, "grad_weight copy")
        allocations += [
            blocked,
            scratchpad,
            *blocked_bias,
            *frees([scratchpad]),
            *bias_output,
            gradient,
            copy,
            *frees([copy, blocked, *blocked_bias]),
        ]
        exact = kernel == 9 and unstrided
        return KernelBlocks(tuple(allocations), "" if exact else _DEPTHWISE_SCRATCHPAD)
    else:
        # NCHW: a 3x3 kernel copies grad_output and input into blocked layouts and pads the
        # groups of its gradient; 5x5 and 7x7 read them as they are.
        small = kernel <= 9
        copies = [blocked_grad_output, blocked_input] if small else []
        if not small:
            blocked = KernelAllocation(weight_bytes, "blocked grad_weight")
        scratchpad = KernelAllocation(
            _nchw_depthwise_weight_gradient_scratchpad_bytes(
                grad_output_shape, input_shape, weight_shape, grad_bias, threads
            ),
            "scratchpad",
        )
        allocations += [
            *copies,
            blocked,
            scratchpad,
            *blocked_bias,
            *frees([scratchpad, *copies[::-1]]),
            *bias_output,
            gradient,
            *frees([blocked, *blocked_bias]),
        ]
        if unstrided and kernel in (9, 25, 49) and threads <= 2:
            return KernelBlocks(tuple(allocations))
    return KernelBlocks(tuple(allocations), _DEPTHWISE_SCRATCHPAD)


def _nchw_depthwise_weight_gradient_scratchpad_bytes(
    grad_output_shape: Sequence[int],
    input_shape: Sequence[int],
    weight_shape: Sequence[int],
    grad_bias: bool,
    threads: int,
) -> int:
    """The scratchpad of oneDNN's NCHW (channel-blocked) depthwise backward-weights kernel.

    3x3: a float32 weight-gradient buffer (groups padded to 16) and, with a bias, a float32 bias
    buffer, per thread that splits the batch (one per thread when the groups make one block of
    16, else one), plus 128 bytes: 24 channels with bias, 1,536 bytes at any size. 5x5 and 7x7:
    float32 buffers of 16 bytes per weight element and 8 more per thread, a bf16 copy of one
    image's k x k neighbourhoods of one channel per thread (H x W x k x k x 2 bytes), 4 bytes per
    channel and 128 for a bias, and 384: 32 channels 7x7 on 8x8 with bias, 2 threads, 50,816.
    Measured for 8 to 120 channels, 4x4 to 16x16, batch 1 to 4, 1 and 2 threads."""
    channels, kernel = weight_shape[0], prod(weight_shape[2:])
    if kernel <= 9:
        padded = pad(channels, _GROUP_BLOCK)
        blocks = padded // _GROUP_BLOCK
        buffers = min(threads // min(blocks, threads), input_shape[0])
        per_buffer = 4 * kernel * padded + ((4 * padded + 128) if grad_bias else 0)
        return buffers * per_buffer + 128
    neighbourhoods = threads * prod(input_shape[2:]) * kernel * _ITEMSIZE
    bias = 4 * channels + 128 if grad_bias else 0
    return 384 + channels * kernel * (8 + 8 * threads) + neighbourhoods + bias


def _depthwise_weight_gradient_scratchpad_bytes(
    grad_output_shape: Sequence[int],
    input_shape: Sequence[int],
    weight_shape: Sequence[int],
    grad_bias: bool,
) -> int:
    """The one scratchpad of oneDNN's jit_bf16 backward-weights kernel for a depthwise 5x5 or 7x7
    convolution, channels-last, with fewer threads than groups (so one thread does each group,
    whatever the batch): a float32 reduction buffer of the 16x16-padded weights (and bias), bf16
    transposed copies of one image's input and grad_output per group, 16 channels each (rows as
    wide as the output rounded up to even, plus 4 for the input), and 8,584 bytes of guards and
    alignment (jit_avx512_core_bf16_conv_bwd_weights_kernel_f32::init_scratchpad). Measured for
    16 to 64 channels, 3x3 to 16x16, square and not, batch 1 to 4, 5x5 and 7x7, 1 and 2 threads:
    e.g. 32 channels 7x7 on 8x8 with bias, 1,780,104."""
    channels, kernel = weight_shape[0], prod(weight_shape[2:])
    reduction = 4 * (channels * 256 * kernel + (16 * channels if grad_bias else 0))
    width = pad(grad_output_shape[3], 2)
    rows = input_shape[2] * (width + 4) + grad_output_shape[2] * width
    return reduction + _ITEMSIZE * channels * 16 * rows + 8584


def bf16_matmul_allocations(
    *, batch: int, rows: int, inner: int, columns: int, output_shape: Sequence[int]
) -> KernelBlocks:
    """A bf16 `mm`/`addmm` (batch 1) or `bmm`/`baddbmm` of (batch, rows, inner) by (batch, inner,
    columns): its outputs only (no workspace) when ATen keeps it off oneDNN, else the output and
    the unmodelled brgemm scratchpad."""
    if batch * rows * inner * columns <= MKLDNN_MATMUL_MIN_SIZE:
        return OUTPUTS_ONLY
    output = KernelAllocation(_bytes(output_shape), "output", output=0)
    return KernelBlocks(
        (output,),
        "bf16 matrix multiply: oneDNN's AMX brgemm scratchpad (sized by its blocking heuristics)",
    )
