"""Input files, one way for all of ninlab: a file ninlab reads (an image, an IDX file, a
checkpoint, a step's .py file) is a regular file, checked before it is opened.

Opening a FIFO for reading waits for a writer, forever if none comes (`ninlab predict RUN
fifo.png` once hung so); a device may never end, and a directory or a socket cannot be read as a
file. `regular_file` refuses each in one `NinlabError` naming the file, what it is, and the fix. A
path that does not exist or cannot be searched is left to the reader that opens it, whose message
already names its own fix.

Shared by the trainer, the accountant's step option and the CLI, so it imports only
`ninlab.errors` and the standard library.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ninlab.errors import NinlabError

__all__ = ["regular_file"]

# What a path is when it is not a regular file, in the words of `ls -l`'s first letter.
_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def regular_file(path: str | os.PathLike[str], *, what: str, fix: str) -> Path:
    """`path` as a Path if it is a regular file (through any symbolic link) or does not exist;
    otherwise a `NinlabError`: "`what` PATH is a FIFO (named pipe), not a regular file; `fix`"."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):  # missing, unsearchable, a NUL in the name: the reader says so
        return path
    if stat.S_ISREG(mode):
        return path
    kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
    raise NinlabError(f"{what} {path} is {kind}, not a regular file; {fix}")
