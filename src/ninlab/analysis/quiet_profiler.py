"""The PyTorch profiler without its noise: Kineto, its C++ side, prints lines such as
"USDT: ... profiler_start" and "profiler_stop" (and, in a CUDA build on a machine without a GPU,
an ERROR about the device count) straight to the process's stderr as a profile starts and stops,
whatever Python's sys.stderr is, and an environment variable silences it only when set before
the first profile of the process. So the file descriptors themselves point at /dev/null while a
profile starts and while it stops, and only then: what the profiled code prints still shows."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any

from torch.profiler import profile

__all__ = ["quiet_profile"]


@contextlib.contextmanager
def _descriptors_silenced() -> Iterator[None]:
    """stdout and stderr, at the file-descriptor level, to /dev/null for the block."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed or replaced stream: nothing to flush
            stream.flush()
    saved = [os.dup(fd) for fd in (1, 2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in (1, 2):
            os.dup2(devnull, fd)
        yield
    finally:
        for fd, copy in zip((1, 2), saved):
            os.dup2(copy, fd)
            os.close(copy)
        os.close(devnull)


@contextlib.contextmanager
def quiet_profile(**options: Any) -> Iterator[profile]:
    """`torch.profiler.profile(**options)`, entered and left with its C++ messages silenced."""
    profiler = profile(**options)
    with _descriptors_silenced():
        profiler.__enter__()
    try:
        yield profiler
    except BaseException:
        with _descriptors_silenced():
            if not profiler.__exit__(*sys.exc_info()):
                raise
    else:
        with _descriptors_silenced():
            profiler.__exit__(None, None, None)
