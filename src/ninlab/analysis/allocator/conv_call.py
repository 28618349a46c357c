"""A convolution call as its CPU kernel sees it: the arguments of `aten.convolution` or
`aten.convolution_backward` by name, parsed once per lookup, with the backend PyTorch picks for it
(asked once) and the layout oneDNN runs it in. The convolution rules of every dtype read it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from ninlab.analysis.allocator.blocks import conv_output_shape, dense_memory_format
from ninlab.analysis.torch_internals import select_conv_backend, suggest_memory_format

__all__ = ["ConvCall", "conv_backend"]


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
    of PyTorch itself, so it follows its rules (thread count included). Works on fake tensors.

    Asked once per call signature: on fake tensors inside a recording the question dispatches
    every size and stride it reads, a tenth of a small network's trace. The signature holds all
    that PyTorch's choice reads: both tensors' layouts and whether they need gradients, the
    bias, the window, and the settings it consults (threads, grad mode, oneDNN switched on,
    deterministic algorithms)."""
    window = (
        tuple(stride),
        tuple(padding),
        tuple(dilation),
        transposed,
        tuple(output_padding),
        groups,
    )
    key = (
        _layout(input),
        _layout(weight),
        None if bias is None else _layout(bias),
        window,
        torch.get_num_threads(),
        torch.is_grad_enabled(),
        torch.backends.mkldnn.enabled,
        torch.are_deterministic_algorithms_enabled(),
    )
    backend = _BACKENDS.get(key)
    if backend is None:
        if len(_BACKENDS) >= _MOST_REMEMBERED:
            _BACKENDS.clear()
        chosen = select_conv_backend(
            input, weight, bias, *(list(w) if isinstance(w, tuple) else w for w in window), None
        )
        backend = _BACKENDS[key] = str(chosen).rsplit(".", 1)[-1]
    return backend


_BACKENDS: dict[tuple[Any, ...], str] = {}
_MOST_REMEMBERED = 4096  # signatures; a model has a few dozen


def _layout(tensor: torch.Tensor) -> tuple[Any, ...]:
    return (
        tuple(tensor.shape),
        tensor.stride(),
        tensor.dtype,
        tensor.device,
        tensor.requires_grad,
        tensor.is_mkldnn,
    )


@dataclass(frozen=True)
class ConvCall:
    """The arguments of `aten.convolution` or `aten.convolution_backward`, by name."""

    input: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    grad_output: torch.Tensor | None  # None: a forward call
    window: tuple[Any, ...]  # stride, padding, dilation, transposed, output_padding, groups
    output_mask: tuple[bool, ...]  # the gradients a backward call computes; () in forward

    @staticmethod
    def forward(args: Sequence[Any]) -> ConvCall:
        """`aten.convolution(input, weight, bias, *window)`."""
        return ConvCall(args[0], args[1], args[2], None, tuple(args[3:9]), ())

    @staticmethod
    def backward(args: Sequence[Any]) -> ConvCall:
        """`aten.convolution_backward(grad_output, input, weight, bias_sizes, *window,
        output_mask)`."""
        return ConvCall(args[1], args[2], None, args[0], tuple(args[4:10]), tuple(args[10]))

    @property
    def groups(self) -> int:
        return self.window[5]

    @property
    def outside_the_rules(self) -> str | None:
        """Why no convolution rule applies to this call, or None: the rules know 2-d, untransposed,
        undilated calls (their arguments are the input's and weight's shapes and layouts,
        stride, padding, groups and the gradients asked for). A dilated call runs other oneDNN
        kernels: a 960->256 3x3 convolution of dilation 12 on a 10x10 map takes a 77,691,136-byte
        block in backward where the undilated one takes 8,847,360, and its forward reorders no
        weights."""
        if self.input.dim() != 4:
            return f"{self.input.dim() - 2}-d convolution: only 2-d is modelled"
        dilation, transposed, output_padding = self.window[2:5]
        if transposed or any(output_padding):
            return "transposed convolution: no rule is modelled"
        if any(d != 1 for d in dilation):
            return "dilated convolution: no rule is modelled (oneDNN runs other kernels)"
        return None

    @cached_property
    def backend(self) -> str:
        """`conv_backend` of this call, asked of PyTorch once."""
        return conv_backend(self.input, self.weight, self.bias, *self.window)

    @cached_property
    def channels_last(self) -> bool:
        """PyTorch's oneDNN path runs in channels-last when the input or the weight is in it
        (ATen's mkldnn_conv_use_channels_last), making the other channels-last too."""
        return torch.channels_last in (
            suggest_memory_format(self.input),
            suggest_memory_format(self.weight),
        )

    @property
    def output_shape(self) -> tuple[int, ...]:
        """A forward call's output shape, from its window."""
        stride, padding, dilation = self.window[:3]
        return conv_output_shape(self.input.shape, self.weight.shape, stride, padding, dilation)

    @property
    def copies_input(self) -> bool:
        """Whether a channels-last kernel first copies the input into channels-last."""
        return not self.input.is_contiguous(memory_format=torch.channels_last)

    @property
    def copies_weight(self) -> bool:
        """Whether a channels-last kernel first copies the weight into channels-last (a weight
        of no dense layout, or whose strides read as NCHW)."""
        return dense_memory_format(self.weight) != torch.channels_last and not (
            self.weight.is_contiguous(memory_format=torch.channels_last)
        )
