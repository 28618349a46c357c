"""What the allocator holds beyond live tensor storage: per-op workspace rules for the CPU, and
the CUDA caching allocator's rounding.

CPU. A tensor-level trace (a dispatch mode) sees each op's outputs, but inside some kernels the
c10 CPU allocator hands out blocks that belong to no tensor the trace sees. A rule here gives, for
one op call, every allocation and free the kernel makes, in order, with the op's own outputs in
their place; the in-op peak is then `live before the op + peak_above_start_bytes(steps)`.
All rules were read off the PyTorch profiler's allocation records (`profile_memory=True`) for one
op at a time on this machine (torch 2.13.0 CPU, oneDNN 3.12, AVX-512 with AMX, 2 threads), with
`ONEDNN_VERBOSE=1` naming the memory formats behind each block; tests/test_allocator.py replays
them against the profiler. What they cover:

* `aten.convolution` and `aten.convolution_backward` on the oneDNN (mkldnn) path, float32,
  contiguous NCHW: oneDNN computes in channel-blocked layouts (`aBcd16b`: channels padded to a
  multiple of 16 on AVX-512, 8 on AVX2), so a convolution reorders its input into a blocked copy
  (unless it has fewer channels than one block, which oneDNN reads as it is), reorders the
  weights, writes a blocked result and reorders that into the NCHW output. For NiN's 1x1
  convolutions that is two extra activation-sized blocks per conv: why inference's allocator
  peak is 45% above its live peak at batch 128. The backward does the same for grad_output,
  weights and grad_input, then again (grad_output, input) for the weight gradient. A strided
  convolution's grad_input comes from oneDNN's brgconv_strided kernel in channels-last layout,
  which PyTorch copies into a new NCHW tensor and clones to make it contiguous: three
  input-sized blocks at once (ResNet's downsampling convolutions).
  Not modelled: the backward-weights scratchpad oneDNN asks for when more than one thread
  reduces weight gradients, and the brgemm scratchpad of a strided backward-data (22 to 320 KB
  for the CNNs in the tests; NiN at batch 128 is left 270,424 bytes, 0.02%, under its measured
  allocator peak); channels-last and bfloat16 convolutions (other formats, AMX brgemm
  scratchpads): `unmodelled_reason` names them.
* Which backend runs a convolution is PyTorch's choice (`conv_backend`): with one thread and a
  batch under 16, 1x1 convolutions take the `Slow2d` path, a matrix multiply with no workspace.
* `aten.native_batch_norm` (per-channel temporaries) and `aten.native_batch_norm_backward`: with
  contiguous inputs the CPU kernel allocates grad_input twice (once before it checks contiguity,
  again in the contiguous branch; aten/src/ATen/native/Normalization.cpp,
  batch_norm_backward_cpu_template), so an input-sized block is held through the op.
* Not modelled, being a few bytes: scalars an op wraps into tensors (8 bytes, then 4 when cast
  to float: dropout's scale, a mean's divisor, each foreach optimizer op), freed within the op.

Ops the dispatch trace already sees completely need no rule: ReLU, ReLU6 (hardtanh), max
pooling (its int64 indices are an output: under `no_grad` and, once composite ops are run as
their parts, under `inference_mode` too), dropout (its float32 mask on CPU is an output of
`bernoulli_`), linear (`addmm`/`mm` copy nothing when their operands come from other ops),
adaptive average pooling and cross-entropy.

CUDA. `torch.cuda.max_memory_allocated` counts caching-allocator blocks, not tensor bytes: every
request is rounded up to a multiple of 512 bytes, and a large block that leaves at most 1 MiB
of its segment unused is handed out whole. The constants and rules are those of
c10/cuda/CUDACachingAllocator.cpp (kMinBlockSize, kSmallSize, kSmallBuffer, kLargeBuffer,
kMinLargeAlloc, kRoundLarge; round_size, get_allocation_size, should_split) with the default
configuration (no `roundup_power2_divisions`, no expandable segments).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from math import prod
from typing import Any

import torch

__all__ = [
    "Step",
    "batch_norm_backward_steps",
    "batch_norm_forward_steps",
    "conv_backend",
    "cpu_steps",
    "cuda_fresh_block_bytes",
    "cuda_pool",
    "cuda_round_size",
    "cuda_segment_bytes",
    "mkldnn_conv_backward_steps",
    "mkldnn_conv_forward_steps",
    "onednn_channel_block",
    "peak_above_start_bytes",
    "unmodelled_reason",
]


@dataclass(frozen=True)
class Step:
    """One allocation (positive `delta_bytes`) or free (negative) inside an op, in order.

    `output` is the index of the op output this allocation becomes (the tensor trace counts it
    already); None marks workspace, which the op frees before it returns.
    """

    delta_bytes: int
    what: str
    output: int | None = None


def peak_above_start_bytes(steps: Iterable[Step]) -> int:
    """Most the op holds at once above what was live when it started (outputs included)."""
    level = peak = 0
    for step in steps:
        level += step.delta_bytes
        peak = max(peak, level)
    return peak


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
        input, weight, bias, list(stride), list(padding), list(dilation), transposed, list(output_padding), groups, None
    )
    return str(backend).rsplit(".", 1)[-1]


def mkldnn_conv_forward_steps(
    *,
    input_shape: Sequence[int],
    weight_shape: Sequence[int],
    output_shape: Sequence[int],
    bias: bool,
    itemsize: int = 4,
    block: int = 16,
) -> tuple[Step, ...]:
    """oneDNN convolution forward, contiguous NCHW float32 (`aten.convolution`, mkldnn path).

    Measured: NiN's 96->96 1x1 conv at batch 2 on 54x54 allocates [input 2,239,488 (blocked
    copy), weights 36,864, blocked result 2,239,488, -weights, -input copy, output 2,239,488,
    -blocked result]. With fewer input channels than one block (NiN's first conv, 1 channel),
    oneDNN reads the input as it is and pads nothing on the input side of the weights. With
    output channels not a multiple of the block and a bias, a padded bias (4 bytes per padded
    channel, plus 128) comes first.
    """
    batch, in_channels, *in_spatial = input_shape
    out_channels, in_per_group, *kernel = weight_shape
    groups = in_channels // in_per_group
    out_spatial = output_shape[2:]
    blocked_input = in_channels >= block
    steps: list[Step] = []
    padded_bias = bias and groups == 1 and out_channels % block != 0
    if padded_bias:
        steps.append(Step(4 * _pad(out_channels, block) + 128, "padded bias"))
    if blocked_input:
        steps.append(Step(batch * _pad(in_channels, block) * prod(in_spatial) * itemsize, "blocked input"))
    if groups == 1:
        weight_bytes = _pad(out_channels, block) * (_pad(in_channels, block) if blocked_input else in_channels)
    else:
        weight_bytes = out_channels * in_per_group
    steps.append(Step(weight_bytes * prod(kernel) * itemsize, "reordered weights"))
    blocked_result = batch * _pad(out_channels, block) * prod(out_spatial) * itemsize
    steps.append(Step(blocked_result, "blocked result"))
    steps += [Step(-s.delta_bytes, "free " + s.what) for s in reversed(steps[:-1])]
    # The freed order above is weights, input copy, padded bias: as measured.
    steps.append(Step(prod(output_shape) * itemsize, "output", output=0))
    steps.append(Step(-blocked_result, "free blocked result"))
    return tuple(steps)


def mkldnn_conv_backward_steps(
    *,
    grad_output_shape: Sequence[int],
    input_shape: Sequence[int],
    weight_shape: Sequence[int],
    strided: bool = False,
    output_mask: Sequence[bool] = (True, True, True),
    itemsize: int = 4,
    block: int = 16,
    threads: int = 2,
) -> tuple[Step, ...]:
    """oneDNN convolution backward, contiguous NCHW float32 (`aten.convolution_backward`).

    grad_input (output_mask[0]): blocked grad_output, weights reordered for backward-data (both
    channel counts padded), blocked grad_input; free the first two; grad_input; free its blocked
    copy. Weight and bias gradients (output_mask[1:]): blocked grad_output again, blocked input
    (when it has a block's worth of channels), blocked weight gradient, blocked bias gradient;
    free grad_output and input copies; bias gradient, weight gradient; free the blocked ones.
    Measured for NiN's 96->96 1x1 conv at batch 2, 54x54: [2,239,488, 36,864, 2,239,488,
    -36,864, -2,239,488, 2,239,488, -2,239,488, 2,239,488, 2,239,488, 36,864, (45,184 scratchpad
    with 2 threads, not modelled), 384, -2,239,488, -2,239,488, 384, 36,864, -36,864, -384].
    A strided convolution (`strided`, groups 1) computes grad_input differently: see below;
    measured for 16->16 3x3 stride 2 at batch 2 on 32x32: [32,768, 9,216, 131,072, (94,256
    brgemm scratchpad, not modelled), -9,216, -32,768, 131,072, 131,072, -131,072, -131,072].
    """
    batch, out_channels, *out_spatial = grad_output_shape
    _, in_channels, *in_spatial = input_shape
    _, in_per_group, *kernel = weight_shape
    groups = in_channels // in_per_group
    kernel_numel = prod(kernel)
    blocked_grad_output = batch * _pad(out_channels, block) * prod(out_spatial) * itemsize
    blocked_input = batch * _pad(in_channels, block) * prod(in_spatial) * itemsize
    steps: list[Step] = []
    input_bytes = prod(input_shape) * itemsize
    if output_mask[0] and strided and groups == 1:
        # oneDNN's brgconv_strided: channels-last (acdb) grad_output and grad_input, weights with
        # input channels padded (Bcda16b); PyTorch then allocates the NCHW grad_input and, when
        # the layouts differ (more than one channel), makes it contiguous with a clone.
        grad_output_nhwc = prod(grad_output_shape) * itemsize
        weight_bytes = out_channels * _pad(in_channels, block) * kernel_numel * itemsize
        steps += [
            Step(grad_output_nhwc, "channels-last grad_output"),
            Step(weight_bytes, "weights for backward-data"),
            Step(input_bytes, "channels-last grad_input"),
            Step(-weight_bytes, "free weights for backward-data"),
            Step(-grad_output_nhwc, "free channels-last grad_output"),
        ]
        if in_channels == 1:
            steps += [Step(input_bytes, "grad_input", output=0), Step(-input_bytes, "free channels-last grad_input")]
        else:
            steps += [
                Step(input_bytes, "NCHW grad_input"),
                Step(input_bytes, "grad_input (contiguous clone)", output=0),
                Step(-input_bytes, "free channels-last grad_input"),
                Step(-input_bytes, "free NCHW grad_input"),
            ]
    elif output_mask[0]:
        if groups == 1:
            weight_bytes = _pad(out_channels, block) * _pad(in_channels, block) * kernel_numel * itemsize
        else:
            weight_bytes = out_channels * in_per_group * kernel_numel * itemsize
        steps += [
            Step(blocked_grad_output, "blocked grad_output"),
            Step(weight_bytes, "weights for backward-data"),
            Step(blocked_input, "blocked grad_input"),
            Step(-weight_bytes, "free weights for backward-data"),
            Step(-blocked_grad_output, "free blocked grad_output"),
            Step(input_bytes, "grad_input", output=0),
            Step(-blocked_input, "free blocked grad_input"),
        ]
    if output_mask[1] or output_mask[2]:
        reorder_input = in_channels >= block
        if groups == 1:
            grad_weight_blocked = _pad(out_channels, block) * (_pad(in_channels, block) if reorder_input else in_channels)
        else:
            grad_weight_blocked = out_channels * in_per_group
        grad_weight_blocked *= kernel_numel * itemsize
        bias_bytes = out_channels * itemsize
        steps.append(Step(blocked_grad_output, "blocked grad_output"))
        if reorder_input:
            steps.append(Step(blocked_input, "blocked input"))
        steps.append(Step(grad_weight_blocked, "blocked grad_weight"))
        # A padded bias-gradient buffer, as in the forward; with several threads it is part of
        # the reduction scratchpad instead (not modelled).
        padded_bias = output_mask[2] and threads == 1 and groups == 1 and out_channels % block != 0
        if padded_bias:
            steps.append(Step(4 * _pad(out_channels, block) + 128, "padded grad_bias"))
        if output_mask[2]:
            steps.append(Step(bias_bytes, "blocked grad_bias"))
        if padded_bias:
            steps.append(Step(-(4 * _pad(out_channels, block) + 128), "free padded grad_bias"))
        if reorder_input:
            steps.append(Step(-blocked_input, "free blocked input"))
        steps.append(Step(-blocked_grad_output, "free blocked grad_output"))
        if output_mask[2]:
            steps.append(Step(bias_bytes, "grad_bias", output=2))
        if output_mask[1]:
            steps.append(Step(prod(weight_shape) * itemsize, "grad_weight", output=1))
        steps.append(Step(-grad_weight_blocked, "free blocked grad_weight"))
        if output_mask[2]:
            steps.append(Step(-bias_bytes, "free blocked grad_bias"))
    return tuple(steps)


def batch_norm_forward_steps(
    *, input_shape: Sequence[int], training: bool, running_stats: bool, itemsize: int = 4
) -> tuple[Step, ...]:
    """CPU `aten.native_batch_norm`: the output, then (training) the saved mean and inverse std,
    and per-channel float32 temporaries: two for the running-stat update per statistic in
    training, two for the folded scale and shift in evaluation. Measured for 16 channels:
    training [out, 64, 64, 64, 64, -64, -64, 64, 64, -64, -64]; evaluation [out, 64, 64, -64, -64]."""
    channel_bytes = input_shape[1] * 4  # statistics are float32 whatever the input dtype
    steps = [Step(prod(input_shape) * itemsize, "output", output=0)]
    if training:
        steps += [Step(channel_bytes, "saved mean", output=1), Step(channel_bytes, "saved inverse std", output=2)]
        if running_stats:
            for statistic in ("running mean", "running var"):
                steps += [Step(channel_bytes, f"{statistic} update"), Step(channel_bytes, f"{statistic} update")]
                steps += [Step(-channel_bytes, f"free {statistic} update")] * 2
    else:
        steps += [Step(channel_bytes, "folded scale"), Step(channel_bytes, "folded shift")]
        steps += [Step(-channel_bytes, "free folded scale"), Step(-channel_bytes, "free folded shift")]
    return tuple(steps)


def batch_norm_backward_steps(
    *,
    input_shape: Sequence[int],
    contiguous: bool,
    output_mask: Sequence[bool] = (True, True, True),
    itemsize: int = 4,
) -> tuple[Step, ...]:
    """CPU `aten.native_batch_norm_backward`. With input and grad_output contiguous in the same
    memory format, grad_input is allocated first, then again in the contiguous branch, and the
    first is freed at the end: measured [input bytes, C*4, C*4, input bytes, -input bytes].
    Otherwise a per-channel sum of grad_output is the only temporary."""
    input_bytes = prod(input_shape) * itemsize
    channel_bytes = input_shape[1] * 4
    steps: list[Step] = []
    if output_mask[0]:
        steps.append(Step(input_bytes, "grad_input (discarded)" if contiguous else "grad_input", output=None if contiguous else 0))
    if output_mask[1]:
        steps.append(Step(channel_bytes, "grad_weight", output=1))
    if output_mask[2]:
        steps.append(Step(channel_bytes, "grad_bias", output=2))
    if contiguous:
        if output_mask[0]:
            steps += [Step(input_bytes, "grad_input", output=0), Step(-input_bytes, "free discarded grad_input")]
    else:
        steps += [Step(channel_bytes, "sum of grad_output"), Step(-channel_bytes, "free sum of grad_output")]
    return tuple(steps)


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


def unmodelled_reason(func_name: str, args: Sequence[Any]) -> str | None:
    """Why an op's CPU workspace is not modelled here, or None when it is (or it needs none)."""
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
    if not all(t.dtype == torch.float32 and t.is_contiguous() for t in (conv.input, conv.weight)):
        return "oneDNN convolution that is not float32 NCHW (channels-last or bf16: other formats and scratchpads)"
    groups, block = conv.window[5], onednn_channel_block()
    if conv.output_mask[:1] == (True,) and conv.input.shape[1] == 1 and any(step > 1 for step in conv.window[0]):
        return "strided backward-data with one input channel (oneDNN picks its jit or brgemm kernel by heuristics)"
    out_per_group = conv.weight.shape[0] // groups
    depthwise = conv.weight.shape[1] == 1 and out_per_group == 1
    if groups > 1 and out_per_group % block != 0 and not (depthwise and conv.weight.shape[0] % block == 0):
        return "grouped oneDNN convolution whose channels per group are not a multiple of the channel block"
    return None


_BATCH_NORM_FORWARD = (
    "aten.native_batch_norm.default",
    "aten._native_batch_norm_legit.default",
    "aten._native_batch_norm_legit_no_training.default",
)


def cpu_steps(func_name: str, args: Sequence[Any]) -> tuple[Step, ...] | None:
    """The allocations `func_name` (as a dispatch mode names it, e.g. "aten.convolution.default")
    makes on CPU for these arguments (real or fake tensors), outputs included; None when the op
    allocates nothing but its outputs, or when `unmodelled_reason` gives a reason."""
    if unmodelled_reason(func_name, args) is not None:
        return None
    conv = _ConvCall.parse(func_name, args)
    if conv is not None:
        if conv.backend != "Mkldnn":
            return None
        if conv.grad_output is None:
            stride, padding, dilation = conv.window[:3]
            return mkldnn_conv_forward_steps(
                input_shape=tuple(conv.input.shape),
                weight_shape=tuple(conv.weight.shape),
                output_shape=_conv_output_shape(conv.input.shape, conv.weight.shape, stride, padding, dilation),
                bias=conv.bias is not None,
                block=onednn_channel_block(),
            )
        return mkldnn_conv_backward_steps(
            grad_output_shape=tuple(conv.grad_output.shape),
            input_shape=tuple(conv.input.shape),
            weight_shape=tuple(conv.weight.shape),
            strided=any(step > 1 for step in conv.window[0]),
            output_mask=conv.output_mask,
            block=onednn_channel_block(),
            threads=torch.get_num_threads(),
        )
    if func_name in _BATCH_NORM_FORWARD:
        # A tracer that runs `func.decompose()` sees Python's decomposition of native_batch_norm
        # (`_native_batch_norm_legit*`) for the same kernel; its arguments line up.
        input, running_mean = args[0], args[3]
        training = args[5] if func_name != "aten._native_batch_norm_legit_no_training.default" else False
        if input.dtype != torch.float32:
            return None
        return batch_norm_forward_steps(input_shape=tuple(input.shape), training=training, running_stats=running_mean is not None)
    if func_name == "aten.native_batch_norm_backward.default":
        grad_output, input = args[0], args[1]
        if input.dtype != torch.float32:
            return None
        contiguous = _memory_format(input) == _memory_format(grad_output) is not None
        return batch_norm_backward_steps(input_shape=tuple(input.shape), contiguous=contiguous, output_mask=tuple(args[9]))
    return None


def _memory_format(tensor: torch.Tensor) -> torch.memory_format | None:
    """As ATen's suggest_memory_format + is_contiguous: the dense layout a tensor is in, or None."""
    if tensor.dim() == 4 and tensor.is_contiguous(memory_format=torch.channels_last) and not tensor.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format if tensor.is_contiguous() else None


def _conv_output_shape(
    input_shape: Sequence[int], weight_shape: Sequence[int], stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]
) -> tuple[int, ...]:
    spatial = tuple(
        (size + 2 * pad - dil * (kernel - 1) - 1) // step + 1
        for size, kernel, step, pad, dil in zip(input_shape[2:], weight_shape[2:], stride, padding, dilation)
    )
    return (input_shape[0], weight_shape[0], *spatial)


