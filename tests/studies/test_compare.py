"""Variants side by side, the VGG-like family, and training each variant (slow)."""

import dataclasses
import json

import matplotlib.pyplot as plt
import pytest
from torch import nn

from ninlab.analysis.predict import predict_memory
from ninlab.analysis.summary import summarize
from ninlab.cli import main
from ninlab.errors import NinlabError
from ninlab.models import resolve_model
from ninlab.studies.compare import METRICS, TrainPlan, compare
from ninlab.training.data import default_search_path, load_fashion_mnist
from ninlab.training.presets import get_preset
from ninlab.viz.charts import compare_chart, draw
from ninlab.viz.compare import comparison_dict, comparison_markdown


@pytest.fixture(scope="module")
def comparison():
    # The chapter's second exercise (one 1x1 conv per block) and the fourth (no 384->10 squeeze).
    return compare(
        ["nin-d2l", "nin-d2l:num_1x1=1", "nin-d2l-no-squeeze"],
        input_size=(1, 224, 224),
        batch_size=2,
    )


def metric(key):
    return next(m for m in METRICS if m.key == key)


def test_columns_hold_the_accountants_numbers(comparison):
    d2l, one, no_squeeze = comparison.variants
    assert (d2l.parameters, one.parameters, no_squeeze.parameters) == (
        1_992_166,
        1_769_112,
        1_961_226,
    )
    assert d2l.forward_flops == 3_049_189_408
    assert one.description == "d2l.ai's NiN, exactly as the chapter builds it; with num_1x1=1"
    model = resolve_model("nin-d2l:num_1x1=1")
    train = predict_memory(model, input_size=(1, 224, 224), batch_size=2, mode="train")
    infer = predict_memory(model, input_size=(1, 224, 224), batch_size=2, mode="infer")
    assert (one.train_peak_bytes, one.train_allocator_peak_bytes) == (
        train.live_peak_bytes,
        train.allocator_peak_bytes,
    )
    assert (one.infer_peak_bytes, one.infer_allocator_peak_bytes) == (
        infer.live_peak_bytes,
        infer.allocator_peak_bytes,
    )
    assert (
        one.training_step_flops
        == summarize(model, input_size=(1, 224, 224), batch_size=2).totals.training_step_flops
    )
    assert d2l.smallest_input_size == one.smallest_input_size == (1, 67, 67)
    # Without the last block the last window layer is the third pool, which sees less.
    assert (d2l.last_field_layer, d2l.last_field_size) == ("7.4", (195, 195))
    assert (no_squeeze.last_field_layer, no_squeeze.last_field_size) == ("5", (131, 131))


def test_differences_are_against_the_first_column(comparison):
    d2l, one, no_squeeze = comparison.variants
    assert (
        comparison.difference(metric("parameters"), one) == -223_054
    )  # 2 x (96^2+96 + 256^2+256 + 384^2+384 + 10^2+10) / 2
    assert comparison.difference(metric("parameters"), d2l) == 0
    assert comparison.difference(metric("last_field_size"), no_squeeze) == (-64, -64)
    assert comparison.difference(metric("smallest_input_size"), one) == (0, 0, 0)
    text = comparison_markdown(comparison)
    assert (
        "| Parameters | 1,992,166 | 1,769,112 (-223,054, -11.2%) | 1,961,226 (-30,940, -1.6%) |"
        in text
    )
    assert "| Smallest valid input | 1x67x67 | 1x67x67 (same) | 1x67x67 (same) |" in text
    data = comparison_dict(comparison)
    assert data["variants"][1]["parameters_difference"] == -223_054
    assert data["variants"][2]["last_field_size"] == [131, 131]
    json.dumps(data)


