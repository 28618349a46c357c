"""`ninlab measure`: run the real training step and inference on this machine and print their
measured memory peaks (live tensor storage and what the allocator held) beside ninlab's
predictions for the same step and their ratio."""

from __future__ import annotations

import argparse

import torch

from ninlab.analysis.measure import available_memory, measure
from ninlab.analysis.memory_report import MemoryReport
from ninlab.analysis.predict import predict_memory
from ninlab.analysis.step import StepSpec
from ninlab.cli.options import (
    ModelChoice,
    add_format_option,
    add_model_options,
    add_step_options,
    model_choice,
    refuse_unread_step_options,
    runs_on_device,
    spec_from_args,
    thread_count,
)
from ninlab.cli.progress_line import progress_line
from ninlab.errors import NinlabError
from ninlab.units import format_bytes
from ninlab.viz.render_measure import measurement_json, measurement_text


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "measure",
        help="measured memory peaks of a real training step and inference, beside the prediction",
    )
    add_model_options(parser)
    add_step_options(parser, mode="both", ddp=False)  # one process: no DDP to measure
    parser.add_argument(
        "--threads", type=thread_count, metavar="N", help="intra-op threads (default: PyTorch's)"
    )
    add_format_option(parser, "table", "json")
    runs_on_device(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    choice = model_choice(args)
    step = spec_from_args(args)
    refuse_unread_step_options(args, step, both_steps=not args.mode)
    specs = [step] if args.mode else [step, step.inference()]
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    batch = choice.batch
    with progress_line(f"measuring {choice.name}", quiet=args.format == "json") as stage:
        # Predicted first, on a model without weights, so a step that would not fit is refused
        # before its weights exist.
        stage(f"predicting the memory of {choice.name}")
        predictions = [
            predict_memory(choice.model, spec, batch_size=batch, model_name=choice.name)
            for spec in specs
        ]
        _check_fits(choice, predictions, torch.device(step.device_type))
        model = choice.with_weights()
        results = []
        for spec in specs:
            stage(f"measuring a real {_step_name(spec)} of {choice.name} at batch {batch}")
            results.append(measure(model, spec, batch_size=batch))
    if args.format == "json":
        print(measurement_json(results, predictions))
    else:
        print(measurement_text(choice.name, results, predictions), end="")
    return 0


def _step_name(spec: StepSpec) -> str:
    return "training step" if spec.mode == "train" else "inference"


def _check_fits(choice: ModelChoice, predictions: list[MemoryReport], device: torch.device) -> None:
    """Refuse a measurement whose model (its weights and the copy measured) and predicted peak
    exceed the memory available on `device`."""
    weights = sum(p.numel() * p.element_size() for p in choice.model.parameters())
    needed = weights + max(prediction.allocator_peak_bytes for prediction in predictions)
    available = available_memory(device)
    if available is not None and needed > available:
        raise NinlabError(
            f"measuring {choice.name} at batch {choice.batch} needs about {format_bytes(needed)} "
            f"on {device} (its weights and the predicted peak) but {format_bytes(available)} is "
            "available; measure a smaller model or --batch, or ask for the prediction alone with "
            "ninlab summary"
        )
