"""`ninlab train`, `ninlab evaluate`, `ninlab predict`: Fashion-MNIST with NiN."""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

from ninlab.cli.options import (
    BATCH,
    DEVICE,
    OUTPUT_DIR,
    TEST_EXAMPLES,
    add_data_options,
    add_format_option,
    add_output_option,
    add_training_options,
    load_data,
    runs_on_device,
    training_overrides,
)
from ninlab.errors import NinlabError
from ninlab.outputs import output_path
from ninlab.training.checkpoint import load_checkpoint, resolve_checkpoint_path
from ninlab.training.console import outliving_console
from ninlab.training.evaluate import evaluate, load_trained_model, predict_images
from ninlab.training.interrupt import StopRequest
from ninlab.training.plots import plot_confusion
from ninlab.training.presets import PRESET_DESCRIPTIONS, PRESETS, config_from_dict, get_preset
from ninlab.training.progress import RichReporter
from ninlab.training.train import train
from ninlab.viz.render_evaluation import evaluation_json, print_evaluation


def register(subparsers: argparse._SubParsersAction) -> None:
    presets = "; ".join(f"{name}: {text}" for name, text in PRESET_DESCRIPTIONS.items())
    parser = subparsers.add_parser(
        "train",
        help="train NiN on Fashion-MNIST",
        description=f"Train NiN on Fashion-MNIST. Presets: {presets}. Training options override "
        "the preset; --batch is the global batch, split across torchrun processes.",
    )
    parser.add_argument(
        "--preset", choices=tuple(PRESETS), default=None, help="starting recipe (default: default)"
    )
    add_training_options(parser)
    DEVICE.add(parser, shown="this rank's GPU if any, else cpu")
    OUTPUT_DIR.add(parser, shown="runs/PRESET")
    parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="RUN_DIR",
        help="continue the run saved in RUN_DIR (or in --output-dir) exactly where it stopped",
    )
    parser.add_argument(
        "--force-memory",
        action="store_true",
        help="start even when the predicted peak memory exceeds the memory available",
    )
    add_data_options(parser)
    runs_on_device(parser)
    parser.set_defaults(func=run_train)

    evaluate = subparsers.add_parser(
        "evaluate", help="test accuracy, per class, and a confusion matrix of a checkpoint"
    )
    evaluate.add_argument("checkpoint", help="checkpoint.pt or a run directory")
    add_output_option(evaluate, "the confusion-matrix PNG", shown="beside the checkpoint")
    add_format_option(evaluate, "table", "json")
    BATCH.add(evaluate, default=256)
    TEST_EXAMPLES.add(evaluate, shown="all")
    DEVICE.add(evaluate, default="cpu")
    add_data_options(evaluate)
    runs_on_device(evaluate)
    evaluate.set_defaults(func=run_evaluate)

    predict = subparsers.add_parser("predict", help="class and probability for image files")
    predict.add_argument("checkpoint", help="checkpoint.pt or a run directory")
    predict.add_argument(
        "images", nargs="+", help="image files of any size; converted to grayscale"
    )
    predict.add_argument(
        "--invert",
        action="store_true",
        help="invert gray levels first (Fashion-MNIST shows light garments on black; photos are "
        "usually the opposite)",
    )
    DEVICE.add(predict, default="cpu")
    runs_on_device(predict)
    predict.set_defaults(func=run_predict)


def run_train(args: argparse.Namespace) -> int:
    given = training_overrides(args)
    preset_name = args.preset or "default"
    config = dataclasses.replace(get_preset(preset_name), **given)
    output_dir = _run_directory(args, preset_name)
    if args.resume and args.preset is None:
        # Compare only what was given again: the rest comes from the checkpoint.
        saved = config_from_dict(load_checkpoint(output_dir)["config"])
        config = dataclasses.replace(saved, **given)
    stop = StopRequest()
    with stop.catching_signals(), outliving_console(output_dir):
        result = train(
            config,
            output_dir=output_dir,
            data=lambda: load_data(args),
            resume=bool(args.resume),
            device=args.device,
            reporter=RichReporter(),
            stop=stop,
            force_memory=args.force_memory,
        )
        # The run's progress is on stderr as it happens; its result, the command's output, on
        # stdout (so `ninlab train > log.txt` keeps it), inside the guard: a reader gone by now
        # finds it in the run's console.log.
        last = result.history[-1] if result.history else None
        if last is not None and os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0's
            print(
                f"{'interrupted' if result.interrupted else 'trained'} {result.config.variant}, "
                f"after epoch {last['epoch']}: train loss {last['train_loss']:.4f}, test "
                f"accuracy {last['test_accuracy']:.4f}; checkpoint {result.checkpoint}"
            )
    if stop.requested and not result.interrupted:
        # Asked to stop after the last step (during the final evaluation, save or plot): the
        # run is complete and saved, and the Ctrl-C still ends the command as one, exit 130.
        raise KeyboardInterrupt
    return 130 if result.interrupted else 0


def _run_directory(args: argparse.Namespace, preset_name: str) -> Path:
    """The run's directory: --resume's, else --output-dir, else runs/PRESET. --resume DIR with
    another --output-dir is refused: a resumed run continues in its own directory."""
    if not isinstance(args.resume, str):
        return args.output_dir or Path("runs") / preset_name
    if not args.resume:  # an unset shell variable: Path("") would be the working directory
        raise NinlabError(
            "--resume '' names no directory; give the run directory (--resume runs/default), or "
            "--resume alone to continue the run in --output-dir"
        )
    resumed = Path(args.resume)
    if args.output_dir is not None and Path(args.output_dir).resolve() != resumed.resolve():
        raise NinlabError(
            f"--resume {args.resume} and --output-dir {args.output_dir} name two directories; a "
            "resumed run continues in its own directory: give only --resume"
        )
    return resumed


def run_evaluate(args: argparse.Namespace) -> int:
    path = resolve_checkpoint_path(args.checkpoint)
    # A bad picture name is refused before the evaluation, not after it.
    png = output_path(
        args.output or path.parent / "confusion-matrix.png",
        suffixes=(".png", ".svg", ".pdf"),
        what="confusion matrix",
    )
    trained = load_trained_model(path, device=args.device)
    data = load_data(args)
    test = data.test.head(args.test_examples) if args.test_examples else data.test
    evaluation = evaluate(trained, test, batch_size=args.batch)
    plot_confusion(
        evaluation.confusion,
        evaluation.class_names,
        png,
        title=f"{trained.config.variant}, epoch {trained.epoch}: "
        f"test accuracy {evaluation.accuracy:.4f}",
    )
    if args.format == "json":
        print(evaluation_json(trained, evaluation, checkpoint=path, confusion_png=png))
    else:
        print_evaluation(trained, evaluation, checkpoint=path, confusion_png=png)
    return 0


def run_predict(args: argparse.Namespace) -> int:
    trained = load_trained_model(resolve_checkpoint_path(args.checkpoint), device=args.device)
    for prediction in predict_images(trained, args.images, invert=args.invert):
        print(f"{prediction.path}: {prediction.class_name} ({prediction.probability:.3f})")
    return 0
