"""Charts: each chart's data is the results object's numbers, and the drawing plots exactly that
data (read back from the matplotlib artists)."""

import matplotlib.pyplot as plt
import pytest
from cnn_zoo import ceil_pool_net
from PIL import Image

from ninlab.analysis.batch import fit_batch, memory_vs_batch
from ninlab.analysis.predict import predict_memory
from ninlab.analysis.summary import summarize
from ninlab.cli import main
from ninlab.errors import NinlabError
from ninlab.models import build_nin
from ninlab.units import BYTE_UNITS, format_bytes
from ninlab.viz.charts import (
    _ScaledLocator,
    _UnitFormatter,
    batch_chart,
    chart_svg,
    draw,
    field_chart,
    flops_chart,
    geometry_chart,
    save_chart,
    saved_chart,
    timeline_chart,
)

GIB, MIB = 1 << 30, 1 << 20


@pytest.fixture(scope="module")
def nin():
    return build_nin()


@pytest.fixture(scope="module")
def summary(nin):
    return summarize(nin, input_size=(1, 224, 224), batch_size=4, model_name="nin-d2l")


@pytest.fixture(scope="module")
def train(nin):
    return predict_memory(
        nin, input_size=(1, 224, 224), batch_size=4, mode="train", model_name="nin-d2l"
    )


@pytest.fixture(scope="module")
def infer(nin):
    return predict_memory(
        nin, input_size=(1, 224, 224), batch_size=4, mode="infer", model_name="nin-d2l"
    )


@pytest.fixture
def figure_of():
    figures = []

    def make(chart):
        figure = draw(chart)
        figures.append(figure)
        figure.canvas.draw()  # lay out ticks, so their labels can be read
        return figure

    yield make
    for figure in figures:
        plt.close(figure)


def layer(summary, name):
    return next(row for row in summary.layers if row.name == name)


# -- geometry -----------------------------------------------------------------------------------


def test_geometry_picture_shows_the_forum_question(summary, figure_of):
    chart = geometry_chart(summary)
    assert chart.layer == "0.0"  # the first layer that loses real pixels to rounding
    for axis in (chart.height, chart.width):
        assert (axis.input_size, axis.output_size, axis.textbook_output) == (224, 54, 54.25)
        assert axis.windows[0] == (0, 10) and axis.windows[-1] == (212, 222)
        assert len(axis.windows) == 54
        assert axis.unread == (223,)
    assert chart.explanation == layer(summary, "0.0").explanation
    whole, corner = figure_of(chart).axes
    shaded = [
        p
        for p in whole.patches
        if p.get_facecolor()[:3] == pytest.approx((0.839, 0.153, 0.157), abs=0.01)
    ]
    assert {(p.get_x(), p.get_y(), p.get_width(), p.get_height()) for p in shaded} == {
        (0, 223, 224, 1),
        (223, 0, 1, 224),
    }
    # 53 windows of the last row, 53 of the last column, and the last window, in bold.
    windows = [p for p in whole.patches if p.get_linewidth() in (0.8, 2.2)]
    assert len(windows) == 107
    last = windows[-1]
    assert (
        last.get_x(),
        last.get_y(),
        last.get_width(),
        last.get_height(),
        last.get_linewidth(),
    ) == (212, 212, 11, 11, 2.2)
    assert (
        corner.get_xlim()[1] == 224 and corner.get_ylim()[0] == 224
    )  # the corner view ends at the edge


def test_geometry_picture_of_a_padded_layer_reaches_into_padding(summary):
    chart = geometry_chart(summary, layer="2.0")
    assert chart.height.padding_before == chart.height.padding_after == 2
    assert chart.height.windows[0] == (-2, 2) and chart.height.windows[-1] == (23, 27)
    assert chart.height.unread == ()


def test_geometry_picture_defaults_to_a_layer_that_rounds_up():
    summary = summarize(ceil_pool_net(), input_size=(3, 34, 34), batch_size=1)
    chart = geometry_chart(summary)
    assert (chart.layer, chart.layer_type) == ("2", "MaxPool2d")  # 30 -> 15 with ceil_mode (14.5)
    assert chart.height.textbook_output == 14.5 and chart.height.output_size == 15
    assert chart.height.windows[-1] == (28, 30)  # one past the last real row: a skipped tap
    assert "ceil_mode rounds up" in chart.explanation


def test_geometry_picture_refuses_a_layer_without_windows(summary):
    with pytest.raises(
        NinlabError, match=r"'0\.1' is not a convolution or pooling layer.*choose one of 0\.0, 0\.2"
    ):
        geometry_chart(summary, layer="0.1")


