"""Stopping cleanly: Ctrl-C, SIGTERM or a closed terminal (SIGHUP) asks, and whoever holds the
request decides when to act on it: the training loop saves after the current step; the command
line's start-up raises it once its imports are done (`held_interrupts`)."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from types import FrameType

__all__ = ["StopRequest", "held_interrupts"]

# SIGHUP: the terminal closed (an ssh session dropped); Windows has no such signal.
_SIGNALS = tuple(
    sig for sig in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if sig
)


class StopRequest:
    """Set by Ctrl-C, SIGTERM or SIGHUP; the loop saves a checkpoint after the current step and
    returns.

    A second Ctrl-C interrupts at once (the last epoch's checkpoint is still intact)."""

    def __init__(self) -> None:
        self.requested = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        if signal.getsignal(signal.SIGINT) == self._handle:  # not when SIGINT is ignored
            signal.signal(signal.SIGINT, signal.default_int_handler)

    @contextlib.contextmanager
    def catching_signals(self) -> Iterator[StopRequest]:
        # A signal the process was started to ignore stays ignored: `nohup` ignores SIGHUP so
        # that the run outlives its terminal; a shell ignores SIGINT in background jobs.
        previous = {
            sig: signal.signal(sig, self._handle)
            for sig in _SIGNALS
            if signal.getsignal(sig) is not signal.SIG_IGN
        }
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


@contextlib.contextmanager
def held_interrupts() -> Iterator[None]:
    """A Ctrl-C (or SIGTERM, SIGHUP) during the block is held until the block ends, then raised
    as KeyboardInterrupt. Imports need this: PyTorch's import of NumPy swallows a
    KeyboardInterrupt (the Ctrl-C is lost), and an import interrupted midway leaves half a module
    behind for the next import to fail on. A second Ctrl-C interrupts at once."""
    stop = StopRequest()
    with stop.catching_signals():
        yield
    if stop.requested:
        raise KeyboardInterrupt
