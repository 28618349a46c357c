"""`ninlab summary`: the per-layer table, with the rounding explained on request."""

from __future__ import annotations

import argparse

from ninlab.cli.options import add_model_options, model_choice
from ninlab.render import print_summary, summary_csv, summary_json, summary_markdown
from ninlab.summary import summarize


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("summary", help="shapes, rounding, parameters and FLOPs per layer")
    add_model_options(parser)
    parser.add_argument("--format", choices=("table", "json", "markdown", "csv"), default="table")
    parser.add_argument("--explain", action="store_true", help="print the arithmetic behind every rounded size")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    choice = model_choice(args)
    summary = summarize(choice.model, input_size=choice.input_size, batch_size=choice.batch_size, dtype=choice.dtype, model_name=choice.name)
    if args.format == "json":
        print(summary_json(summary))
    elif args.format == "markdown":
        print(summary_markdown(summary, explain=args.explain), end="")
    elif args.format == "csv":
        print(summary_csv(summary), end="")
    else:
        print_summary(summary, explain=args.explain)
    return 0
