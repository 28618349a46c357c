"""`ninlab summary`: the per-layer table, with the rounding explained on request, and the memory
section (`ninlab.analysis.memory`) after it."""

from __future__ import annotations

import argparse
import json

from ninlab.cli.memory_options import add_memory_options, memory_section
from ninlab.cli.options import add_model_options, model_choice
from ninlab.viz.render import print_summary, summary_csv, summary_markdown, summary_to_dict
from ninlab.viz.render_memory import memory_markdown, memory_to_dict, print_memory
from ninlab.analysis.summary import summarize


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("summary", help="shapes, rounding, parameters and FLOPs per layer")
    add_model_options(parser)
    parser.add_argument("--format", choices=("table", "json", "markdown", "csv"), default="table")
    parser.add_argument("--explain", action="store_true", help="print the arithmetic behind every rounded size")
    add_memory_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    choice = model_choice(args)
    summary = summarize(choice.model, input_size=choice.input_size, batch_size=choice.batch_size, dtype=choice.dtype, model_name=choice.name)
    if args.format == "csv":  # one row per module: the memory section has no place there
        print(summary_csv(summary), end="")
        return 0
    memory = memory_section(args, choice)
    if args.format == "json":
        data = summary_to_dict(summary)
        data["memory"] = memory_to_dict(memory.report, scaling=memory.scaling, fit=memory.fit)
        print(json.dumps(data, indent=2))
    elif args.format == "markdown":
        print(summary_markdown(summary, explain=args.explain))
        print(memory_markdown(memory.report, scaling=memory.scaling, fit=memory.fit), end="")
    else:
        print_summary(summary, explain=args.explain)
        print()
        print_memory(memory.report, scaling=memory.scaling, fit=memory.fit)
    return 0
