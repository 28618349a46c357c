"""oneDNN's float32 convolutions on CPU (`aten.convolution` and `aten.convolution_backward` on the
mkldnn path): every block they allocate, or why a kind is not modelled.

* Contiguous NCHW: oneDNN computes in channel-blocked layouts (`aBcd16b`: channels padded to a
  multiple of 16 on AVX-512, 8 on AVX2), so a convolution reorders its input into a blocked copy
  (unless it has fewer channels than one block and a kernel over 1x1, which oneDNN reads as it
  is; its 1x1 kernel pads even a squeeze-excitation's 4 channels), reorders the
  weights, writes a blocked result and reorders that into the NCHW output. For NiN's 1x1
  convolutions that is two extra activation-sized blocks per conv: why inference's allocator
  peak is 45% above its live peak at batch 128. The backward does the same for grad_output,
  weights and grad_input, then again (grad_output, input) for the weight gradient. A strided
  convolution's grad_input comes from oneDNN's brgconv_strided kernel in channels-last layout,
  which PyTorch copies into a new NCHW tensor and clones to make it contiguous: three
  input-sized blocks at once (ResNet's downsampling convolutions), beside a brgemm scratchpad
  (`strided_backward_data_scratchpad_bytes`: a per-thread copy of grad_output, known for 1x1
  and "same"-padded stride-2 convolutions; elsewhere, as where kernel equals stride, the
  report flags it). When oneDNN's jit kernel splits the weight gradient's batch over threads
  (`onednn_weight_gradient_batch_threads`, its own cost model redone), it reduces the
  per-thread gradients in a scratchpad (NiN at batch 128 is now exact; it was 270,424 bytes
  under). A depthwise convolution (one channel per group) of any width pads its groups to the
  block in every blocked copy, weights and bias included; a grouped convolution's reduction
  scratchpad with several threads is not modelled. A depthwise weight gradient of a kernel over
  3x3 (5x5, 7x7; ONEDNN_VERBOSE shows oneDNN's gemm kernel, `x64:gemm:jit`, where 1x1 and 3x3
  run `jit_dw`) reads NCHW as it is, beside a scratchpad of per-thread weight-reduction and
  im2col buffers (`depthwise_gemm_weight_gradient_scratchpad_bytes`: 80,256 bytes for 96
  channels 5x5 on a 4x4 map, 8 times the weights; EfficientNet at 16x16 was 5.8% under).
* Channels-last (`--memory-format channels_last`, and any convolution whose
  input arrives channels-last, such as ConvNeXt's depthwise convs after a permuted LayerNorm):
  forward, ungrouped or depthwise (the output written in place, a brgemm scratchpad of a fixed
  size per thread, reordered weights, and a channels-last copy of an input or weight not yet in
  it); backward of a 3x3, 5x5 or 7x7 depthwise convolution, whose 5x5 and 7x7 weight gradient
  takes a scratchpad of 1 KB per weight element (25 times ConvNeXt's activation at batch 2);
  backward of an ungrouped convolution (`mkldnn_conv_channels_last_backward_allocations`:
  grad_input in place beside a brgemm scratchpad, then the weight gradient in oneDNN's blocked
  layout, its reduction scratchpad as in NCHW, and ATen's dense and channels-last copies).
  Not modelled: grouped (not depthwise) channels-last convolutions, the backward-data of a
  strided convolution whose scratchpad follows no rule found (kernel equal to stride, as in
  ConvNeXt's downsampling and patchify convs), a forward with one input channel under a kernel
  over 1x1 or a kernel over 7x7 (`_fixed_brgemm_scratchpad`) or to a single output pixel, a
  depthwise backward on a map smaller than its kernel, and an NCHW backward whose gradient
  arrives channels-last (PVT-v2's); `float32_conv_blocks` names them,
  and the predictor measures each such call on its own (`ninlab.analysis.kernel_probe`). Which
  layout a convolution runs in is ATen's choice from the strides (`suggest_memory_format`), so a
  one-channel input with channels-last strides runs channels-last.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from math import prod
from typing import Any

import torch

from ninlab.analysis.allocator.blocks import (
    KernelAllocation,
    frees,
    onednn_channel_block,
    pad,
)
from ninlab.analysis.allocator.conv_call import ConvCall
from ninlab.analysis.allocator.registry import KernelBlocks

__all__ = [
    "depthwise_gemm_weight_gradient_scratchpad_bytes",
    "float32_conv_blocks",
    "mkldnn_conv_backward_allocations",
    "mkldnn_conv_channels_last_backward_allocations",
    "mkldnn_conv_channels_last_forward_allocations",
    "mkldnn_conv_forward_allocations",
    "mkldnn_depthwise_conv_channels_last_backward_allocations",
    "onednn_weight_gradient_batch_threads",
    "strided_backward_data_modelled",
    "strided_backward_data_scratchpad_bytes",
]


def float32_conv_blocks(conv: ConvCall) -> KernelBlocks:
    """The blocks of a float32 convolution call on the oneDNN backend, or why they are not
    known."""
    reason = _unmodelled_reason(conv)
    if reason is not None:
        return KernelBlocks(None, reason)
    return KernelBlocks(_call_allocations(conv))


def _unmodelled_reason(conv: ConvCall) -> str | None:
    """Why this call's blocks are not known, or None when a rule here gives them."""
    groups, block = conv.groups, onednn_channel_block()
    if conv.channels_last:
        depthwise = conv.weight.shape[1] == 1 and conv.weight.shape[0] == groups
        if groups > 1 and not depthwise:
            return "grouped channels-last oneDNN convolution"
        if conv.grad_output is None:
            if not depthwise and prod(conv.output_shape[2:]) == 1:
                # A 4x4 stride-4 patch embedding of a 4x4 map takes 49,152 bytes more than
                # the rule's scratchpad; on an 8x8 map, the rule's (measured, torch 2.13/2.14).
                return "channels-last forward to a single output pixel (another brgemm scratchpad)"
            if depthwise or _fixed_brgemm_scratchpad(
                conv.input.shape[1], tuple(conv.weight.shape[2:])
            ):
                return None
            return (
                "channels-last forward with one input channel or a kernel over 7x7 (another "
                "brgemm scratchpad)"
            )
        if not depthwise:
            return _channels_last_backward_reason(conv, block)
        if (
            tuple(conv.weight.shape[2:]) not in _DEPTHWISE_BACKWARD_KERNELS
            or not conv.output_mask[1]
        ):
            return "channels-last depthwise backward of a kernel size or gradients not measured"
        if any(size < k for size, k in zip(conv.input.shape[2:], conv.weight.shape[2:])):
            # 256 channels 3x3 on a 2x2 map: 2,387,968 bytes where the rule gives 37,888 (PVT-v2's
            # last stages); from a 3x3 map on, the rule's (measured, torch 2.13/2.14).
            return "channels-last depthwise backward on a map smaller than its kernel"
        return None
    if not all(t.is_contiguous() for t in (conv.input, conv.weight)):
        return "oneDNN convolution on tensors neither NCHW nor channels-last"
    kernel = tuple(conv.weight.shape[2:])
    if (
        conv.grad_output is None
        and groups == 1
        and kernel == (1, 1)
        and any(step > 1 for step in conv.window[0])
    ):
        # oneDNN's 1x1 kernel may first copy the strided input to unit stride, in a scratchpad
        # of the input's blocked channels by the output's pixels per thread, plus 128 bytes
        # (3->16 stride 2 on 64x64 at batch 2: 131,200 bytes, an inference 0.86 of its allocator
        # peak, FastViT's stem): on a 64x64 map with stride 2 or 4, not with stride 3 nor on
        # 33x33 (measured, torch 2.14.1, AVX-512), oneDNN's choice.
        return "NCHW strided 1x1 forward (oneDNN's reduce-to-unit-stride copy, by heuristics)"
    if _strided_1x1_weight_gradient_unmeasured(conv, block):
        return "NCHW strided 1x1 weight gradient of a kind not measured (its scratchpad)"
    if conv.grad_output is not None and not conv.grad_output.is_contiguous():
        # oneDNN reorders a channels-last gradient of an NCHW convolution (a transformer's
        # reshaped tokens): 64->64 3x3 on 8x8, 360,960 bytes where the NCHW rule gives 328,192.
        return "NCHW oneDNN convolution backward of a gradient in another layout"
    if max(conv.weight.shape[2:]) > _JIT_KERNEL_MAX:
        return (
            f"NCHW oneDNN convolution of a kernel over {_JIT_KERNEL_MAX} (oneDNN's gemm kernel "
            "and its im2col scratchpad)"
        )
    strided = any(step > 1 for step in conv.window[0])
    if conv.output_mask[:1] == (True,) and conv.input.shape[1] == 1 and strided:
        return (
            "strided backward-data with one input channel "
            "(oneDNN picks its jit or brgemm kernel by heuristics)"
        )
    if (
        conv.output_mask[:1] == (True,)
        and strided
        and groups == 1
        and not strided_backward_data_modelled(kernel, *conv.window[:2], conv.input.shape[2:])
    ):
        return "strided backward-data not of a measured kind (brgconv_strided's scratchpad)"
    in_channels = conv.input.shape[1]
    if (
        conv.grad_output is not None
        and groups == 1
        and _MEASURED_FIRST_LAYER_CHANNELS < in_channels < block
        and kernel != (1, 1)
    ):
        # 12->8 3x3 on 8x8 (a pixel-unshuffled image): 27,456 bytes where the rule gives 39,392;
        # 4->16 3x3 13,376 for 30,016 (measured for 4 to 15 input channels, torch 2.14.1).
        return "NCHW backward of a first layer with 4 to 15 input channels (another jit kernel)"
    out_per_group = conv.weight.shape[0] // groups
    depthwise = conv.weight.shape[1] == 1 and out_per_group == 1
    if depthwise and conv.output_mask[1:] == (False, True) and max(kernel) > 3:
        return "depthwise bias gradient without the weight gradient, kernel over 3x3 (not measured)"
    # A depthwise convolution pads its groups to the block, whatever their number.
    if groups > 1 and not depthwise and out_per_group % block != 0:
        return (
            "grouped oneDNN convolution whose channels per group are not a multiple of the "
            "channel block"
        )
    return None


