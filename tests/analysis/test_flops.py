"""FLOP totals equal PyTorch's own FlopCounterMode, for NiN and for CNNs unlike it."""

import pytest
import torch
from cnn_zoo import ZOO
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from ninlab.analysis.flops import FLOP_RULES, conv_flops, flop_rule, op_flops, uncounted_products
from ninlab.analysis.summary import summarize
from ninlab.models import build_nin, resolve_model

aten = torch.ops.aten


def counted_by_pytorch(model, input_size, batch_size):
    x = torch.randn(batch_size, *input_size)
    targets = torch.zeros(batch_size, dtype=torch.long)
    with FlopCounterMode(display=False) as forward_counter:
        logits = model(x)
    with FlopCounterMode(display=False) as backward_counter:
        F.cross_entropy(logits, targets).backward()
    return forward_counter.get_total_flops(), backward_counter.get_total_flops()


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_totals_equal_flop_counter_mode(name):
    entry = ZOO[name]
    torch.manual_seed(0)
    model = entry.factory()
    forward, backward = counted_by_pytorch(model, entry.input_size, 4)
    totals = summarize(model, input_size=entry.input_size, batch_size=4).totals
    assert (totals.forward_flops, totals.backward_flops) == (forward, backward)
    assert forward > 0 and backward > forward  # backward computes input and weight gradients


def test_nin_totals_equal_flop_counter_mode_and_the_hand_count():
    model = build_nin()
    forward, backward = counted_by_pytorch(model, (1, 224, 224), 2)
    totals = summarize(model, input_size=(1, 224, 224), batch_size=2).totals
    assert totals.forward_flops == forward == 3_049_189_408
    assert totals.backward_flops == backward
    # The first conv needs no input gradient, so backward is a little under twice the forward.
    first_conv = conv_flops((2, 1, 224, 224), (96, 1, 11, 11), (2, 96, 54, 54), transposed=False)
    assert backward == 2 * forward - first_conv


class _Checkpointed(torch.nn.Module):
    """A linear block recomputed in backward (`torch.utils.checkpoint`), then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.block = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU())
        self.head = torch.nn.Linear(32, 5)

    def forward(self, x):
        return self.head(checkpoint(self.block, x, use_reentrant=False))


def test_a_checkpoints_recomputation_is_backward_flops_as_flop_counter_mode_counts_it():
    torch.manual_seed(0)
    model = _Checkpointed()
    forward, backward = counted_by_pytorch(model, (16,), 4)
    summary = summarize(model, input_size=(16,), batch_size=4)
    totals = summary.totals
    # The block's forward, 2 * 4 * 16 * 32 FLOPs, runs again in backward.
    assert (totals.forward_flops, totals.backward_flops) == (forward, backward) == (5_376, 10_752)
    assert totals.training_step_flops == forward + backward
    layers = {layer.name: layer for layer in summary.layers}
    # Its recomputation and its weight's gradient (the input needs none).
    assert layers["block"].backward_flops == 2 * (2 * 4 * 16 * 32)


class _Encoder(torch.nn.Module):
    """A Transformer encoder layer and a head: without gradients, PyTorch runs it as one fused
    kernel (`_transformer_encoder_layer_fwd`) that no FLOP rule counts."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.head = torch.nn.Linear(32, 5)

    def forward(self, x):
        return self.head(self.layer(x).mean(1))


def test_a_training_steps_forward_flops_are_those_of_its_forward_with_gradients():
    torch.manual_seed(0)
    model = _Encoder()
    forward, backward = counted_by_pytorch(model, (10, 32), 3)
    totals = summarize(model, input_size=(10, 32), batch_size=3, mode="train").totals
    # The attention's projections, scores and feed-forward, not only the head's 960.
    assert (totals.forward_flops, totals.backward_flops) == (forward, backward)
    assert forward == 3 * 2 * 10 * (32 * 96 + 32 * 32 + 2 * 32 * 64) + 960
    assert totals.training_step_flops == forward + backward
    # An inference runs the fused kernel, which FlopCounterMode does not count either.
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(3, 10, 32))
    inference = summarize(model, input_size=(10, 32), batch_size=3, mode="infer").totals
    assert inference.forward_flops == counter.get_total_flops() == 960