# --- CUDA caching allocator (c10/cuda/CUDACachingAllocator.cpp, default configuration) ---------

CUDA_MIN_BLOCK_BYTES = 512  # kMinBlockSize: every request is rounded up to a multiple of this
CUDA_SMALL_BYTES = 1 << 20  # kSmallSize: requests up to 1 MiB come from the small pool
CUDA_SMALL_BUFFER_BYTES = 2 << 20  # kSmallBuffer: the small pool's segments
CUDA_LARGE_BUFFER_BYTES = 20 << 20  # kLargeBuffer: segment for requests of 1 to 10 MiB
CUDA_MIN_LARGE_ALLOC_BYTES = 10 << 20  # kMinLargeAlloc
CUDA_ROUND_LARGE_BYTES = 2 << 20  # kRoundLarge: larger requests get their own segment, rounded to 2 MiB


def cuda_round_size(nbytes: int) -> int:
    """round_size(): the block size a request occupies, counted by max_memory_allocated."""
    return max(CUDA_MIN_BLOCK_BYTES, -(-nbytes // CUDA_MIN_BLOCK_BYTES) * CUDA_MIN_BLOCK_BYTES)


def cuda_pool(nbytes: int) -> str:
    """get_pool(): "small" for rounded requests up to 1 MiB, else "large"."""
    return "small" if cuda_round_size(nbytes) <= CUDA_SMALL_BYTES else "large"


def cuda_segment_bytes(nbytes: int) -> int:
    """get_allocation_size(): the cudaMalloc'd segment a request needs when no cached block fits."""
    size = cuda_round_size(nbytes)
    if size <= CUDA_SMALL_BYTES:
        return CUDA_SMALL_BUFFER_BYTES
    if size < CUDA_MIN_LARGE_ALLOC_BYTES:
        return CUDA_LARGE_BUFFER_BYTES
    return -(-size // CUDA_ROUND_LARGE_BYTES) * CUDA_ROUND_LARGE_BYTES


def cuda_fresh_block_bytes(nbytes: int) -> int:
    """Bytes `max_memory_allocated` counts for a request served from a new segment.

    should_split(): a block is split off the segment only if the rest is at least 512 bytes
    (small pool) or more than 1 MiB (large pool); otherwise the request gets the whole segment.
    A request served from a cached free block follows the same rule against that block's size,
    which depends on the allocation history; this is the rule for the first allocation.
    """
    size = cuda_round_size(nbytes)
    segment = cuda_segment_bytes(nbytes)
    remaining = segment - size
    if cuda_pool(nbytes) == "small":
        return size if remaining >= CUDA_MIN_BLOCK_BYTES else segment
    return size if remaining > CUDA_SMALL_BYTES else segment