# The most input channels of an NCHW first layer whose backward the rules were measured for (an
# image's 1 to 3); from 4 up to a block, oneDNN's kernels block the input otherwise.
_MEASURED_FIRST_LAYER_CHANNELS = 3

# The widest kernel the NCHW rules were measured for: from 15 on, oneDNN's jit kernels give way
# to its gemm kernel (a 3->192 16x16 stride-16 patch embedding's weight gradient, ViT's, takes
# 5,407,744 bytes at 64x64 where the jit rule gives 1,181,184; a 16->32 20x20 stride-2 forward
# 2,885,376 for 978,048).
_JIT_KERNEL_MAX = 14


def _fixed_brgemm_scratchpad(in_channels: int, kernel: tuple[int, ...]) -> bool:
    """Whether a channels-last float32 forward takes the brgemm scratchpad of a fixed size per
    thread (`mkldnn_conv_channels_last_forward_allocations`). Measured on a 24x24 map for 1 to 16
    input channels, 1x1 to 11x11 kernels, strides 1 to 4: one input channel under a kernel over
    1x1 (NiN's first layer: 3,137,552 bytes at 72x72) and kernels of 11 take others."""
    return max(kernel) <= 7 and (in_channels > 1 or max(kernel) == 1)


def _channels_last_backward_reason(conv: ConvCall, block: int) -> str | None:
    """Why an ungrouped channels-last backward's blocks are not known, or None when
    `mkldnn_conv_channels_last_backward_allocations` gives them."""
    stride = conv.window[0]
    kernel = tuple(conv.weight.shape[2:])
    strided = any(step > 1 for step in stride)
    in_channels = conv.input.shape[1]
    if block != 16 or kernel[1] > 14:
        return (
            "channels-last oneDNN convolution backward outside the measured kernels (AVX-512, "
            "kw <= 14)"
        )
    if (
        conv.output_mask[0]
        and strided
        and not strided_backward_data_modelled(kernel, stride, conv.window[1], conv.input.shape[2:])
    ):
        return (
            "strided channels-last backward-data not of a measured kind (brgconv_strided's "
            "scratchpad)"
        )
    if conv.output_mask[0] and in_channels < block and kernel != (1, 1):
        return "channels-last backward-data of a first layer (fewer input channels than a block)"
    if _strided_1x1_weight_gradient_unmeasured(conv, block):
        return "channels-last strided 1x1 weight gradient of a kind not measured (its scratchpad)"
    return None


def _strided_1x1_weight_gradient_unmeasured(conv: ConvCall, block: int) -> bool:
    """Whether the call is an ungrouped strided 1x1 weight gradient outside the kinds
    `_weight_gradient_scratchpad_bytes` was measured on (its unit-stride copy alone, from 32
    input channels): one of a block of input channels or fewer (3->16 on 32x32: 54,592 bytes
    NCHW, 27,968 channels-last, where the rule gives 6,272; 16->32 on 32x32: 43,264 where it
    gives 32,896, a batch split's reduction more; torch 2.14.1, 2 threads), or whose batch the
    cost model splits over threads beside the copy (not seen measured)."""
    if not (
        conv.grad_output is not None
        and conv.output_mask[1]
        and conv.groups == 1
        and tuple(conv.weight.shape[2:]) == (1, 1)
        and any(step > 1 for step in conv.window[0])
    ):
        return False
    batch, in_channels = conv.input.shape[:2]
    return (
        in_channels <= block
        or onednn_weight_gradient_batch_threads(
            batch=batch,
            in_channels=in_channels,
            out_channels=conv.weight.shape[0],
            input_spatial=conv.input.shape[2:],
            output_spatial=conv.grad_output.shape[2:],
            kernel=(1, 1),
            stride=conv.window[0],
            threads=torch.get_num_threads(),
            channels_last=conv.channels_last,
        )
        > 1
    )


