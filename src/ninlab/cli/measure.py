"""`ninlab measure`: run the real training step and inference on this machine and print their
measured memory peaks (live tensor storage and what the allocator held) beside ninlab's
predictions for the same step and their ratio."""

from __future__ import annotations

import argparse
import json

import torch

from ninlab.analysis.measure import Measurement, measure
from ninlab.analysis.memory_report import MemoryReport
from ninlab.analysis.predict import predict_memory
from ninlab.cli.options import (
    add_format_option,
    add_model_options,
    add_step_options,
    model_choice,
    positive_int,
    runs_on_device,
    step_spec,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "measure",
        help="measured memory peaks of a real training step and inference, beside the prediction",
    )
    add_model_options(parser)
    add_step_options(parser, mode="both", ddp=False)  # one process: no DDP to measure
    parser.add_argument(
        "--threads", type=positive_int, metavar="N", help="intra-op threads (default: PyTorch's)"
    )
    add_format_option(parser, "table", "json")
    runs_on_device(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    choice = model_choice(args)
    step = step_spec(args)
    specs = [step] if args.mode else [step, step.inference()]
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    batch = choice.batch_size
    results = [measure(choice.model, spec, batch_size=batch) for spec in specs]
    predictions = [
        predict_memory(choice.model, spec, batch_size=batch, model_name=choice.name)
        for spec in specs
    ]
    if args.format == "json":
        pairs = zip(results, predictions)
        print(json.dumps([_as_json(result, prediction) for result, prediction in pairs], indent=2))
    else:
        _print_table(choice.name, results, predictions)
    return 0


def _step_name(result: Measurement) -> str:
    return result.spec.title


def _predicted(prediction: MemoryReport) -> dict[str, int]:
    return {"live": prediction.live_peak_bytes, "allocator": prediction.allocator_peak_bytes}


def _print_table(
    model_name: str, results: list[Measurement], predictions: list[MemoryReport]
) -> None:
    first = results[0]
    amp = first.spec.autocast_dtype
    precision = _dtype_name(first.spec.dtype) + (f" + {_dtype_name(amp)} autocast" if amp else "")
    size = " and ".join("x".join(map(str, size)) for size in first.spec.input_sizes)
    print(
        f"{model_name}, input {size}, batch {first.batch_size}, "
        f"{precision}, {first.device}, {first.num_threads} threads; second step measured"
    )
    print(
        f"{'step':<24} {'level':<10} {'measured_bytes':>15} {'predicted_bytes':>15} "
        f"{'pred/meas':>9}  measured peak at"
    )
    for result, prediction in zip(results, predictions):
        allocator_at = (
            f"{result.allocator_peak_op} ({result.allocator_peak_phase})"
            if result.allocator_peak_op
            else result.allocator_method
        )
        rows = (
            ("live", result.live_peak_bytes, f"{result.live_peak_op} ({result.live_peak_phase})"),
            ("allocator", result.allocator_peak_bytes, allocator_at),
        )
        predicted = _predicted(prediction)
        for level, nbytes, where in rows:
            ratio = predicted[level] / nbytes if nbytes else float("nan")
            print(
                f"{_step_name(result):<24} {level:<10} {nbytes:>15,} {predicted[level]:>15,} "
                f"{ratio:>9.4f}  {where}"
            )
    print(
        "live: tensor storage, each storage once; allocator: every block the allocator handed out."
    )
    for prediction in predictions:
        for note in prediction.notes:
            print(f"note: {note}")
    for result in results:
        base = result.baseline
        print(
            f"{_step_name(result)} baseline {base.total_bytes:,} bytes: "
            f"parameters {base.parameters_bytes:,}, buffers {base.buffers_bytes:,}, "
            f"gradients {base.gradients_bytes:,}, optimizer state {base.optimizer_state_bytes:,}, "
            f"input {base.input_bytes:,}, targets {base.targets_bytes:,}"
        )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _as_json(result: Measurement, prediction: MemoryReport) -> dict[str, object]:
    predicted = _predicted(prediction)
    return {
        "step": result.spec.mode,
        **result.spec.as_dict(),
        "batch_size": result.batch_size,
        "device": result.device,
        "num_threads": result.num_threads,
        "baseline_bytes": {**result.baseline.__dict__, "total_bytes": result.baseline.total_bytes},
        "live_peak_bytes": result.live_peak_bytes,
        "live_peak_at": {"op": result.live_peak_op, "phase": result.live_peak_phase},
        "allocator_peak_bytes": result.allocator_peak_bytes,
        "allocator_peak_at": {"op": result.allocator_peak_op, "phase": result.allocator_peak_phase},
        "allocator_method": result.allocator_method,
        "predicted_bytes": predicted,
        "predicted_over_measured": {
            level: nbytes / result.peaks()[level] for level, nbytes in predicted.items()
        },
    }
