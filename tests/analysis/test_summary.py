import subprocess
import sys

import pytest
import torch
from cnn_zoo import ZOO
from torch import nn

from ninlab.analysis.step import StepSpec
from ninlab.analysis.summary import default_mode, is_bias, smallest_input_size, summarize
from ninlab.errors import NinlabError
from ninlab.models import build_nin


@pytest.fixture(scope="module")
def nin_summary():
    return summarize(build_nin(), input_size=(1, 224, 224), batch_size=128, model_name="nin-d2l")


def layer(summary, name):
    return next(row for row in summary.layers if row.name == name)


def test_nin_shapes_at_224_match_a_real_forward(nin_summary):
    model = build_nin()
    real = {}

    def remember(name):
        def hook(module, inputs, output):
            real[name] = tuple(output.shape)

        return hook

    hooks = [m.register_forward_hook(remember(n)) for n, m in model.named_modules() if n]
    with torch.no_grad():
        model(torch.zeros(128, 1, 224, 224))
    for hook in hooks:
        hook.remove()
    assert {row.name: row.output_shape for row in nin_summary.layers if row.name} == real
    assert layer(nin_summary, "0.0").output_shape == (128, 96, 54, 54)
    assert [layer(nin_summary, n).output_shape[2] for n in ("1", "3", "5")] == [26, 12, 5]


def test_nin_rounding_is_explained_with_the_forum_numbers(nin_summary):
    first = layer(nin_summary, "0.0")
    assert first.axes[0].textbook_output == 54.25
    assert first.axes[0].trailing_unread_real == 1
    assert first.explanation == (
        "(224 - 11 + 2*0)/4 + 1 = 54.25 -> 54; the last 1 row and column (bottom/right) of real "
        "pixels are never read"
    )
    assert first.rounding == "54.25 -> 54, last 1 real unread"
    assert layer(nin_summary, "3").rounding == "12.5 -> 12, last 1 real unread"
    assert layer(nin_summary, "2.0").rounding == ""  # 5x5 with padding 2 keeps 26


def test_nin_parameters_weights_and_biases(nin_summary):
    totals = nin_summary.totals
    assert totals.parameters == 1_992_166
    assert totals.biases == 96 * 3 + 256 * 3 + 384 * 3 + 10 * 3
    assert totals.weights == totals.parameters - totals.biases
    assert totals.parameter_bytes == 4 * 1_992_166
    assert layer(nin_summary, "2").parameters == 256 * (5 * 5 * 96 + 1) + 2 * 256 * (256 + 1)


def test_every_bias_pytorch_names_is_a_bias():
    attention = nn.MultiheadAttention(8, 2, add_bias_kv=True)
    assert sorted(name for name, _ in attention.named_parameters() if is_bias(name)) == [
        "bias_k",
        "bias_v",
        "in_proj_bias",
        "out_proj.bias",
    ]
    lstm = nn.LSTM(3, 4, num_layers=2, bidirectional=True)
    assert (
        sum(is_bias(name) for name, _ in lstm.named_parameters()) == 8
    )  # ih and hh, 2 layers, 2 directions
    assert not any(
        is_bias(name)
        for name in ("weight_ih_l0", "in_proj_weight", "bias_norm.weight", "unbiased", "biases")
    )
    # A bidirectional LSTM(3, 4): its 4 gates' weights 2 x 4*4 x (3 + 4), its biases 2 x 2 x 4*4.
    totals = summarize(nn.LSTM(3, 4, bidirectional=True), input_size=(5, 3), batch_size=2).totals
    assert (totals.weights, totals.biases) == (224, 64)


def test_nin_flops_per_layer_add_up(nin_summary):
    leaves = [row for row in nin_summary.layers if row.is_leaf]
    assert (
        sum(row.forward_flops for row in leaves)
        == nin_summary.totals.forward_flops
        == 195_148_122_112
    )
    assert sum(row.backward_flops for row in leaves) == nin_summary.totals.backward_flops
    # conv 0.0: 2 x 128 x 54 x 54 positions x 11 x 11 x 1 x 96 channels
    assert layer(nin_summary, "0.0").forward_flops == 2 * 128 * 54 * 54 * 121 * 96
    # ...and in backward only the weight gradient: the network input needs none.
    assert layer(nin_summary, "0.0").backward_flops == layer(nin_summary, "0.0").forward_flops