def _call_allocations(conv: ConvCall) -> tuple[KernelAllocation, ...]:
    """The rule below that this call follows, given its shapes, layouts and thread count."""
    if conv.grad_output is not None and conv.channels_last and conv.groups == 1:
        copies = [
            name
            for name, tensor in (
                ("grad_output", conv.grad_output),
                ("input", conv.input),
                ("weight", conv.weight),
            )
            if not tensor.is_contiguous(memory_format=torch.channels_last)
        ]
        return mkldnn_conv_channels_last_backward_allocations(
            input_shape=tuple(conv.input.shape),
            weight_shape=tuple(conv.weight.shape),
            grad_output_shape=tuple(conv.grad_output.shape),
            stride=tuple(conv.window[0]),
            output_mask=conv.output_mask,
            copies=copies,
            block=onednn_channel_block(),
            threads=torch.get_num_threads(),
        )
    if conv.grad_output is not None and conv.channels_last:
        return mkldnn_depthwise_conv_channels_last_backward_allocations(
            input_shape=tuple(conv.input.shape),
            weight_shape=tuple(conv.weight.shape),
            output_mask=conv.output_mask,
            block=onednn_channel_block(),
        )
    if conv.grad_output is None and conv.channels_last:
        return mkldnn_conv_channels_last_forward_allocations(
            input_shape=tuple(conv.input.shape),
            weight_shape=tuple(conv.weight.shape),
            output_shape=conv.output_shape,
            copies_input=conv.copies_input,
            copies_weight=conv.copies_weight,
            block=onednn_channel_block(),
            threads=torch.get_num_threads(),
        )
    if conv.grad_output is None:
        return mkldnn_conv_forward_allocations(
            input_shape=tuple(conv.input.shape),
            weight_shape=tuple(conv.weight.shape),
            output_shape=conv.output_shape,
            bias=conv.bias is not None,
            block=onednn_channel_block(),
        )
    return mkldnn_conv_backward_allocations(
        grad_output_shape=tuple(conv.grad_output.shape),
        input_shape=tuple(conv.input.shape),
        weight_shape=tuple(conv.weight.shape),
        stride=tuple(conv.window[0]),
        padding=tuple(conv.window[1]),
        output_mask=conv.output_mask,
        block=onednn_channel_block(),
        threads=torch.get_num_threads(),
    )


@dataclass(frozen=True)
class _ConvSizes:
    """The bytes of the blocks oneDNN allocates for one convolution, forward or backward: its
    tensors as they are (NCHW) and in channel-blocked layouts (channels padded to `block`)."""

    batch: int
    in_channels: int
    out_channels: int
    in_per_group: int
    kernel: int  # elements of one filter's spatial kernel
    in_positions: int  # spatial positions of the input
    out_positions: int  # spatial positions of the output
    itemsize: int
    block: int

    @staticmethod
    def of(
        input_shape: Sequence[int],
        weight_shape: Sequence[int],
        output_spatial: Sequence[int],
        *,
        itemsize: int,
        block: int,
    ) -> _ConvSizes:
        batch, in_channels, *in_spatial = input_shape
        out_channels, in_per_group, *kernel = weight_shape
        return _ConvSizes(
            batch,
            in_channels,
            out_channels,
            in_per_group,
            prod(kernel),
            prod(in_spatial),
            prod(output_spatial),
            itemsize,
            block,
        )

    @property
    def groups(self) -> int:
        return self.in_channels // self.in_per_group

    @property
    def depthwise(self) -> bool:
        """One input and one output channel per group."""
        return self.groups > 1 and self.in_per_group == 1 and self.out_channels == self.groups

    @property
    def blocks_input(self) -> bool:
        """oneDNN reads an input with fewer channels than one block as it is, without a copy,
        except in its 1x1 kernel (jit_1x1), which takes only blocked layouts and pads the input
        and the weights' input channels (measured: a squeeze-excitation's 6->96 on 1x1 to 32x32
        maps, forward and weight gradient; ONEDNN_VERBOSE shows `aBcd16b` with padding)."""
        return self.in_channels >= self.block or self.kernel == 1

    @property
    def pads_bias(self) -> bool:
        """A bias (or its gradient) goes through a padded buffer when the output channels do not
        fill whole blocks (ungrouped and depthwise convolutions)."""
        return (self.groups == 1 or self.depthwise) and self.out_channels % self.block != 0

    @property
    def padded_bias_bytes(self) -> int:
        return 4 * pad(self.out_channels, self.block) + 128  # float32, plus 128 as measured

    @property
    def input_bytes(self) -> int:
        return self.batch * self.in_channels * self.in_positions * self.itemsize

    @property
    def output_bytes(self) -> int:
        return self.batch * self.out_channels * self.out_positions * self.itemsize

    @property
    def weight_bytes(self) -> int:
        return self.out_channels * self.in_per_group * self.kernel * self.itemsize

    @property
    def blocked_input_bytes(self) -> int:
        return self.batch * pad(self.in_channels, self.block) * self.in_positions * self.itemsize

    @property
    def blocked_output_bytes(self) -> int:
        """The output (forward's result, backward's grad_output) in blocked layout."""
        return self.batch * pad(self.out_channels, self.block) * self.out_positions * self.itemsize

    def blocked_weight_bytes(self, *, pad_input_channels: bool) -> int:
        """Weights reordered into oneDNN's layout: both channel counts padded for an ungrouped
        convolution (input channels only when `pad_input_channels`); a depthwise convolution's
        groups padded to the block (measured: 24 channels 3x3, 1,152 bytes = 32 x 9 x 4); other
        grouped weights as they are."""
        if self.depthwise:
            return pad(self.groups, self.block) * self.kernel * self.itemsize
        if self.groups > 1:
            return self.weight_bytes
        in_channels = pad(self.in_channels, self.block) if pad_input_channels else self.in_channels
        return pad(self.out_channels, self.block) * in_channels * self.kernel * self.itemsize


