"""The book's training pipeline against ninlab's, same model, batch and resolution, in one run.

Run by hand: `python benchmarks/bench_pipeline.py [--steps 10] [--size 224] [--batch 128]`.

The book (d2l.ai, chapter "Network in Network", `d2l.load_data_fashion_mnist(batch_size,
resize=224)` and `d2l.train_ch6`) is written out here without torchvision: a Dataset that turns
each uint8 image into a PIL image, resizes it with PIL's bilinear filter (what
`transforms.Resize(224)` does to a PIL image) and scales it to [0, 1] (`transforms.ToTensor`), a
shuffling `DataLoader` with d2l's 4 workers, and train_ch6's step (zero_grad, forward,
cross-entropy, backward, SGD step, `d2l.accuracy` per batch).

Ours is `ninlab.training.train.train` itself with the d2l preset (channels-last, the default
layout), in float32 and with `--amp bf16`. Every pipeline trains two epochs over the same first
`steps` batches of Fashion-MNIST; the second epoch is timed (the first pays one-off set-up: oneDNN
kernel choice, first worker start), so each figure is a whole epoch end to end: data, steps,
metrics, and for the book the worker start-up it pays every epoch. The machine is shared: the
three pipelines run in turn, `--repeats` times, each keeps its fastest timed epoch (the least
disturbed), and the load average is printed. Compare ratios, not absolute times.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ninlab.models import build_nin
from ninlab.training.data import FashionMNIST, Split, load_fashion_mnist
from ninlab.training.presets import PRESETS
from ninlab.training.train import train

D2L_WORKERS = 4  # d2l.get_dataloader_workers()
D2L_LR = 0.05


class BookFashionMNIST(Dataset):
    """torchvision's FashionMNIST with transforms.Compose([Resize(size), ToTensor()]), per image."""

    def __init__(self, split: Split, size: int) -> None:
        self.images, self.labels, self.size = split.images.numpy(), split.labels.numpy(), size

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = Image.fromarray(self.images[index])  # mode "L", as torchvision's dataset returns it
        image = image.resize(
            (self.size, self.size), Image.BILINEAR
        )  # transforms.Resize on a PIL image
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True))  # transforms.ToTensor
        return pixels.unsqueeze(0).float().div(255), int(self.labels[index])


def d2l_accuracy(y_hat: torch.Tensor, y: torch.Tensor) -> float:
    """d2l.accuracy: the number of correct predictions (a float, so a host sync every batch)."""
    y_hat = y_hat.argmax(axis=1)
    cmp = y_hat.type(y.dtype) == y
    return float(cmp.type(y.dtype).sum())


def book_epoch_seconds(split: Split, *, size: int, batch: int, epochs: int) -> list[float]:
    """d2l.train_ch6's loop over d2l's DataLoader; the wall time of each epoch."""
    torch.manual_seed(0)
    net = build_nin()  # nin-d2l with d2l's Xavier-uniform init (net.apply(init_weights))
    optimizer = torch.optim.SGD(net.parameters(), lr=D2L_LR)
    loss = nn.CrossEntropyLoss()
    train_iter = DataLoader(
        BookFashionMNIST(split, size), batch_size=batch, shuffle=True, num_workers=D2L_WORKERS
    )
    seconds = []
    for _ in range(epochs):
        start = time.perf_counter()
        metric = [0.0, 0.0, 0]
        net.train()
        for X, y in train_iter:
            optimizer.zero_grad()
            y_hat = net(X)
            l = loss(y_hat, y)  # noqa: E741  (the book's name)
            l.backward()
            optimizer.step()
            with torch.no_grad():
                metric[0] += float(l * X.shape[0])
                metric[1] += d2l_accuracy(y_hat, y)
                metric[2] += X.shape[0]
        seconds.append(time.perf_counter() - start)
    return seconds


def ours_epoch_seconds(
    data: FashionMNIST, *, size: int, batch: int, examples: int, epochs: int, amp: str
) -> list[float]:
    config = dataclasses.replace(
        PRESETS["d2l"],
        image_size=size,
        batch_size=batch,
        epochs=epochs,
        train_examples=examples,
        test_examples=batch,
        amp=amp,
    )
    with tempfile.TemporaryDirectory() as output_dir:
        result = train(config, output_dir=output_dir, data=data)
    return [row["train_seconds"] for row in result.history]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="batches per epoch")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2, help="rounds of the three pipelines")
    parser.add_argument(
        "--output", type=Path, default=Path(__file__).with_name("bench_pipeline-cpu.json")
    )
    args = parser.parse_args()
    data = load_fashion_mnist()
    examples = args.steps * args.batch
    subset = data.train.head(examples)
    load_before = os.getloadavg()[0]
    pipelines = {
        "book (DataLoader + PIL, float32)": lambda: book_epoch_seconds(
            subset, size=args.size, batch=args.batch, epochs=2
        ),
        "ninlab float32": lambda: ours_epoch_seconds(
            data, size=args.size, batch=args.batch, examples=examples, epochs=2, amp="none"
        ),
        "ninlab --amp bf16": lambda: ours_epoch_seconds(
            data, size=args.size, batch=args.batch, examples=examples, epochs=2, amp="bf16"
        ),
    }
    timings: dict[str, list[float]] = {name: [] for name in pipelines}
    for _ in range(args.repeats):
        for name, run in pipelines.items():
            timings[name].append(run()[-1])
    load_after = os.getloadavg()[0]
    best = {name: min(seconds) for name, seconds in timings.items()}
    book = best["book (DataLoader + PIL, float32)"]
    print(
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; NiN at {args.size}x{args.size}, batch {args.batch}, "
        f"{args.steps} steps per epoch, epoch 2 timed, best of {args.repeats}; load average "
        f"{load_before:.1f} before, {load_after:.1f} after"
    )
    rows = []
    for name, seconds in best.items():
        rate = examples / seconds
        rows.append(
            {
                "pipeline": name,
                "epoch_seconds": seconds,
                "all_epoch_seconds": timings[name],
                "examples_per_s": rate,
                "speedup": book / seconds,
            }
        )
        print(f"  {name:34s} {seconds:7.1f} s  {rate:7.1f} examples/s  {book / seconds:5.2f}x")
    args.output.write_text(
        json.dumps(
            {
                "machine": platform.platform(),
                "cpu_count": os.cpu_count(),
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "size": args.size,
                "batch": args.batch,
                "steps": args.steps,
                "load_average": [load_before, load_after],
                "results": rows,
            },
            indent=2,
        )
        + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