def test_nin_receptive_fields_smallest_input_and_reach(nin_summary):
    fields = {
        name: layer(nin_summary, name).receptive_field[0]
        for name in ("0.0", "1", "2.0", "3", "4.0", "5", "7.0")
    }
    assert [(f.size, f.jump) for f in fields.values()] == [
        (11, 4),
        (19, 8),
        (51, 8),
        (67, 16),
        (99, 16),
        (131, 32),
        (195, 32),
    ]
    assert nin_summary.smallest_input_size == (1, 67, 67)
    # Rounding at the first conv and the three pools leaves the last 5 rows and columns unused.
    assert [(r.first, r.last, r.never_read) for r in nin_summary.input_reach] == [
        (0, 218, 5),
        (0, 218, 5),
    ]


@pytest.mark.canary
def test_smallest_input_holds_for_real_torch():
    """PyTorch runs NiN on 67x67 and raises on 66 rows: an empty output is an error, not a size."""
    model = build_nin().eval()
    model(torch.zeros(1, 1, 67, 67))
    with pytest.raises(RuntimeError):
        model(torch.zeros(1, 1, 66, 67))


@pytest.fixture
def traced_sizes(monkeypatch):
    """The input sizes `summarize` traces, in order."""
    import ninlab.analysis.summary as summary_module

    traced = []
    record = summary_module.record_step
    monkeypatch.setattr(
        summary_module,
        "record_step",
        lambda model, spec, *args, **kwargs: (
            traced.append(spec.input_size) or record(model, spec, *args, **kwargs)
        ),
    )
    return traced


def test_a_chain_the_input_passes_alone_is_trusted_without_tracing(traced_sizes):
    """NiN's input meets only its windows, ReLUs and dropout: below 67x67 a window's output is
    empty at every size; and past its last window only a ReLU and the global average, after
    which no shape depends on the input's, so 67x67 runs the whole network: no trace at either."""
    summary = summarize(build_nin(), input_size=(1, 224, 224), batch_size=2)
    assert summary.smallest_input_size == (1, 67, 67)
    assert traced_sizes == [(1, 224, 224), (1, 224, 224)]


class _Flattened(nn.Module):
    """A window chain, then a Linear of the flattened map: only 3x16x16 runs."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2)
        self.fc = nn.Linear(4 * 7 * 7, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


class _UnevenMean(nn.Module):
    """A mean over the width alone: the height reaches the output."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(x).mean(3, keepdim=True).view(-1, 4 * 14)


@pytest.mark.parametrize("model", [_Flattened(), _UnevenMean()])
def test_sizes_that_reach_past_the_chain_are_checked_by_tracing(model, traced_sizes):
    """Past the last window the input's sizes reach a reshape: the chain's smallest input is
    traced, the model refuses it, and the search by tracing gives what really runs."""
    summary = summarize(model, input_size=(3, 16, 16), batch_size=1, mode="infer")
    assert (3, 3, 3) in traced_sizes
    with torch.no_grad():
        model(torch.zeros(1, *summary.smallest_input_size))


