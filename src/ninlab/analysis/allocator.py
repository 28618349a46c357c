"""What the CPU allocator holds beyond live tensor storage: per-op workspace rules (CUDA's caching
allocator is simulated in `ninlab.analysis.cuda_allocator`).

CPU. A tensor-level trace (a dispatch mode) sees each op's outputs, but inside some kernels the
c10 CPU allocator hands out blocks that belong to no tensor the trace sees. A rule here gives, for
one op call, every allocation and free the kernel makes, in order, with the op's own outputs in
their place; the in-op peak is then `live before the op + peak_above_start_bytes(allocations)`.
All rules were read off the PyTorch profiler's allocation records (`profile_memory=True`) for one
op at a time on this machine (torch 2.13.0 CPU, oneDNN 3.12, AVX-512 with AMX, 2 threads), with
`ONEDNN_VERBOSE=1` naming the memory formats behind each block; tests/analysis/test_allocator.py
replays them against the profiler. What they cover:

* `aten.convolution` and `aten.convolution_backward` on the oneDNN (mkldnn) path, float32,
  contiguous NCHW: oneDNN computes in channel-blocked layouts (`aBcd16b`: channels padded to a
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
* Channels-last float32 convolutions (`--memory-format channels_last`, and any convolution whose
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
  over 1x1 or a kernel over 7x7 (`_fixed_brgemm_scratchpad`); `unmodelled_reason` names them,
  and the predictor measures each such call on its own (`ninlab.analysis.kernel_probe`). Which
  layout a convolution runs in is ATen's choice from the strides (`suggest_memory_format`), so a
  one-channel input with channels-last strides runs channels-last.
* bfloat16 convolutions and matrix multiplies (bf16 autocast) follow `ninlab.analysis.onednn_bf16`
  (`_bf16_rule` dispatches there): exact for depthwise forward passes and for matrix multiplies
  too small for oneDNN; elsewhere the channels-last copies, dense copies and contiguous clones are
  counted but oneDNN's AMX brgemm scratchpads and weight padding are not, so those rules give a
  lower bound (`cpu_kernel_allocations` returns their blocks with the reason), which the
  predictor replaces by the call measured on its own.
* `aten.max_pool2d_with_indices_backward`: copies of grad_output, indices and grad_input where
  their layouts disagree with the one PyTorch suggests for grad_output
  (`max_pool_backward_allocations`).
* Which backend runs a convolution is PyTorch's choice (`conv_backend`): with one thread and a
  batch under 16, 1x1 convolutions take the `Slow2d` path, a matrix multiply with no workspace.
* `aten.native_batch_norm` (per-channel temporaries, float32 or bfloat16; channels-last adds
  per-thread sums) and `aten.native_batch_norm_backward` (float32; reduced precision is measured
  per call): with
  contiguous inputs the CPU kernel allocates grad_input twice (once before it checks contiguity,
  again in the contiguous branch; aten/src/ATen/native/Normalization.cpp,
  batch_norm_backward_cpu_template), so an input-sized block is held through the op.
* CPU flash attention (`F.scaled_dot_product_attention`, and `nn.MultiheadAttention` without
  attention weights), float32: per-thread float32 blocks of scores beside the outputs, and in
  backward a query-sized buffer (`flash_attention_allocations`). An `attn_mask` (a keyword of
  the op; a bool one is first made float by `where`, which the trace sees) is added to each
  score block in place and changes none of these blocks (measured, so the rule reads only
  query and key). A mask that needs a gradient (a learned position bias) sends the CPU to the
  math path, ops the trace sees, whose `_safe_softmax` holds bool masks beside its output
  (`safe_softmax_allocations`).
* Not modelled, being a few bytes: scalars an op wraps into tensors (8 bytes, then 4 when cast
  to float: dropout's scale, a mean's divisor, each foreach optimizer op), freed within the op.

Ops the dispatch trace already sees completely need no rule: ReLU, ReLU6 (hardtanh), max
pooling (its int64 indices are an output: under `no_grad` and, once composite ops are run as
their parts, under `inference_mode` too), dropout (its float32 mask on CPU is an output of
`bernoulli_`), linear (`addmm`/`mm` copy nothing when their operands come from other ops),
adaptive average pooling and cross-entropy.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from math import prod
from typing import Any

import torch
from torch._prims_common import suggest_memory_format

__all__ = [
    "KernelAllocation",
    "batch_norm_backward_allocations",
    "batch_norm_forward_allocations",
    "conv_backend",
    "cpu_allocations",
    "cpu_kernel_allocations",
    "depthwise_gemm_weight_gradient_scratchpad_bytes",
    "flash_attention_allocations",
    "mkldnn_conv_backward_allocations",
    "mkldnn_conv_channels_last_backward_allocations",
    "mkldnn_conv_channels_last_forward_allocations",
    "mkldnn_conv_forward_allocations",
    "mkldnn_depthwise_conv_channels_last_backward_allocations",
    "onednn_channel_block",
    "onednn_weight_gradient_batch_threads",
    "peak_above_start_bytes",
    "safe_softmax_allocations",
    "strided_backward_data_modelled",
    "strided_backward_data_scratchpad_bytes",
    "unmodelled_reason",
]


@dataclass(frozen=True)
class KernelAllocation:
    """One block a kernel allocates (positive `delta_bytes`) or frees (negative) inside one op
    call; a rule gives them in the order the kernel makes them.

    `output` is the index of the op output this allocation becomes (the tensor trace counts it
    already); None marks workspace, which the op frees before it returns.
    """

    delta_bytes: int
    what: str
    output: int | None = None


def peak_above_start_bytes(allocations: Iterable[KernelAllocation]) -> int:
    """Most the op holds at once above what was live when it started (outputs included)."""
    level = peak = 0
    for allocation in allocations:
        level += allocation.delta_bytes
        peak = max(peak, level)
    return peak


def _frees(allocations: Iterable[KernelAllocation]) -> list[KernelAllocation]:
    """The frees of `allocations`, in the order given."""
    return [KernelAllocation(-a.delta_bytes, "free " + a.what) for a in allocations]


def onednn_channel_block() -> int:
    """Channels per block in oneDNN's blocked float32 layouts on this CPU: 16 with AVX-512
    (`aBcd16b`, seen in ONEDNN_VERBOSE here), 8 with AVX2 (`aBcd8b`; not measured here)."""
    return 16 if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else 8


def _pad(channels: int, block: int) -> int:
    return -(-channels // block) * block


def conv_backend(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    transposed: bool,
    output_padding: Sequence[int],
    groups: int,
) -> str:
    """The backend PyTorch picks for this convolution ("Mkldnn", "Slow2d", "Cudnn", ...), asked
    of PyTorch itself, so it follows its rules (thread count included). Works on fake tensors."""
    backend = torch._C._select_conv_backend(
        input, weight, bias, list(stride), list(padding), list(dilation), transposed,
        list(output_padding), groups, None,
    )
    return str(backend).rsplit(".", 1)[-1]


# --- oneDNN convolution, contiguous NCHW float32 -------------------------------------------------


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
            batch, in_channels, out_channels, in_per_group, prod(kernel), prod(in_spatial),
            prod(output_spatial), itemsize, block,
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
        return 4 * _pad(self.out_channels, self.block) + 128  # float32, plus 128 as measured

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
        return self.batch * _pad(self.in_channels, self.block) * self.in_positions * self.itemsize

    @property
    def blocked_output_bytes(self) -> int:
        """The output (forward's result, backward's grad_output) in blocked layout."""
        return self.batch * _pad(self.out_channels, self.block) * self.out_positions * self.itemsize

    def blocked_weight_bytes(self, *, pad_input_channels: bool) -> int:
        """Weights reordered into oneDNN's layout: both channel counts padded for an ungrouped
        convolution (input channels only when `pad_input_channels`); a depthwise convolution's
        groups padded to the block (measured: 24 channels 3x3, 1,152 bytes = 32 x 9 x 4); other
        grouped weights as they are."""
        if self.depthwise:
            return _pad(self.groups, self.block) * self.kernel * self.itemsize
        if self.groups > 1:
            return self.weight_bytes
        in_channels = _pad(self.in_channels, self.block) if pad_input_channels else self.in_channels
        return _pad(self.out_channels, self.block) * in_channels * self.kernel * self.itemsize


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
        *_frees(reversed(workspace)),
        KernelAllocation(sizes.output_bytes, "output", output=0),
        *_frees([blocked_result]),
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
    sizes = _ConvSizes.of(input_shape, weight_shape, output_shape[2:], itemsize=itemsize, block=block)
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
        weights = _pad(sizes.out_channels, block) * sizes.in_channels * sizes.kernel * itemsize
    workspace.append(KernelAllocation(weights, "reordered weights"))
    return (
        *copies,
        KernelAllocation(sizes.output_bytes, "output", output=0),
        *workspace,
        *_frees(reversed(workspace)),
        *_frees(copies),
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
    padded_weights = _pad(channels, block) * kernel_size * itemsize
    weight_bytes = channels * kernel_size * itemsize
    bias_bytes = channels * itemsize
    grad_bias = bool(output_mask[2])
    allocations: list[KernelAllocation] = []
    if output_mask[0]:
        reordered = KernelAllocation(padded_weights, "weights for backward-data")
        allocations += [KernelAllocation(input_bytes, "grad_input", output=0), reordered, *_frees([reordered])]
    blocked_bias = [KernelAllocation(bias_bytes, "blocked grad_bias")] if grad_bias else []
    bias_output = [KernelAllocation(bias_bytes, "grad_bias", output=2)] if grad_bias else []
    gradient = KernelAllocation(weight_bytes, "grad_weight", output=1)
    if kernel_size > 9:
        scratchpad = KernelAllocation(weight_bytes * 256, "weight-gradient scratchpad")
        reduction = [KernelAllocation(channels * 64 + 128, "bias reduction")] if grad_bias else []
        blocked = KernelAllocation(weight_bytes, "blocked grad_weight")
        allocations += [
            scratchpad, *reduction, *blocked_bias, *_frees(reduction), *bias_output,
            blocked, gradient, *_frees([blocked, scratchpad, *blocked_bias]),
        ]
    else:
        blocked = KernelAllocation(padded_weights, "blocked grad_weight")
        scratchpad = KernelAllocation(1280 + (bias_bytes + 128 if grad_bias else 0), "scratchpad")
        copy = KernelAllocation(weight_bytes, "grad_weight copy")
        allocations += [
            blocked, scratchpad, *blocked_bias, *_frees([scratchpad]), *bias_output,
            gradient, copy, *_frees([copy, blocked, *blocked_bias]),
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
            -(-batch * in_rows // on_batch) * -(-in_blocks // on_in) * in_block * (positions_in // in_rows)
            // stride[0] // stride[1]
            + -(-batch * out_rows // on_batch) * -(-out_blocks // on_out) * 16 * (positions_out // out_rows)
            + 8 * -(-out_blocks // on_out) * -(-in_blocks // on_in) * kernel_size * in_block * 16
        )

    def compute_cost(on_batch: int, on_out: int, on_in: int) -> int:
        return -(-batch * out_rows // on_batch) * -(-out_blocks // on_out) * -(-in_blocks // on_in)

    return _batch_split(
        memory_cost, compute_cost, min(threads, row_batches), threads, in_blocks, out_blocks, row_batches
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
    padded_out = _pad(sizes.out_channels, sizes.block)
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
    """oneDNN convolution backward, channels-last float32, ungrouped (`unmodelled_reason` names
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
    sizes = _ConvSizes.of(input_shape, weight_shape, grad_output_shape[2:], itemsize=itemsize, block=block)
    copy_bytes = {"grad_output": sizes.output_bytes, "input": sizes.input_bytes, "weight": sizes.weight_bytes}
    copied = [KernelAllocation(copy_bytes[name], f"channels-last copy of the {name}") for name in copies]
    allocations: list[KernelAllocation] = list(copied)
    padded_in = _pad(sizes.in_channels, block)
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
            *_frees([scratchpad, weights]),
        ]
    grad_bias = bool(output_mask[2])
    if output_mask[1] or grad_bias:
        first_layer = sizes.in_channels < block and sizes.kernel > 1  # 1x1: padded all the same
        padded_out = _pad(sizes.out_channels, block)
        blocked_weights = padded_out * (sizes.in_channels if first_layer else padded_in) * sizes.kernel
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
        scratchpad = [KernelAllocation(scratchpad_bytes, "weight-gradient scratchpad")] if scratchpad_bytes else []
        bias_bytes = sizes.out_channels * itemsize
        blocked_bias = [KernelAllocation(bias_bytes, "blocked grad_bias")] if grad_bias else []
        blocked = KernelAllocation(blocked_weights * itemsize, "blocked grad_weight")
        dense = KernelAllocation(sizes.weight_bytes, "dense grad_weight")
        allocations += [
            blocked,
            *scratchpad,
            *blocked_bias,
            *_frees(scratchpad),
            *([KernelAllocation(bias_bytes, "grad_bias", output=2)] if grad_bias else []),
            dense,
            KernelAllocation(sizes.weight_bytes, "grad_weight (channels-last copy)", output=1),
            *_frees([dense, blocked, *blocked_bias]),
        ]
    return (*allocations, *_frees(copied))


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
        allocations += _depthwise_gemm_grad_weight_and_bias(sizes, grad_bias=output_mask[2], threads=threads)
    elif output_mask[1] or output_mask[2]:
        scratchpad = 0
        if sizes.groups == 1:
            scratchpad = _weight_gradient_scratchpad_bytes(
                sizes,
                blocked_weights=sizes.blocked_weight_bytes(pad_input_channels=sizes.blocks_input) // itemsize,
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
        *_frees([weights, grad_output]),
        KernelAllocation(sizes.input_bytes, "grad_input", output=0),
        *_frees([blocked_grad_input]),
    ]


