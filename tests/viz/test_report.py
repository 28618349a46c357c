"""The HTML report: its charts carry the report's own numbers, it is self-contained, and it renders
in headless Chromium with no console errors."""

import os
import re
import shutil
import subprocess

import pytest
from PIL import Image

from ninlab.cli import main
from ninlab.models import build_nin
from ninlab.studies.report import study_model
from ninlab.units import format_bytes, format_count, format_flops
from ninlab.viz.html import html_text
from ninlab.viz.render import layer_table
from ninlab.viz.render_memory import saved_table
from ninlab.viz.report import build_report

CHART_KEYS = ("geometry", "field", "flops", "train-timeline", "infer-timeline", "saved", "batch")


@pytest.fixture(scope="module")
def report():
    study = study_model(
        build_nin(), input_size=(1, 224, 224), batch_size=8, budget="512MiB", model_name="nin-d2l"
    )
    return build_report(study)


@pytest.fixture(scope="module")
def page(report):
    return report.html()  # drawing the charts takes seconds: once per module


@pytest.fixture(scope="module")
def saved_html(report, tmp_path_factory):
    return report.save(tmp_path_factory.mktemp("report") / "report.html")


def test_chart_data_are_the_reports_numbers(report):
    charts, summary, train, infer = (
        report.charts,
        report.study.summary,
        report.study.train,
        report.study.infer,
    )
    assert (
        charts.flops.total_forward_flops
        == sum(charts.flops.forward_flops)
        == summary.totals.forward_flops
    )
    assert (
        charts.flops.total_backward_flops
        == sum(charts.flops.backward_flops)
        == summary.totals.backward_flops
    )
    assert charts.geometry.layer == "0.0" and charts.geometry.height.unread == (223,)
    assert charts.field.sizes[-1] == tuple(f.size for f in summary.layers[-4].receptive_field)
    assert (
        charts.train_timeline.peak_bytes
        == max(charts.train_timeline.total_bytes)
        == train.live_peak_bytes
    )
    assert charts.train_timeline.total_bytes == train.timeline.totals()
    assert charts.infer_timeline.peak_bytes == infer.live_peak_bytes
    assert charts.saved.total_bytes == sum(charts.saved.layer_bytes) == train.saved_total_bytes
    fit = report.study.batch.fit
    assert (
        charts.batch.fit_batch_size,
        charts.batch.fit_peak_bytes,
        charts.batch.budget_bytes,
    ) == (fit.batch_size, fit.peak_bytes, 512 << 20)
    assert fit.peak_bytes <= 512 << 20 < fit.next_peak_bytes
    scaling = report.study.batch.scaling
    assert scaling.batch_sizes == (fit.batch_size // 4, fit.batch_size // 2)
    assert (
        dict(zip(charts.batch.batch_sizes, charts.batch.peaks_bytes))[scaling.check_batch_size]
        == scaling.check_peak_bytes
    )


def test_html_shows_the_same_numbers_and_every_chart(report, page):
    summary, train = report.study.summary, report.study.train
    for text in (
        format_count(summary.totals.parameters),
        format_flops(summary.totals.forward_flops),
        format_bytes(train.live_peak_bytes),
        f"({train.live_peak_bytes:,} bytes)",
        format_bytes(report.study.infer.live_peak_bytes),
        (
            "(224 - 11 + 2*0)/4 + 1 = 54.25 -&gt; 54; the last 1 row and column (bottom/right) "
            "of real pixels are never read"
        ),
        f"is <b>{report.study.batch.fit.batch_size:,}</b>",
        "1x67x67",
    ):
        assert text in page
    for key in CHART_KEYS:
        assert f'<figure id="chart-{key}"><svg' in page
    assert page.count("<svg") == len(CHART_KEYS)
    ids = re.findall(r'\bid="([^"]+)"', page)
    assert len(ids) == len(set(ids))  # seven inline SVGs, no id shared


def test_the_reports_tables_are_the_ones_every_format_prints(report, page):
    wide, narrow = layer_table(report.study.summary, wide=True), layer_table(report.study.summary)
    # The report adds two columns to the terminal's, in place; the cells are the same.
    assert wide.columns == (
        "Layer",
        "Type",
        "Output shape",
        "Rounding",
        "Params",
        "Forward FLOPs",
        "Backward FLOPs",
        "Output size",
        "Receptive field",
    )
    assert tuple(column for column in wide.columns if column in narrow.columns) == narrow.columns
    assert wide.rows[1] == (
        "  0.0",
        "Conv2d",
        "8x96x54x54",
        "54.25 -> 54, last 1 real unread",
        "11,712",
        "541.96 MFLOP",
        "541.96 MFLOP",
        "8.54 MiB",
        "11 (jump 4)",
    )
    assert narrow.rows[1] == (
        "  0.0",
        "Conv2d",
        "8x96x54x54",
        "54.25 -> 54, last 1 real unread",
        "11,712",
        "541.96 MFLOP",
        "8.54 MiB",
    )
    saved = saved_table(report.study.train)
    assert saved.rows[0][:4] == ("0.1", "ReLU", "8,957,952", "15.0%")
    page_rows = [
        tuple(re.findall(r"<td[^>]*>(.*?)</td>", row))
        for row in re.findall(r"<tr>(.*?)</tr>", page)
    ]
    for table in (wide, saved):
        expected = [tuple(html_text(cell) for cell in row) for row in table.rows]
        start = page_rows.index(expected[0])
        assert page_rows[start : start + len(expected)] == expected


def test_html_needs_no_network(page):
    assert "<script" not in page and "<link" not in page and "@import" not in page
    urls = set(re.findall(r"https?://[^\"') ]+", page))
    assert urls <= {
        "http://www.w3.org/2000/svg",
        "http://www.w3.org/1999/xlink",
    }  # XML namespaces, never fetched


def test_jupyter_renders_the_report_body(report, page):
    fragment = report._repr_html_()
    assert fragment.startswith('<div class="ninlab-report"><style>')
    assert "<html" not in fragment and fragment.count("<svg") == len(CHART_KEYS)
    assert page.startswith("<!DOCTYPE html>")


def test_save_writes_the_document_atomically(page, saved_html):
    assert saved_html.read_text(encoding="utf-8") == page
    assert [p.name for p in saved_html.parent.iterdir()] == ["report.html"]


def _chromium():
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail(
                "chromium is not installed; CI must install it (apt-get install -y chromium)"
            )
        pytest.skip("chromium is not installed (apt-get install -y chromium); CI runs this test")
    return found


def _headless(chromium, profile, *arguments):
    command = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--enable-logging=stderr",
        "--v=0",
        *arguments,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)


