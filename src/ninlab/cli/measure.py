"""`ninlab measure`: run the real training step and inference on this machine and print their
measured memory peaks (live tensor storage and what the allocator held) beside ninlab's
predictions for the same step and their ratio."""

from __future__ import annotations

import argparse
import json

import torch

from ninlab.cli.options import add_model_options, model_choice
from ninlab.analysis.measure import Measurement, measure
from ninlab.analysis.memory import MemoryReport, predict_memory
from ninlab.analysis.step import StepSpec


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("measure", help="measured memory peaks of a real training step and inference")
    add_model_options(parser)
    parser.add_argument("--optimizer", default="sgd", help="e.g. sgd, adam, adamw:weight_decay=0.01,implementation=foreach (default: sgd)")
    parser.add_argument("--amp", choices=("bfloat16", "float16"), help="run forward and loss under autocast to this dtype")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run (default: cpu)")
    parser.add_argument("--mode", choices=("train", "infer", "both"), default="both", help="which step to measure (default: both)")
    parser.add_argument("--grad-mode", choices=("no_grad", "inference_mode"), default="no_grad", help="inference's guard (default: no_grad)")
    parser.add_argument("--threads", type=int, help="intra-op threads (default: PyTorch's)")
    parser.add_argument("--format", choices=("table", "json"), default="table")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    choice = model_choice(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    modes = ("train", "infer") if args.mode == "both" else (args.mode,)
    specs = [
        StepSpec(
            input_size=choice.input_size,
            mode=mode,
            dtype=choice.dtype,
            amp=args.amp,
            device_type=args.device,
            optimizer=args.optimizer,
            grad_mode=args.grad_mode,
        )
        for mode in modes
    ]
    batch = choice.batch_size
    results = [measure(choice.model, spec, batch_size=batch) for spec in specs]
    predictions = [predict_memory(choice.model, spec, batch_size=batch, model_name=choice.name) for spec in specs]
    if args.format == "json":
        print(json.dumps([_as_json(result, prediction) for result, prediction in zip(results, predictions)], indent=2))
    else:
        _print_table(choice.name, results, predictions)
    return 0


def _step_name(result: Measurement) -> str:
    return result.spec.title


def _predicted(prediction: MemoryReport) -> dict[str, int]:
    return {"live": prediction.live_peak_bytes, "allocator": prediction.allocator_peak_bytes}


def _print_table(model_name: str, results: list[Measurement], predictions: list[MemoryReport]) -> None:
    first = results[0]
    amp = first.spec.autocast_dtype
    precision = _dtype_name(first.spec.dtype) + (f" + {_dtype_name(amp)} autocast" if amp else "")
    print(
        f"{model_name}, input {'x'.join(map(str, first.spec.input_size))}, batch {first.batch_size}, "
        f"{precision}, {first.device}, {first.num_threads} threads; second step measured"
    )
    print(f"{'step':<24} {'level':<10} {'measured_bytes':>15} {'predicted_bytes':>15} {'pred/meas':>9}  measured peak at")
    for result, prediction in zip(results, predictions):
        rows = (
            ("live", result.live_peak_bytes, f"{result.live_peak_op} ({result.live_peak_phase})"),
            ("allocator", result.allocator_peak_bytes, f"{result.allocator_peak_op} ({result.allocator_peak_phase})" if result.allocator_peak_op else result.allocator_method),
        )
        predicted = _predicted(prediction)
        for level, nbytes, where in rows:
            ratio = predicted[level] / nbytes if nbytes else float("nan")
            print(f"{_step_name(result):<24} {level:<10} {nbytes:>15,} {predicted[level]:>15,} {ratio:>9.4f}  {where}")
    print("live: tensor storage, each storage once; allocator: every block the allocator handed out.")
    for prediction in predictions:
        for note in prediction.notes:
            print(f"note: {note}")
    for result in results:
        base = result.baseline
        print(
            f"{_step_name(result)} baseline {base.total_bytes:,} bytes: parameters {base.parameters_bytes:,}, "
            f"buffers {base.buffers_bytes:,}, gradients {base.gradients_bytes:,}, optimizer state "
            f"{base.optimizer_state_bytes:,}, input {base.input_bytes:,}, targets {base.targets_bytes:,}"
        )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _as_json(result: Measurement, prediction: MemoryReport) -> dict[str, object]:
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
        "predicted_bytes": _predicted(prediction),
        "predicted_over_measured": {level: nbytes / result.peaks()[level] for level, nbytes in _predicted(prediction).items()},
    }
