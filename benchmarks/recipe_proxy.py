"""Rank recipe changes for the `cpu` preset cheaply: a short run on a subset, evaluated once.

Run by hand, one change at a time against the same baseline, e.g.
    nice -n 15 python benchmarks/recipe_proxy.py --train-examples 10000 --epochs 6
    nice -n 15 python benchmarks/recipe_proxy.py --train-examples 10000 --epochs 6 --flip

The loop is the trainer's own pieces (`optimize_batch`, the learning rate of `Schedule`, the input
transform and augmentation of `pipeline`, `evaluate_model`) without its checkpoints and per-epoch
evaluations. One run gives four test accuracies on all 10,000 test images, so flip test-time
augmentation and an exponential moving average (EMA) of the weights cost no extra training: the
network as trained, with flip TTA, its EMA, and the EMA with flip TTA. Appends a JSON line per run
to `--output`.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from pathlib import Path

import torch

from ninlab.models import build_nin, parse_variant
from ninlab.optimizers import make_optimizer
from ninlab.training.data import Split, load_fashion_mnist
from ninlab.training.evaluate import autocast
from ninlab.training.pipeline import Augmentation, InputTransform, batch_indices, epoch_permutation
from ninlab.training.presets import PRESETS, TrainConfig
from ninlab.training.schedule import Schedule
from ninlab.training.train import _optimizer_spec, optimize_batch


def _accuracies(
    model: torch.nn.Module, split: Split, transform: InputTransform, amp: str
) -> tuple[float, float]:
    """Test accuracy without and with flip TTA, from one pass over the images and one over their
    mirror images (`evaluate_model` with and without `flip_tta` would make three)."""
    model.eval()
    plain = flip_tta = 0
    with torch.no_grad(), autocast(split.images.device, amp):
        for indices in torch.arange(len(split)).split(500):
            inputs = transform(split.images[indices]).contiguous(memory_format=torch.channels_last)
            logits, mirrored = model(inputs).float(), model(inputs.flip(-1)).float()
            labels = split.labels[indices]
            plain += int((logits.argmax(1) == labels).sum())
            flip_tta += int(((logits + mirrored).argmax(1) == labels).sum())
    return plain / len(split), flip_tta / len(split)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=tuple(PRESETS), default="cpu")
    parser.add_argument("--train-examples", type=int, default=10_000)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--variant", default=None)
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--label-smoothing", type=float, default=None)
    parser.add_argument("--weight-decay", type=float, default=None)
    parser.add_argument("--flip", action="store_true")
    parser.add_argument("--translate", type=int, default=0)
    parser.add_argument("--ema", type=float, default=0.999, help="EMA decay per step")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--output", type=Path, default=Path(__file__).with_name("recipe_proxy-cpu.jsonl")
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    given = {
        "variant": args.variant,
        "image_size": args.image_size,
        "batch_size": args.batch,
        "lr": args.lr,
        "label_smoothing": args.label_smoothing,
        "weight_decay": args.weight_decay,
    }
    config = TrainConfig(
        **{
            **PRESETS[args.preset].__dict__,
            **{key: value for key, value in given.items() if value is not None},
            "epochs": args.epochs,
            "seed": args.seed,
            "train_examples": args.train_examples,
        }
    )
    data = load_fashion_mnist()
    train_split = data.train.head(args.train_examples)
    torch.manual_seed(config.seed)
    model = build_nin(parse_variant(config.variant)).to(memory_format=torch.channels_last)
    optimizer = make_optimizer(_optimizer_spec(config), model.parameters())
    average = copy.deepcopy(model)
    schedule = Schedule.of(config, len(train_split), 1)
    transform = InputTransform(config.image_size, config.normalize)
    augment = Augmentation(flip=args.flip, translate=args.translate)
    start = time.perf_counter()
    step = 0
    for epoch in range(1, config.epochs + 1):
        permutation = epoch_permutation(len(train_split), seed=config.seed, epoch=epoch)
        for indices, count in batch_indices(permutation, batch_size=config.batch_size):
            for group in optimizer.param_groups:
                group["lr"] = schedule.lr(step)
            images = augment(train_split.images[indices], seed=config.seed, step=step)
            inputs = transform(images).contiguous(memory_format=torch.channels_last)
            optimize_batch(
                model,
                optimizer,
                inputs,
                train_split.labels[indices],
                amp=config.amp,
                label_smoothing=config.label_smoothing,
                loss_scale=1 / count,
            )
            step += 1
            # Warmed-up decay (as timm's ModelEmaV3), so early averages are not dominated by init.
            decay = min(args.ema, (1 + step) / (10 + step))
            with torch.no_grad():
                for mine, theirs in zip(average.state_dict().values(), model.state_dict().values()):
                    if mine.dtype.is_floating_point:
                        mine.lerp_(theirs, 1 - decay)
                    else:
                        mine.copy_(theirs)
    train_seconds = time.perf_counter() - start
    accuracies = {}
    for name, net in (("plain", model), ("ema", average)):
        plain, flip_tta = _accuracies(net, data.test, transform, config.amp)
        accuracies.update({name: plain, f"{name}+tta": flip_tta})
    row = {
        "config": {**config.__dict__, "flip": args.flip, "translate": args.translate},
        "ema_decay": args.ema,
        "steps": step,
        "test_accuracy": accuracies,
        "train_seconds": round(train_seconds, 1),
        "threads": args.threads,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, shared",
        "torch": torch.__version__,
    }
    print(json.dumps(row))
    with args.output.open("a") as out:
        out.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
