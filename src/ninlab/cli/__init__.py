"""`ninlab`, the command line: a thin layer over the library. Each command lives in its own module
here and only parses arguments (with the shared vocabulary of `ninlab.cli.options`), calls the
library and prints; any `NinlabError` becomes one line on stderr and exit code 2, a warning one
line "ninlab: warning: ...", Ctrl-C (from start-up to exit) one line and exit code 130, and a
closed pipe (the reader, `head` or `less`, gone) a quiet exit with code 1, as Python's own
advice on SIGPIPE has it (https://docs.python.org/3/library/signal.html#note-on-sigpipe) and as
rich, which draws the tables, already does. `ninlab train` is the exception: a closed console
never stops a run (`ninlab.training.console`)."""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import re
import signal
import sys
import warnings
from collections.abc import Callable, Sequence

from ninlab.errors import ECHO_LIMIT, NinlabError, NinlabWarning, shorten
from ninlab.training.interrupt import held_interrupts

# Each module defines `register(subparsers)`, which adds its command(s) and sets `func`.
_COMMAND_MODULES: tuple[str, ...] = (
    "summary",
    "measure",
    "train",
    "plot",
    "report",
    "compare",
    "cache",
)

_DESCRIPTION = """\
The d2l.ai chapter on Network in Network as software. For any PyTorch CNN, ninlab shows how each
layer's output size is rounded (and which input pixels are never read) and what the network costs:
parameters, FLOPs, and the memory to train and to predict, exactly, without running it. It also
trains NiN and its variants on Fashion-MNIST."""

_EPILOG = """\
examples:
  ninlab summary --explain                  d2l's NiN layer by layer, the rounding explained
  ninlab summary --optimizer adam --fit 8GiB
                                            memory of a training step; the largest batch in 8 GiB
  ninlab plot geometry -o geometry.png      the pixels the first layer never reads
  ninlab compare nin-d2l nin-d2l-1x1        two variants side by side
  ninlab train --preset cpu                 92% test accuracy in 7 minutes on 2 CPU cores

Run 'ninlab COMMAND --help' for a command's options."""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def _format_action(self, action: argparse.Action) -> str:
        # The commands a line each, without the lone "COMMAND" line argparse puts above them.
        if isinstance(action, argparse._SubParsersAction):
            return "".join(self._format_action(command) for command in action._get_subactions())
        return super()._format_action(action)


