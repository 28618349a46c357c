"""`ninlab report`: one self-contained HTML file with the summary, the rounding, memory and every
chart."""

from __future__ import annotations

import argparse

from ninlab.cli.options import (
    add_chart_options,
    add_model_options,
    add_output_option,
    add_step_options,
    model_choice,
    spec_from_args,
)
from ninlab.cli.progress_line import progress_line
from ninlab.studies.report import DEFAULT_BUDGET, study_model
from ninlab.viz.report import build_report, report_path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report",
        help="a self-contained HTML report: summary, rounding, memory, all charts",
        description="The step options describe the training step; the report also shows its "
        "inference.",
    )
    add_output_option(parser, "the HTML report", default="report.html")
    add_model_options(parser)
    add_step_options(parser, mode=None)  # the report shows both steps
    add_chart_options(parser)
    parser.add_argument(
        "--plan",
        action="store_true",
        help="also how to fit the batch into --budget: bf16, checkpointing, accumulation, other "
        "optimizers (many exact predictions: minutes for a large model)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    report_path(args.output)  # refuse a bad file name before the work
    choice = model_choice(args)
    with progress_line(f"studying {choice.name} for the report") as stage:
        study = study_model(
            choice.model,
            spec_from_args(args),
            batch_size=choice.batch,
            budget=DEFAULT_BUDGET if args.budget is None else args.budget,
            model_name=choice.name,
            plan=args.plan,
            progress=lambda part: stage(f"studying {choice.name} for the report: {part}"),
        )
        report = build_report(study, layer=args.layer)
    print(f"wrote {report.save(args.output)}")
    return 0
