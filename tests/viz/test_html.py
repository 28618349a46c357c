"""Results as a notebook shows them: HTML tables with the terminal's words and numbers, escaped, and
charts as PNG."""

import subprocess
import sys
from html.parser import HTMLParser

import pytest

from ninlab.analysis.predict import predict_memory
from ninlab.analysis.summary import summarize
from ninlab.models import build_nin
from ninlab.studies.compare import compare
from ninlab.units import format_bytes
from ninlab.viz.charts import flops_chart
from ninlab.viz.compare import comparison_html
from ninlab.viz.html import html_table
from ninlab.viz.render import summary_html
from ninlab.viz.render_memory import memory_html
from ninlab.viz.table import TextTable


@pytest.fixture(scope="module")
def summary():
    return summarize(build_nin(), input_size=(1, 224, 224), batch_size=128, model_name="nin-d2l")


def test_the_summary_table_holds_every_layer_and_the_totals(summary):
    page = summary_html(summary)
    assert page.count("<tr>") == len(
        summary.layers
    )  # the header and one row per layer but the model
    assert "54.25 -&gt; 54, last 1 real unread" in page
    assert "Parameters: 1,992,166 (1,989,928 weights + 2,238 biases;" in page
    assert "Smallest valid input: 1x67x67" in page
    assert "&nbsp;&nbsp;0.0" in page  # a nested layer keeps its indent


def test_every_text_is_escaped():
    page = html_table(
        TextTable(("a<b",), frozenset(), (("x & <script>",),)), caption="<i>c</i>", notes=["1 < 2"]
    )
    assert "<script>" not in page and "<i>" not in page
    assert (
        "a&lt;b" in page
        and "x &amp; &lt;script&gt;" in page
        and "&lt;i&gt;c&lt;/i&gt;" in page
        and "1 &lt; 2" in page
    )
    named = summarize(build_nin(), input_size=(1, 96, 96), batch_size=1, model_name="<NiN & co>")
    assert "&lt;NiN &amp; co&gt;: batch 1 x 1x96x96" in summary_html(named)


def test_the_memory_tables_hold_the_peak_its_parts_and_the_forum_rule():
    report = predict_memory(build_nin(), input_size=(1, 224, 224), batch_size=128)
    page = memory_html(report)
    assert (
        f"Live tensor peak: {format_bytes(report.live_peak_bytes)} ({report.live_peak_bytes:,} "
        "bytes)"
    ) in page
    assert f">{report.breakdown.of('saved_for_backward'):,}</td>" in page
    assert f"Kept for backward: {report.saved_total_bytes / 2**20:.2f} MiB" in page
    assert f"{report.forum.ratio:.2f}x ours" in page


def test_a_comparison_renders_with_its_differences():
    comparison = compare(["nin-d2l", "nin-d2l:num_1x1=1"], input_size=(1, 224, 224), batch_size=2)
    page = comparison_html(comparison)
    assert ">1,992,166</td>" in page
    assert '>1,769,112<br><small style="white-space:normal">(-223,054, -11.2%)</small></td>' in page
    assert (
        "nin-d2l:num_1x1=1: d2l.ai&#x27;s NiN, exactly as the chapter builds it; with num_1x1=1"
        in page
    )


class _Widths(HTMLParser):
    """The narrowest each column of an HTML table can be, in characters: a cell's text that may
    not wrap (white-space:nowrap) whole, else its longest word."""

    def __init__(self) -> None:
        super().__init__()
        self.columns: dict[int, int] = {}
        self.column, self.nowrap = -1, [False]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        style = dict(attrs).get("style") or ""
        if tag == "tr":
            self.column = -1
        if tag in ("td", "th"):
            self.column += 1
        if tag in ("td", "th", "small"):
            self.nowrap.append("white-space:nowrap" in style)

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th", "small"):
            self.nowrap.pop()

    def handle_data(self, data: str) -> None:
        if self.column < 0 or len(self.nowrap) < 2:
            return  # the caption, the notes
        width = len(data) if self.nowrap[-1] else max(map(len, data.split()), default=0)
        self.columns[self.column] = max(self.columns.get(self.column, 0), width)


def test_the_notebooks_five_variants_fit_a_page():
    # The notebook's comparison; its differences once made every column 35 characters wide, the
    # table 157 characters at the least, wider than a notebook's page.
    comparison = compare(
        ["nin-d2l", "nin-d2l:num_1x1=1", "nin-d2l-no-squeeze", "nin-vgg11", "nin-vgg16"],
        input_size=(1, 224, 224),
        batch_size=128,
    )
    widths = _Widths()
    widths.feed(comparison_html(comparison).split("</table>")[0])
    assert len(widths.columns) == 6
    assert sum(widths.columns.values()) + 2 * len(widths.columns) <= 100, widths.columns  # padding


def test_a_chart_shows_itself_as_png(summary):
    assert flops_chart(summary)._repr_png_().startswith(b"\x89PNG\r\n\x1a\n")


def test_ipython_shows_the_accountants_results_as_html_once_ninlab_is_imported():
    # The accountant and the studies import nothing from the visuals; the front door registers
    # their renderers with the running IPython, by class name. A fresh process, as a kernel is.
    code = (
        "from IPython.core.interactiveshell import InteractiveShell\n"
        "shell = InteractiveShell.instance()\n"
        "import ninlab\n"
        "from ninlab.studies.compare import compare\n"
        "model = ninlab.build_nin()\n"
        "for result in (ninlab.summarize(model, input_size=(1, 96, 96), batch_size=2),\n"
        "               ninlab.predict_memory(model, input_size=(1, 96, 96), batch_size=2),\n"
        "               compare(['nin-d2l'], input_size=(1, 96, 96), batch_size=2)):\n"
        "    data, _ = shell.display_formatter.format(result)\n"
        "    html = data['text/html']\n"
        "    print(sorted(data), 'Parameters: 1,992,166' in html, 'Live tensor peak' in html,\n"
        "          '>1,992,166</td>' in html)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.splitlines() == [
        "['text/html', 'text/plain'] True False False",
        "['text/html', 'text/plain'] False True False",
        "['text/html', 'text/plain'] False False True",
    ]
