"""FLOPs of aten ops, as small pure functions over shapes, in one registry.

Convention: the one `torch.utils.flop_counter.FlopCounterMode` uses. A multiply-accumulate counts
as 2 FLOPs; only matrix products and convolutions are counted (bias additions, activations, pooling
and normalisation are not), so totals equal FlopCounterMode's on the same model and input. MACs are
FLOPs / 2, and are never reported under the name FLOPs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from math import prod
from types import MappingProxyType
from typing import Any

import torch

from ninlab.analysis.rule_registry import rule_decorator
from ninlab.analysis.torch_internals import OpOverload

__all__ = ["CONVENTION", "FLOP_RULES", "flop_rule", "op_flops", "uncounted_products"]

CONVENTION = (
    "FLOPs = 2 x multiply-accumulates of convolutions and matrix products, as "
    "torch.utils.flop_counter.FlopCounterMode counts them; element-wise ops, pooling and biases "
    "are 0"
)

Shape = Sequence[int]
aten = torch.ops.aten

FlopRule = Callable[..., int]
_RULES: dict[Any, FlopRule] = {}
FLOP_RULES: Mapping[Any, FlopRule] = MappingProxyType(_RULES)
"""Every registered rule, by aten op packet (`aten.mm`), read-only: `flop_rule` adds one."""


flop_rule = rule_decorator(_RULES, "a FLOP rule")
"""`@flop_rule(aten.mm, ...)` registers the decorated rule for the aten op packets given; a
packet that has a rule already is refused, naming it and its rule, and nothing is registered."""


def _matmul(a: Shape, b: Shape) -> int:
    (m, k), n = a[-2:], b[-1]
    return 2 * prod(a[:-2]) * m * k * n


@flop_rule(aten.mm, aten.bmm)
def matmul_flops(args: tuple[Any, ...], outputs: tuple[Any, ...]) -> int:
    return _matmul(args[0].shape, args[1].shape)


@flop_rule(aten.addmm, aten.baddbmm)
def add_matmul_flops(args: tuple[Any, ...], outputs: tuple[Any, ...]) -> int:
    # addmm(bias, a, b): the addition of the bias is not counted.
    return _matmul(args[1].shape, args[2].shape)


def conv_flops(
    input_shape: Shape, weight_shape: Shape, output_shape: Shape, *, transposed: bool
) -> int:
    """2 x (positions the filter visits) x (filter volume) x (batch) x (output channels).

    The weight is (C_out, C_in / groups, *kernel), so groups are accounted for by the weight's
    second dimension. A transposed convolution visits input positions, not output ones.
    """
    batch = input_shape[0]
    positions = prod((input_shape if transposed else output_shape)[2:])
    out_channels, in_channels_per_group, *kernel = weight_shape
    return 2 * batch * positions * prod(kernel) * out_channels * in_channels_per_group


@flop_rule(aten.convolution, aten._convolution)
def convolution_flops(args: tuple[Any, ...], outputs: tuple[Any, ...]) -> int:
    x, weight, transposed = args[0], args[1], args[6]
    return conv_flops(x.shape, weight.shape, outputs[0].shape, transposed=bool(transposed))


def _swap_batch_and_channels(shape: Shape) -> list[int]:
    return [shape[1], shape[0], *shape[2:]]


@flop_rule(aten.convolution_backward)
def convolution_backward_flops(args: tuple[Any, ...], outputs: tuple[Any, ...]) -> int:
    """The two products of a convolution's backward, each itself a convolution.

    For y = conv(x, w): the input gradient is conv_transpose(dy, w), which visits every position of
    dy with the whole filter, so it costs what the forward costs; the weight gradient is a
    convolution of x (batch and channels swapped) with dy as the filter, which again costs the
    forward's FLOPs for an ordinary convolution. A layer whose input needs no gradient (the first
    layer) skips the first product: output_mask says which gradients were asked for.
    """
    grad_output, x, weight = args[0], args[1], args[2]
    # (grad_output, input, weight, bias_sizes, stride, padding, dilation, transposed,
    # output_padding, groups, output_mask)
    transposed, output_mask = bool(args[7]), args[10]
    total = 0
    if output_mask[0]:
        total += conv_flops(
            grad_output.shape, weight.shape, outputs[0].shape, transposed=not transposed
        )
    if output_mask[1]:
        grad_weight = _swap_batch_and_channels(outputs[1].shape)
        if transposed:
            total += conv_flops(
                _swap_batch_and_channels(grad_output.shape),
                _swap_batch_and_channels(x.shape),
                grad_weight,
                transposed=False,
            )
        else:
            total += conv_flops(
                _swap_batch_and_channels(x.shape),
                _swap_batch_and_channels(grad_output.shape),
                grad_weight,
                transposed=False,
            )
    return total


def op_flops(func: OpOverload, args: tuple[Any, ...], outputs: tuple[Any, ...]) -> int:
    """FLOPs of one call of an aten op; 0 for ops that the convention does not count."""
    rule = _RULES.get(func.overloadpacket)
    return rule(args, outputs) if rule else 0


# Kernels that multiply matrices inside, which the convention leaves at 0 as FlopCounterMode
# does on CPU (it has no rule for the CPU attention kernel, the fused inference paths of
# `nn.MultiheadAttention` and `nn.TransformerEncoderLayer`, grouped products, or the fused RNN
# kernels: an LSTM runs oneDNN's on some CPUs (AMD EPYC, float32) and its cell's matrix
# products, counted, on others or in another dtype), by what a
# reader calls them: a total that leaves them out says so (`uncounted_products`), since a
# transformer's or a mixture of experts' FLOPs are otherwise silently short of its arithmetic.
_UNCOUNTED_PRODUCTS = {
    **dict.fromkeys(
        (
            "aten._scaled_dot_product_flash_attention_for_cpu",
            "aten._scaled_dot_product_flash_attention_for_cpu_backward",
            "aten._scaled_dot_product_flash_attention",
            "aten._scaled_dot_product_flash_attention_backward",
            "aten._scaled_dot_product_efficient_attention",
            "aten._scaled_dot_product_efficient_attention_backward",
            "aten._scaled_dot_product_cudnn_attention",
            "aten._scaled_dot_product_cudnn_attention_backward",
            "aten._flash_attention_forward",
            "aten._flash_attention_backward",
            "aten._efficient_attention_forward",
            "aten._efficient_attention_backward",
            "aten._native_multi_head_attention",
            "aten._transformer_encoder_layer_fwd",
        ),
        "fused attention",
    ),
    **dict.fromkeys(
        (
            "aten.mkldnn_rnn_layer",
            "aten.mkldnn_rnn_layer_backward",
            "aten._cudnn_rnn",
            "aten._cudnn_rnn_backward",
            "aten.miopen_rnn",
            "aten.miopen_rnn_backward",
        ),
        "recurrent layers (oneDNN's or cuDNN's RNN kernel)",
    ),
    "aten._grouped_mm": "grouped matrix products (mixture-of-experts layers)",
    "aten._scaled_grouped_mm": "grouped matrix products (mixture-of-experts layers)",
    "aten._scaled_mm": "float8 matrix products",
}


def uncounted_products(op_names: Iterable[str]) -> tuple[str, ...]:
    """What the ops named (`OpRecord.op`: "aten._grouped_mm.default") multiply that the
    convention does not count, each kind once, in the order first met."""
    kinds = (_UNCOUNTED_PRODUCTS.get(name.rpartition(".")[0]) for name in op_names)
    return tuple(dict.fromkeys(kind for kind in kinds if kind is not None))
