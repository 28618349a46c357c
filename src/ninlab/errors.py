"""The one exception type a user sees: bad input, explained in one line with the fix; its
warning, for a result that is shown but suspect (the CLI prints it as one line too);
`one_line`, how any other exception is quoted inside such a line; `shorten`, how a value the
user gave is echoed in one (a 5,000-character `--model` is not repeated in full); and
`checked_flag`, `checked_whole`, `checked_name`, how a typed argument of the library is checked:
a flag given "yes", a seed given 1.5, is one line naming the argument, not a silent truth or
truncation."""

from __future__ import annotations

import operator

__all__ = [
    "NinlabError",
    "NinlabWarning",
    "checked_flag",
    "checked_name",
    "checked_whole",
    "one_line",
    "shorten",
]

# An exception quoted in a message is cut here: enough for the cause, short enough for one line.
_QUOTE_LIMIT = 200
# A value echoed in a message is shown whole up to ECHO_LIMIT characters (any path a person types);
# beyond, only its start: enough to recognise it, and the line stays one line.
ECHO_LIMIT = 200
_ECHO_KEPT = 80


class NinlabError(Exception):
    """A problem with the user's input or environment. The CLI prints it as one line, exit
    code 2."""


class NinlabWarning(UserWarning):
    """A result ninlab shows although something in it is suspect (weights or a loss that are not
    finite numbers); the CLI prints it as one line, "ninlab: warning: ..."."""


def one_line(error: BaseException) -> str:
    """`error` as one line to quote in a message: its type and the first line of its text
    ("RuntimeError: ..."), or its type alone when it has no text; cut to 200 characters."""
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0].strip()}" if lines else type(error).__name__
    return text if len(text) <= _QUOTE_LIMIT else text[: _QUOTE_LIMIT - 3] + "..."


def shorten(value: object) -> str:
    """`value` as text to echo in a message: whole when it has at most ECHO_LIMIT (200)
    characters, else its first 80 and how long it was ("xxxx... (5,000 characters)"); its
    line breaks as spaces, so the message stays one line."""
    text = " ".join(str(value).splitlines())
    if len(text) <= ECHO_LIMIT:
        return text
    return f"{text[:_ECHO_KEPT]}... ({len(text):,} characters)"


def checked_flag(name: str, value: object) -> bool:
    """`value` if it is True or False, else one line naming `name` (any object has a truth value,
    so `verify="no"` would verify)."""
    if not isinstance(value, bool):
        raise NinlabError(f"{name} must be True or False, got {shorten(repr(value))}")
    return value


def checked_whole(name: str, value: object, lowest: int, highest: int) -> int:
    """`value` as an int from `lowest` to `highest`, else one line naming `name` (a float or a
    bool is no whole number: 1.5 would be truncated, True taken for 1)."""
    try:
        if isinstance(value, bool):
            raise TypeError
        number = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise NinlabError(f"{name} must be a whole number, got {shorten(repr(value))}") from None
    if not lowest <= number <= highest:
        raise NinlabError(f"{name} must be {lowest:,} to {highest:,}, got {number:,}")
    return number


def checked_name(name: str, value: object) -> str | None:
    """`value` if it is a string or None (the default name), else one line naming `name`."""
    if value is not None and not isinstance(value, str):
        raise NinlabError(f"{name} must be a string, got {shorten(repr(value))}")
    return value
