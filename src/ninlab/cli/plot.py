"""`ninlab plot KIND`: one chart of a model as PNG or SVG (by the file's suffix)."""

from __future__ import annotations

import argparse

from ninlab.viz.charts import (
    Chart,
    batch_chart,
    chart_path,
    field_chart,
    flops_chart,
    geometry_chart,
    save_chart,
    saved_chart,
    timeline_chart,
)
from ninlab.cli.options import ModelChoice, add_model_options, model_choice
from ninlab.analysis.memory import predict_memory
from ninlab.analysis.memory import study_batch
from ninlab.analysis.step import StepSpec
from ninlab.viz.report import DEFAULT_BUDGET
from ninlab.analysis.summary import summarize

KINDS = {
    "geometry": "one layer's input grid: the windows of the last output row and column, and the pixels never read",
    "receptive-field": "receptive field and jump of every conv and pooling layer",
    "flops": "forward and backward FLOPs per layer",
    "timeline": "memory alive after each op of a training step (or --mode infer), by category, peak marked",
    "saved": "bytes each layer keeps for backward, by reason",
    "batch": "training peak memory against batch size, a budget line and the largest batch that fits",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plot",
        help="draw one chart (geometry, receptive-field, flops, timeline, saved, batch) as PNG or SVG",
        description="Kinds: " + "; ".join(f"{kind}: {text}" for kind, text in KINDS.items()),
    )
    parser.add_argument("kind", choices=tuple(KINDS))
    add_model_options(parser)
    parser.add_argument("-o", "--output", required=True, help="the chart file: .png or .svg")
    parser.add_argument("--layer", help="geometry: the conv or pooling layer to draw (default: the first that loses pixels to rounding)")
    parser.add_argument("--mode", choices=("train", "infer"), default="train", help="timeline: which step (default: train)")
    parser.add_argument("--optimizer", default="sgd", help="memory charts: e.g. sgd, adam (default: sgd)")
    parser.add_argument("--budget", default=DEFAULT_BUDGET, help=f"batch: the memory budget, e.g. 8GiB, 500MB (default: {DEFAULT_BUDGET})")
    parser.set_defaults(func=run)


def _chart(kind: str, choice: ModelChoice, args: argparse.Namespace) -> Chart:
    common = {"input_size": choice.input_size, "dtype": choice.dtype}
    if kind in ("geometry", "receptive-field", "flops"):
        summary = summarize(choice.model, batch_size=choice.batch_size, model_name=choice.name, **common)
        if kind == "geometry":
            return geometry_chart(summary, layer=args.layer)
        return field_chart(summary) if kind == "receptive-field" else flops_chart(summary)
    mode = "train" if kind in ("saved", "batch") else args.mode
    spec = StepSpec(mode=mode, optimizer=args.optimizer, **common)
    if kind == "batch":
        study = study_batch(choice.model, spec, budget=args.budget)
        return batch_chart(study.scaling, study.fit, model=choice.name, mode="train")
    report = predict_memory(choice.model, spec, batch_size=choice.batch_size, model_name=choice.name)
    return saved_chart(report) if kind == "saved" else timeline_chart(report)


def run(args: argparse.Namespace) -> int:
    chart_path(args.output)  # refuse a bad file name before the work
    choice = model_choice(args)
    path = save_chart(_chart(args.kind, choice, args), args.output)
    print(f"wrote {path}")
    return 0