# A value that starts like a negative number, with a unit or a sign argparse does not read as
# one (-1GiB, -1e3, -.5x2).
_NEGATIVE = re.compile(r"-\.?\d")


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: object, **kwargs: object) -> None:
        # No abbreviations: `report --mode infer` would be read as `--model infer`, and a new
        # option would change what an old command line means.
        super().__init__(*args, allow_abbrev=False, **kwargs)  # type: ignore[arg-type]
        self._given: list[str] | None = None  # the arguments parsed, whose values errors echo

    def error(self, message: str) -> None:  # argparse's own usage errors also exit 2, in one line
        message = shortened(message, sys.argv[1:] if self._given is None else self._given)
        self.exit(2, f"ninlab: error: {message} (see '{self.prog} --help')\n")

    def parse_known_args(
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        if args is not None:  # the command line itself (argparse passes a subcommand its share)
            args = self._negative_values_joined(list(args))
            self._given = args
            self._refuse_conflicts(self._given)
        # Refused by the parser that left them over, so the error names the command, not ninlab.
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras

    def _negative_values_joined(self, args: list[str]) -> list[str]:
        """`--fit -1GiB` as `--fit=-1GiB`: argparse takes a value that starts with a dash and
        is no plain number for an option ("expected one argument"), so the option's own check,
        which names what is wrong with the value, would never see it."""
        joined: list[str] = []
        index = 0
        while index < len(args):
            arg = args[index]
            action = self._option_string_actions.get(arg)
            takes_one = action is not None and action.nargs is None
            if takes_one and index + 1 < len(args) and _NEGATIVE.match(args[index + 1]):
                joined.append(f"{arg}={args[index + 1]}")
                index += 2
            else:
                if arg == "--":
                    return joined + args[index:]
                joined.append(arg)
                index += 1
        return joined

    def _refuse_conflicts(self, args: list[str]) -> None:
        """An option given twice with two values (`--batch 2 --batch 3`, `--flip --no-flip`)
        would silently keep the last; refused. An option that adds (--input) may repeat."""
        given: dict[str, tuple[str, str | None]] = {}
        for index, arg in enumerate(args):
            if arg == "--":
                return
            name, equals, inline = arg.partition("=")
            action = self._option_string_actions.get(name)
            if action is None or isinstance(action, argparse._AppendAction) or action.nargs:
                continue  # not an option of this command (a subcommand's), or one that adds
            if equals:
                value: str | None = inline
            elif action.nargs == 0:
                value = None
            else:
                value = args[index + 1] if index + 1 < len(args) else None
            said = f"{name} {value}" if value is not None else name
            # A switch's spelling is its value (--flip, --no-flip); a value's spelling is not.
            meaning = name if action.nargs == 0 else value
            earlier = given.setdefault(action.dest, (meaning, said))
            if earlier[0] != meaning:
                self.error(f"{earlier[1]} and {said} conflict; give one")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ninlab",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=_Formatter,
    )
    subparsers = parser.add_subparsers(
        dest="command", required=True, title="commands", metavar="COMMAND", parser_class=_Parser
    )
    for name in _COMMAND_MODULES:
        importlib.import_module(f"ninlab.cli.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_for_ninlab(warnings.showwarning)
            with held_interrupts():  # start-up imports torch: a Ctrl-C there waits for its end
                args = build_parser().parse_args(argv)
                from ninlab.cli.options import check_device

                check_device(args)
            code = int(args.func(args) or 0)
            sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
            return code
    except NinlabError as error:
        _say(f"ninlab: error: {shortened(str(error), sys.argv[1:] if argv is None else argv)}")
        return 2
    except BrokenPipeError:
        # What is still buffered for the closed pipe goes nowhere, so that the interpreter's
        # final flush does not fail again (Python's advice, as above); stderr too, which may be
        # the closed one (`2>&1 | head`).
        _silence(sys.stdout)
        _silence(sys.stderr)
        return BROKEN_PIPE_EXIT
    except KeyboardInterrupt:
        _say("ninlab: interrupted")
        return 130
    except OSError as error:
        if error.errno == errno.ENAMETOOLONG:  # any file the command line names
            name = shortened(str(error.filename), sys.argv[1:] if argv is None else argv)
            _say(f"ninlab: error: file name too long: {name}; give a shorter path")
            return 2
        if error.errno not in _STREAM_FULL:
            raise
        # Every file ninlab writes says so itself (a NinlabError); what is left is the output
        # stream, which cannot take the result (stdout to /dev/full, a full disk behind `>`).
        _silence(sys.stdout)
        _say(
            f"ninlab: error: cannot write the output ({error.strerror}); free space, or send it "
            "elsewhere (> FILE on another disk)"
        )
        return 2
    finally:
        if argv is None:
            # The command line's own process, now exiting: a Ctrl-C during the interpreter's
            # shutdown (its threads, its atexit handlers) would print a traceback for nothing.
            signal.signal(signal.SIGINT, signal.SIG_IGN)


def shortened(message: str, argv: Sequence[str]) -> str:
    """`message` with each value of the command line `argv` too long to echo in full (a
    5,000-character --model) cut by `shorten`, wherever the message quotes it, whole or a part
    of it (a variant's setting in `nin-d2l:KEY=VALUE`, a file in `FILE.py:function`)."""
    values = {part for arg in argv for part in (arg, *re.split(r"[:=,]", arg))}
    for value in sorted(values, key=len, reverse=True):  # a value before the parts it holds
        if len(value) > ECHO_LIMIT:
            message = message.replace(value, shorten(value))
    return message


# Errors of a stream that cannot take what is written: no space, over quota, too large, I/O.
_STREAM_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO})

# The exit code of a command whose reader went away: Python's and rich's.
BROKEN_PIPE_EXIT = 1


def _say(line: str) -> None:
    """`line` on stderr, unless stderr is closed too: then there is no one left to tell."""
    try:
        print(line, file=sys.stderr, flush=True)
    except OSError:
        _silence(sys.stderr)


def _silence(stream: object) -> None:
    """Point `stream`'s file descriptor at /dev/null (a stream without one, as under pytest's
    capture, is left alone)."""
    try:
        descriptor = stream.fileno()  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, descriptor)
    os.close(devnull)


def _one_line_for_ninlab(show: Callable[..., None]) -> Callable[..., None]:
    """`warnings.showwarning` that shows a `NinlabWarning` as one line, "ninlab: warning: ...",
    without the file and line of the code that warned; other warnings as `show` does."""

    def show_warning(message: Warning | str, category: type[Warning], *args: object) -> None:
        if issubclass(category, NinlabWarning):
            _say(f"ninlab: warning: {message}")
        else:
            show(message, category, *args)

    return show_warning


if __name__ == "__main__":
    sys.exit(main())