def test_conv_flops_counts_groups_through_the_weight_shape():
    # Depthwise 3x3 over 8 channels of 4x4: each output reads 9 inputs of its own channel.
    assert conv_flops((1, 8, 4, 4), (8, 1, 3, 3), (1, 8, 4, 4), transposed=False) == 2 * 8 * 16 * 9


def test_linear_layers_are_counted_through_addmm():
    model = resolve_model("nin-d2l-no-squeeze")
    totals = summarize(model, input_size=(1, 224, 224), batch_size=1).totals
    forward, _ = counted_by_pytorch(model, (1, 224, 224), 1)
    assert totals.forward_flops == forward
    # The 384 -> 10 block (1,738,000 FLOPs at 5x5) gives way to a 384 -> 10 linear layer.
    nin = summarize(build_nin(), input_size=(1, 224, 224), batch_size=1).totals.forward_flops
    assert forward == nin - 1_738_000 + 2 * 384 * 10


# --- the registry, against PyTorch's own -----------------------------------------------------

# What PyTorch's FlopCounterMode counts and ninlab does not, on purpose: attention kernels (the
# CUDA ones and flex attention; the CPU flash kernel a CPU trace records is counted by neither),
# float8 scaled matrix multiplies, and the backend convolutions a trace never records (a dispatch
# mode sees `aten.convolution`, not the kernel it picks). A new PyTorch rule fails the test below
# until it is ours or named here.
NOT_COUNTED = {
    "aten._efficient_attention_backward",
    "aten._efficient_attention_forward",
    "aten._flash_attention_backward",
    "aten._flash_attention_forward",
    "aten._scaled_dot_product_cudnn_attention",
    "aten._scaled_dot_product_cudnn_attention_backward",
    "aten._scaled_dot_product_efficient_attention",
    "aten._scaled_dot_product_efficient_attention_backward",
    "aten._scaled_dot_product_flash_attention",
    "aten._scaled_dot_product_flash_attention_backward",
    "aten._scaled_mm",
    "aten._slow_conv2d_forward",
    "aten.convolution_overrideable",
    "aten.cudnn_convolution",
    "flex_attention",
    "flex_attention_backward",
}


def test_every_op_pytorch_counts_is_ours_or_named_as_not_counted() -> None:
    theirs = {str(packet) for packet in flop_registry}
    ours = {str(packet) for packet in FLOP_RULES}
    assert ours <= theirs
    assert theirs - ours <= NOT_COUNTED


@pytest.mark.torch_build
def test_every_op_named_as_not_counted_is_counted_by_pytorch() -> None:
    # No stale name. Under the reference build only: an older torch counts fewer ops (2.8 has no
    # rule for flex attention, `_slow_conv2d_forward` and the backend convolutions).
    theirs = {str(packet) for packet in flop_registry}
    assert theirs >= NOT_COUNTED


def _convolution_call(x_shape, w_shape, *, stride=1, padding=0, groups=1, transposed=False):
    torch.manual_seed(0)
    dims = len(x_shape) - 2
    x, w = torch.randn(x_shape), torch.randn(w_shape)
    window = ([stride] * dims, [padding] * dims, [1] * dims, transposed, [0] * dims, groups)
    return x, w, window


def _forward(packet):
    def call(x_shape, w_shape, **window):
        x, w, window_args = _convolution_call(x_shape, w_shape, **window)
        args = (x, w, None, *window_args)
        if packet is aten._convolution:  # benchmark, deterministic, cudnn_enabled, allow_tf32
            args = (*args, False, False, True, True)
        return packet.default, args

    return call


def _backward(x_shape, w_shape, mask, **window):
    x, w, window_args = _convolution_call(x_shape, w_shape, **window)
    grad = torch.randn_like(aten.convolution.default(x, w, None, *window_args))
    return aten.convolution_backward.default, (grad, x, w, None, *window_args, mask)


