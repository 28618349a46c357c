"""The allocator rules' registry: one rule per op, a real aten op behind every name, and the one
lookup reaching every family's rule (a rule registered for no call here fails, so none is ever
silently unused); the rules' bytes are replayed against the profiler in test_allocator.py."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
import torch

from ninlab.analysis.allocator import KernelBlocks, conv_call, cpu_kernel_allocations
from ninlab.analysis.allocator.attention import (
    flash_attention_allocations,
    safe_softmax_allocations,
)
from ninlab.analysis.allocator.batch_norm import (
    batch_norm_backward_allocations,
    batch_norm_forward_allocations,
)
from ninlab.analysis.allocator.blocks import onednn_channel_block
from ninlab.analysis.allocator.layer_norm import layer_norm_backward_allocations
from ninlab.analysis.allocator.onednn_bf16 import (
    bf16_conv_forward_allocations,
    bf16_matmul_allocations,
)
from ninlab.analysis.allocator.onednn_float32 import (
    mkldnn_conv_backward_allocations,
    mkldnn_conv_forward_allocations,
)
from ninlab.analysis.allocator.pooling import max_pool_backward_allocations
from ninlab.analysis.allocator.probed import ALWAYS_PROBED, PROBED_IN_ANOTHER_LAYOUT
from ninlab.analysis.allocator.registry import (
    ALLOCATION_RULES,
    OUTPUTS_ONLY,
    allocation_rule,
)
from ninlab.analysis.allocator.rnn import mkldnn_rnn_layer

aten = torch.ops.aten


def test_a_second_rule_for_an_op_is_refused_naming_it() -> None:
    before = dict(ALLOCATION_RULES)
    with pytest.raises(
        ValueError,
        match=r"aten\.convolution\.default has an allocation rule already: "
        r"ninlab\.analysis\.allocator\.convolution\.convolution",
    ):
        allocation_rule("aten.relu.default", "aten.convolution.default")(lambda args: OUTPUTS_ONLY)
    with pytest.raises(ValueError, match=r"aten\.relu\.default has an allocation rule already"):
        allocation_rule("aten.relu.default", "aten.relu.default")(lambda args: OUTPUTS_ONLY)
    assert dict(ALLOCATION_RULES) == before  # nothing registered, relu included


@pytest.mark.parametrize("name", sorted(ALLOCATION_RULES))
def test_every_rule_names_a_real_aten_overload(name: str) -> None:
    namespace, op, overload = name.split(".")
    resolved = getattr(getattr(getattr(torch.ops, namespace), op), overload)
    assert isinstance(resolved, torch._ops.OpOverload)
    assert str(resolved) == name  # what a dispatch mode names it, which the tracer asks with


def test_an_op_without_a_rule_allocates_only_its_outputs() -> None:
    assert cpu_kernel_allocations("aten.relu.default", (torch.randn(3),)) is OUTPUTS_ONLY


def _threads() -> int:
    return torch.get_num_threads()


def _float32_conv() -> tuple[tuple[Any, ...], KernelBlocks]:
    x, w = torch.randn(16, 32, 8, 8), torch.randn(32, 32, 3, 3)
    args = (x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1)
    expected = mkldnn_conv_forward_allocations(
        input_shape=(16, 32, 8, 8),
        weight_shape=(32, 32, 3, 3),
        output_shape=(16, 32, 8, 8),
        bias=False,
        block=onednn_channel_block(),
    )
    return args, KernelBlocks(expected)


def _float32_conv_backward() -> tuple[tuple[Any, ...], KernelBlocks]:
    x, w, grad = torch.randn(16, 32, 8, 8), torch.randn(32, 32, 3, 3), torch.randn(16, 32, 8, 8)
    args = (grad, x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [True, True, False])
    expected = mkldnn_conv_backward_allocations(
        grad_output_shape=(16, 32, 8, 8),
        input_shape=(16, 32, 8, 8),
        weight_shape=(32, 32, 3, 3),
        stride=(1, 1),
        padding=(1, 1),
        output_mask=(True, True, False),
        block=onednn_channel_block(),
        threads=_threads(),
    )
    return args, KernelBlocks(expected)


def _bf16_depthwise_conv() -> tuple[tuple[Any, ...], KernelBlocks]:
    x, w = torch.randn(2, 24, 8, 8).bfloat16(), torch.randn(24, 1, 3, 3).bfloat16()
    args = (x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 24)
    expected = bf16_conv_forward_allocations(
        input_shape=(2, 24, 8, 8),
        weight_shape=(24, 1, 3, 3),
        output_shape=(2, 24, 8, 8),
        groups=24,
        bias=False,
        channels_last=False,
    )
    return args, expected


def _bf16_matmul(biased: bool) -> Callable[[], tuple[tuple[Any, ...], KernelBlocks]]:
    def call() -> tuple[tuple[Any, ...], KernelBlocks]:
        a, b = torch.randn(8, 192).bfloat16(), torch.randn(192, 10).bfloat16()
        expected = bf16_matmul_allocations(
            batch=1, rows=8, inner=192, columns=10, output_shape=(8, 10)
        )
        return ((torch.randn(10).bfloat16(), a, b) if biased else (a, b)), expected

    return call


def _bf16_batched_matmul(biased: bool) -> Callable[[], tuple[tuple[Any, ...], KernelBlocks]]:
    def call() -> tuple[tuple[Any, ...], KernelBlocks]:
        a, b = torch.randn(3, 8, 64).bfloat16(), torch.randn(3, 64, 10).bfloat16()
        expected = bf16_matmul_allocations(
            batch=3, rows=8, inner=64, columns=10, output_shape=(3, 8, 10)
        )
        return ((torch.randn(3, 8, 10).bfloat16(), a, b) if biased else (a, b)), expected

    return call


def _batch_norm(no_training: bool) -> Callable[[], tuple[tuple[Any, ...], KernelBlocks]]:
    def call() -> tuple[tuple[Any, ...], KernelBlocks]:
        x, stats = torch.randn(4, 24, 5, 5), (torch.zeros(24), torch.ones(24))
        if no_training:
            args: tuple[Any, ...] = (x, torch.ones(24), torch.zeros(24), *stats, 0.1, 1e-5)
        else:
            args = (x, torch.ones(24), torch.zeros(24), *stats, True, 0.1, 1e-5)
        expected = batch_norm_forward_allocations(
            input_shape=(4, 24, 5, 5),
            training=not no_training,
            threads=_threads(),
        )
        return args, KernelBlocks(expected)

    return call


def _batch_norm_backward() -> tuple[tuple[Any, ...], KernelBlocks]:
    x = torch.randn(4, 24, 5, 5)
    saved = (torch.zeros(24), torch.ones(24))
    args = (torch.randn_like(x), x, torch.ones(24), None, None, *saved, True, 1e-5, [True] * 3)
    expected = batch_norm_backward_allocations(
        input_shape=(4, 24, 5, 5), contiguous=True, threads=_threads()
    )
    return args, KernelBlocks(expected)


def _flash_attention(backward: bool) -> Callable[[], tuple[tuple[Any, ...], KernelBlocks]]:
    def call() -> tuple[tuple[Any, ...], KernelBlocks]:
        q, k = torch.randn(2, 2, 64, 16), torch.randn(2, 2, 96, 16)
        args = (q, q, k, k, q, torch.randn(2, 2, 64), 0.0, False) if backward else (q, k, k)
        expected = flash_attention_allocations(
            query_shape=(2, 2, 64, 16),
            key_shape=(2, 2, 96, 16),
            backward=backward,
            threads=_threads(),
        )
        return args, KernelBlocks(expected)

    return call


def _safe_softmax() -> tuple[tuple[Any, ...], KernelBlocks]:
    expected = safe_softmax_allocations(shape=(3, 5, 7), dim=-1)
    return (torch.randn(3, 5, 7), -1), KernelBlocks(expected)


def _max_pool_backward() -> tuple[tuple[Any, ...], KernelBlocks]:
    x = torch.randn(4, 24, 7, 7).contiguous(memory_format=torch.channels_last)
    window = ([3, 3], [2, 2], [0, 0], [1, 1], False)
    _, indices = aten.max_pool2d_with_indices.default(x, *window)
    grad = torch.randn(indices.shape)  # NCHW: the kernel copies indices and grad_input
    expected = max_pool_backward_allocations(grad, x, indices)
    return (grad, x, *window, indices), KernelBlocks(expected)


def _lstm_layer(backward: bool) -> Callable[[], tuple[tuple[Any, ...], KernelBlocks]]:
    def call() -> tuple[tuple[Any, ...], KernelBlocks]:
        x, h = torch.randn(5, 2, 8), torch.randn(2, 16)
        weights = (torch.randn(64, 8), torch.randn(64, 16), torch.randn(64), torch.randn(64))
        args: tuple[Any, ...] = (x, *weights, h, h, False, [], 2, 16, 1, True, False, False, True)
        if backward:
            out = torch.randn(5, 2, 16)
            args = (
                x,
                *weights,
                h,
                h,
                out,
                h,
                h,
                out,
                None,
                None,
                False,
                2,
                16,
                1,
                True,
                True,
                False,
                [],
                False,
                torch.zeros(0, dtype=torch.uint8),
            )
        return args, mkldnn_rnn_layer(args)

    return call


def _layer_norm_backward() -> tuple[tuple[Any, ...], KernelBlocks]:
    x, statistic, weight = torch.randn(4, 6), torch.zeros(4, 1), torch.ones(6)
    args = (x, x, [6], statistic, statistic, weight, weight, [True, True, True])
    expected = layer_norm_backward_allocations(
        input_shape=(4, 6),
        normalized_shape=[6],
        itemsize=4,
        parameter_itemsize=4,
        output_mask=[True, True, True],
        threads=_threads(),
    )
    return args, KernelBlocks(expected)


# One call of every registered op, and what its family's own rule gives for it.
CALLS: dict[str, Callable[[], tuple[tuple[Any, ...], KernelBlocks]]] = {
    "aten.convolution.default": _float32_conv,
    "aten.convolution_backward.default": _float32_conv_backward,
    "aten.mm.default": _bf16_matmul(biased=False),
    "aten.addmm.default": _bf16_matmul(biased=True),
    "aten.bmm.default": _bf16_batched_matmul(biased=False),
    "aten.baddbmm.default": _bf16_batched_matmul(biased=True),
    "aten.native_batch_norm.default": _batch_norm(no_training=False),
    "aten._native_batch_norm_legit.default": _batch_norm(no_training=False),
    "aten._native_batch_norm_legit_no_training.default": _batch_norm(no_training=True),
    "aten.native_batch_norm_backward.default": _batch_norm_backward,
    "aten._scaled_dot_product_flash_attention_for_cpu.default": _flash_attention(backward=False),
    "aten._scaled_dot_product_flash_attention_for_cpu_backward.default": _flash_attention(
        backward=True
    ),
    "aten._safe_softmax.default": _safe_softmax,
    "aten.embedding_dense_backward.default": lambda: (
        (torch.randn(5, 4, 8).transpose(0, 1), torch.randint(0, 10, (4, 5)), 10, -1, False),
        KernelBlocks(
            None, "embedding backward of a non-contiguous gradient or indices (the kernel's copies)"
        ),
    ),
    "aten.max_pool2d_with_indices_backward.default": _max_pool_backward,
    "aten.native_layer_norm_backward.default": _layer_norm_backward,
    "aten.mkldnn_rnn_layer.default": _lstm_layer(backward=False),
    "aten.mkldnn_rnn_layer_backward.default": _lstm_layer(backward=True),
}


# Rules that know no blocks and send each call to the kernel probe: their call and its reason.
def _bag() -> tuple[Any, ...]:
    return (torch.randn(10, 4), torch.randint(0, 10, (6,)), torch.tensor([0, 3]))


# Rules that always send their op to the kernel probe: a call, and what the reason names.
PROBED_CALLS: dict[str, tuple[Callable[[], tuple[Any, ...]], str]] = {
    "aten._native_multi_head_attention.default": (
        lambda: (torch.zeros(2, 5, 16),),
        "fast attention path",
    ),
    "aten._transformer_encoder_layer_fwd.default": (
        lambda: (torch.zeros(2, 5, 16),),
        "fast attention path",
    ),
    "aten._embedding_bag.default": (_bag, "embedding bag"),
    "aten._embedding_bag_forward_only.default": (_bag, "embedding bag"),
    **{
        op: (lambda: (torch.zeros(2, 3, 4, 4),), reason)
        for reason, ops in ALWAYS_PROBED.items()
        for op in ops
    },
    "aten.all.default": (lambda: (torch.zeros(2, 3),), "not bool"),
    # Given a channels-last map; contiguous, they allocate only their outputs (below).
    **{
        op: (lambda: (_channels_last_map(),), "not contiguous")
        for ops in PROBED_IN_ANOTHER_LAYOUT.values()
        for op in ops
    },
}


def _channels_last_map() -> torch.Tensor:
    return torch.zeros(2, 3, 4, 4).contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(
    "name", sorted(op for ops in PROBED_IN_ANOTHER_LAYOUT.values() for op in ops)
)
def test_a_layout_probed_rule_keeps_contiguous_calls_as_outputs_only(name: str) -> None:
    assert cpu_kernel_allocations(name, (torch.zeros(2, 3, 4, 4),)) == OUTPUTS_ONLY


def test_every_registered_rule_has_a_call_here() -> None:
    """A rule registered for an op no call here exercises, or a call of an op no rule is
    registered for, fails: the table above is the registry's, not a list kept beside it."""
    assert set(CALLS) | set(PROBED_CALLS) == set(ALLOCATION_RULES)
    assert not set(CALLS) & set(PROBED_CALLS)


