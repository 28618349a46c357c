"""Training recipes: one frozen `TrainConfig` per run, and named presets to start from.

A checkpoint stores its `TrainConfig`, so a run can be resumed or reproduced from the file alone.
The numbers behind the `default` and `cpu` presets are in the README's training section.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

from ninlab.errors import NinlabError

__all__ = [
    "MAX_COUNT",
    "MAX_SEED",
    "PRESETS",
    "PRESET_DESCRIPTIONS",
    "TrainConfig",
    "config_from_dict",
    "get_preset",
]

Schedule = Literal["constant", "cosine", "onecycle"]
Amp = Literal["none", "bf16"]


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run (with the data and the seed, its exact result)."""

    variant: str = (
        "nin-d2l"  # a registry name or `name:key=value,...` (see ninlab.models.parse_variant)
    )
    image_size: int = 224
    epochs: int = 10
    batch_size: int = 128  # the global batch: split across ranks under torchrun
    lr: float = 0.05
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: Schedule = "constant"
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    # Augmentation of the 28x28 training images before the resize (`pipeline.Augmentation`):
    # random horizontal flips, random shifts of up to `translate` pixels each way.
    flip: bool = False
    translate: int = 0
    flip_tta: bool = False  # evaluate on the mean logits of each test image and its mirror image
    normalize: bool = False  # standardise inputs with the training set's mean and std
    amp: Amp = "none"
    channels_last: bool = True  # a layout, not a change to the arithmetic: 1.7x faster on this CPU
    compile: bool = False
    seed: int = 0
    train_examples: int | None = None  # use only the first N training images (None: all 60,000)
    test_examples: int | None = None

    def __post_init__(self) -> None:
        # Each message names the command-line option of the field, which is its name with dashes.
        finite = all(
            math.isfinite(value)
            for value in (
                self.lr,
                self.momentum,
                self.weight_decay,
                self.warmup_epochs,
                self.label_smoothing,
            )
        )
        checks = [
            (
                finite,
                (
                    "--lr, --momentum, --weight-decay, --warmup-epochs and --label-smoothing "
                    "must be finite numbers"
                ),
            ),
            (1 <= self.epochs <= MAX_COUNT, f"--epochs must be between 1 and {MAX_COUNT}"),
            (1 <= self.batch_size <= MAX_COUNT, f"--batch must be between 1 and {MAX_COUNT}"),
            (self.lr > 0, "--lr (learning rate) must be positive"),
            (0 <= self.momentum < 1, "--momentum must be in [0, 1)"),
            (not self.nesterov or self.momentum > 0, "--nesterov needs --momentum > 0"),
            (self.weight_decay >= 0, "--weight-decay must be non-negative"),
            (
                0 <= self.warmup_epochs <= self.epochs,
                "--warmup-epochs must be between 0 and the number of epochs",
            ),
            (0 <= self.label_smoothing < 1, "--label-smoothing must be in [0, 1)"),
            (
                self.schedule in ("constant", "cosine", "onecycle"),
                "--schedule must be constant, cosine or onecycle",
            ),
            (self.amp in ("none", "bf16"), "--amp must be none or bf16"),
            (
                0 <= self.translate < SOURCE_SIDE,
                (
                    f"--translate must be between 0 and {SOURCE_SIDE - 1} pixels (the images "
                    f"are {SOURCE_SIDE}x{SOURCE_SIDE})"
                ),
            ),
            (1 <= self.image_size <= MAX_COUNT, f"--image-size must be between 1 and {MAX_COUNT}"),
            (0 <= self.seed <= MAX_SEED, f"--seed must be between 0 and {MAX_SEED}"),
            (
                self.train_examples is None or self.train_examples >= 1,
                "--train-examples must be at least 1",
            ),
            (
                self.test_examples is None or self.test_examples >= 1,
                "--test-examples must be at least 1",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise NinlabError(message)


SOURCE_SIDE = 28  # Fashion-MNIST's images, which augmentation shifts before the resize
# torch.manual_seed takes an unsigned 64-bit seed; a rank adds its number to the run's.
MAX_SEED = 2**63 - 1
MAX_COUNT = 2**31 - 1  # PyTorch's sizes and indices in 32 bits


PRESETS: dict[str, TrainConfig] = {
    # d2l.ai's chapter: `lr, num_epochs, batch_size = 0.05, 10, 128`,
    # `load_data_fashion_mnist(batch_size, resize=224)`, plain SGD, Xavier-uniform init (the
    # registry's nin-d2l), no input normalisation.
    "d2l": TrainConfig(),
    # The book's architecture with a recipe that learns from the first epoch on every seed tried.
    "default": TrainConfig(
        variant="nin-d2l:init=kaiming",
        # With momentum 0.9 a peak of 0.05 collapsed to chance within the first epoch on one seed of
        # three at 224x224; 0.01 (VGG's rate, also a plain-conv stack without batch norm) did not.
        lr=0.01,
        momentum=0.9,
        weight_decay=5e-4,
        schedule="cosine",
        warmup_epochs=1.0,
        label_smoothing=0.1,
        normalize=True,
    ),
    # Small enough for a 2-core CPU (72 is just above d2l's NiN's smallest valid input, 67): on this
    # machine's 2 cores, 92.4% test accuracy after 6 epochs in 6.9 minutes, 88.5% after 3.
    "cpu": TrainConfig(
        variant="nin-d2l-bn",
        image_size=72,
        epochs=6,
        lr=0.1,
        momentum=0.9,
        nesterov=True,
        weight_decay=5e-4,
        schedule="onecycle",
        label_smoothing=0.1,
        normalize=True,
        amp="bf16",
    ),
}
# The `cpu` recipe without the dropout before the last block (a regulariser a 6-epoch run does not
# need: +0.75 points on the proxy of benchmarks/recipe-cpu.md), at 67x67, the smallest input
# nin-d2l takes: every map after the first block has the size it has at 72, and a step takes 7%
# less time. Seed 0: 92.77% after 6 epochs.
PRESETS["cpu-no-dropout"] = dataclasses.replace(
    PRESETS["cpu"], variant="nin-d2l-bn:dropout=0", image_size=67
)
# The `cpu` recipe on a NiN made for Fashion-MNIST's own 28x28 (nin-28: 3x3 convs, 2x2 pooling,
# 32/96/256 channels): no resize, maps of 28, 14 and 7 where nin-d2l at 67 has 15, 7 and 3, half
# the multiply-adds, 0.75-0.97x cpu's step time (benchmarks/recipe-cpu.md). Seeds 0-2: 93.65%,
# 93.90%, 93.81% after 6 epochs (mean 93.79%), against cpu-no-dropout's 92.77% (seed 0).
PRESETS["cpu-28"] = dataclasses.replace(PRESETS["cpu"], variant="nin-28", image_size=28)

PRESET_DESCRIPTIONS: dict[str, str] = {
    "d2l": (
        "the book's recipe exactly: nin-d2l, 224x224, batch 128, SGD lr 0.05, 10 epochs, Xavier "
        "init"
    ),
    "default": (
        "the book's NiN at 224x224: Kaiming init, normalised input, SGD momentum lr 0.01, warm-up "
        "+ cosine"
    ),
    "cpu": (
        "NiN with batch norm at 72x72, bf16, one-cycle, 6 epochs: 92.4% test accuracy in 7 "
        "minutes on 2 cores"
    ),
    "cpu-no-dropout": (
        "the cpu recipe without dropout, at 67x67: 92.8% test accuracy (seed 0) in 0.93x cpu's time"
    ),
    "cpu-28": (
        "the cpu recipe on nin-28, a NiN at Fashion-MNIST's own 28x28: 93.6% mean test accuracy "
        "over 3 seeds, 5.3-5.6 min each on 2 CPU cores"
    ),
}


def get_preset(name: str) -> TrainConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise NinlabError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None


def config_from_dict(values: dict[str, Any]) -> TrainConfig:
    """The inverse of `dataclasses.asdict` for a checkpoint's stored settings, refusing keys this
    version does not know and values it does not accept, saying that they are the checkpoint's."""
    known = {field.name for field in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise NinlabError(
            f"the checkpoint's stored settings have unknown keys {unknown}; upgrade ninlab"
        )
    try:
        return TrainConfig(**values)
    except (NinlabError, TypeError) as error:
        raise NinlabError(
            f"the checkpoint's stored settings are invalid ({error}); it was not written by "
            "'ninlab train' or was edited"
        ) from None