def _strided_backward_data_weight_bytes(sizes: _ConvSizes) -> int:
    """Weights reordered for brgconv_strided's backward-data: input channels padded to 16 up to
    16, to a multiple of 32 above (measured 16, 40, 48, 80, 112, 144 -> 16, 64, 64, 96, 128,
    160; 96 stays 96)."""
    in_block = sizes.block if sizes.in_channels <= sizes.block else 2 * sizes.block
    return sizes.out_channels * _pad(sizes.in_channels, in_block) * sizes.kernel * sizes.itemsize


def strided_backward_data_modelled(
    kernel: Sequence[int], stride: Sequence[int], padding: Sequence[int], input_spatial: Sequence[int]
) -> bool:
    """Whether `strided_backward_data_scratchpad_bytes` knows this strided backward-data: an
    unpadded 1x1 kernel, or overlapping windows with "same" padding (3x3 padding 1, 5x5 padding
    2, 7x7 padding 3, stride 2: ResNet's and MobileNet's), over an input the stride divides.
    Elsewhere the scratchpad follows another rule, not pinned down: kernel equal to stride
    (patchify convs), 3x3 unpadded (48->80 on 28x28: 192,560 bytes, the rule says 159,792), an
    odd input (112->64 3x3 on 15x15: 98,352, the rule says 94,256)."""
    return all(
        ((size == 1 and pad == 0) or (size > step and pad == (size - 1) // 2)) and extent % step == 0
        for size, step, pad, extent in zip(kernel, stride, padding, input_spatial)
    )


def strided_backward_data_scratchpad_bytes(
    *, out_channels: int, output_spatial: Sequence[int], kernel: Sequence[int], stride: Sequence[int], threads: int
) -> int:
    """The scratchpad of oneDNN's brgconv_strided backward-data (float32, NCHW or channels-last):
    12,288 bytes, and per thread 8,216 and a copy of grad_output with ceil((k - 1) / stride) more
    rows and columns, rounded up to 16 KB. Fitted on 13 shapes (3x3 and 1x1 stride 2, 16 to 128
    output channels, 2 threads, and 1 thread twice), confirmed on 6 it was not fitted on, up to
    913,456 bytes (64->128 3x3 stride 2 on 56x56)."""
    rows, columns = (
        size + -(-(window - 1) // step) for size, window, step in zip(output_spatial, kernel, stride)
    )
    copy = -(-(out_channels * rows * columns * 4) // 16384) * 16384
    return 12288 + threads * (8216 + copy)


def _conv_grad_input_strided(sizes: _ConvSizes, scratchpad_bytes: int) -> list[KernelAllocation]:
    """grad_input of a strided, ungrouped convolution: oneDNN's brgconv_strided works on
    channels-last (acdb) grad_output and grad_input with weights whose input channels are padded
    (`_strided_backward_data_weight_bytes`) and a scratchpad (`strided_backward_data_scratchpad_bytes`, 0 where not known);
    PyTorch then allocates the NCHW grad_input and, when the layouts differ (more than one
    channel), makes it contiguous with a clone. Measured for 16->16 3x3 stride 2 at batch 2 on
    32x32, 2 threads: [32,768, 9,216, 131,072, 94,256, -94,256, -9,216, -32,768, 131,072,
    131,072, -131,072, -131,072]."""
    grad_output = KernelAllocation(sizes.output_bytes, "channels-last grad_output")
    weights = KernelAllocation(_strided_backward_data_weight_bytes(sizes), "weights for backward-data")
    channels_last = KernelAllocation(sizes.input_bytes, "channels-last grad_input")
    scratchpad = [KernelAllocation(scratchpad_bytes, "brgemm scratchpad")] if scratchpad_bytes else []
    computed = [grad_output, weights, channels_last, *scratchpad, *_frees([*scratchpad, weights, grad_output])]
    if sizes.in_channels == 1:  # one channel: channels-last is NCHW already, no clone
        grad_input = KernelAllocation(sizes.input_bytes, "grad_input", output=0)
        return [*computed, grad_input, *_frees([channels_last])]
    nchw = KernelAllocation(sizes.input_bytes, "NCHW grad_input")
    return [
        *computed,
        nchw,
        KernelAllocation(sizes.input_bytes, "grad_input (contiguous clone)", output=0),
        *_frees([channels_last, nchw]),
    ]


def depthwise_gemm_weight_gradient_scratchpad_bytes(
    *, batch: int, channels: int, kernel: Sequence[int], output_spatial: Sequence[int], threads: int, itemsize: int = 4
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


def _depthwise_gemm_grad_weight_and_bias(sizes: _ConvSizes, *, grad_bias: bool, threads: int) -> list[KernelAllocation]:
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
        *_frees([scratchpad]),
        *([KernelAllocation(bias_bytes, "grad_bias", output=2)] if grad_bias else []),
        KernelAllocation(sizes.weight_bytes, "grad_weight", output=1),
        *_frees([dense, *bias_buffer]),
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
    scratchpad = [KernelAllocation(scratchpad_bytes, "weight-gradient scratchpad")] if scratchpad_bytes else []
    bias_bytes = sizes.out_channels * sizes.itemsize
    blocked_grad_bias = [KernelAllocation(bias_bytes, "blocked grad_bias")] if grad_bias else []
    return [
        grad_output,
        *blocked_input,
        blocked_grad_weight,
        *scratchpad,
        *blocked_grad_bias,
        *_frees([*scratchpad, *blocked_input, grad_output]),
        *([KernelAllocation(bias_bytes, "grad_bias", output=2)] if grad_bias else []),
        *([KernelAllocation(sizes.weight_bytes, "grad_weight", output=1)] if grad_weight else []),
        *_frees([blocked_grad_weight, *blocked_grad_bias]),
    ]


# --- batch norm ----------------------------------------------------------------------------------


def batch_norm_forward_allocations(
    *,
    input_shape: Sequence[int],
    training: bool,
    running_stats: bool,
    itemsize: int = 4,
    channels_last: bool = False,
    threads: int = 1,
) -> tuple[KernelAllocation, ...]:
    """CPU `aten.native_batch_norm`, float32 or bfloat16: the output, then (training) the saved
    mean and inverse std, and per-channel float32 temporaries: two for the running-stat update per
    statistic in training (a channels-last input adds a per-thread float32 sum buffer inside the
    first), two for the folded scale and shift in evaluation. Measured for 16 channels, 1 and 2
    threads: training [out, 64, 64, 64, 64, -64, -64, 64, 64, -64, -64], channels-last with 2
    threads [out, 64, 64, 64, 64, 128, -128, -64, -64, 64, 64, -64, -64]; evaluation
    [out, 64, 64, -64, -64], either layout and dtype."""
    channel_bytes = input_shape[1] * 4  # statistics are float32 whatever the input dtype
    allocations = [KernelAllocation(prod(input_shape) * itemsize, "output", output=0)]
    if training:
        allocations += [
            KernelAllocation(channel_bytes, "saved mean", output=1),
            KernelAllocation(channel_bytes, "saved inverse std", output=2),
        ]
        if running_stats:
            for statistic in ("running mean", "running var"):
                update = KernelAllocation(channel_bytes, f"{statistic} update")
                sums = [KernelAllocation(threads * channel_bytes, "per-thread sums")]
                inside = [*sums, *_frees(sums)] if channels_last and statistic == "running mean" else []
                allocations += [update, update, *inside, *_frees([update, update])]
    else:
        folded = [
            KernelAllocation(channel_bytes, "folded scale"),
            KernelAllocation(channel_bytes, "folded shift"),
        ]
        allocations += [*folded, *_frees(folded)]
    return tuple(allocations)


def batch_norm_backward_allocations(
    *,
    input_shape: Sequence[int],
    contiguous: bool,
    output_mask: Sequence[bool] = (True, True, True),
    itemsize: int = 4,
    channels_last: bool = False,
    threads: int = 1,
) -> tuple[KernelAllocation, ...]:
    """CPU `aten.native_batch_norm_backward`, float32. With input and grad_output contiguous in
    the same memory format, grad_input is allocated first, then again in the contiguous branch,
    and the first is freed at the end: measured [input bytes, C*4, C*4, input bytes, -input
    bytes], then in channels-last per-thread float32 sums, two per channel (16 channels, 2
    threads: 256 bytes). Otherwise a per-channel sum of grad_output is the only temporary."""
    input_bytes = prod(input_shape) * itemsize
    channel_bytes = input_shape[1] * 4
    allocations: list[KernelAllocation] = []
    if output_mask[0]:
        if contiguous:
            allocations.append(KernelAllocation(input_bytes, "grad_input (discarded)"))
        else:
            allocations.append(KernelAllocation(input_bytes, "grad_input", output=0))
    if output_mask[1]:
        allocations.append(KernelAllocation(channel_bytes, "grad_weight", output=1))
    if output_mask[2]:
        allocations.append(KernelAllocation(channel_bytes, "grad_bias", output=2))
    if contiguous:
        if output_mask[0]:
            allocations += [
                KernelAllocation(input_bytes, "grad_input", output=0),
                KernelAllocation(-input_bytes, "free discarded grad_input"),
            ]
        if channels_last:
            sums = KernelAllocation(threads * 2 * channel_bytes, "per-thread sums")
            allocations += [sums, *_frees([sums])]
    else:
        grad_output_sum = KernelAllocation(channel_bytes, "sum of grad_output")
        allocations += [grad_output_sum, *_frees([grad_output_sum])]
    return tuple(allocations)


# --- softmax of attention's math path -------------------------------------------------------------


def safe_softmax_allocations(
    *, shape: Sequence[int], dim: int, itemsize: int = 4
) -> tuple[KernelAllocation, ...]:
    """`aten._safe_softmax` (the softmax of `F.scaled_dot_product_attention`'s math path, which
    the CPU takes when the mask needs a gradient: a learned position bias): the output, then a
    bool mask of the -inf scores, a bool per row (all -inf?) and a zero scalar of the output's
    dtype for the `where` that zeroes fully masked rows, all freed. Measured for float32 and
    bfloat16, 3-d and 4-d, softmax over the last or another dim: (3, 5, 7, 9) over dim 1:
    [3,780, 945, 189, 4, -4, -189, -945]."""
    elements = prod(shape)
    temporaries = [
        KernelAllocation(elements, "bool mask of -inf scores"),
        KernelAllocation(elements // shape[dim], "bool mask of fully masked rows"),
        KernelAllocation(itemsize, "zero scalar"),
    ]
    return (
        KernelAllocation(elements * itemsize, "output", output=0),
        *temporaries,
        *_frees(reversed(temporaries)),
    )


# --- max pooling's backward ----------------------------------------------------------------------


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
        KernelAllocation(tensor.numel() * tensor.dtype.itemsize, f"copy of {name} in the kernel's layout")
        for name, tensor in (("grad_output", grad_output), ("indices", indices))
        if not tensor.is_contiguous(memory_format=layout)
    ]
    grad_input_bytes = input.numel() * input.dtype.itemsize
    grad_input = torch.empty(input.shape, device="meta", memory_format=suggest_memory_format(input))
    if not grad_input.is_contiguous(memory_format=layout):
        copies.append(KernelAllocation(grad_input_bytes, "copy of grad_input in the kernel's layout"))
    if not copies:
        return None
    return (KernelAllocation(grad_input_bytes, "grad_input", output=0), *copies, *_frees(reversed(copies)))


# --- which rule an op call follows ---------------------------------------------------------------


@dataclass(frozen=True)
class _ConvCall:
    """The arguments of `aten.convolution` or `aten.convolution_backward`, by name."""

    input: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    grad_output: torch.Tensor | None
    window: tuple[Any, ...]  # stride, padding, dilation, transposed, output_padding, groups
    output_mask: tuple[bool, ...]

    @staticmethod
    def parse(func_name: str, args: Sequence[Any]) -> _ConvCall | None:
        if func_name == "aten.convolution.default":
            return _ConvCall(args[0], args[1], args[2], None, tuple(args[3:9]), ())
        if func_name == "aten.convolution_backward.default":
            return _ConvCall(args[1], args[2], None, args[0], tuple(args[4:10]), tuple(args[10]))
        return None

    @property
    def backend(self) -> str:
        return conv_backend(self.input, self.weight, self.bias, *self.window)

    @property
    def channels_last(self) -> bool:
        """PyTorch's oneDNN path runs in channels-last when the input or the weight is in it
        (ATen's mkldnn_conv_use_channels_last), making the other channels-last too."""
        return torch.channels_last in (suggest_memory_format(self.input), suggest_memory_format(self.weight))


def unmodelled_reason(func_name: str, args: Sequence[Any]) -> str | None:
    """Why an op's CPU workspace is not modelled here, or None when it is (or it needs none)."""
    bf16 = _bf16_rule(func_name, args)
    if bf16 is not None:
        return bf16[1]
    if func_name in _MATRIX_MULTIPLIES:
        reduced = any(
            isinstance(a, torch.Tensor) and a.dtype in (torch.bfloat16, torch.float16) for a in args
        )
        return "bf16 or fp16 matrix multiply (oneDNN's brgemm scratchpad)" if reduced else None
    if func_name == "aten.native_batch_norm_backward.default" and args[1].dtype != torch.float32:
        return "reduced-precision batch norm backward (the float32 temporaries of a mixed-type kernel)"
    conv = _ConvCall.parse(func_name, args)
    if conv is None:
        return None
    if conv.input.dim() != 4:
        return f"{conv.input.dim() - 2}-d convolution: only 2-d is modelled"
    backend = conv.backend
    if backend == "Slow2d" and tuple(conv.weight.shape[2:]) == (1, 1):
        return None  # an unstrided 1x1 convolution as a matrix multiply: no workspace
    if backend != "Mkldnn":
        return f"convolution on the {backend} backend"
    if not all(t.dtype == torch.float32 for t in (conv.input, conv.weight)):
        return "bf16 or fp16 oneDNN convolution (other formats and AMX/brgemm scratchpads)"
    groups, block = conv.window[5], onednn_channel_block()
    if conv.channels_last:
        depthwise = conv.weight.shape[1] == 1 and conv.weight.shape[0] == groups
        if groups > 1 and not depthwise:
            return "grouped channels-last oneDNN convolution"
        if conv.grad_output is None:
            if depthwise or _fixed_brgemm_scratchpad(conv.input.shape[1], tuple(conv.weight.shape[2:])):
                return None
            return "channels-last forward with one input channel or a kernel over 7x7 (another brgemm scratchpad)"
        if not depthwise:
            return _channels_last_backward_reason(conv, block)
        if tuple(conv.weight.shape[2:]) not in _DEPTHWISE_BACKWARD_KERNELS or not conv.output_mask[1]:
            return "channels-last depthwise backward of a kernel size or gradients not measured"
        return None
    if not all(t.is_contiguous() for t in (conv.input, conv.weight)):
        return "oneDNN convolution on tensors neither NCHW nor channels-last"
    strided = any(step > 1 for step in conv.window[0])
    if conv.output_mask[:1] == (True,) and conv.input.shape[1] == 1 and strided:
        return (
            "strided backward-data with one input channel "
            "(oneDNN picks its jit or brgemm kernel by heuristics)"
        )
    kernel = tuple(conv.weight.shape[2:])
    if (
        conv.output_mask[:1] == (True,)
        and strided
        and groups == 1
        and not strided_backward_data_modelled(kernel, *conv.window[:2], conv.input.shape[2:])
    ):
        return "strided backward-data not of a measured kind (brgconv_strided's scratchpad)"
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


def _fixed_brgemm_scratchpad(in_channels: int, kernel: tuple[int, ...]) -> bool:
    """Whether a channels-last float32 forward takes the brgemm scratchpad of a fixed size per
    thread (`mkldnn_conv_channels_last_forward_allocations`). Measured on a 24x24 map for 1 to 16
    input channels, 1x1 to 11x11 kernels, strides 1 to 4: one input channel under a kernel over
    1x1 (NiN's first layer: 3,137,552 bytes at 72x72) and kernels of 11 take others."""
    return max(kernel) <= 7 and (in_channels > 1 or max(kernel) == 1)


def _channels_last_backward_reason(conv: _ConvCall, block: int) -> str | None:
    """Why an ungrouped channels-last backward's blocks are not known, or None when
    `mkldnn_conv_channels_last_backward_allocations` gives them."""
    stride, _, dilation = conv.window[:3]
    kernel = tuple(conv.weight.shape[2:])
    strided = any(step > 1 for step in stride)
    in_channels = conv.input.shape[1]
    if block != 16 or any(d != 1 for d in dilation) or kernel[1] > 14:
        return "channels-last oneDNN convolution backward outside the measured kernels (AVX-512, undilated, kw <= 14)"
    if conv.output_mask[0] and strided and not strided_backward_data_modelled(kernel, stride, conv.window[1], conv.input.shape[2:]):
        return "strided channels-last backward-data not of a measured kind (brgconv_strided's scratchpad)"
    if conv.output_mask[0] and in_channels < block and kernel != (1, 1):
        return "channels-last backward-data of a first layer (fewer input channels than a block)"
    return None


_BATCH_NORM_FORWARD = (
    "aten.native_batch_norm.default",
    "aten._native_batch_norm_legit.default",
    "aten._native_batch_norm_legit_no_training.default",
)


_CONVOLUTIONS = ("aten.convolution.default", "aten.convolution_backward.default")
_MATRIX_MULTIPLIES = frozenset(
    ("aten.mm.default", "aten.addmm.default", "aten.bmm.default", "aten.baddbmm.default")
)
_BIASED_MATRIX_MULTIPLIES = frozenset(("aten.addmm.default", "aten.baddbmm.default"))
_FLASH_ATTENTION = (
    "aten._scaled_dot_product_flash_attention_for_cpu.default",
    "aten._scaled_dot_product_flash_attention_for_cpu_backward.default",
)
_RULED = frozenset(
    (
        *_CONVOLUTIONS,
        *_FLASH_ATTENTION,
        *_MATRIX_MULTIPLIES,
        *_BATCH_NORM_FORWARD,
        "aten.native_batch_norm_backward.default",
        "aten._safe_softmax.default",
        "aten.max_pool2d_with_indices_backward.default",
    )
)


def cpu_kernel_allocations(
    func_name: str, args: Sequence[Any]
) -> tuple[tuple[KernelAllocation, ...] | None, str]:
    """`cpu_allocations` and `unmodelled_reason` ("" for None) together, for a tracer that asks
    of every op: ops no rule names cost one set lookup."""
    if func_name not in _RULED:
        return None, ""
    bf16 = _bf16_rule(func_name, args)
    if bf16 is not None:  # a lower bound where the reason is given
        return bf16[0], bf16[1] or ""
    reason = unmodelled_reason(func_name, args)
    if reason is not None:
        return None, reason
    return cpu_allocations(func_name, args), ""


def cpu_allocations(func_name: str, args: Sequence[Any]) -> tuple[KernelAllocation, ...] | None:
    """The allocations `func_name` (as a dispatch mode names it, e.g. "aten.convolution.default")
    makes on CPU for these arguments (real or fake tensors), outputs included; None when the op
    allocates nothing but its outputs, or when `unmodelled_reason` gives a reason."""
    if unmodelled_reason(func_name, args) is not None:
        return None
    bf16 = _bf16_rule(func_name, args)
    if bf16 is not None:
        return bf16[0]
    conv = _ConvCall.parse(func_name, args)
    if conv is not None:
        return _conv_call_allocations(conv)
    if func_name in _BATCH_NORM_FORWARD:
        return _batch_norm_forward_call_allocations(func_name, args)
    if func_name == "aten.native_batch_norm_backward.default":
        return _batch_norm_backward_call_allocations(args)
    if func_name in _FLASH_ATTENTION:
        return _flash_attention_call_allocations(func_name, args)
    if func_name == "aten.max_pool2d_with_indices_backward.default":
        return max_pool_backward_allocations(args[0], args[1], args[7])
    if func_name == "aten._safe_softmax.default":
        x, dim = args[0], args[1]
        dtype = args[2] if len(args) > 2 and args[2] is not None else x.dtype
        return safe_softmax_allocations(shape=tuple(x.shape), dim=dim, itemsize=dtype.itemsize)
    return None


def _bf16_rule(
    func_name: str, args: Sequence[Any]
) -> tuple[tuple[KernelAllocation, ...] | None, str | None] | None:
    """For a bfloat16 matrix multiply or oneDNN convolution, `ninlab.analysis.onednn_bf16`'s
    allocations (None: its outputs only) and why they are a lower bound (None: exact); None for
    any other op."""
    from ninlab.analysis import onednn_bf16  # imported here: it builds on KernelAllocation

    if func_name in _MATRIX_MULTIPLIES:
        first, second = args[1:3] if func_name in _BIASED_MATRIX_MULTIPLIES else args[:2]
        if not (first.dtype == second.dtype == torch.bfloat16):
            return None
        batch = first.shape[0] if first.dim() == 3 else 1
        rule = onednn_bf16.bf16_matmul_allocations(
            batch=batch, rows=first.shape[-2], inner=first.shape[-1], columns=second.shape[-1],
            output_shape=(*first.shape[:-1], second.shape[-1]),
        )
        return (None, None) if rule is None else (rule.allocations, rule.unmodelled)
    conv = _ConvCall.parse(func_name, args)
    if conv is None or not (conv.input.dtype == conv.weight.dtype == torch.bfloat16):
        return None
    if conv.input.dim() != 4 or conv.backend != "Mkldnn":
        return None
    groups = conv.window[5]
    if conv.grad_output is None:
        stride, padding, dilation = conv.window[:3]
        rule = onednn_bf16.bf16_conv_forward_allocations(
            input_shape=tuple(conv.input.shape),
            weight_shape=tuple(conv.weight.shape),
            output_shape=_conv_output_shape(conv.input.shape, conv.weight.shape, stride, padding, dilation),
            groups=groups,
            bias=conv.bias is not None,
            channels_last=conv.channels_last,
            copies_input=conv.channels_last and not conv.input.is_contiguous(memory_format=torch.channels_last),
            copies_weight=conv.channels_last and _memory_format(conv.weight) != torch.channels_last
            and not conv.weight.is_contiguous(memory_format=torch.channels_last),
        )
    else:
        rule = onednn_bf16.bf16_conv_backward_allocations(
            grad_output_shape=tuple(conv.grad_output.shape),
            input_shape=tuple(conv.input.shape),
            weight_shape=tuple(conv.weight.shape),
            groups=groups,
            channels_last=conv.channels_last,
            output_mask=conv.output_mask,
            threads=torch.get_num_threads(),
        )
    if rule is None:
        return None, "grouped bf16 oneDNN convolution (neither ungrouped nor depthwise)"
    return rule.allocations, rule.unmodelled


def _flash_attention_call_allocations(
    func_name: str, args: Sequence[Any]
) -> tuple[KernelAllocation, ...] | None:
    backward = func_name.endswith("backward.default")
    query, key = (args[1], args[2]) if backward else (args[0], args[1])
    if query.dtype != torch.float32 or query.dim() != 4:
        return None
    return flash_attention_allocations(
        query_shape=tuple(query.shape),
        key_shape=tuple(key.shape),
        backward=backward,
        threads=torch.get_num_threads(),
    )


def flash_attention_allocations(
    *, query_shape: Sequence[int], key_shape: Sequence[int], backward: bool, threads: int
) -> tuple[KernelAllocation, ...]:
    """CPU flash attention (`F.scaled_dot_product_attention`'s CPU kernel), float32, for query
    (B, H, L, D) and key (B, H, S, D). Queries are split in blocks of 32, 64 or 256 rows (L under
    192, under 768, or more) and keys in blocks of up to 512 (ATen's FlashAttentionKernel.cpp);
    each thread gets float32 buffers for one block pair.

    Forward: the output and the log-sum-exp, then per thread the block's scores, row maxima and
    sums, and a D-wide accumulator. Backward: the three gradients, a query-sized buffer, per
    thread the block's scores and their gradient, and one block of row sums. Measured with 1 and
    2 threads for (4, 4, 256, 24), (2, 4, 256, 24), (4, 4, 64, 16), (4, 8, 197, 64); e.g. the
    first with 2 threads: forward [393,216, 16,384, 144,384, -144,384], backward [393,216 x 4,
    262,144, 256, -256, -262,144, -393,216].
    """
    batch, heads, queries, head_size = query_shape
    keys = key_shape[2]
    query_block = 256 if queries >= 768 else 64 if queries >= 192 else 32
    query_block = min(query_block, queries)
    key_block = min(512, keys)
    query_bytes = prod(query_shape) * 4
    if not backward:
        per_thread = query_block * key_block + 2 * query_block + query_block * head_size
        buffer = KernelAllocation(threads * per_thread * 4, "per-thread blocks")
        return (
            KernelAllocation(query_bytes, "output", output=0),
            KernelAllocation(batch * heads * queries * 4, "log-sum-exp", output=1),
            buffer,
            *_frees([buffer]),
        )
    gradients = [
        KernelAllocation(prod(shape) * 4, f"grad_{name}", output=index)
        for index, (name, shape) in enumerate((("query", query_shape), ("key", key_shape), ("value", key_shape)))
    ]
    query_sized = KernelAllocation(query_bytes, "query-sized buffer")
    blocks = KernelAllocation(threads * 2 * query_block * key_block * 4, "per-thread score blocks")
    row_sums = KernelAllocation(query_block * 4, "row sums")
    return (*gradients, query_sized, blocks, row_sums, *_frees([row_sums, blocks, query_sized]))


def _conv_call_allocations(conv: _ConvCall) -> tuple[KernelAllocation, ...] | None:
    if conv.backend != "Mkldnn":
        return None  # the Slow2d path `unmodelled_reason` lets through: a matrix multiply
    if conv.grad_output is not None and conv.channels_last and conv.window[5] == 1:
        copies = [
            name
            for name, tensor in (("grad_output", conv.grad_output), ("input", conv.input), ("weight", conv.weight))
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
        stride, padding, dilation = conv.window[:3]
        return mkldnn_conv_channels_last_forward_allocations(
            input_shape=tuple(conv.input.shape),
            weight_shape=tuple(conv.weight.shape),
            output_shape=_conv_output_shape(
                conv.input.shape, conv.weight.shape, stride, padding, dilation
            ),
            copies_input=not conv.input.is_contiguous(memory_format=torch.channels_last),
            copies_weight=_memory_format(conv.weight) != torch.channels_last
            and not conv.weight.is_contiguous(memory_format=torch.channels_last),
            block=onednn_channel_block(),
            threads=torch.get_num_threads(),
        )
    if conv.grad_output is None:
        stride, padding, dilation = conv.window[:3]
        return mkldnn_conv_forward_allocations(
            input_shape=tuple(conv.input.shape),
            weight_shape=tuple(conv.weight.shape),
            output_shape=_conv_output_shape(
                conv.input.shape, conv.weight.shape, stride, padding, dilation
            ),
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


def _batch_norm_forward_call_allocations(
    func_name: str, args: Sequence[Any]
) -> tuple[KernelAllocation, ...] | None:
    # A tracer that runs `func.decompose()` sees Python's decomposition of native_batch_norm
    # (`_native_batch_norm_legit*`) for the same kernel; its arguments line up.
    input, running_mean = args[0], args[3]
    no_training = func_name == "aten._native_batch_norm_legit_no_training.default"
    training = False if no_training else args[5]
    if input.dtype not in (torch.float32, torch.bfloat16):
        return None
    return batch_norm_forward_allocations(
        input_shape=tuple(input.shape),
        training=training,
        running_stats=running_mean is not None,
        itemsize=input.dtype.itemsize,
        channels_last=_memory_format(input) == torch.channels_last,
        threads=torch.get_num_threads(),
    )


def _batch_norm_backward_call_allocations(
    args: Sequence[Any],
) -> tuple[KernelAllocation, ...] | None:
    grad_output, input = args[0], args[1]
    if input.dtype != torch.float32:
        return None
    contiguous = _memory_format(input) == _memory_format(grad_output) is not None
    return batch_norm_backward_allocations(
        input_shape=tuple(input.shape),
        contiguous=contiguous,
        output_mask=tuple(args[9]),
        channels_last=contiguous and _memory_format(input) == torch.channels_last,
        threads=torch.get_num_threads(),
    )


def _memory_format(tensor: torch.Tensor) -> torch.memory_format | None:
    """As ATen's suggest_memory_format + is_contiguous: the dense layout a tensor is in, or None."""
    channels_last = tensor.dim() == 4 and tensor.is_contiguous(memory_format=torch.channels_last)
    if channels_last and not tensor.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format if tensor.is_contiguous() else None


def _conv_output_shape(
    input_shape: Sequence[int],
    weight_shape: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> tuple[int, ...]:
    spatial = tuple(
        (size + 2 * pad - dil * (kernel - 1) - 1) // step + 1
        for size, kernel, step, pad, dil in zip(
            input_shape[2:], weight_shape[2:], stride, padding, dilation
        )
    )
    return (input_shape[0], weight_shape[0], *spatial)
