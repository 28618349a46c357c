"""`ninlab train`, `ninlab evaluate`, `ninlab predict`: Fashion-MNIST with NiN."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ninlab.training.checkpoint import load_checkpoint, resolve_checkpoint_path
from ninlab.training.data import CLASS_NAMES, FashionMNIST, default_search_path, load_fashion_mnist
from ninlab.training.evaluate import evaluate_model, load_trained_model, predict_images
from ninlab.training.presets import PRESET_DESCRIPTIONS, PRESETS, config_from_dict, get_preset
from ninlab.training.progress import RichReporter, download_progress
from ninlab.training.train import StopRequest, train
from ninlab.training.plots import plot_confusion

# Options that map one to one onto TrainConfig fields (flag, field, type, help).
_CONFIG_OPTIONS: tuple[tuple[str, str, Any, str], ...] = (
    ("--variant", "variant", str, "NiN from the registry, optionally with settings, e.g. nin-d2l:num_1x1=1"),
    ("--image-size", "image_size", int, "side of the square input the images are resized to"),
    ("--epochs", "epochs", int, "epochs (the schedule spans them all)"),
    ("--batch-size", "batch_size", int, "global batch size (split across torchrun processes)"),
    ("--lr", "lr", float, "peak learning rate"),
    ("--momentum", "momentum", float, "SGD momentum (0: plain SGD, as in d2l)"),
    ("--weight-decay", "weight_decay", float, "L2 weight decay"),
    ("--schedule", "schedule", str, "learning-rate schedule"),
    ("--warmup-epochs", "warmup_epochs", float, "linear warm-up length in epochs (fractions allowed)"),
    ("--label-smoothing", "label_smoothing", float, "label smoothing of the cross-entropy"),
    ("--amp", "amp", str, "mixed precision (bf16: autocast)"),
    ("--seed", "seed", int, "seed of initialisation, shuffling and dropout"),
    ("--train-examples", "train_examples", int, "train on the first N training images only"),
    ("--test-examples", "test_examples", int, "evaluate on the first N test images only"),
)
_CONFIG_SWITCHES: tuple[tuple[str, str, str], ...] = (
    ("nesterov", "nesterov", "Nesterov momentum"),
    ("normalize", "normalize", "standardise inputs with the training set's mean and std"),
    ("channels-last", "channels_last", "channels-last memory layout (faster on CPUs and tensor cores)"),
    ("compile", "compile", "torch.compile the model"),
)


def register(subparsers: argparse._SubParsersAction) -> None:
    presets = "; ".join(f"{name}: {text}" for name, text in PRESET_DESCRIPTIONS.items())
    parser = subparsers.add_parser(
        "train",
        help="train NiN on Fashion-MNIST",
        description=f"Train NiN on Fashion-MNIST. Presets: {presets}. Options override the preset.",
    )
    parser.add_argument(
        "--preset", choices=tuple(PRESETS), default=None, help="starting recipe (default: default)"
    )
    choices = {"schedule": ("constant", "cosine", "onecycle"), "amp": ("none", "bf16")}
    for flag, field, kind, text in _CONFIG_OPTIONS:
        parser.add_argument(flag, dest=field, type=kind, default=None, choices=choices.get(field), help=text)
    for flag, field, text in _CONFIG_SWITCHES:
        parser.add_argument(
            f"--{flag}", dest=field, action=argparse.BooleanOptionalAction, default=None, help=text
        )
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        help="where checkpoint, metrics and plots go (default: runs/PRESET)",
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="RUN_DIR",
        help="continue the run saved in RUN_DIR (or in --output-dir) exactly where it stopped",
    )
    _add_common(parser)
    parser.set_defaults(func=run_train)

    evaluate = subparsers.add_parser(
        "evaluate", help="test accuracy, per class, and a confusion matrix of a checkpoint"
    )
    evaluate.add_argument("checkpoint", help="checkpoint.pt or a run directory")
    evaluate.add_argument(
        "--output", type=Path, default=None, help="confusion-matrix PNG (default: beside the checkpoint)"
    )
    evaluate.add_argument("--batch-size", type=int, default=256)
    evaluate.add_argument(
        "--test-examples", type=int, default=None, help="evaluate on the first N test images only"
    )
    evaluate.add_argument("--json", action="store_true", help="print the results as JSON")
    _add_common(evaluate)
    evaluate.set_defaults(func=run_evaluate)

    predict = subparsers.add_parser("predict", help="class and probability for image files")
    predict.add_argument("checkpoint", help="checkpoint.pt or a run directory")
    predict.add_argument("images", nargs="+", help="image files of any size; converted to grayscale")
    predict.add_argument(
        "--invert",
        action="store_true",
        help="invert gray levels first (Fashion-MNIST shows light garments on black; photos are usually the opposite)",
    )
    predict.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    predict.set_defaults(func=run_predict)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir", default=None, help="directory with the four Fashion-MNIST IDX files (.gz or not)"
    )
    parser.add_argument(
        "--no-download", action="store_true", help="never download; fail if the files are not found"
    )
    parser.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1, ... (default: this rank's GPU if any, else CPU)"
    )


def _load_data(args: argparse.Namespace) -> FashionMNIST:
    with download_progress() as hook:
        return load_fashion_mnist(
            search_path=default_search_path(args.data_dir), download=not args.no_download, progress=hook
        )


def run_train(args: argparse.Namespace) -> int:
    fields = [field for _, field, _, _ in _CONFIG_OPTIONS] + [field for _, field, _ in _CONFIG_SWITCHES]
    given = {field: getattr(args, field) for field in fields if getattr(args, field) is not None}
    preset_name = args.preset or "default"
    config = dataclasses.replace(get_preset(preset_name), **given)
    output_dir = (
        Path(args.resume) if isinstance(args.resume, str) else args.output_dir or Path("runs") / preset_name
    )
    if args.resume and args.preset is None:
        # Compare only what was given again: the rest comes from the checkpoint.
        config = dataclasses.replace(config_from_dict(load_checkpoint(output_dir)["config"]), **given)
    data = _load_data(args)
    stop = StopRequest()
    with stop.catching_signals():
        result = train(
            config,
            output_dir=output_dir,
            data=data,
            resume=bool(args.resume),
            device=args.device,
            reporter=RichReporter(),
            stop=stop,
        )
    return 130 if result.interrupted else 0


def run_evaluate(args: argparse.Namespace) -> int:
    path = resolve_checkpoint_path(args.checkpoint)
    trained = load_trained_model(path, device=args.device or "cpu")
    data = _load_data(args)
    test = data.test.head(args.test_examples) if args.test_examples else data.test
    device = next(trained.model.parameters()).device
    test = type(test)(test.images.to(device), test.labels.to(device))
    evaluation = evaluate_model(
        trained.model,
        test,
        transform=trained.transform,
        batch_size=args.batch_size,
        amp=trained.config.amp,
        channels_last=trained.config.channels_last,
    )
    png = args.output or path.parent / "confusion-matrix.png"
    plot_confusion(
        evaluation.confusion,
        CLASS_NAMES,
        png,
        title=f"{trained.config.variant}, epoch {trained.epoch}: test accuracy {evaluation.accuracy:.4f}",
    )
    if args.json:
        print(
            json.dumps(
                {
                    "checkpoint": str(path),
                    "epoch": trained.epoch,
                    "variant": trained.config.variant,
                    "examples": evaluation.examples,
                    "accuracy": evaluation.accuracy,
                    "loss": evaluation.loss,
                    "per_class_accuracy": dict(zip(CLASS_NAMES, evaluation.per_class_accuracy)),
                    "confusion": evaluation.confusion,
                    "confusion_png": str(png),
                },
                indent=2,
            )
        )
        return 0
    console = Console()
    table = Table(title=f"{path} (epoch {trained.epoch}, {trained.config.variant})")
    table.add_column("class")
    table.add_column("test images", justify="right")
    table.add_column("accuracy", justify="right")
    for name, row, accuracy in zip(CLASS_NAMES, evaluation.confusion, evaluation.per_class_accuracy):
        table.add_row(name, f"{sum(row):,}", f"{accuracy:.4f}")
    table.add_row("all", f"{evaluation.examples:,}", f"{evaluation.accuracy:.4f}", style="bold")
    console.print(table)
    console.print(f"confusion matrix: {png}", highlight=False)
    return 0


def run_predict(args: argparse.Namespace) -> int:
    trained = load_trained_model(resolve_checkpoint_path(args.checkpoint), device=args.device)
    for prediction in predict_images(trained, args.images, invert=args.invert):
        print(f"{prediction.path}: {prediction.class_name} ({prediction.probability:.3f})")
    return 0