def test_compare_chart_bars_are_the_table(comparison):
    chart = compare_chart(comparison)
    assert chart.variants == ("nin-d2l", "nin-d2l:num_1x1=1", "nin-d2l-no-squeeze")
    panels = {panel.label: panel for panel in chart.panels}
    assert panels["Parameters"].values == (1_992_166, 1_769_112, 1_961_226)
    assert panels["Training peak: live tensors"].values == tuple(
        v.train_peak_bytes for v in comparison.variants
    )
    assert panels["Smallest valid input, height"].values == (67, 67, 67)
    figure = draw(chart)
    try:
        heights = [
            [bar.get_height() for bar in axes.patches] for axes in figure.axes if axes.get_visible()
        ]
    finally:
        plt.close(figure)
    assert heights == [list(panel.values) for panel in chart.panels]


def test_vgg_like_family_has_vggs_weight_layers():
    expected = {
        "nin-vgg11": (11, 4_547_046),
        "nin-vgg16": (16, 5_158_822),
        "nin-vgg19": (19, 5_749_926),
    }
    for name, (layers, parameters) in expected.items():
        model = resolve_model(name)
        assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == layers
        assert sum(p.numel() for p in model.parameters()) == parameters
    summary = summarize(resolve_model("nin-vgg11"), input_size=(1, 224, 224), batch_size=1)
    assert summary.smallest_input_size == (
        1,
        63,
        63,
    )  # five 3x3/2 pools: 63 -> 31 -> 15 -> 7 -> 3 -> 1
    assert [row.output_shape[1:] for row in summary.layers if row.type == "MaxPool2d"] == [
        (64, 111, 111),
        (128, 55, 55),
        (256, 27, 27),
        (512, 13, 13),
        (512, 6, 6),
    ]


def test_compare_refuses_repeats_and_nothing():
    with pytest.raises(NinlabError, match="named twice"):
        compare(["nin-d2l", "nin-d2l"])
    with pytest.raises(NinlabError, match="at least one model"):
        compare([])


def test_cli_compare_table_and_plot(tmp_path, capsys):
    path = tmp_path / "bars.png"
    assert main(["compare", "nin-d2l", "nin-d2l-1x1", "--batch", "2", "--plot", str(path)]) == 0
    captured = capsys.readouterr()
    assert f"wrote {path}" in captured.err
    # The difference under its value, right-aligned with it (a table half as wide).
    lines = captured.out.splitlines()
    row = next(index for index, line in enumerate(lines) if "1,769,112" in line)
    value, difference = lines[row], lines[row + 1]
    assert difference.index("(-223,054, -11.2%)") + len("(-223,054, -11.2%)") == value.index(
        "1,769,112"
    ) + len("1,769,112")
    assert path.stat().st_size > 20_000
    assert main(["compare", "nin-d2l", "--batch", "2", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["variants"][0]["parameters"] == 1_992_166
    assert main(["compare", "no-such-net"]) == 2
    assert "unknown model 'no-such-net'" in capsys.readouterr().err


@pytest.mark.slow
def test_train_adds_accuracy_and_time(tmp_path):
    data = load_fashion_mnist(search_path=default_search_path(None), download=False)
    quick = dataclasses.replace(
        get_preset("cpu"), epochs=1, batch_size=32, train_examples=64, test_examples=64
    )
    plan = TrainPlan(preset="cpu", config=quick, data=data, output_dir=tmp_path)
    result = compare(
        ["nin-d2l-bn", "nin-d2l-bn:num_1x1=1"], input_size=(1, 72, 72), batch_size=32, training=plan
    )
    assert result.preset == "cpu"
    for variant in result.variants:
        assert 0 <= variant.training.test_accuracy <= 1 and variant.training.train_seconds > 0
        assert (
            variant.training.config.variant == variant.spec
            and variant.training.config.image_size == 72
        )
        assert (
            tmp_path / variant.spec.replace(":", "_").replace("=", "_") / "checkpoint.pt"
        ).exists()
    assert "Test accuracy" in comparison_markdown(result)
    with pytest.raises(NinlabError, match="factory"):
        compare(["cnn_zoo:resnet_bn"], input_size=(3, 32, 32), batch_size=2, training=plan)
