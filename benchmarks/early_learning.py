"""Does a recipe learn early? The first steps of a preset's full schedule, for several seeds.

Run by hand, e.g.
    python benchmarks/early_learning.py --preset d2l --image-size 96 --amp bf16 --seeds 0 1 2
    python benchmarks/early_learning.py --preset default --amp bf16 --steps 120 --seeds 0 1 2

Each run is `ninlab.training.train.train` with the preset's whole schedule (so the learning rate is
what it would be in the full run), stopped after `--steps` optimizer steps (default: one epoch) the
way Ctrl-C stops it, then evaluated on all 10,000 test images: accuracy, test images whose logits
are all exactly 0 (dead final ReLUs) and the mean |logit| (near 0: the signal has faded). Appends
one JSON line per run to `--output`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

from ninlab.training.data import load_fashion_mnist
from ninlab.training.evaluate import evaluate_model
from ninlab.training.interrupt import StopRequest
from ninlab.training.pipeline import InputTransform
from ninlab.training.presets import PRESETS
from ninlab.training.progress import SilentReporter
from ninlab.training.train import train


class _StopAfter(SilentReporter):
    """Asks the run to stop once `steps` optimizer steps are done; remembers the running loss."""

    def __init__(self, stop: StopRequest, steps: int) -> None:
        self.stop, self.steps, self.done, self.loss = stop, steps, 0, float("nan")

    def batch_done(self, done: int, loss: float, accuracy: float, examples_per_s: float) -> None:
        self.done += 1
        self.loss = loss
        if self.done >= self.steps:
            self.stop.requested = True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=tuple(PRESETS), default="default")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--amp", choices=("none", "bf16"), default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument(
        "--steps", type=int, default=None, help="optimizer steps (default: one epoch)"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--output", type=Path, default=Path(__file__).with_name("early_learning-cpu.jsonl")
    )
    args = parser.parse_args()
    data = load_fashion_mnist()
    given = (("image_size", args.image_size), ("amp", args.amp), ("lr", args.lr))
    overrides = {key: value for key, value in given if value is not None}
    config = dataclasses.replace(PRESETS[args.preset], **overrides)
    steps = args.steps or -(-len(data.train) // config.batch_size)
    for seed in args.seeds:
        run = dataclasses.replace(config, seed=seed)
        stop = StopRequest()
        reporter = _StopAfter(stop, steps)
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as output_dir:
            result = train(run, output_dir=output_dir, data=data, reporter=reporter, stop=stop)
        evaluation = evaluate_model(
            result.model,
            data.test,
            transform=InputTransform(run.image_size, run.normalize),
            batch_size=256,
            amp=run.amp,
            channels_last=run.channels_last,
        )
        row = {
            "preset": args.preset,
            "config": dataclasses.asdict(run),
            "steps": steps,
            "running_train_loss": reporter.loss,
            "test_accuracy": evaluation.accuracy,
            "zero_logit_examples": evaluation.zero_logit_examples,
            "mean_abs_logit": evaluation.mean_abs_logit,
            "seconds": time.perf_counter() - start,
        }
        print(
            f"{args.preset} seed {seed}, {steps} steps at {run.image_size}x{run.image_size}: test "
            f"accuracy {evaluation.accuracy:.4f}, train loss {reporter.loss:.4f}, all-zero logits "
            f"{evaluation.zero_logit_examples}, mean |logit| {evaluation.mean_abs_logit:.4f}"
        )
        with args.output.open("a") as out:
            out.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
