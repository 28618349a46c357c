"""`ninlab report`: one self-contained HTML file with the summary, the rounding, memory and every chart."""

from __future__ import annotations

import argparse

from ninlab.cli.options import add_model_options, model_choice
from ninlab.viz.report import DEFAULT_BUDGET, build_report, report_path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("report", help="a self-contained HTML report: summary, rounding, memory, all charts")
    add_model_options(parser)
    parser.add_argument("-o", "--output", default="report.html", help="the HTML file (default: report.html)")
    parser.add_argument("--optimizer", default="sgd", help="the training step's optimizer, e.g. sgd, adam (default: sgd)")
    parser.add_argument("--budget", default=DEFAULT_BUDGET, help=f"memory budget for the largest batch (default: {DEFAULT_BUDGET})")
    parser.add_argument("--layer", help="the layer of the geometry picture (default: the first that loses pixels to rounding)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    report_path(args.output)  # refuse a bad file name before the work
    choice = model_choice(args)
    report = build_report(
        choice.model,
        batch_size=choice.batch_size,
        input_size=choice.input_size,
        dtype=choice.dtype,
        optimizer=args.optimizer,
        budget=args.budget,
        model_name=choice.name,
        layer=args.layer,
    )
    print(f"wrote {report.save(args.output)}")
    return 0
