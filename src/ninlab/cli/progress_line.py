"""What a long command is doing, as one transient line on stderr.

`summary --fit`, `measure` and `report` can take from seconds to minutes (many exact predictions,
real steps); a terminal that shows nothing for that long looks hung. `progress_line` shows a rich
status line (a spinner and the stage, which the command updates) once the work has taken
`DELAY_S`, and removes it when the work ends, so a quick answer never flickers and the output
that follows is as it would be without it. Nothing is written when stderr is not a terminal (a
pipe, a file, a test) or when the command's output is for a program (JSON, CSV: `quiet`).
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Callable, Iterator
from typing import TextIO

from rich.console import Console
from rich.status import Status

__all__ = ["DELAY_S", "progress_line"]

DELAY_S = 2.0
"""How long the work runs before the line appears."""


@contextlib.contextmanager
def progress_line(
    text: str, *, quiet: bool = False, stream: TextIO | None = None, delay_s: float = DELAY_S
) -> Iterator[Callable[[str], None]]:
    """Within the block, a status line saying `text` on `stream` (stderr), shown after `delay_s`;
    gives a function that changes what it says (the next stage)."""
    stream = sys.stderr if stream is None else stream
    if quiet or not stream.isatty():
        yield lambda _text: None
        return
    lock = threading.Lock()
    said = [text]
    status: list[Status] = []

    def show() -> None:
        with lock:
            if said:  # the block has not ended
                status.append(Console(file=stream, stderr=True).status(said[0]))
                status[0].start()

    def update(new_text: str) -> None:
        with lock:
            said[0] = new_text
            if status:
                status[0].update(new_text)

    timer = threading.Timer(delay_s, show)
    timer.daemon = True
    timer.start()
    try:
        yield update
    finally:
        timer.cancel()
        with lock:
            said.clear()
            if status:
                status[0].stop()