class _ResizedFirst(nn.Module):
    """Resizes its input before its windows, so any input size runs."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 5, stride=2)

    def forward(self, x):
        return self.conv(nn.functional.interpolate(x, size=(32, 32))).mean((2, 3))


class _Cropped(nn.Module):
    """Crops a row and a column between its two windows."""

    def __init__(self):
        super().__init__()
        self.first = nn.Conv2d(3, 8, 5, stride=2)
        self.second = nn.Conv2d(8, 8, 3, stride=2)

    def forward(self, x):
        return self.second(torch.relu(self.first(x)[..., 1:, 1:])).mean((2, 3))


@pytest.mark.parametrize(
    ("model", "smallest"), [(_ResizedFirst(), (3, 1, 1)), (_Cropped(), (3, 11, 11))]
)
def test_a_chain_with_other_ops_on_the_way_is_checked_by_tracing(model, smallest):
    summary = summarize(model, input_size=(3, 32, 32), batch_size=1, mode="infer")
    assert summary.smallest_input_size == smallest
    with torch.no_grad():
        model(torch.zeros(1, *smallest))
        if smallest[1] > 1:
            with pytest.raises(RuntimeError):
                model(torch.zeros(1, smallest[0], smallest[1] - 1, smallest[2]))


def test_too_small_input_names_the_first_empty_layer():
    with pytest.raises(NinlabError) as error:
        summarize(build_nin(), input_size=(1, 60, 60), batch_size=1)
    assert str(error.value) == (
        "input 1x60x60 is too small: layer 5 (MaxPool2d): (2 - 3 + 2*0)/2 + 1 = 0.5 < 1, so the "
        "output would be empty; this layer needs an input of at least 3; the smallest input this "
        "network accepts is 1x67x67"
    )


@pytest.mark.parametrize("name", sorted(ZOO))
def test_smallest_input_of_other_cnns_is_exact(name):
    entry = ZOO[name]
    model = entry.factory().eval()
    smallest = summarize(model, input_size=entry.input_size, batch_size=1).smallest_input_size
    with torch.no_grad():
        model(torch.zeros(1, *smallest))
        for axis in (1, 2):
            if smallest[axis] > 1:
                smaller = list(smallest)
                smaller[axis] -= 1
                with pytest.raises(RuntimeError):
                    model(torch.zeros(1, *smaller))


def test_functional_calls_and_residual_adds_are_seen():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(8, 3, 3, 3))

        def forward(self, x):
            y = torch.nn.functional.conv2d(x, self.weight, padding=1)
            return (y + torch.relu(y)).mean((2, 3))

    summary = summarize(Functional(), input_size=(3, 16, 16), batch_size=2)
    assert summary.totals.forward_flops == 2 * 2 * 16 * 16 * 27 * 8
    assert summary.layers[0].output_shape == (2, 8)
    assert summary.totals.parameters == 8 * 27


def test_bfloat16_halves_parameter_and_output_bytes():
    summary = summarize(build_nin(), input_size=(1, 224, 224), batch_size=2, dtype=torch.bfloat16)
    assert summary.totals.parameter_bytes == 2 * 1_992_166
    assert summary.layers[1].output_bytes == 2 * 2 * 96 * 54 * 54
    assert summary.dtype == "bfloat16"


def test_batch_and_input_errors():
    with pytest.raises(NinlabError, match="batch size must be at least 1"):
        summarize(build_nin(), input_size=(1, 224, 224), batch_size=0)
    with pytest.raises(
        NinlabError,
        match=(
            r"the model cannot run a forward on a batch of 3x224x224 inputs .*expected input.*to "
            r"have 1 channels"
        ),
    ):
        summarize(build_nin(), input_size=(3, 224, 224), batch_size=1)


def test_nin_at_batch_128_allocates_no_activations():
    """A real forward at batch 128 needs over 1 GB; the analysis must stay far below."""
    # VmHWM is this process's own high-water mark; ru_maxrss would also count the memory of the
    # test process it was forked from (Linux carries it across exec).
    code = (
        "import re, ninlab; from ninlab.analysis.summary import summarize; "
        "summarize(ninlab.build_nin(), input_size=(1, 224, 224), batch_size=128); "
        "print(int(re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1)) "
        "* 1024)"
    )
    peak_rss = int(
        subprocess.run(
            [sys.executable, "-c", code], check=True, capture_output=True, text=True
        ).stdout
    )
    assert peak_rss < 1_000_000_000


def test_a_step_spec_gives_the_summary_its_fields_give() -> None:
    model = build_nin()
    spec = StepSpec(
        input_size=(1, 96, 96), optimizer="adam", amp="bf16", memory_format="channels_last"
    )
    given = summarize(model, spec, batch_size=2, model_name="nin-d2l")
    # The optimizer, autocast and layout change a step's memory, not its layers or FLOPs.
    assert given == summarize(model, input_size=(1, 96, 96), batch_size=2, model_name="nin-d2l")
    assert given.totals.backward_flops > 0
    inference = summarize(model, spec.inference(), batch_size=2)
    assert (
        inference.totals.backward_flops == 0
        and inference.totals.forward_flops == given.totals.forward_flops
    )
    with pytest.raises(NinlabError, match="give a StepSpec or its fields"):
        summarize(model, spec, batch_size=2, input_size=(1, 96, 96))


def test_the_mode_given_as_fields_defaults_to_what_the_model_can_do() -> None:
    frozen = build_nin().requires_grad_(False)
    assert default_mode(frozen) == "infer" and default_mode(build_nin()) == "train"
    assert summarize(frozen, input_size=(1, 96, 96), batch_size=1).loss == ""
    with pytest.raises(NinlabError, match="no trainable parameters"):
        summarize(frozen, StepSpec(input_size=(1, 96, 96)), batch_size=1)


class _DenseBlocks(nn.Module):
    """DenseNet's shape in small: a strided stem, layers that concatenate a padded 3x3
    convolution's output to their input, and unpadded 2x2 average pools between blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, stride=2)
        self.layers = nn.ModuleList(nn.Conv2d(4 + 2 * i, 2, 3, padding=1) for i in range(3))
        self.pool = nn.AvgPool2d(2)
        self.head = nn.Conv2d(10, 10, 1)

    def forward(self, x):
        x = self.stem(x)
        for layer in self.layers:
            x = torch.cat([x, layer(x)], 1)
        return self.head(self.pool(self.pool(x))).mean((2, 3))