# -- receptive field, FLOPs ------------------------------------------------------------------


def test_receptive_field_chart_plots_the_summary_fields(summary, figure_of):
    chart = field_chart(summary)
    rows = [row for row in summary.layers if row.is_leaf and row.receptive_field]
    assert chart.layers == tuple(row.name for row in rows)
    assert chart.sizes == tuple(tuple(f.size for f in row.receptive_field) for row in rows)
    assert chart.sizes[-1] == (195, 195) and chart.jumps[-1] == (32, 32)
    axes = figure_of(chart).axes[0]
    size_line = next(line for line in axes.get_lines() if line.get_label() == "field size")
    assert list(size_line.get_ydata()) == [size[0] for size in chart.sizes]


def test_flops_chart_bars_are_the_summary_flops(summary, figure_of):
    chart = flops_chart(summary)
    assert sum(chart.forward_flops) == summary.totals.forward_flops == chart.total_forward_flops
    assert sum(chart.backward_flops) == summary.totals.backward_flops
    assert chart.forward_flops[chart.layers.index("0.0")] == layer(summary, "0.0").forward_flops
    axes = figure_of(chart).axes[0]
    bars = [p.get_width() for p in axes.patches]
    assert bars == list(chart.forward_flops) + list(chart.backward_flops)
    labels = [t.get_text() for t in axes.get_xticklabels() if t.get_text()]
    assert labels[0] == "0 FLOP" and all("FLOP" in text for text in labels)


# -- memory ------------------------------------------------------------------------------------


def test_timeline_chart_is_the_memory_timeline(train, figure_of):
    chart = timeline_chart(train)
    assert chart.total_bytes == train.timeline.totals()
    assert max(chart.total_bytes) == chart.peak_bytes == train.live_peak_bytes
    assert chart.total_bytes[chart.peak_op] == chart.peak_bytes
    assert [phase for phase, _, _ in chart.phases] == [
        "zero_grad",
        "forward",
        "loss",
        "backward",
        "optimizer",
    ]
    assert chart.peak_label.startswith(train.peak.op.removeprefix("aten.").removesuffix(".default"))
    assert f"in {train.peak.module} ({train.peak.module_type}), backward" in chart.peak_label
    for name, series in zip(chart.categories, chart.series_bytes):
        assert series == train.timeline.series(name)
    axes = figure_of(chart).axes[0]
    total = next(line for line in axes.get_lines() if line.get_label() == "total alive")
    assert list(total.get_ydata()) == list(train.timeline.totals())
    texts = " ".join(t.get_text() for t in axes.texts)
    assert f"live peak {format_bytes(train.live_peak_bytes)}" in texts and "backward" in texts
    assert all(
        label.get_text().endswith(("B", "KiB", "MiB", "GiB"))
        for label in axes.get_yticklabels()
        if label.get_text()
    )


def test_inference_timeline_has_one_phase(infer):
    chart = timeline_chart(infer)
    assert [phase for phase, _, _ in chart.phases] == ["forward"]
    assert chart.peak_bytes == infer.live_peak_bytes
    assert "saved_for_backward" not in chart.categories


def test_saved_chart_splits_each_layers_bytes_by_reason(train, figure_of):
    chart = saved_chart(train)
    assert sum(chart.layer_bytes) == chart.total_bytes == train.saved_total_bytes
    assert chart.layer_bytes == tuple(layer.counted_bytes for layer in train.saved_by_layer())
    assert [sum(values) for values in zip(*chart.bytes_by_reason)] == list(chart.layer_bytes)
    relu = chart.layers.index("0.1")
    reason = chart.reasons.index("ReLU keeps its output: the gradient passes where it is positive")
    assert chart.bytes_by_reason[reason][relu] == 4 * 96 * 54 * 54 * 4
    assert chart.layers[-1] == "(loss)"
    axes = figure_of(chart).axes[0]
    widths = [p.get_width() for p in axes.patches]
    assert widths == [value for values in chart.bytes_by_reason for value in values]
    with pytest.raises(NinlabError, match="only a training step"):
        saved_chart(predict_memory(build_nin(), input_size=(1, 67, 67), batch_size=1, mode="infer"))


