"""FLOP totals equal PyTorch's own FlopCounterMode, for NiN and for CNNs unlike it."""

import pytest
import torch
from cnn_zoo import ZOO
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

from ninlab.analysis.flops import conv_flops
from ninlab.analysis.summary import summarize
from ninlab.models import build_nin, resolve_model


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
