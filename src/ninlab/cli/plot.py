"""`ninlab plot KIND`: one chart of a model as PNG or SVG (by the file's suffix)."""

from __future__ import annotations

import argparse

from ninlab.cli.options import (
    add_chart_options,
    add_model_options,
    add_output_option,
    add_step_options,
    model_choice,
    refuse_unread_step_options,
    spec_from_args,
)
from ninlab.cli.progress_line import progress_line
from ninlab.errors import NinlabError
from ninlab.studies.charts import CHART_KINDS, ChartSetting, chart_source
from ninlab.studies.report import DEFAULT_BUDGET
from ninlab.viz.charts import chart_of_kind, chart_path, save_chart


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plot",
        help=f"draw one chart ({', '.join(CHART_KINDS)}) as PNG or SVG",
        description="Kinds: "
        + "; ".join(f"{kind}: {chart.description}" for kind, chart in CHART_KINDS.items())
        + ". The step options describe the step of the memory charts (timeline, saved, batch); "
        "a chart refuses an option it does not read.",
    )
    parser.add_argument("kind", choices=tuple(CHART_KINDS))
    add_output_option(parser, "the chart, .png or .svg")
    add_model_options(parser)
    add_step_options(parser, mode="train; saved draws a training step only")
    add_chart_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    chart_path(args.output)  # refuse a bad file name before the work
    choice = model_choice(args)
    spec = spec_from_args(args)  # checked for every kind, so a bad step option is never ignored
    refuse_unread_step_options(args, spec)
    _refuse_unread_settings(args)
    # The batch chart fits the batch (many predictions: seconds to minutes on a large model).
    with progress_line(f"computing the {args.kind} chart of {choice.name}"):
        source = chart_source(
            args.kind,
            choice.model,
            spec,
            batch_size=choice.batch,
            budget=DEFAULT_BUDGET if args.budget is None else args.budget,
            model_name=choice.name,
        )
    chart = chart_of_kind(args.kind, source, layer=args.layer, model=choice.name)
    print(f"wrote {save_chart(chart, args.output)}")
    return 0


# The options behind each setting a chart kind may read (`ChartKind.reads`).
_SETTING_OPTIONS: dict[ChartSetting, dict[str, str]] = {
    "step": {
        "optimizer": "--optimizer",
        "amp": "--amp",
        "device": "--device",
        "grad_mode": "--grad-mode",
        "ddp": "--ddp",
        "channels_last": "--channels-last",
        "step": "--step",
    },
    "budget": {"budget": "--budget"},
    "layer": {"layer": "--layer"},
}


def _refuse_unread_settings(args: argparse.Namespace) -> None:
    """An option given that the chart kind does not read is refused rather than ignored."""
    reads = CHART_KINDS[args.kind].reads
    for setting, options in _SETTING_OPTIONS.items():
        given = [flag for dest, flag in options.items() if getattr(args, dest) is not None]
        if given and setting not in reads:
            readers = [kind for kind, chart in CHART_KINDS.items() if setting in chart.reads]
            raise NinlabError(
                f"{given[0]} is not read by chart {args.kind!r} (only by {', '.join(readers)}); "
                "drop it"
            )
