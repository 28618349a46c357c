"""`ninlab compare`: NiN variants side by side, optionally trained (the chapter's exercises)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from ninlab.viz.charts import chart_path, compare_chart, save_chart
from ninlab.cli.options import parse_input_size, positive_int
from ninlab.viz.compare import (
    TrainPlan,
    compare,
    comparison_json,
    comparison_markdown,
    print_comparison,
)
from ninlab.training.data import default_search_path, load_fashion_mnist
from ninlab.training.presets import PRESETS, get_preset
from ninlab.training.progress import RichReporter, download_progress
from ninlab.analysis.step import DTYPES

# Training settings worth shortening for a quick comparison (flag, TrainConfig field, help).
_TRAIN_OVERRIDES = (
    ("--epochs", "epochs", "epochs per variant (default: the preset's)"),
    ("--image-size", "image_size", "training image side (default: the preset's)"),
    ("--train-examples", "train_examples", "train on the first N training images only"),
    ("--test-examples", "test_examples", "test on the first N test images only"),
    ("--seed", "seed", "seed of every variant's run (default: the preset's)"),
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "compare",
        help="variants side by side: parameters, FLOPs, memory, smallest input, receptive field (--train: accuracy)",
        description="Each NAME_OR_SPEC is a registry name (nin-d2l, nin-d2l-1x1, nin-vgg11, ...), a variant "
        "(nin-d2l:num_1x1=1) or package.module:factory. Differences are against the first.",
    )
    parser.add_argument("specs", nargs="+", metavar="NAME_OR_SPEC")
    parser.add_argument("--input", default="1x224x224", help="one sample's size, channels first (default: 1x224x224)")
    parser.add_argument("--batch", type=positive_int, default=128, help="batch size of the analysis (default: 128)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--optimizer", default="sgd", help="the training step's optimizer for the memory columns (default: sgd)")
    parser.add_argument("--format", choices=("table", "markdown", "json"), default="table")
    parser.add_argument("--plot", metavar="FILE", help="also draw the table as bars (.png or .svg)")
    parser.add_argument(
        "--train", nargs="?", const="cpu", choices=tuple(PRESETS), metavar="PRESET",
        help="train each variant with a preset (default: cpu) and add test accuracy and training time",
    )
    for flag, field, text in _TRAIN_OVERRIDES:
        parser.add_argument(flag, dest=field, type=positive_int, help=text)
    parser.add_argument("--output-dir", type=Path, default=Path("runs/compare"), help="where each variant's run goes (default: runs/compare)")
    parser.add_argument("--data-dir", default=None, help="directory with the Fashion-MNIST IDX files")
    parser.add_argument("--no-download", action="store_true", help="never download Fashion-MNIST")
    parser.add_argument("--device", default=None, help="training device: cpu, cuda, ... (default: a GPU if any)")
    parser.set_defaults(func=run)


def _plan(args: argparse.Namespace) -> TrainPlan:
    overrides = {field: getattr(args, field) for _, field, _ in _TRAIN_OVERRIDES if getattr(args, field) is not None}
    with download_progress() as hook:
        data = load_fashion_mnist(search_path=default_search_path(args.data_dir), download=not args.no_download, progress=hook)
    return TrainPlan(
        preset=args.train,
        config=dataclasses.replace(get_preset(args.train), **overrides),
        data=data,
        output_dir=args.output_dir,
        device=args.device,
        reporter=RichReporter(),
    )


def run(args: argparse.Namespace) -> int:
    if args.plot:
        chart_path(args.plot)  # refuse a bad file name before the work
    comparison = compare(
        args.specs,
        input_size=parse_input_size(args.input),
        batch_size=args.batch,
        dtype=DTYPES[args.dtype],
        optimizer=args.optimizer,
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
