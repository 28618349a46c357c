"""A long command's transient status line: on a terminal only, after its delay, gone at the end,
and never in JSON/CSV mode."""

from __future__ import annotations

import io
import time

import pytest
from cli_run import run

from ninlab.cli.progress_line import progress_line


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
