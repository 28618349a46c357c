"""A run directory is owned by one run at a time.

`owning(directory)` creates the directory if needed and takes its lock file, `.ninlab.lock`: an
exclusive `flock` on it, held until the run ends, with the owner's pid and host written inside
for the message a second run gets. The operating system releases a `flock` when its process dies,
however it dies, so a killed run never holds its directory forever; a second live run is refused
in one line. Once owned, the temporaries that a killed save left behind are removed (no other
process writes there). Directories that the run created and left empty (a configuration or the
data refused before anything was written) are removed again, its parents' included.

Where `fcntl` is missing (Windows), the lock file is created exclusively instead and taken over
when the pid inside it is no longer running on this host.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from ninlab.errors import NinlabError
from ninlab.outputs import output_directory, remove_stale_temporaries

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_NAME", "owning"]

LOCK_NAME = ".ninlab.lock"


@contextlib.contextmanager
def owning(directory: Path, *, option: str = "--output-dir") -> Iterator[Path]:
    """Own `directory` (created if missing) for the block; refuse with a `NinlabError` while
    another live process owns it."""
    created = _missing(directory)
    output_directory(directory, option=option)
    lock = directory / LOCK_NAME
    descriptor = _take(lock, directory, option)
    try:
        remove_stale_temporaries(directory)
        yield directory
    finally:
        _release(lock, descriptor)
        for path in created:
            with contextlib.suppress(OSError):  # not empty: the run wrote something; keep it
                path.rmdir()


def _missing(directory: Path) -> list[Path]:
    """The directory and those of its parents that do not exist yet, deepest first."""
    missing = []
    for path in (directory, *directory.parents):
        if path.exists():
            break
        missing.append(path)
    return missing


def _owner_text() -> str:
    return f"{os.getpid()} {socket.gethostname()}\n"


def _refusal(directory: Path, lock: Path, option: str) -> NinlabError:
    try:
        pid, host = lock.read_text().split()
        owner = f"pid {pid} on {host}"
    except (OSError, ValueError):
        owner = "another process"
    return NinlabError(
        f"{directory} is in use by another ninlab run ({owner}); wait for it to end or choose "
        f"another {option}"
    )


def _take(lock: Path, directory: Path, option: str) -> int:
    if fcntl is None:
        return _take_by_pid(lock, directory, option)
    while True:
        descriptor = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            raise _refusal(directory, lock, option) from None
        # The previous owner may have removed the file between our open and our lock: then this
        # lock is on a file nobody else will see; take the new one.
        try:
            same = os.path.samestat(os.fstat(descriptor), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(descriptor, 0)
            os.write(descriptor, _owner_text().encode())
            return descriptor
        os.close(descriptor)


def _take_by_pid(lock: Path, directory: Path, option: str) -> int:
    for _ in range(2):
        try:
            descriptor = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            if not _owner_is_gone(lock):
                raise _refusal(directory, lock, option) from None
            lock.unlink(missing_ok=True)
            continue
        os.write(descriptor, _owner_text().encode())
        return descriptor
    raise _refusal(directory, lock, option)


def _owner_is_gone(lock: Path) -> bool:
    try:
        pid, host = lock.read_text().split()
        if host != socket.gethostname():
            return False  # cannot tell: a run on another machine may still be going
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (OSError, ValueError):
        return False
    return False


def _release(lock: Path, descriptor: int) -> None:
    # Removed while still locked, so that no one takes a lock on a file about to disappear.
    lock.unlink(missing_ok=True)
    os.close(descriptor)
