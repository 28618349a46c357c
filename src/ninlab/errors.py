"""The one exception type a user sees: bad input, explained in one line with the fix."""


class NinlabError(Exception):
    """A problem with the user's input or environment. The CLI prints it as one line, exit code 2."""
