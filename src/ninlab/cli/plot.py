"""`ninlab plot KIND`: one chart of a model as PNG or SVG (by the file's suffix)."""

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
from ninlab.studies.charts import CHART_KINDS, chart_source
from ninlab.viz.charts import chart_of_kind, chart_path, save_chart


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plot",
        help=f"draw one chart ({', '.join(CHART_KINDS)}) as PNG or SVG",
        description="Kinds: "
        + "; ".join(f"{kind}: {chart.description}" for kind, chart in CHART_KINDS.items())
        + ". The step options describe the step of the memory charts (timeline, saved, batch).",
    )
    parser.add_argument("kind", choices=tuple(CHART_KINDS))
    add_output_option(parser, "the chart, .png or .svg")
    add_model_options(parser)
    add_step_options(parser, mode="train; saved and batch are always of a training step")
    add_chart_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    chart_path(args.output)  # refuse a bad file name before the work
    choice = model_choice(args)
    spec = spec_from_args(args)  # checked for every kind, so a bad step option is never ignored
    source = chart_source(
        args.kind,
        choice.model,
        spec,
        batch_size=choice.batch,
        budget=args.budget,
        model_name=choice.name,
    )
    chart = chart_of_kind(args.kind, source, layer=args.layer, model=choice.name)
    print(f"wrote {save_chart(chart, args.output)}")
    return 0
