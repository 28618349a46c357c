"""`ninlab ARGV` run in the test's own process, for the tests that check what a command prints."""

from __future__ import annotations

import pytest

from ninlab.cli import main


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Exit code (argparse's own exits included), stdout and stderr of `ninlab ARGV`."""
    try:
        code = main(list(argv))
    except SystemExit as exit:
        code = int(exit.code or 0)
    out, err = capsys.readouterr()
    return code, out, err
