"""The one exception type a user sees: bad input, explained in one line with the fix; its
warning, for a result that is shown but suspect (the CLI prints it as one line too);
`one_line`, how any other exception is quoted inside such a line; and `shorten`, how a value the
user gave is echoed in one (a 5,000-character `--model` is not repeated in full)."""

from __future__ import annotations

__all__ = ["NinlabError", "NinlabWarning", "one_line", "shorten"]

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
