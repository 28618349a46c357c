"""A run outlives its console. When whatever reads a run's output goes away (`| head` exits, a
`timeout ... cat` ends, an ssh session drops), the next write to stdout or stderr raises
BrokenPipeError (EIO on a terminal that is gone), which would end hours of training with nothing
said. While `outliving_console` lasts, such a stream is pointed at /dev/null instead and the run
goes on; the loss, and everything written to either stream afterwards, go to `console.log` in the
run directory, the one place left to say it.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from ninlab.errors import NinlabError

__all__ = ["CONSOLE_LOG_NAME", "outliving_console"]

CONSOLE_LOG_NAME = "console.log"


class _SurvivingStream(io.TextIOBase):
    """`stream` (sys.stdout or sys.stderr) whose writes never raise: once the stream fails, its
    file descriptor is pointed at /dev/null and what is written goes to the log."""

    def __init__(self, stream: TextIO, name: str, log: Path) -> None:
        self._stream = stream
        self._name = name
        self.log = log
        self.lost = False

    def write(self, text: str) -> int:
        if not self.lost:
            try:
                written = self._stream.write(text)
                # At once, so that a reader gone is seen inside the guard and what follows is
                # logged (a block-buffered pipe would show it only at the interpreter's exit).
                self._stream.flush()
                return written
            except OSError as error:
                self._lose(error)
        _append(self.log, text)
        return len(text)

    def flush(self) -> None:
        if not self.lost:
            try:
                self._stream.flush()
            except OSError as error:
                self._lose(error)

    def _lose(self, error: OSError) -> None:
        self.lost = True
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)
            self._stream.flush()  # what was buffered for the closed reader goes nowhere
        when = time.strftime("%Y-%m-%d %H:%M:%S")
        _append(
            self.log,
            f"ninlab: {when}: {self._name} was closed ({error.strerror or error}); the run goes "
            f"on, and what it says from here is written to this file\n",
        )

    # rich asks the stream whether it is a terminal, its encoding, its descriptor.
    def isatty(self) -> bool:
        return not self.lost and self._stream.isatty()

    def fileno(self) -> int:
        return self._stream.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self._stream.encoding

    def writable(self) -> bool:
        return True


def _append(log: Path, text: str) -> None:
    """`text` added to `log` if its directory exists (a run refused before it made its directory
    leaves none behind); a log that cannot be written is given up, as the console was."""
    if log.parent.is_dir():
        with contextlib.suppress(OSError), open(log, "a", encoding="utf-8") as handle:
            handle.write(text)


@contextlib.contextmanager
def outliving_console(run_dir: Path) -> Iterator[None]:
    """stdout and stderr that survive their reader for the block; the loss is written to
    `run_dir`/console.log, and so is how the block ended when that was an error or a stop."""
    streams = {"stdout": sys.stdout, "stderr": sys.stderr}
    surviving = {
        name: _SurvivingStream(stream, name, run_dir / CONSOLE_LOG_NAME)
        for name, stream in streams.items()
    }
    sys.stdout, sys.stderr = surviving["stdout"], surviving["stderr"]
    try:
        yield
    except NinlabError as error:
        _ending(surviving, f"ninlab: error: {error}\n")
        raise
    except KeyboardInterrupt:
        _ending(surviving, "ninlab: interrupted\n")
        raise
    finally:
        sys.stdout, sys.stderr = streams["stdout"], streams["stderr"]


def _ending(surviving: dict[str, _SurvivingStream], line: str) -> None:
    """The error line the command line is about to print, kept in the log when stderr is lost."""
    if surviving["stderr"].lost:
        _append(surviving["stderr"].log, line)
