"""Options of a command that predicts memory (`ninlab summary`'s memory section): which step, on
which device, at which precision, and the batch-size questions."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from ninlab.cli.options import ModelChoice
from ninlab.analysis.step import AMP_DTYPES, StepSpec
from ninlab.analysis.memory import (
    BatchFit,
    BatchScaling,
    MemoryReport,
    fit_batch,
    memory_vs_batch,
    predict_memory,
)

__all__ = ["MemorySection", "add_memory_options", "memory_section"]


@dataclass(frozen=True)
class MemorySection:
    report: MemoryReport
    scaling: BatchScaling | None  # with --fit: the peak as fixed + per-sample bytes
    fit: BatchFit | None


def add_memory_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("memory")
    group.add_argument("--mode", choices=("train", "infer"), help="predict a training step or an inference (default: train, infer for a model with nothing to train)")
    group.add_argument("--optimizer", default="sgd", help="e.g. sgd, sgd-momentum, nesterov, adam, adamw:weight_decay=0.01, rmsprop, adagrad (default: sgd)")
    group.add_argument("--device-type", choices=("cpu", "cuda"), default="cpu", help="the device to predict for, from any machine (default: cpu)")
    group.add_argument("--amp", choices=sorted(AMP_DTYPES), help="run forward and loss under autocast to this dtype")
    group.add_argument("--grad-mode", choices=("no_grad", "inference_mode"), default="no_grad", help="inference's guard (default: no_grad)")
    group.add_argument("--fit", metavar="BUDGET", help="largest batch whose training peak fits, e.g. 8GiB, 500MB, 1.5G")
    group.add_argument("--ddp", action="store_true", help="add DistributedDataParallel's gradient buckets (its defaults)")


def memory_section(args: argparse.Namespace, choice: ModelChoice) -> MemorySection:
    trains = any(p.requires_grad for p in choice.model.parameters())
    spec = StepSpec(
        input_size=choice.input_size,
        mode=args.mode or ("train" if trains else "infer"),
        optimizer=args.optimizer,
        dtype=choice.dtype,
        amp=args.amp,
        device_type=args.device_type,
        grad_mode=args.grad_mode,
        ddp=args.ddp,
    )
    report = predict_memory(choice.model, spec, batch_size=choice.batch_size, model_name=choice.name)
    if args.fit is None:
        return MemorySection(report, None, None)
    fit = fit_batch(choice.model, spec, budget=args.fit)
    scaling = memory_vs_batch(
        choice.model, spec, batch_sizes=(fit.batch_size, fit.batch_size + 1), check_batch_size=choice.batch_size, level=fit.level
    )
    return MemorySection(report, scaling, fit)