def test_batch_chart_marks_the_largest_batch_under_the_budget(nin, figure_of):
    fit = fit_batch(nin, budget="256MiB", input_size=(1, 224, 224))
    scaling = memory_vs_batch(
        nin, input_size=(1, 224, 224), batch_sizes=(4, 8), check_batch_size=16, level="allocator"
    )
    chart = batch_chart(scaling, fit, model="nin-d2l", mode="train")
    assert chart.batch_sizes == (4, 8, 16, fit.batch_size, fit.batch_size + 1)
    assert chart.peaks_bytes[-2:] == (fit.peak_bytes, fit.next_peak_bytes)
    assert fit.peak_bytes <= 256 * MIB < fit.next_peak_bytes
    axes = figure_of(chart).axes[0]
    points = next(line for line in axes.get_lines() if line.get_label() == "predicted peak (exact)")
    assert list(points.get_xdata()) == list(chart.batch_sizes) and list(points.get_ydata()) == list(
        chart.peaks_bytes
    )
    budget = next(line for line in axes.get_lines() if line.get_label() == "budget 256.00 MiB")
    assert list(budget.get_ydata()) == [256 * MIB, 256 * MIB]
    assert any(
        line.get_label() == f"largest batch that fits: {fit.batch_size}"
        for line in axes.get_lines()
    )
    live = memory_vs_batch(
        nin, input_size=(1, 224, 224), batch_sizes=(4, 8), check_batch_size=16, level="live"
    )
    with pytest.raises(NinlabError, match="must count the same memory"):
        batch_chart(live, fit, model="nin-d2l", mode="train")


# -- ticks, files ---------------------------------------------------------------------------------


def test_byte_ticks_are_round_binary_numbers():
    locator = _ScaledLocator((GIB, MIB, 1 << 10), binary=True)
    ticks = locator.tick_values(0, 1.15 * GIB)
    assert all(tick % (256 * MIB) == 0 for tick in ticks)
    assert [format_bytes(round(t)) for t in ticks[:3]] == ["0 B", "256.00 MiB", "512.00 MiB"]
    assert all(tick % GIB == 0 for tick in locator.tick_values(0, 9.1 * GIB))


def test_an_axis_labels_every_tick_in_one_unit():
    # The issue: "768.00 MiB" next to "1.00 GiB" on one axis.
    formatter = _UnitFormatter(BYTE_UNITS, "B")
    ticks = [0, 256 * MIB, 512 * MIB, 768 * MIB, GIB, 1280 * MIB]
    assert formatter.format_ticks(ticks) == [
        "0 B",
        "0.25 GiB",
        "0.50 GiB",
        "0.75 GiB",
        "1.00 GiB",
        "1.25 GiB",
    ]
    assert formatter.format_ticks([0, 2 * GIB, 4 * GIB]) == ["0 B", "2 GiB", "4 GiB"]
    assert formatter.format_ticks([100, 200]) == ["100 B", "200 B"]


def test_save_chart_writes_png_and_svg(summary, tmp_path):
    png = save_chart(flops_chart(summary), tmp_path / "flops.png")
    with Image.open(png) as image:
        assert image.format == "PNG" and image.width > 800
    svg = save_chart(field_chart(summary), tmp_path / "field.svg")
    assert svg.read_text().lstrip().startswith("<?xml")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "field.svg",
        "flops.png",
    ]  # no temporary left
    with pytest.raises(NinlabError, match=r"name a \.png or \.svg file"):
        save_chart(flops_chart(summary), tmp_path / "flops.pdf")


def test_inline_svg_prefixes_ids(summary):
    svg = chart_svg(flops_chart(summary), id_prefix="flops")
    assert svg.startswith("<svg") and "<metadata>" not in svg
    assert svg.startswith('<svg id="flops" ') and "#flops *{stroke-linejoin" in svg
    assert 'id="flops-' in svg and 'clip-path="url(#flops-' in svg
    assert 'id="p' not in svg


def test_cli_plot_writes_each_kind(tmp_path, capsys):
    for kind in ("geometry", "receptive-field", "flops", "timeline", "saved", "batch"):
        path = tmp_path / f"{kind}.png"
        budget = ["--budget", "512MiB"] if kind == "batch" else []  # only batch reads it
        assert main(["plot", kind, "--batch", "2", *budget, "-o", str(path)]) == 0
        assert path.stat().st_size > 10_000
    assert (
        main(
            [
                "plot",
                "timeline",
                "--mode",
                "infer",
                "--input",
                "1x96x96",
                "--batch",
                "2",
                "-o",
                str(tmp_path / "t.svg"),
            ]
        )
        == 0
    )
    assert main(["plot", "flops", "-o", str(tmp_path / "f.txt")]) == 2
    assert "name a .png or .svg file" in capsys.readouterr().err