@pytest.mark.parametrize("name", sorted(PROBED_CALLS))
def test_a_probed_rule_gives_a_reason(name: str) -> None:
    call, reason = PROBED_CALLS[name]
    blocks = cpu_kernel_allocations(name, call())
    assert blocks.allocations is None
    assert reason in blocks.unmodelled


def test_importing_the_package_registers_every_rule() -> None:
    """What the tracer gets from `import ninlab.analysis.allocator` alone (this test module
    imports rule modules itself): a rule module the package does not import is never used."""
    code = (
        "import ninlab.analysis.allocator\n"
        "from ninlab.analysis.allocator.registry import ALLOCATION_RULES\n"
        "print(sorted(ALLOCATION_RULES))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    out = run.stdout
    assert out.strip() == str(sorted({**CALLS, **PROBED_CALLS}))


@pytest.mark.parametrize("name", sorted(CALLS))
def test_the_lookup_reaches_each_family_rule(name: str, two_threads: None) -> None:
    args, expected = CALLS[name]()
    blocks = cpu_kernel_allocations(name, args)
    # the family's rule ran, not "outputs only": blocks, or the reason the probe measures them
    assert blocks.allocations is not None or blocks.unmodelled
    assert blocks == expected


@pytest.mark.avx512
def test_the_lookup_reaches_the_bf16_convolution_rule(two_threads: None) -> None:
    """A bfloat16 convolution runs on oneDNN only with AVX-512 (elsewhere Slow2d, a reason)."""
    args, expected = _bf16_depthwise_conv()
    assert expected.unmodelled == "" and expected.allocations is not None
    assert cpu_kernel_allocations("aten.convolution.default", args) == expected


def test_a_convolution_call_is_parsed_once_and_its_backend_asked_once(
    monkeypatch: pytest.MonkeyPatch, two_threads: None
) -> None:
    asked: list[str] = []
    backend = conv_call.conv_backend

    def counted(*args: Any) -> str:
        asked.append(backend(*args))
        return asked[-1]

    monkeypatch.setattr(conv_call, "conv_backend", counted)
    x, w = torch.randn(16, 96, 8, 8), torch.randn(96, 96, 1, 1)  # a float32 1x1 convolution
    window = ([1, 1], [0, 0], [1, 1], False, [0, 0], 1)
    blocks = cpu_kernel_allocations("aten.convolution.default", (x, w, None, *window))
    assert blocks.allocations is not None and asked == ["Mkldnn"]
