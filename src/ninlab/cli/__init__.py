"""`ninlab`, the command line: a thin layer over the library. Each command lives in its own module
here and only parses arguments (with the shared vocabulary of `ninlab.cli.options`), calls the
library and prints; any `NinlabError` becomes one line on stderr and exit code 2, and Ctrl-C
(from start-up to exit) one line and exit code 130."""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
from collections.abc import Sequence

from ninlab.errors import NinlabError

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


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own usage errors also exit 2, in one line
        self.exit(2, f"ninlab: error: {message} (see '{self.prog} --help')\n")

    def parse_known_args(
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        # Refused by the parser that left them over, so the error names the command, not ninlab.
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras


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
        args = build_parser().parse_args(argv)  # imports torch: Ctrl-C often lands here
        from ninlab.cli.options import check_device

        check_device(args)
        return int(args.func(args) or 0)
    except NinlabError as error:
        print(f"ninlab: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader (head, less) closed the pipe: not an error of ours
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - stays open until the process exits
        return 0
    except KeyboardInterrupt:
        print("ninlab: interrupted", file=sys.stderr)
        return 130
    finally:
        if argv is None:
            # The command line's own process, now exiting: a Ctrl-C during the interpreter's
            # shutdown (its threads, its atexit handlers) would print a traceback for nothing.
            signal.signal(signal.SIGINT, signal.SIG_IGN)


if __name__ == "__main__":
    sys.exit(main())
