"""`ninlab`: a thin command line over the library. Each subcommand lives in its own module here
and only parses arguments, calls the library and prints; any `NinlabError` becomes one line on
stderr and exit code 2."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from ninlab.errors import NinlabError

# Each module defines `register(subparsers)`, which adds its subcommand(s) and sets `func`.
_COMMAND_MODULES: tuple[str, ...] = ("summary", "measure", "train", "plot", "report", "compare")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own usage errors also exit 2, in one line
        self.exit(2, f"ninlab: error: {message} (see 'ninlab {self.prog.split()[-1]} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ninlab", description=__doc__.split("\n")[0])
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name in _COMMAND_MODULES:
        importlib.import_module(f"ninlab.cli.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except NinlabError as error:
        print(f"ninlab: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader (head, less) closed the pipe: not an error of ours
        sys.stdout = open(os.devnull, "w")
        return 0
    except KeyboardInterrupt:
        print("ninlab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