def mkldnn_conv_forward_allocations(
    *,
    input_shape: Sequence[int],
    weight_shape: Sequence[int],
    output_shape: Sequence[int],
    bias: bool,
    itemsize: int = 4,
    block: int = 16,
) -> tuple[KernelAllocation, ...]:
    """oneDNN convolution forward, contiguous NCHW float32 (`aten.convolution`, mkldnn path).

    Measured: NiN's 96->96 1x1 conv at batch 2 on 54x54 allocates [input 2,239,488 (blocked
    copy), weights 36,864, blocked result 2,239,488, -weights, -input copy, output 2,239,488,
    -blocked result]. With fewer input channels than one block (NiN's first conv, 1 channel),
    oneDNN reads the input as it is and pads nothing on the input side of the weights. With
    output channels not a multiple of the block and a bias, a padded bias (4 bytes per padded
    channel, plus 128) comes first.
    """
    sizes = _ConvSizes.of(
        input_shape, weight_shape, output_shape[2:], itemsize=itemsize, block=block
    )
    workspace: list[KernelAllocation] = []
    if bias and sizes.pads_bias:
        workspace.append(KernelAllocation(sizes.padded_bias_bytes, "padded bias"))
    if sizes.blocks_input:
        workspace.append(KernelAllocation(sizes.blocked_input_bytes, "blocked input"))
    weights = sizes.blocked_weight_bytes(pad_input_channels=sizes.blocks_input)
    workspace.append(KernelAllocation(weights, "reordered weights"))
    blocked_result = KernelAllocation(sizes.blocked_output_bytes, "blocked result")
    return (
        *workspace,
        blocked_result,
        # Weights, input copy, padded bias: freed in the reverse order, as measured.
        *frees(reversed(workspace)),
        KernelAllocation(sizes.output_bytes, "output", output=0),
        *frees([blocked_result]),
    )


def mkldnn_conv_channels_last_forward_allocations(
    *,
    input_shape: Sequence[int],
    weight_shape: Sequence[int],
    output_shape: Sequence[int],
    copies_input: bool = False,
    copies_weight: bool = False,
    itemsize: int = 4,
    block: int = 16,
    threads: int = 2,
) -> tuple[KernelAllocation, ...]:
    """oneDNN convolution forward, channels-last float32 (ungrouped or depthwise).

    The input or weight not yet channels-last is first copied into it (ATen's
    `contiguous(ChannelsLast)`); the output is allocated before oneDNN runs and written in place,
    with no blocked result. An ungrouped convolution then takes a brgemm scratchpad of
    4,096 + 4,120 bytes per thread whatever its shape (measured with 1, 2 and 4 threads: 8,216,
    12,336, 20,576; from 3->32 4x4 on 16x16 to 256->256 3x3 on 28x28) and reorders its weights
    (output channels padded to the block); a depthwise one only reorders its weights, groups
    padded to the block.
    Measured, 32->32 3x3 at batch 2 on 16x16, 2 threads, input channels-last, weight not:
    [36,864 (weight copy), 65,536 (output), 12,336, 36,864, -36,864, -12,336, -36,864].
    A bias adds no block here (40 output channels measured).
    """
    sizes = _ConvSizes.of(
        input_shape, weight_shape, output_shape[2:], itemsize=itemsize, block=block
    )
    copies = []
    if copies_input:
        copies.append(KernelAllocation(sizes.input_bytes, "channels-last copy of the input"))
    if copies_weight:
        copies.append(KernelAllocation(sizes.weight_bytes, "channels-last copy of the weight"))
    workspace = []
    if sizes.depthwise:
        weights = sizes.blocked_weight_bytes(pad_input_channels=False)
    else:
        workspace.append(KernelAllocation(4096 + 4120 * threads, "brgemm scratchpad"))
        # Output channels padded to the block, input channels as they are (measured 24->40 3x3:
        # 48 x 24 x 9 x 4; one 1x1 case, 24->40, padded its input channels too: 1.5 KB more).
        weights = pad(sizes.out_channels, block) * sizes.in_channels * sizes.kernel * itemsize
    workspace.append(KernelAllocation(weights, "reordered weights"))
    return (
        *copies,
        KernelAllocation(sizes.output_bytes, "output", output=0),
        *workspace,
        *frees(reversed(workspace)),
        *frees(copies),
    )


_DEPTHWISE_BACKWARD_KERNELS = ((3, 3), (5, 5), (7, 7))


def mkldnn_depthwise_conv_channels_last_backward_allocations(
    *,
    input_shape: Sequence[int],
    weight_shape: Sequence[int],
    output_mask: Sequence[bool] = (True, True, True),
    itemsize: int = 4,
    block: int = 16,
) -> tuple[KernelAllocation, ...]:
    """oneDNN depthwise convolution backward, channels-last float32, 3x3, 5x5 or 7x7, with a
    weight gradient.

    grad_input (output_mask[0]) comes first, with the weights reordered for it (groups padded to
    the block). The weight gradient of a 5x5 or 7x7 kernel takes a scratchpad of 1,024 bytes per
    weight element (C x k x k x 1,024, whatever the batch, size and thread count: 1,605,632 for
    32 channels 7x7, 25 times that layer's activation at batch 2 on 16x16: ConvNeXt's training
    allocator peak), then a bias-reduction buffer (C x 64 + 128) and the blocked weight gradient
    (unpadded); a 3x3 kernel takes a blocked weight gradient with padded groups and a 1,280-byte
    scratchpad (C x 4 + 128 more with a bias) and copies its weight gradient once. Measured for
    24, 32 and 64 channels, batch 2 and 4, 8x8 to 16x16, 1 and 2 threads; e.g. 32 channels 7x7
    with bias: [65,536, 6,272, -6,272, 1,605,632, 2,176, 128, -2,176, 128, 6,272, 6,272, -6,272,
    -1,605,632, -128].
    """
    channels, kernel_size = weight_shape[0], prod(weight_shape[2:])
    input_bytes = prod(input_shape) * itemsize
    padded_weights = pad(channels, block) * kernel_size * itemsize
    weight_bytes = channels * kernel_size * itemsize
    bias_bytes = channels * itemsize
    grad_bias = bool(output_mask[2])
    allocations: list[KernelAllocation] = []
    if output_mask[0]:
        reordered = KernelAllocation(padded_weights, "weights for backward-data")
        allocations += [
            KernelAllocation(input_bytes, "grad_input", output=0),
            reordered,
            *frees([reordered]),
        ]
    blocked_bias = [KernelAllocation(bias_bytes, "blocked grad_bias")] if grad_bias else []
    bias_output = [KernelAllocation(bias_bytes, "grad_bias", output=2)] if grad_bias else []
    gradient = KernelAllocation(weight_bytes, "grad_weight", output=1)
    if kernel_size > 9:
        scratchpad = KernelAllocation(weight_bytes * 256, "weight-gradient scratchpad")
        reduction = [KernelAllocation(channels * 64 + 128, "bias reduction")] if grad_bias else []
        blocked = KernelAllocation(weight_bytes, "blocked grad_weight")
        allocations += [
            scratchpad,
            *reduction,
            *blocked_bias,
            *frees(reduction),
            *bias_output,
            blocked,
            gradient,
            *frees([blocked, scratchpad, *blocked_bias]),
        ]
    else:
        blocked = KernelAllocation(padded_weights, "blocked grad_weight")
        scratchpad = KernelAllocation(1280 + (bias_bytes + 128 if grad_bias else 0), "scratchpad")
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
    return tuple(allocations)


