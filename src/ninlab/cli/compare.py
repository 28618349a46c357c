"""`ninlab compare`: NiN variants side by side, optionally trained (the chapter's exercises)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from ninlab.cli.options import (
    EPOCHS,
    IMAGE_SIZE,
    OUTPUT_DIR,
    SEED,
    TEST_EXAMPLES,
    TRAIN_EXAMPLES,
    add_data_options,
    add_format_option,
    add_model_options,
    add_step_options,
    add_training_options,
    load_data,
    runs_on_device,
    spec_from_args,
    training_overrides,
)
from ninlab.studies.compare import TrainPlan, check_specs, compare
from ninlab.training.presets import PRESETS, get_preset
from ninlab.training.progress import RichReporter
from ninlab.viz.charts import chart_path, compare_chart, save_chart
from ninlab.viz.compare import comparison_json, comparison_markdown, print_comparison


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "compare",
        help="variants side by side: parameters, FLOPs, memory, smallest input, receptive field "
        "(--train: accuracy)",
        description="Each NAME_OR_SPEC is a registry name (nin-d2l, nin-d2l-1x1, nin-vgg11, ...), "
        "a variant (nin-d2l:num_1x1=1) or package.module:factory. Differences are against the "
        "first. The step options describe the training step of the memory columns; with --train, "
        "each variant trains on --device (default: a GPU if any).",
    )
    parser.add_argument("specs", nargs="+", metavar="NAME_OR_SPEC")
    add_model_options(parser, model=False)  # the models are the positional arguments
    add_step_options(parser, mode=None)  # the columns show both steps
    add_format_option(parser, "table", "markdown", "json")
    parser.add_argument("--plot", metavar="FILE", help="also draw the table as bars (.png or .svg)")
    parser.add_argument(
        "--train",
        nargs="?",
        const="cpu",
        choices=tuple(PRESETS),
        metavar="PRESET",
        help="train each variant with a preset (default: cpu) and add test accuracy and "
        "training time",
    )
    add_training_options(parser, only=(EPOCHS, IMAGE_SIZE, TRAIN_EXAMPLES, TEST_EXAMPLES, SEED))
    OUTPUT_DIR.add(parser, default=Path("runs/compare"), shown="runs/compare, a run per variant")
    add_data_options(parser)
    runs_on_device(parser, when="train")
    parser.set_defaults(func=run)


def _plan(args: argparse.Namespace) -> TrainPlan:
    return TrainPlan(
        preset=args.train,
        config=dataclasses.replace(get_preset(args.train), **training_overrides(args)),
        data=load_data(args),
        output_dir=args.output_dir,
        device=args.device,
        reporter=RichReporter(),
    )


def run(args: argparse.Namespace) -> int:
    if args.plot:
        chart_path(args.plot, option="--plot")  # refuse a bad file name before the work
    check_specs(args.specs, trained=bool(args.train))  # before the data is loaded
    comparison = compare(
        args.specs,
        spec_from_args(args),
        batch_size=args.batch,
        training=_plan(args) if args.train else None,
    )
    if args.format == "json":
        print(comparison_json(comparison))
    elif args.format == "markdown":
        print(comparison_markdown(comparison), end="")
    else:
        print_comparison(comparison)
    if args.plot:
        # On stderr, so that --format json output stays one JSON document.
        print(f"wrote {save_chart(compare_chart(comparison), args.plot)}", file=sys.stderr)
    return 0
