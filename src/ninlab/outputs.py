"""Output files, one way for all of ninlab: check where a file may go before the work that makes
it, then write it whole or not at all.

`output_path` refuses a path the caller cannot write with a one-line `NinlabError` naming the path
and the fix, so a command fails in its first second rather than after minutes of work.
`atomic_write` writes a temporary file beside the target and renames it into place: a reader sees
the previous file or the new one, never half of one, and a failure (an exception, Ctrl-C) leaves
the previous file untouched and no temporary behind. A write that fails (a full disk, a lost
permission) is one `NinlabError` naming the file and saying "disk full" when it is; a process
killed mid-write leaves its temporary, which `remove_stale_temporaries` clears for the next owner
of the directory.

`json_text` is every JSON text ninlab writes or prints: strict JSON (RFC 8259 has no NaN or
Infinity, which Python's json module writes by default and other readers refuse), a value that is
not a finite number written as null with a `NinlabWarning` naming it.

Shared by the trainer and the visuals, so it imports only `ninlab.errors` and the standard library.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import secrets
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any, NoReturn

from ninlab.errors import NinlabError, NinlabWarning

__all__ = [
    "atomic_write",
    "disk_error",
    "json_text",
    "output_directory",
    "output_path",
    "remove_stale_temporaries",
    "write_text_atomically",
]


def output_path(
    path: str | os.PathLike[str],
    *,
    suffixes: Sequence[str] = (".png", ".svg"),
    what: str = "chart",
    option: str = "-o",
) -> Path:
    """`path` if the `what` can be written there: a file name ending in one of `suffixes` (any
    case), not a directory or device, in an existing directory this process may write in.
    `option` is the command-line option the fix names."""
    given = os.fspath(path)  # the messages show the path as the user spelled it
    path = Path(given)
    name_a_file = f"name a {' or '.join(suffixes)} file"
    # Path("") is "."; "/" and ".." have no file name either.
    if path.name in ("", ".."):
        _refuse(given, what, f"it has no file name; {name_a_file}")
    if path.is_dir():
        _refuse(given, what, f"it is a directory; {name_a_file} inside it")
    if path.exists() and not path.is_file():
        _refuse(given, what, f"it is not a regular file; choose another {option}")
    if path.suffix.lower() not in suffixes:
        _refuse(given, what, f"unsupported file type; {name_a_file}")
    problem = _directory_problem(path.parent, option=option)
    if problem:
        _refuse(given, what, problem)
    return path


def output_directory(path: str | os.PathLike[str], *, option: str = "--output-dir") -> Path:
    """`path`, created with its parents if missing, if this process may write files in it."""
    if not os.fspath(path):  # Path("") is ".": an empty name would write into the working directory
        raise NinlabError(f"{option} is an empty name; name a directory")
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise NinlabError(_dangling(path, option))
    if path.exists() and not path.is_dir():
        raise NinlabError(f"{path} is a file, not a directory; choose another {option}")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise NinlabError(
            f"cannot create output directory {path} ({error.strerror}); choose another {option}"
        ) from None
    problem = _directory_problem(path, option=option)
    if problem:
        raise NinlabError(problem)
    return path


def _directory_problem(directory: Path, *, option: str) -> str | None:
    """Why files cannot be written in `directory`, with the fix; None if they can."""
    if directory.is_symlink() and not directory.exists():
        return _dangling(directory, option)
    if not directory.exists():
        return f"directory {str(directory)!r} does not exist; create it or choose another {option}"
    if not directory.is_dir():
        return f"{str(directory)!r} is not a directory; choose another {option}"
    # Creating a file needs write and search permission on its directory.
    if not os.access(directory, os.W_OK | os.X_OK):
        return (
            f"directory {str(directory)!r} is not writable (permission denied); "
            f"choose another {option}"
        )
    return None


def _dangling(link: Path, option: str) -> str:
    return (
        f"{str(link)!r} is a symbolic link that leads nowhere (a loop or a missing target); "
        f"fix the link or choose another {option}"
    )


def _refuse(path: str, what: str, reason: str) -> NoReturn:
    raise NinlabError(f"cannot write the {what} to {path!r}: {reason}")


@contextlib.contextmanager
def atomic_write(
    path: str | os.PathLike[str], *, durable: bool, text: bool = False
) -> Iterator[IO[Any]]:
    """A file handle (UTF-8 text with `text`, else bytes) on a new temporary file beside `path`,
    renamed over `path` when the block ends without an exception; on any exception, Ctrl-C
    included, the temporary is removed and `path` keeps its previous content.

    `durable` (for files whose loss loses work: checkpoints, metrics, the run's config) flushes
    the bytes and then the rename to disk, so a power cut after the block leaves the new file.
    The final file has the mode a plain `open(path, "w")` gives (0o666 less the umask). The
    handle's `name` is the temporary's path, so a caller can read back what it wrote before the
    rename (the data download verifies its checksum this way).
    """
    path = Path(path)
    # The same directory, so the rename is atomic; a random name, so concurrent writers never
    # share one. Mode "x" creates the file (never reuses one) with open()'s usual permissions,
    # which tempfile.mkstemp (always 0o600) would not give. newline="": "\n" stays "\n".
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}{_TEMPORARY_SUFFIX}")
    options = {"mode": "xt", "encoding": "utf-8", "newline": ""} if text else {"mode": "xb"}
    # Opened before the `try`: a failed open has created nothing to remove.
    try:
        handle = open(temporary, **options)  # noqa: SIM115 (closed below, before the rename)
    except OSError as error:
        raise disk_error(path, error) from None
    try:
        with handle:
            try:
                yield handle
            except OSError as error:
                # The block's own writes: a full disk is reported as one; any other OSError is
                # the caller's to explain (a download's network error is an OSError too).
                if error.errno in _DISK_FULL:
                    raise disk_error(path, error) from None
                raise _CallersError(error) from None
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(temporary, path)
        if durable:
            _sync_directory(path.parent)
    except _CallersError as wrapped:
        temporary.unlink(missing_ok=True)
        raise wrapped.error from None
    except OSError as error:  # flushing, closing (the last buffered bytes), the rename
        temporary.unlink(missing_ok=True)
        raise disk_error(path, error) from None
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


class _CallersError(Exception):
    """Carries an OSError of the caller's block past `atomic_write`'s own OSError handling."""

    def __init__(self, error: OSError) -> None:
        self.error = error


_TEMPORARY_SUFFIX = ".tmp"
_TEMPORARY_NAME = re.compile(r"\..+\.[0-9a-f]{16}\.tmp")  # atomic_write's names, and only those
_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def disk_error(path: str | os.PathLike[str], error: OSError) -> NinlabError:
    """A failed write of `path` as one line: "disk full" when it is, else the system's reason."""
    reason = "disk full" if error.errno in _DISK_FULL else (error.strerror or str(error))
    fix = "free disk space or choose" if error.errno in _DISK_FULL else "choose"
    return NinlabError(f"could not write {os.fspath(path)} ({reason}); {fix} another directory")


def remove_stale_temporaries(directory: str | os.PathLike[str]) -> list[Path]:
    """Remove what `atomic_write`s killed mid-write (SIGKILL, a power cut) left in `directory`;
    call only while owning the directory (no write of another process is under way). Returns
    the files removed."""
    stale = [
        entry
        for entry in Path(directory).iterdir()
        if entry.is_file() and _TEMPORARY_NAME.fullmatch(entry.name)
    ]
    for entry in stale:
        entry.unlink(missing_ok=True)
    return stale


def _sync_directory(directory: Path) -> None:
    """Make a rename in `directory` survive a power cut: POSIX keeps a rename in the directory's
    own data, so that is synced too (Windows cannot open a directory for this; it is skipped)."""
    if os.name != "posix":
        return
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_text_atomically(path: str | os.PathLike[str], text: str, *, durable: bool) -> None:
    """`text` as the whole content of `path` (UTF-8), written with `atomic_write`."""
    with atomic_write(path, durable=durable, text=True) as handle:
        handle.write(text)


def json_text(data: Any, *, indent: int | None = None, what: str = "the JSON") -> str:
    """`data` as strict JSON text, as `json.dumps(data, indent=indent)` writes it but for the
    floats that are not finite numbers (nan, inf): null instead, and a `NinlabWarning` that names
    where they were in `what`."""
    non_finite: list[str] = []
    finite = _finite_or_null(data, "", non_finite)
    if non_finite:
        unnamed = len(non_finite) - _NAMED_AT_MOST
        shown = ", ".join(non_finite[:_NAMED_AT_MOST]) + (
            f" and {unnamed} more" if unnamed > 0 else ""
        )
        warnings.warn(
            NinlabWarning(
                f"{what} has values that are not finite numbers (nan or inf), written as null: "
                f"{shown}"
            ),
            stacklevel=2,
        )
    return json.dumps(finite, indent=indent, allow_nan=False)


_NAMED_AT_MOST = 5  # of the values json_text writes as null, named in its warning


def _finite_or_null(value: Any, where: str, non_finite: list[str]) -> Any:
    """`value` with every non-finite float replaced by None, its place added to `non_finite`."""
    if isinstance(value, float) and not math.isfinite(value):
        non_finite.append(where or "the value")
        return None
    if isinstance(value, dict):
        return {
            key: _finite_or_null(item, f"{where}.{key}" if where else str(key), non_finite)
            for key, item in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(item, f"{where}[{i}]", non_finite) for i, item in enumerate(value)]
    return value
