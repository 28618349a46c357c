"""What a training run shows on the terminal: a live bar per epoch, a line per epoch, warnings.

The trainer calls a `Reporter`; `RichReporter` draws with rich, `SilentReporter` (ranks other
than 0, library use, tests) draws nothing. Formatting lives here, never in the training loop.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Protocol

from rich.console import Console
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

__all__ = ["Reporter", "RichReporter", "SilentReporter", "download_progress", "format_duration"]


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

    def batch_done(self, done: int, loss: float, accuracy: float, examples_per_s: float) -> None: ...

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
        self.console.print(Panel(message, title="warning", border_style="bold red"), style="bold red")

    def epoch_started(self, epoch: int, epochs: int, batches: int, done: int) -> None:
        self._progress = Progress(
            TextColumn(f"epoch {epoch}/{epochs}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
        )
        self._task = self._progress.add_task("train", total=batches, completed=done, stats="")
        self._progress.start()

    def batch_done(self, done: int, loss: float, accuracy: float, examples_per_s: float) -> None:
        if self._progress is not None:
            stats = f"loss {loss:.4f}  acc {accuracy:.3f}  {examples_per_s:,.0f} ex/s"
            self._progress.update(self._task, completed=done, stats=stats)

    def epoch_finished(self, line: str) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        self.console.print(line, highlight=False)


@contextlib.contextmanager
def download_progress(console: Console | None = None) -> Iterator[DownloadHook]:
    """A hook for `ninlab.training.data.load_fashion_mnist` that shows one bar per downloaded file; it
    draws nothing unless a download actually happens."""
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
