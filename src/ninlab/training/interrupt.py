"""Stopping a run cleanly: Ctrl-C or SIGTERM asks, and the loop saves after the current step."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from types import FrameType

__all__ = ["StopRequest"]


class StopRequest:
    """Set by Ctrl-C or SIGTERM; the loop saves a checkpoint after the current step and returns.

    A second Ctrl-C interrupts at once (the last epoch's checkpoint is still intact)."""

    def __init__(self) -> None:
        self.requested = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    @contextlib.contextmanager
    def catching_signals(self) -> Iterator[StopRequest]:
        previous = {
            sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