class _SkipsItsWindowWhenSmall(nn.Module):
    """Runs a 7x7 window only on inputs wide enough for it: the windows' guess (7 rows and
    columns) is above what runs."""

    def __init__(self) -> None:
        super().__init__()
        self.small = nn.Conv2d(3, 4, 1)
        self.big = nn.Conv2d(4, 4, 7)

    def forward(self, x):
        x = torch.cat([x, x], 1)[:, :3]
        y = self.small(x)
        return (self.big(y) if y.shape[-1] >= 7 else y).mean((2, 3))


def test_the_search_asks_the_windows_guess_first(traced_sizes):
    """Where the windows form no single chain, each path's chain gives a guess, which the search
    asks first with the size below it: the input, then 2 traces per axis (13 without)."""
    model = _DenseBlocks()
    summary = summarize(model, input_size=(3, 32, 32), batch_size=1, mode="infer")
    assert len(traced_sizes) == 1 + 5  # the summary's forward, then the search's
    assert summary.smallest_input_size == (3, 9, 9)  # 9 -> 4 -> 2 -> 1; 8 -> 3 -> 1 -> 0
    assert summary.smallest_input_size == smallest_input_size(model, input_size=(3, 32, 32))


def test_a_wrong_guess_leaves_the_search_where_it_was():
    """Guessed 7 on both axes; the search finds what it finds without a guess: at width 32 the
    7x7 window runs and needs 7 rows, and at 7 rows a width of 1 skips it."""
    model = _SkipsItsWindowWhenSmall()
    summary = summarize(model, input_size=(3, 32, 32), batch_size=1, mode="infer")
    assert summary.smallest_input_size == (3, 7, 1)
    assert summary.smallest_input_size == smallest_input_size(model, input_size=(3, 32, 32))


def test_a_training_summary_reads_layer_outputs_from_the_training_forward():
    """The summary's forward runs as an inference, where `nn.TransformerEncoderLayer` takes its
    fused path and calls none of its linear layers; a training summary shows what its training
    forward makes: each feed-forward layer's output, batch 3 x 10 tokens x 64 features."""
    torch.manual_seed(0)
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 2, 64, batch_first=True), 2)
    summary = summarize(model, input_size=(10, 32), batch_size=3, mode="train")
    assert layer(summary, "layers.0.linear1").output_shapes == ((3, 10, 64),)
    assert layer(summary, "layers.1.linear2").output_bytes == 3 * 10 * 32 * 4
    assert summary.totals.uncounted_products == ()  # with gradients, attention is matmuls
    inference = summarize(model.eval(), input_size=(10, 32), batch_size=3, mode="infer")
    assert layer(inference, "layers.0.linear1").output_shapes == ()  # the fused path
    assert inference.totals.uncounted_products == ("fused attention",)
