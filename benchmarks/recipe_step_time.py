"""Time per training image of two recipes, side by side in one process: a step-time ratio that a
shared, loaded machine still measures (wall-clock runs there are inflated and noisy).

Run by hand, e.g.
    nice -n 15 python benchmarks/recipe_step_time.py --old cpu-2025 --new cpu

Each recipe's step is the trainer's own: the batch gathered, augmented, resized and scaled
(`pipeline`), then `optimize_batch`, on random images; and its evaluation of a batch (with flip
test-time augmentation when the recipe has it). The recipes are timed in turns, `--rounds` times
`--steps` steps each, and each figure is the lower quartile of the rounds, since load only adds
time. Prints the per-image times and the new/old ratios, and appends them to `--output`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from ninlab.models import build_nin, parse_variant
from ninlab.optimizers import make_optimizer
from ninlab.training.evaluate import autocast
from ninlab.training.pipeline import Augmentation, InputTransform
from ninlab.training.presets import PRESETS, TrainConfig
from ninlab.training.train import _optimizer_spec, optimize_batch


class _Recipe:
    def __init__(self, config: TrainConfig) -> None:
        torch.manual_seed(0)
        self.config = config
        self.model = build_nin(parse_variant(config.variant)).to(memory_format=torch.channels_last)
        self.optimizer = make_optimizer(_optimizer_spec(config), self.model.parameters())
        self.transform = InputTransform(config.image_size, config.normalize)
        self.augment = Augmentation(flip=config.flip, translate=config.translate)
        self.images = torch.randint(0, 256, (config.batch_size, 28, 28), dtype=torch.uint8)
        self.labels = torch.randint(0, 10, (config.batch_size,))
        self.step = 0

    def train_step(self) -> None:
        images = self.augment(self.images, seed=0, step=self.step)
        inputs = self.transform(images).contiguous(memory_format=torch.channels_last)
        optimize_batch(
            self.model,
            self.optimizer,
            inputs,
            self.labels,
            amp=self.config.amp,
            label_smoothing=self.config.label_smoothing,
            loss_scale=1 / self.config.batch_size,
        )
        self.step += 1

    def eval_batch(self) -> None:
        inputs = self.transform(self.images).contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), autocast(inputs.device, self.config.amp):
            self.model(inputs)
            if self.config.flip_tta:
                self.model(inputs.flip(-1))


def _per_image(recipes: list[_Recipe], action: str, rounds: int, steps: int) -> list[float]:
    times: list[list[float]] = [[] for _ in recipes]
    for _ in range(rounds):
        for recipe, measured in zip(recipes, times):
            start = time.perf_counter()
            for _ in range(steps):
                getattr(recipe, action)()
            measured.append((time.perf_counter() - start) / (steps * recipe.config.batch_size))
    return [sorted(measured)[len(measured) // 4] for measured in times]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--old", choices=tuple(PRESETS), default="cpu")
    parser.add_argument("--new", choices=tuple(PRESETS), default="cpu")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--output", type=Path, default=Path(__file__).with_name("recipe_step_time-cpu.jsonl")
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    recipes = [_Recipe(PRESETS[args.old]), _Recipe(PRESETS[args.new])]
    _per_image(recipes, "train_step", 1, 2)  # warm-up: oneDNN's kernels, the allocator
    train = _per_image(recipes, "train_step", args.rounds, args.steps)
    evaluate = _per_image(recipes, "eval_batch", args.rounds, args.steps)
    row = {
        "old": args.old,
        "new": args.new,
        "train_ms_per_image": [round(t * 1e3, 4) for t in train],
        "eval_ms_per_image": [round(t * 1e3, 4) for t in evaluate],
        "train_ratio": round(train[1] / train[0], 3),
        "eval_ratio": round(evaluate[1] / evaluate[0], 3),
        "threads": args.threads,
        "load_average": os.getloadavg(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, shared",
        "torch": torch.__version__,
    }
    print(json.dumps(row))
    with args.output.open("a") as out:
        out.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