def test_report_renders_in_headless_chromium(saved_html, tmp_path):
    chromium = _chromium()
    url = saved_html.as_uri()
    dom = _headless(chromium, tmp_path / "profile", "--dump-dom", url)
    # Console messages (errors from the page) are logged as CONSOLE(line) on stderr.
    assert not [line for line in dom.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    for key in CHART_KEYS:
        assert re.search(rf'<figure id="chart-{key}"><svg[^>]*viewBox', dom.stdout)
    assert dom.stdout.count("<svg") == len(CHART_KEYS)
    screenshot = tmp_path / "report.png"
    shot = _headless(
        chromium, tmp_path / "profile", "--window-size=1280,4000", f"--screenshot={screenshot}", url
    )
    assert not [line for line in shot.stderr.splitlines() if "CONSOLE" in line]
    with Image.open(screenshot) as image:
        assert image.size == (1280, 4000)
        # Not a blank page: the charts put many colours on it.
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 100


def test_cli_report(tmp_path, capsys):
    path = tmp_path / "nin.html"
    assert (
        main(["report", "--input", "1x96x96", "--batch", "2", "--budget", "64MiB", "-o", str(path)])
        == 0
    )
    assert f"wrote {path}" in capsys.readouterr().out
    assert path.read_text(encoding="utf-8").count("<svg") == len(CHART_KEYS)
    assert main(["report", "-o", str(tmp_path / "missing" / "r.html")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_report_and_plot_refuse_an_unsupported_suffix_alike(tmp_path, capsys):
    """`report -o x.txt` once wrote HTML into it; both commands refuse it before any work."""
    path = tmp_path / "x.txt"
    assert main(["report", "-o", str(path)]) == 2
    report_error = capsys.readouterr().err
    assert main(["plot", "flops", "-o", str(path)]) == 2
    plot_error = capsys.readouterr().err
    refusal = f"to {str(path)!r}: unsupported file type; name a"
    assert f"cannot write the report {refusal} .html or .htm file" in report_error
    assert f"cannot write the chart {refusal} .png or .svg file" in plot_error
    assert list(tmp_path.iterdir()) == []


def test_a_batch_over_the_budget_shows_why_where_rounding_would_hide_it():
    from ninlab.viz.report import _over

    budget = 8 << 30
    assert _over(budget + 1_000, budget) == (
        "8.00 GiB: 8,589,935,592 bytes, over the budget's 8,589,934,592"
    )
    assert _over(9 << 30, budget) == "9.00 GiB"


def test_cli_report_on_a_model_the_default_budget_does_not_bound(tmp_path, capsys):
    """A tiny model fits the default 8 GiB at every batch searched: the report once refused it
    whole ("give a smaller budget"); it is written without its batch section, which says why."""
    source = tmp_path / "tiny.py"
    source.write_text("from torch import nn\nmodel = nn.Sequential(nn.Linear(4, 2))\n")
    path = tmp_path / "tiny.html"
    argv = ["report", "--model", f"{source}:model", "--input", "4", "--batch", "2", "-o", str(path)]
    assert main(argv) == 0
    page = path.read_text(encoding="utf-8")
    assert (
        "No batch size to show: budget 8.00 GiB fits even batch 16,777,216, the largest "
        "searched; give a smaller budget." in page
    )
    assert 'id="chart-batch"' not in page and 'id="chart-train-timeline"' in page