# A few real calls of every op both registries count.
CALLS = {
    "aten.mm": [lambda: (aten.mm.default, (torch.randn(5, 7), torch.randn(7, 3)))],
    "aten.bmm": [lambda: (aten.bmm.default, (torch.randn(2, 5, 7), torch.randn(2, 7, 3)))],
    "aten.addmm": [
        lambda: (aten.addmm.default, (torch.randn(3), torch.randn(5, 7), torch.randn(7, 3)))
    ],
    "aten.baddbmm": [
        lambda: (
            aten.baddbmm.default,
            (torch.randn(2, 5, 3), torch.randn(2, 5, 7), torch.randn(2, 7, 3)),
        )
    ],
    "aten.convolution": [
        lambda: _forward(aten.convolution)((2, 3, 17, 17), (8, 3, 3, 3), stride=2, padding=1),
        lambda: _forward(aten.convolution)((2, 8, 9, 9), (8, 1, 5, 5), padding=2, groups=8),
        lambda: _forward(aten.convolution)((2, 8, 5, 5), (8, 4, 3, 3), stride=2, transposed=True),
        lambda: _forward(aten.convolution)((2, 4, 20), (6, 4, 3), stride=2),
    ],
    "aten._convolution": [
        lambda: _forward(aten._convolution)((2, 3, 17, 17), (8, 3, 3, 3), stride=2, padding=1),
        lambda: _forward(aten._convolution)((2, 8, 5, 5), (8, 4, 3, 3), stride=2, transposed=True),
    ],
    "aten.convolution_backward": [
        lambda: _backward((2, 3, 17, 17), (8, 3, 3, 3), [True, True, True], stride=2, padding=1),
        lambda: _backward((2, 1, 16, 16), (6, 1, 5, 5), [False, True, False]),
        lambda: _backward((2, 8, 9, 9), (8, 1, 3, 3), [True, False, True], padding=1, groups=8),
        lambda: _backward(
            (2, 8, 5, 5), (8, 4, 3, 3), [True, True, False], stride=2, transposed=True
        ),
    ],
}


def test_every_op_both_registries_count_has_calls_here() -> None:
    both = {str(packet) for packet in FLOP_RULES} & {str(packet) for packet in flop_registry}
    assert set(CALLS) == both


@pytest.mark.parametrize(
    "make_call",
    [
        pytest.param(call, id=f"{name}-{index}")
        for name, calls in CALLS.items()
        for index, call in enumerate(calls)
    ],
)
def test_flops_equal_pytorch_registry(make_call) -> None:
    func, args = make_call()
    outputs = func(*args)
    outputs = tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)
    pytorch_rule = flop_registry[func.overloadpacket]
    pytorch = pytorch_rule(*args, out_val=outputs if len(outputs) > 1 else outputs[0])
    assert op_flops(func, args, outputs) == pytorch > 0


def test_a_second_flop_rule_for_an_op_is_refused() -> None:
    before = dict(FLOP_RULES)
    taken = r"aten\.mm has a FLOP rule already: ninlab\.analysis\.flops\.matmul_flops"
    with pytest.raises(ValueError, match=taken):
        flop_rule(aten.relu, aten.mm)(lambda args, outputs: 0)
    with pytest.raises(ValueError, match=r"aten\.relu has a FLOP rule already"):
        flop_rule(aten.relu, aten.relu)(lambda args, outputs: 0)
    assert dict(FLOP_RULES) == before  # nothing registered, relu included


def test_products_the_convention_leaves_at_zero_are_named():
    """Kernels that multiply matrices inside but count 0 FLOPs (as FlopCounterMode counts them on
    CPU) are named by kind, each once, so a total that leaves them out says so."""
    names = (
        "aten.mm.default",
        "aten._scaled_dot_product_flash_attention_for_cpu.default",
        "aten._grouped_mm.default",
        "aten._scaled_dot_product_flash_attention_for_cpu_backward.default",
    )
    assert uncounted_products(names) == (
        "fused attention",
        "grouped matrix products (mixture-of-experts layers)",
    )
    assert uncounted_products(["aten.convolution.default"]) == ()
