"""`ninlab plot KIND`: one chart of a model as PNG or SVG (by the file's suffix)."""

from __future__ import annotations

import argparse

from ninlab.analysis.predict import predict_memory
from ninlab.analysis.step import StepSpec
from ninlab.analysis.summary import default_mode, summarize
from ninlab.cli.options import (
    ModelChoice,
    add_chart_options,
    add_model_options,
    add_output_option,
    add_step_options,
    model_choice,
    spec_from_args,
)
from ninlab.studies.memory import study_batch
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

KINDS = {
    "geometry": "one layer's input grid: the windows of the last output row and column, and the "
    "pixels never read",
    "receptive-field": "receptive field and jump of every conv and pooling layer",
    "flops": "forward and backward FLOPs per layer",
    "timeline": "memory alive after each op of a training step (or --mode infer), by category, "
    "peak marked",
    "saved": "bytes each layer keeps for backward, by reason",
    "batch": "training peak memory against batch size, a budget line and the largest batch "
    "that fits",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plot",
        help="draw one chart (geometry, receptive-field, flops, timeline, saved, batch) as PNG "
        "or SVG",
        description="Kinds: " + "; ".join(f"{kind}: {text}" for kind, text in KINDS.items())
        + ". The step options describe the step of the memory charts (timeline, saved, batch).",
    )
    parser.add_argument("kind", choices=tuple(KINDS))
    add_output_option(parser, "the chart, .png or .svg")
    add_model_options(parser)
    add_step_options(parser, mode="train; saved and batch are always of a training step")
    add_chart_options(parser)
    parser.set_defaults(func=run)


def _chart(kind: str, choice: ModelChoice, spec: StepSpec, layer: str | None, budget: str) -> Chart:
    if kind in ("geometry", "receptive-field", "flops"):
        # The summary's own step whatever --mode says: backward FLOPs wherever a parameter trains.
        if default_mode(choice.model) == "train":
            spec = spec.replace(mode="train")
        else:
            spec = spec.inference()
        summary = summarize(choice.model, spec, batch_size=choice.batch, model_name=choice.name)
        if kind == "geometry":
            return geometry_chart(summary, layer=layer)
        return field_chart(summary) if kind == "receptive-field" else flops_chart(summary)
    if kind in ("saved", "batch"):
        spec = spec.replace(mode="train")
    if kind == "batch":
        study = study_batch(choice.model, spec, budget=budget)
        return batch_chart(study.scaling, study.fit, model=choice.name, mode="train")
    report = predict_memory(choice.model, spec, batch_size=choice.batch, model_name=choice.name)
    return saved_chart(report) if kind == "saved" else timeline_chart(report)


def run(args: argparse.Namespace) -> int:
    chart_path(args.output)  # refuse a bad file name before the work
    choice = model_choice(args)
    spec = spec_from_args(args)  # checked for every kind, so a bad step option is never ignored
    chart = _chart(args.kind, choice, spec, args.layer, args.budget)
    print(f"wrote {save_chart(chart, args.output)}")
    return 0