def onednn_weight_gradient_batch_threads(
    *,
    batch: int,
    in_channels: int,
    out_channels: int,
    input_spatial: Sequence[int],
    output_spatial: Sequence[int],
    kernel: Sequence[int],
    stride: Sequence[int],
    threads: int,
    channels_last: bool = True,
) -> int:
    """How many threads oneDNN's float32 jit backward-weights kernel splits the batch over
    (`nthr_mb`) for an ungrouped 2-d convolution: each beyond the first reduces into a
    scratchpad. The thread split is oneDNN's own cost model, redone here: `balance()` in
    src/cpu/x64/jit_avx512_common_conv_kernel.cpp (kh x kw > 1; in NCHW with more than 9 output
    rows it splits batch x rows, its "2d reduction") and in jit_avx512_common_1x1_conv_kernel.cpp
    (1x1, unstrided), channel blocks of 16 (an input with fewer channels is one block). Checked
    against the profiler for 27 shapes, NCHW and channels-last, with 2 threads: a scratchpad
    appears exactly where this says 2."""
    in_block = in_channels if in_channels < 16 else 16
    in_blocks, out_blocks = -(-in_channels // in_block), -(-out_channels // 16)
    positions_in, positions_out = prod(input_spatial), prod(output_spatial)
    kernel_size = prod(kernel)
    if kernel_size == 1:
        # The 1x1 kernel reduces over output positions in blocks of 7 to 16, splitting
        # batch x position blocks; its cost model has no compute step.
        reduce_block = _best_divider(positions_out, 7, 16)
        reduce_work = batch * -(-positions_out // reduce_block)

        def memory_cost(on_batch: int, on_out: int, on_in: int) -> int:
            rows = -(-reduce_work // on_batch)
            return (
                rows * -(-in_blocks // on_in) * 16 * reduce_block // stride[0] // stride[1]
                + rows * -(-out_blocks // on_out) * 16 * reduce_block
                + 12 * -(-out_blocks // on_out) * -(-in_blocks // on_in) * 256
            )

        most_on_batch = min(threads, reduce_work)
        return _batch_split(memory_cost, None, most_on_batch, threads, in_blocks, out_blocks, batch)

    # The 2d reduction splits input and output rows with the batch; each then counts one row.
    rows_split = not channels_last and output_spatial[0] > 9
    in_rows, out_rows = (input_spatial[0], output_spatial[0]) if rows_split else (1, 1)
    row_batches = batch * (max(1, output_spatial[0] // 9) if rows_split else 1)

    def memory_cost(on_batch: int, on_out: int, on_in: int) -> int:
        return (
            -(-batch * in_rows // on_batch)
            * -(-in_blocks // on_in)
            * in_block
            * (positions_in // in_rows)
            // stride[0]
            // stride[1]
            + -(-batch * out_rows // on_batch)
            * -(-out_blocks // on_out)
            * 16
            * (positions_out // out_rows)
            + 8 * -(-out_blocks // on_out) * -(-in_blocks // on_in) * kernel_size * in_block * 16
        )

    def compute_cost(on_batch: int, on_out: int, on_in: int) -> int:
        return -(-batch * out_rows // on_batch) * -(-out_blocks // on_out) * -(-in_blocks // on_in)

    return _batch_split(
        memory_cost,
        compute_cost,
        min(threads, row_batches),
        threads,
        in_blocks,
        out_blocks,
        row_batches,
    )


def _batch_split(
    memory_cost: Any,
    compute_cost: Any,
    most_on_batch: int,
    threads: int,
    in_blocks: int,
    out_blocks: int,
    batch: int,
) -> int:
    """oneDNN's `balance()`: the split (batch, output-channel blocks, input-channel blocks) of
    least memory cost, then (jit kernel) one of lower compute cost within 110% of that memory
    cost, or 25% less compute; returns the threads on the batch (at most `batch`, the work the
    batch split shares out, when more than half the threads but not all took it)."""
    splits = [
        (on_batch, on_out, min(threads // on_batch // on_out, in_blocks))
        for on_batch in range(1, most_on_batch + 1)
        for on_out in range(1, min(threads // on_batch, out_blocks) + 1)
    ]
    best, best_memory = (1, 1, 1), memory_cost(1, 1, 1)
    for split in splits:
        if memory_cost(*split) <= best_memory:
            best, best_memory = split, memory_cost(*split)
    if compute_cost is not None:
        best_compute = compute_cost(*best)
        for split in splits:
            compute = compute_cost(*split)
            if (compute <= best_compute and memory_cost(*split) < 1.1 * best_memory) or (
                4 * compute <= 3 * best_compute
            ):
                best, best_compute = split, compute
    on_batch = best[0]
    if threads // 2 < on_batch < threads:
        on_batch = min(batch, threads)
    return on_batch


def _best_divider(value: int, smallest: int, largest: int) -> int:
    """oneDNN's utils best_divider(value, min, max, find_max=true): the divider in [min, max]
    leaving the least remainder, the largest such."""
    best, best_remainder = largest, value % largest
    for divider in range(largest, smallest - 1, -1):
        if value % divider < best_remainder:
            best, best_remainder = divider, value % divider
    return best


# oneDNN books a barrier and aligns its scratchpad: 8,320 bytes beside the per-thread weight
# gradients, whatever the shape (measured for 1x1 and 3x3 kernels, 16 to 96 channels).
_REDUCTION_OVERHEAD_BYTES = 8320
# What a bias gradient of one output-channel block adds with several threads (see
# `_weight_gradient_scratchpad_bytes`), not derived from oneDNN's source.
_ONE_BLOCK_BIAS_REDUCTION_BYTES = 12352


def _weight_gradient_scratchpad_bytes(
    sizes: _ConvSizes,
    *,
    blocked_weights: int,
    input_shape: Sequence[int],
    grad_output_shape: Sequence[int],
    kernel: Sequence[int],
    stride: Sequence[int],
    grad_bias: bool,
    threads: int,
    channels_last: bool,
) -> int:
    """The scratchpad oneDNN's float32 jit backward-weights kernel books for an ungrouped
    convolution, NCHW or channels-last (0 for none): when it splits the batch over threads, the
    per-thread weight gradients (`blocked_weights` elements, plus the padded bias for kh x kw >
    1) of every thread beyond the first and 8,320 bytes; with several threads, 12,352 more for a
    bias gradient of one output-channel block, the batch split or not (16->16, 3->16, 96->10
    3x3, NCHW and channels-last; 1x1 96->6, 16->4 and 4->16 on 1x1 to 32x32 maps, NCHW; none
    with 24 to 96 output channels); and the
    bias padded to whole blocks (4 bytes per padded channel + 128)."""
    if sizes.kernel == 1 and any(step > 1 for step in stride):
        # A strided 1x1 first copies its input at the output positions, per thread ("reduce to
        # unit stride"): measured 32->64, 32->128, 64->32 at 16x16 stride 2 and 40->80 with a
        # bias at 28x28, NCHW and channels-last; a batch split beside it was not seen.
        return threads * sizes.in_channels * sizes.out_positions * sizes.itemsize + 128
    on_batch = onednn_weight_gradient_batch_threads(
        batch=sizes.batch,
        in_channels=sizes.in_channels,
        out_channels=sizes.out_channels,
        input_spatial=input_shape[2:],
        output_spatial=grad_output_shape[2:],
        kernel=kernel,
        stride=stride,
        threads=threads,
        channels_last=channels_last,
    )
    padded_out = pad(sizes.out_channels, sizes.block)
    scratchpad = 0
    if on_batch > 1:
        per_thread = blocked_weights + (padded_out if sizes.kernel > 1 else 0)
        scratchpad = per_thread * (on_batch - 1) * sizes.itemsize + _REDUCTION_OVERHEAD_BYTES
    if grad_bias and threads > 1 and padded_out == sizes.block:
        scratchpad += _ONE_BLOCK_BIAS_REDUCTION_BYTES
    if grad_bias and sizes.out_channels % sizes.block != 0:
        scratchpad += sizes.padded_bias_bytes
    return scratchpad


def mkldnn_conv_channels_last_backward_allocations(
    *,
    input_shape: Sequence[int],
    weight_shape: Sequence[int],
    grad_output_shape: Sequence[int],
    stride: Sequence[int] = (1, 1),
    output_mask: Sequence[bool] = (True, True, True),
    copies: Sequence[str] = (),
    itemsize: int = 4,
    block: int = 16,
    threads: int = 2,
) -> tuple[KernelAllocation, ...]:
    """oneDNN convolution backward, channels-last float32, ungrouped (`float32_conv_blocks` names
    the cases left out: a strided backward-data of a kind not measured, such as patchify's).

    `copies` names the tensors ("grad_output", "input", "weight") not yet channels-last, which
    ATen copies into it first and frees last. grad_input (output_mask[0]) is allocated
    channels-last and written in place by brg_conv_bwd, with the weights reordered (input
    channels padded to the block) and a brgemm scratchpad of 4,224 + 4,120 bytes per thread
    (strided: brgconv_strided's, `strided_backward_data_scratchpad_bytes`).
    The weight gradient comes from the jit kernel in oneDNN's blocked layout (both channel
    counts padded; a first layer's input channels as they are), with a scratchpad holding the
    per-thread gradients of every batch thread beyond the first (see
    `onednn_weight_gradient_batch_threads`; weights and padded bias for kh x kw > 1, weights only
    for 1x1, plus 8,320) and the padded bias when the output channels do not fill blocks; then
    the blocked bias gradient, the bias gradient, and ATen's dense copy of the weight gradient
    and its channels-last copy (the output). Measured, 16->16 3x3 at batch 2 on 16x16, 2
    threads, no bias: [32,768, 9,216, 12,464, -12,464, -9,216, 9,216, 17,600, -17,600, 9,216,
    9,216, -9,216, -9,216].
    """
    sizes = _ConvSizes.of(
        input_shape, weight_shape, grad_output_shape[2:], itemsize=itemsize, block=block
    )
    copy_bytes = {
        "grad_output": sizes.output_bytes,
        "input": sizes.input_bytes,
        "weight": sizes.weight_bytes,
    }
    copied = [
        KernelAllocation(copy_bytes[name], f"channels-last copy of the {name}") for name in copies
    ]
    allocations: list[KernelAllocation] = list(copied)
    padded_in = pad(sizes.in_channels, block)
    if output_mask[0]:
        weight_bytes = sizes.out_channels * padded_in * sizes.kernel * itemsize
        scratchpad_bytes = 4224 + 4120 * threads
        if any(step > 1 for step in stride):
            weight_bytes = _strided_backward_data_weight_bytes(sizes)
            scratchpad_bytes = strided_backward_data_scratchpad_bytes(
                out_channels=sizes.out_channels,
                output_spatial=grad_output_shape[2:],
                kernel=weight_shape[2:],
                stride=stride,
                threads=threads,
            )
        weights = KernelAllocation(weight_bytes, "weights for backward-data")
        scratchpad = KernelAllocation(scratchpad_bytes, "brgemm scratchpad")
        allocations += [
            KernelAllocation(sizes.input_bytes, "grad_input", output=0),
            weights,
            scratchpad,
            *frees([scratchpad, weights]),
        ]
    grad_bias = bool(output_mask[2])
    if output_mask[1] or grad_bias:
        first_layer = sizes.in_channels < block and sizes.kernel > 1  # 1x1: padded all the same
        padded_out = pad(sizes.out_channels, block)
        blocked_weights = (
            padded_out * (sizes.in_channels if first_layer else padded_in) * sizes.kernel
        )
        scratchpad_bytes = _weight_gradient_scratchpad_bytes(
            sizes,
            blocked_weights=blocked_weights,
            input_shape=input_shape,
            grad_output_shape=grad_output_shape,
            kernel=weight_shape[2:],
            stride=stride,
            grad_bias=grad_bias,
            threads=threads,
            channels_last=True,
        )
        scratchpad = (
            [KernelAllocation(scratchpad_bytes, "weight-gradient scratchpad")]
            if scratchpad_bytes
            else []
        )
        bias_bytes = sizes.out_channels * itemsize
        blocked_bias = [KernelAllocation(bias_bytes, "blocked grad_bias")] if grad_bias else []
        blocked = KernelAllocation(blocked_weights * itemsize, "blocked grad_weight")
        dense = KernelAllocation(sizes.weight_bytes, "dense grad_weight")
        allocations += [
            blocked,
            *scratchpad,
            *blocked_bias,
            *frees(scratchpad),
            *([KernelAllocation(bias_bytes, "grad_bias", output=2)] if grad_bias else []),
            dense,
            KernelAllocation(sizes.weight_bytes, "grad_weight (channels-last copy)", output=1),
            *frees([dense, blocked, *blocked_bias]),
        ]
    return (*allocations, *frees(copied))


def mkldnn_conv_backward_allocations(
    *,
    grad_output_shape: Sequence[int],
    input_shape: Sequence[int],
    weight_shape: Sequence[int],
    stride: Sequence[int] = (1, 1),
    padding: Sequence[int] = (0, 0),
    output_mask: Sequence[bool] = (True, True, True),
    itemsize: int = 4,
    block: int = 16,
    threads: int = 2,
) -> tuple[KernelAllocation, ...]:
    """oneDNN convolution backward, contiguous NCHW float32 (`aten.convolution_backward`): the
    input gradient (output_mask[0]) by the blocked or, for a strided convolution, the
    channels-last path, then the weight and bias gradients (output_mask[1:]; a depthwise kernel
    over 3x3 by oneDNN's gemm kernel, `_depthwise_gemm_grad_weight_and_bias`).

    Measured for NiN's 96->96 1x1 conv at batch 2, 54x54, 2 threads: [2,239,488, 36,864,
    2,239,488, -36,864, -2,239,488, 2,239,488, -2,239,488, 2,239,488, 2,239,488, 36,864, 45,184
    (the weight-gradient scratchpad), 384, -45,184, -2,239,488, -2,239,488, 384, 36,864, -36,864,
    -384].
    """
    sizes = _ConvSizes.of(
        input_shape, weight_shape, grad_output_shape[2:], itemsize=itemsize, block=block
    )
    allocations: list[KernelAllocation] = []
    if output_mask[0]:
        if any(step > 1 for step in stride) and sizes.groups == 1:
            kernel = weight_shape[2:]
            scratchpad = (
                strided_backward_data_scratchpad_bytes(
                    out_channels=sizes.out_channels,
                    output_spatial=grad_output_shape[2:],
                    kernel=kernel,
                    stride=stride,
                    threads=threads,
                )
                if strided_backward_data_modelled(kernel, stride, padding, input_shape[2:])
                else 0
            )
            allocations += _conv_grad_input_strided(sizes, scratchpad)
        else:
            allocations += _conv_grad_input_blocked(sizes)
    if output_mask[1] and sizes.depthwise and max(weight_shape[2:]) > 3:
        allocations += _depthwise_gemm_grad_weight_and_bias(
            sizes, grad_bias=output_mask[2], threads=threads
        )
    elif output_mask[1] or output_mask[2]:
        scratchpad = 0
        if sizes.groups == 1:
            scratchpad = _weight_gradient_scratchpad_bytes(
                sizes,
                blocked_weights=sizes.blocked_weight_bytes(pad_input_channels=sizes.blocks_input)
                // itemsize,
                input_shape=input_shape,
                grad_output_shape=grad_output_shape,
                kernel=weight_shape[2:],
                stride=stride,
                grad_bias=bool(output_mask[2]),
                threads=threads,
                channels_last=False,
            )
        allocations += _conv_grad_weight_and_bias(
            sizes, grad_weight=output_mask[1], grad_bias=output_mask[2], scratchpad_bytes=scratchpad
        )
    return tuple(allocations)


def _conv_grad_input_blocked(sizes: _ConvSizes) -> list[KernelAllocation]:
    """grad_input on the blocked path: blocked grad_output, weights reordered for backward-data
    (both channel counts padded), blocked grad_input; free the first two; grad_input; free its
    blocked copy."""
    grad_output = KernelAllocation(sizes.blocked_output_bytes, "blocked grad_output")
    weights = KernelAllocation(
        sizes.blocked_weight_bytes(pad_input_channels=True), "weights for backward-data"
    )
    blocked_grad_input = KernelAllocation(sizes.blocked_input_bytes, "blocked grad_input")
    return [
        grad_output,
        weights,
        blocked_grad_input,
        *frees([weights, grad_output]),
        KernelAllocation(sizes.input_bytes, "grad_input", output=0),
        *frees([blocked_grad_input]),
    ]


def _strided_backward_data_weight_bytes(sizes: _ConvSizes) -> int:
    """Weights reordered for brgconv_strided's backward-data: input channels padded to 16 up to
    16, to a multiple of 32 above (measured 16, 40, 48, 80, 112, 144 -> 16, 64, 64, 96, 128,
    160; 96 stays 96)."""
    in_block = sizes.block if sizes.in_channels <= sizes.block else 2 * sizes.block
    return sizes.out_channels * pad(sizes.in_channels, in_block) * sizes.kernel * sizes.itemsize


def strided_backward_data_modelled(
    kernel: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    input_spatial: Sequence[int],
) -> bool:
    """Whether `strided_backward_data_scratchpad_bytes` knows this strided backward-data: an
    unpadded 1x1 kernel, or overlapping windows with "same" padding (3x3 padding 1, 5x5 padding
    2, 7x7 padding 3, stride 2: ResNet's and MobileNet's), over an input the stride divides.
    Elsewhere the scratchpad follows another rule, not pinned down: kernel equal to stride
    (patchify convs), 3x3 unpadded (48->80 on 28x28: 192,560 bytes, the rule says 159,792), an
    odd input (112->64 3x3 on 15x15: 98,352, the rule says 94,256)."""
    return all(
        ((size == 1 and pad == 0) or (size > step and pad == (size - 1) // 2))
        and extent % step == 0
        for size, step, pad, extent in zip(kernel, stride, padding, input_spatial)
    )


def strided_backward_data_scratchpad_bytes(
    *,
    out_channels: int,
    output_spatial: Sequence[int],
    kernel: Sequence[int],
    stride: Sequence[int],
    threads: int,
) -> int:
    """The scratchpad of oneDNN's brgconv_strided backward-data (float32, NCHW or channels-last):
    12,288 bytes, and per thread 8,216 and a copy of grad_output with ceil((k - 1) / stride) more
    rows and columns, rounded up to 16 KB. Fitted on 13 shapes (3x3 and 1x1 stride 2, 16 to 128
    output channels, 2 threads, and 1 thread twice), confirmed on 6 it was not fitted on, up to
    913,456 bytes (64->128 3x3 stride 2 on 56x56)."""
    rows, columns = (
        size + -(-(window - 1) // step)
        for size, window, step in zip(output_spatial, kernel, stride)
    )
    copy = -(-(out_channels * rows * columns * 4) // 16384) * 16384
    return 12288 + threads * (8216 + copy)


def _conv_grad_input_strided(sizes: _ConvSizes, scratchpad_bytes: int) -> list[KernelAllocation]:
    """grad_input of a strided, ungrouped convolution: oneDNN's brgconv_strided works on
    channels-last (acdb) grad_output and grad_input with weights whose input channels are padded
    (`_strided_backward_data_weight_bytes`) and a scratchpad
    (`strided_backward_data_scratchpad_bytes`, 0 where not known); PyTorch then allocates the NCHW
    grad_input and, when the layouts differ (more than one channel), makes it contiguous with a
    clone. Measured for 16->16 3x3 stride 2 at batch 2 on 32x32, 2 threads: [32,768, 9,216, 131,072,
    94,256, -94,256, -9,216, -32,768, 131,072, 131,072, -131,072, -131,072]."""
    grad_output = KernelAllocation(sizes.output_bytes, "channels-last grad_output")
    weights = KernelAllocation(
        _strided_backward_data_weight_bytes(sizes), "weights for backward-data"
    )
    channels_last = KernelAllocation(sizes.input_bytes, "channels-last grad_input")
    scratchpad = (
        [KernelAllocation(scratchpad_bytes, "brgemm scratchpad")] if scratchpad_bytes else []
    )
    computed = [
        grad_output,
        weights,
        channels_last,
        *scratchpad,
        *frees([*scratchpad, weights, grad_output]),
    ]
    if sizes.in_channels == 1:  # one channel: channels-last is NCHW already, no clone
        grad_input = KernelAllocation(sizes.input_bytes, "grad_input", output=0)
        return [*computed, grad_input, *frees([channels_last])]
    nchw = KernelAllocation(sizes.input_bytes, "NCHW grad_input")
    return [
        *computed,
        nchw,
        KernelAllocation(sizes.input_bytes, "grad_input (contiguous clone)", output=0),
        *frees([channels_last, nchw]),
    ]


def depthwise_gemm_weight_gradient_scratchpad_bytes(
    *,
    batch: int,
    channels: int,
    kernel: Sequence[int],
    output_spatial: Sequence[int],
    threads: int,
    itemsize: int = 4,
) -> int:
    """The scratchpad of oneDNN's gemm backward-weights kernel (`x64:gemm:jit`), which computes an
    NCHW depthwise weight gradient of a kernel over 3x3 (jit_dw takes 1x1 and 3x3). From its
    init_conf (src/cpu/gemm_convolution_utils.cpp, blocked bwd_w): with "outer threading"
    (output positions per thread under 256, and a batch over 1 or more than 2 groups) every
    thread gets a weight-reduction buffer and an im2col buffer (kernel x output positions
    floats), else one of each; the reduction buffer books `weights_d.size()`, a byte count, as
    floats (4 x the weight bytes); each entry adds 128 bytes of alignment. Fitted on 96 and 64
    channels 5x5 on 4x4 maps, confirmed on 9 shapes it was not fitted on (3x5 to 7x7 kernels,
    4x4 to 23x23 maps, stride 2, batch 1 to 3, 1 and 2 threads): 135,300 bytes for 40 channels
    7x7 on 23x23, where one thread takes it."""
    positions = prod(output_spatial)
    outer = positions // threads < 256 and (batch != 1 or channels > 2)
    buffers = threads if outer else 1
    weight_bytes = channels * prod(kernel) * itemsize
    return buffers * 4 * weight_bytes + 128 + buffers * prod(kernel) * positions * itemsize + 128


def _depthwise_gemm_grad_weight_and_bias(
    sizes: _ConvSizes, *, grad_bias: bool, threads: int
) -> list[KernelAllocation]:
    """A depthwise weight gradient of a kernel over 3x3 on oneDNN's gemm kernel, which reads
    input and grad_output as they are (NCHW): a dense weight-gradient buffer, the scratchpad
    (`depthwise_gemm_weight_gradient_scratchpad_bytes`), a bias-gradient buffer; free the
    scratchpad; bias and weight gradients; free the buffers. Measured, 96 channels 5x5 at batch
    2 on 4x4, 2 threads, with a bias: [9,600, 80,256, 384, -80,256, 384, 9,600, -9,600, -384]."""
    dense = KernelAllocation(sizes.weight_bytes, "dense grad_weight")
    scratchpad = KernelAllocation(
        depthwise_gemm_weight_gradient_scratchpad_bytes(
            batch=sizes.batch,
            channels=sizes.groups,
            kernel=(sizes.kernel,),
            output_spatial=(sizes.out_positions,),
            threads=threads,
            itemsize=sizes.itemsize,
        ),
        "gemm weight-gradient scratchpad",
    )
    bias_bytes = sizes.out_channels * sizes.itemsize
    bias_buffer = [KernelAllocation(bias_bytes, "grad_bias buffer")] if grad_bias else []
    return [
        dense,
        scratchpad,
        *bias_buffer,
        *frees([scratchpad]),
        *([KernelAllocation(bias_bytes, "grad_bias", output=2)] if grad_bias else []),
        KernelAllocation(sizes.weight_bytes, "grad_weight", output=1),
        *frees([dense, *bias_buffer]),
    ]


def _conv_grad_weight_and_bias(
    sizes: _ConvSizes, *, grad_weight: bool, grad_bias: bool, scratchpad_bytes: int
) -> list[KernelAllocation]:
    """Weight and bias gradients: blocked grad_output again, blocked input (when it has a block's
    worth of channels), blocked weight gradient, the scratchpad (`_weight_gradient_scratchpad_bytes`
    for an ungrouped convolution; a grouped one's, with several threads, is not modelled),
    blocked bias gradient; free the scratchpad and the
    grad_output and input copies; bias gradient, weight gradient; free the blocked ones."""
    grad_output = KernelAllocation(sizes.blocked_output_bytes, "blocked grad_output")
    blocked_input = (
        [KernelAllocation(sizes.blocked_input_bytes, "blocked input")] if sizes.blocks_input else []
    )
    blocked_grad_weight = KernelAllocation(
        sizes.blocked_weight_bytes(pad_input_channels=sizes.blocks_input), "blocked grad_weight"
    )
    scratchpad = (
        [KernelAllocation(scratchpad_bytes, "weight-gradient scratchpad")]
        if scratchpad_bytes
        else []
    )
    bias_bytes = sizes.out_channels * sizes.itemsize
    blocked_grad_bias = [KernelAllocation(bias_bytes, "blocked grad_bias")] if grad_bias else []
    return [
        grad_output,
        *blocked_input,
        blocked_grad_weight,
        *scratchpad,
        *blocked_grad_bias,
        *frees([*scratchpad, *blocked_input, grad_output]),
        *([KernelAllocation(bias_bytes, "grad_bias", output=2)] if grad_bias else []),
        *([KernelAllocation(sizes.weight_bytes, "grad_weight", output=1)] if grad_weight else []),
        *frees([blocked_grad_weight, *blocked_grad_bias]),
    ]
