"""What a training run shows: a live bar per epoch, a line per epoch, warnings.

The trainer calls a `Reporter`; `RichReporter` draws with rich on a terminal, `NotebookReporter`
draws the same bar in a Jupyter cell, `SilentReporter` (ranks other than 0, library use, tests)
draws nothing. Formatting lives here, never in the training loop.
"""

from __future__ import annotations

import contextlib
import io
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from rich.console import Console, Group
from rich.panel import Panel
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

__all__ = [
    "NotebookReporter",
    "Reporter",
    "RichReporter",
    "SilentReporter",
    "download_progress",
    "format_duration",
]


def format_duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


DownloadHook = Callable[[str, int, "int | None"], None]


class Reporter(Protocol):
    def info(self, message: str) -> None: ...

    def warn(self, message: str) -> None: ...

    def epoch_started(self, epoch: int, epochs: int, batches: int, done: int) -> None: ...

    def batch_done(
        self, done: int, loss: float, accuracy: float, examples_per_s: float
    ) -> None: ...

    def epoch_finished(self, line: str) -> None: ...


class SilentReporter:
    def info(self, message: str) -> None:
        pass

    def warn(self, message: str) -> None:
        pass

    def epoch_started(self, epoch: int, epochs: int, batches: int, done: int) -> None:
        pass

    def batch_done(self, done: int, loss: float, accuracy: float, examples_per_s: float) -> None:
        pass

    def epoch_finished(self, line: str) -> None:
        pass


class RichReporter:
    """A rich progress bar: epoch, batches, loss, accuracy, examples/s and the epoch's ETA."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self._progress: Progress | None = None
        self._task = 0

    def info(self, message: str) -> None:
        self.console.print(message, highlight=False)

    def warn(self, message: str) -> None:
        self.console.print(
            Panel(message, title="warning", border_style="bold red"), style="bold red"
        )

    def epoch_started(self, epoch: int, epochs: int, batches: int, done: int) -> None:
        self._progress = _epoch_bar(epoch, epochs, self.console)
        self._task = self._progress.add_task("train", total=batches, completed=done, stats="")
        self._progress.start()

    def batch_done(self, done: int, loss: float, accuracy: float, examples_per_s: float) -> None:
        if self._progress is not None:
            self._progress.update(
                self._task, completed=done, stats=_stats(loss, accuracy, examples_per_s)
            )

    def epoch_finished(self, line: str) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        self.console.print(line, highlight=False)


def _epoch_bar(epoch: int, epochs: int, console: Console) -> Progress:
    return Progress(
        TextColumn(f"epoch {epoch}/{epochs}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[stats]}"),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )


def _stats(loss: float, accuracy: float, examples_per_s: float) -> str:
    return f"loss {loss:.4f}  acc {accuracy:.3f}  {examples_per_s:,.0f} ex/s"


class NotebookReporter:
    """`RichReporter`'s bar in a Jupyter cell: one output per epoch, redrawn in place at most every
    `interval` seconds, holding the epoch's messages above its bar and, once the epoch ends, its
    line instead of the bar. (rich's own live display needs ipywidgets and leaves nothing in a
    saved notebook; printing every update would fill the cell.) Needs IPython, as Jupyter has."""

    def __init__(self, *, interval: float = 0.5) -> None:
        from IPython.display import display  # only a notebook's reporter needs IPython

        self._display = display
        self._interval = interval
        self._progress: Progress | None = None
        self._task = TaskID(0)
        self._messages: list[Any] = []  # said during the epoch, shown above its bar in order
        self._handle: Any = None
        self._drawn_at = 0.0

    def info(self, message: str) -> None:
        self._say(message)

    def warn(self, message: str) -> None:
        self._say(Panel(message, title="warning", border_style="bold red"))

    def epoch_started(self, epoch: int, epochs: int, batches: int, done: int) -> None:
        self._progress = _epoch_bar(epoch, epochs, Console(file=io.StringIO()))
        self._task = self._progress.add_task("train", total=batches, completed=done, stats="")
        self._messages = []
        self._handle = self._display(
            _rendered(self._progress.get_renderable()), raw=True, display_id=True
        )
        self._drawn_at = time.monotonic()

    def batch_done(self, done: int, loss: float, accuracy: float, examples_per_s: float) -> None:
        if self._progress is None:
            return
        self._progress.update(
            self._task, completed=done, stats=_stats(loss, accuracy, examples_per_s)
        )
        if time.monotonic() - self._drawn_at >= self._interval:
            self._redraw(self._progress.get_renderable())

    def epoch_finished(self, line: str) -> None:
        if self._handle is None:
            self._say(line)
            return
        self._redraw(line)
        self._progress = self._handle = None

    def _say(self, message: Any) -> None:
        if self._progress is None:
            self._display(_rendered(message), raw=True)
        else:
            self._messages.append(message)
            self._redraw(self._progress.get_renderable())

    def _redraw(self, last: Any) -> None:
        self._handle.update(_rendered(Group(*self._messages, last)), raw=True)
        self._drawn_at = time.monotonic()


def _rendered(renderable: Any) -> dict[str, str]:
    """A rich renderable as a notebook output: HTML (colours kept) and plain text."""
    console = Console(
        file=io.StringIO(),
        record=True,
        width=110,
        color_system="truecolor",
        force_jupyter=False,
        highlight=False,
    )
    console.print(renderable)
    page = '<pre style="line-height:1.25;font-family:monospace;margin:0">{code}</pre>'
    return {
        "text/html": console.export_html(inline_styles=True, code_format=page, clear=False),
        "text/plain": console.export_text(),
    }


@contextlib.contextmanager
def download_progress(console: Console | None = None) -> Iterator[DownloadHook]:
    """A hook for `ninlab.training.data.load_fashion_mnist` that shows one bar per downloaded file;
    it draws nothing unless a download actually happens."""
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console or Console(stderr=True),
    )
    tasks: dict[str, TaskID] = {}

    def hook(name: str, received: int, total: int | None) -> None:
        if name not in tasks:
            if not tasks:
                progress.start()
            tasks[name] = progress.add_task(f"downloading {name}", total=total)
        progress.update(tasks[name], completed=received)

    try:
        yield hook
    finally:
        if tasks:
            progress.stop()
