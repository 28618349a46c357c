"""A long command's transient status line: on a terminal only, after its delay, gone at the end,
and never in JSON/CSV mode."""

from __future__ import annotations

import contextlib
import io
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cli_run import run

from ninlab.cli import plot, report, summary
from ninlab.cli.progress_line import progress_line

_MODULE = """
import torch
from torch import nn


def linear():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 4))
"""
# A small model (a few traces a plan) and a budget that fits a few thousand samples of it
_SMALL = ("--model", "small_models:linear", "--input", "16", "--batch", "2")
_BUDGET = "1MiB"


@pytest.fixture
def small_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    (tmp_path / "small_models.py").write_text(_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("small_models", None)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_sees_the_stage_once_the_delay_has_passed() -> None:
    terminal = _Terminal()
    with progress_line("first stage", stream=terminal, delay_s=0.05) as stage:
        time.sleep(0.3)
        stage("second stage")
        time.sleep(0.3)
    written = terminal.getvalue()
    assert "first stage" in written
    assert "second stage" in written


def test_a_quick_answer_shows_nothing() -> None:
    terminal = _Terminal()
    with progress_line("quick", stream=terminal, delay_s=5) as stage:
        stage("still quick")
    time.sleep(0.1)
    assert terminal.getvalue() == ""


@pytest.mark.parametrize("quiet", [True, False])
def test_a_pipe_or_a_quiet_command_sees_nothing(quiet: bool) -> None:
    stream = _Terminal() if quiet else io.StringIO()
    with progress_line("working", stream=stream, quiet=quiet, delay_s=0):
        time.sleep(0.2)
    assert stream.getvalue() == ""


def test_a_command_on_a_pipe_prints_only_its_answer(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "summary", "--batch", "1")  # a table: not quiet, but a pipe
    assert code == 0
    assert out.startswith("nin-d2l: batch 1")
    assert err == ""


class _Stages:
    """A stand-in for `progress_line` that keeps every stage it is told."""

    def __init__(self) -> None:
        self.said: list[str] = []

    @contextlib.contextmanager
    def __call__(self, text: str, **_options: object) -> Iterator[Callable[[str], None]]:
        self.said.append(text)
        yield self.said.append


def test_summary_fit_names_each_part_of_the_study_and_each_alternative(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, small_models: None
) -> None:
    stages = _Stages()
    monkeypatch.setattr(summary, "progress_line", stages)
    code, _, _ = run(capsys, "summary", *_SMALL, "--fit", _BUDGET)
    assert code == 0
    fitting = f"fitting small_models:linear into {_BUDGET}: "
    said = [text.removeprefix(fitting) for text in stages.said if text.startswith(fitting)]
    plan = "the budget plan at batch 2: "
    assert said[:3] == ["the largest batch", "the peak's line", f"{plan}as given"]
    assert {f"{plan}checkpoint 0", f"{plan}accumulation", f"{plan}adam"} <= set(said)


def test_plot_shows_a_status_line_while_its_chart_is_computed(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    small_models: None,
) -> None:
    stages = _Stages()
    monkeypatch.setattr(plot, "progress_line", stages)
    chart = tmp_path / "batch.png"
    code, out, _ = run(capsys, "plot", "batch", *_SMALL, "--budget", _BUDGET, "-o", str(chart))
    assert code == 0 and out == f"wrote {chart}\n"
    assert stages.said == ["computing the batch chart of small_models:linear"]


def test_report_names_each_part_of_its_study(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    small_models: None,
) -> None:
    stages = _Stages()
    monkeypatch.setattr(report, "progress_line", stages)
    page = tmp_path / "report.html"
    code, _, _ = run(capsys, "report", *_SMALL, "--budget", _BUDGET, "-o", str(page))
    assert code == 0 and page.exists()
    studying = "studying small_models:linear for the report"
    assert stages.said == [
        studying,
        *(
            f"{studying}: {part}"
            for part in (
                "the summary and the memory of a training step and an inference at batch 2",
                "the largest batch",
                "the peak's line",
            )
        ),
    ]
