"""The pieces every allocator rule builds on: one block a kernel allocates or frees
(`KernelAllocation`), the most an op holds at once, and the layout arithmetic oneDNN's rules share
(channel blocks and their padding, a tensor's dense memory format, a convolution's output shape).
Imports no rule."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "KernelAllocation",
    "conv_output_shape",
    "dense_memory_format",
    "frees",
    "onednn_channel_block",
    "pad",
    "peak_above_start_bytes",
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


def frees(allocations: Iterable[KernelAllocation]) -> list[KernelAllocation]:
    """The frees of `allocations`, in the order given."""
    return [KernelAllocation(-a.delta_bytes, "free " + a.what) for a in allocations]


def onednn_channel_block() -> int:
    """Channels per block in oneDNN's blocked float32 layouts on this CPU: 16 with AVX-512
    (`aBcd16b`, seen in ONEDNN_VERBOSE here), 8 with AVX2 (`aBcd8b`; not measured here)."""
    return 16 if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else 8


def pad(channels: int, block: int) -> int:
    """`channels` rounded up to whole blocks of `block`."""
    return -(-channels // block) * block


def dense_memory_format(tensor: torch.Tensor) -> torch.memory_format | None:
    """As ATen's suggest_memory_format + is_contiguous: the dense layout a tensor is in, or None."""
    channels_last = tensor.dim() == 4 and tensor.is_contiguous(memory_format=torch.channels_last)
    if channels_last and not tensor.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format if tensor.is_contiguous() else None


def conv_output_shape(
    input_shape: Sequence[int],
    weight_shape: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> tuple[int, ...]:
    """The output shape of an untransposed convolution."""
    spatial = tuple(
        (size + 2 * border - dil * (kernel - 1) - 1) // step + 1
        for size, kernel, step, border, dil in zip(
            input_shape[2:], weight_shape[2:], stride, padding, dilation
        )
    )
    return (input_shape[0], weight_shape[0], *spatial)
