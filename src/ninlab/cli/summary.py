"""`ninlab summary`: the per-layer table, with the rounding explained on request, and the memory
section (`ninlab.analysis.predict`; with --fit, `ninlab.studies.memory`) after it."""

from __future__ import annotations

import argparse

from ninlab.analysis.predict import predict_memory
from ninlab.analysis.summary import default_mode, summarize
from ninlab.cli.options import (
    add_format_option,
    add_model_options,
    add_step_options,
    memory_size,
    model_choice,
    refuse_unread_step_options,
    spec_from_args,
)
from ninlab.cli.progress_line import progress_line
from ninlab.errors import NinlabError
from ninlab.studies.costs import study_costs
from ninlab.studies.memory import study_batch
from ninlab.viz.render import print_summary, summary_csv, summary_json, summary_markdown


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "summary",
        help="shapes, rounding, parameters and FLOPs per layer, and the memory of a step",
        description="One row per layer (output shape, where its size was rounded, parameters, "
        "FLOPs, output size), the totals, then the memory of a training step or an inference.",
    )
    add_model_options(parser)
    add_step_options(parser, mode="train; infer for a model with nothing to train")
    add_format_option(parser, "table", "json", "markdown", "csv")
    parser.add_argument(
        "--explain", action="store_true", help="print the arithmetic behind every rounded size"
    )
    parser.add_argument(
        "--fit",
        type=memory_size,
        metavar="BUDGET",
        help="largest batch whose peak fits, e.g. 8GiB, 500MB; for training, also under bf16, "
        "checkpointing, accumulation and other optimizers, with a recommendation",
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="also run the step for real at a small batch on this machine and compare it with "
        "the prediction there: 'verified', or by how much and at which op it is off",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # What a format has no place for is refused, not dropped: CSV is one row per module, and
    # JSON holds the numbers, not the arithmetic in words.
    if args.format == "csv" and args.fit is not None:
        raise NinlabError(
            "--fit has no place in --format csv; use --format table, markdown or json"
        )
    if args.format in ("csv", "json") and args.explain:
        raise NinlabError(
            f"--explain has no place in --format {args.format}; use --format table or markdown"
        )
    choice = model_choice(args)
    spec = spec_from_args(args, mode=args.mode or default_mode(choice.model))
    refuse_unread_step_options(args, spec)
    quiet = args.format in ("json", "csv")
    with progress_line(f"summarizing {choice.name}", quiet=quiet) as stage:
        if args.format == "csv":  # one row per module: the memory section has no place there
            summary = summarize(choice.model, spec, batch_size=choice.batch, model_name=choice.name)
            print(summary_csv(summary), end="")
            return 0
        # Verifying runs the step for real: the model it predicts needs its weights.
        costs = study_costs(
            choice.model,
            spec,
            batch_size=choice.batch,
            model_name=choice.name,
            memory=() if args.verify else (spec.mode,),
        )
        summary = costs.summary
        memory = costs.train if spec.mode == "train" else costs.infer
        if memory is None:
            stage(
                f"predicting the memory of {choice.name} at batch {choice.batch}, then running "
                "its step for real to verify it"
            )
            memory = predict_memory(
                choice.with_weights(),
                spec,
                batch_size=choice.batch,
                model_name=choice.name,
                verify=True,
            )
        study = None
        if args.fit is not None:
            study = study_batch(
                choice.model,
                spec,
                budget=args.fit,
                check_batch_size=choice.batch,
                plan_batch_size=choice.batch if spec.mode == "train" else None,
                predicted=(memory,),
                progress=lambda part: stage(f"fitting {choice.name} into {args.fit}: {part}"),
            )
    if args.format == "json":
        print(summary_json(summary, memory=memory, study=study))
    elif args.format == "markdown":
        print(summary_markdown(summary, explain=args.explain, memory=memory, study=study), end="")
    else:
        print_summary(summary, explain=args.explain, memory=memory, study=study)
    return 0
