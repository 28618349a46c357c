"""Measuring a trained network: test accuracy and confusion matrix, and predictions for
image files."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import nn
from torch.nn import functional as F

from ninlab.errors import NinlabError, one_line
from ninlab.inputs import regular_file
from ninlab.models import build_nin, parse_variant
from ninlab.training import distributed
from ninlab.training.checkpoint import load_checkpoint, warn_if_not_finite
from ninlab.training.data import CLASS_NAMES, Split
from ninlab.training.pipeline import InputTransform, resize_like_pil
from ninlab.training.presets import TrainConfig, config_from_dict

__all__ = [
    "ClassResult",
    "Evaluation",
    "Prediction",
    "TrainedModel",
    "autocast",
    "evaluate",
    "evaluate_model",
    "load_image",
    "load_trained_model",
    "predict_images",
]

# Fashion-MNIST's images are 28x28; any other picture is first brought to that size.
SOURCE_SIZE = 28


@dataclass(frozen=True)
class ClassResult:
    """One class of a labelled set: its images, how many were predicted right, and the ratio (None
    when the set holds no image of it, as a few `--test-examples` may)."""

    name: str
    examples: int
    correct: int
    accuracy: float | None


@dataclass(frozen=True)
class Evaluation:
    """Counts over a labelled set; `confusion[i][j]` is how many images of class i were
    predicted j."""

    confusion: tuple[tuple[int, ...], ...]
    loss_sum: float  # cross-entropy summed over examples (no label smoothing)
    # Examples whose logits were all exactly 0: the signature of a NiN whose last ReLU has died.
    zero_logit_examples: int
    abs_logit_sum: (
        float  # |logit| summed over examples and classes: near 0 when the signal has faded
    )
    class_names: tuple[str, ...] = CLASS_NAMES

    @property
    def examples(self) -> int:
        return sum(sum(row) for row in self.confusion)

    @property
    def correct(self) -> int:
        return sum(self.confusion[i][i] for i in range(len(self.confusion)))

    @property
    def accuracy(self) -> float:
        return self.correct / self.examples

    @property
    def loss(self) -> float:
        return self.loss_sum / self.examples

    @property
    def mean_abs_logit(self) -> float:
        return self.abs_logit_sum / (self.examples * len(self.confusion))

    @property
    def per_class(self) -> tuple[ClassResult, ...]:
        """A row per class, in the confusion matrix's order."""
        return tuple(
            ClassResult(name, sum(row), row[i], row[i] / sum(row) if sum(row) else None)
            for i, (name, row) in enumerate(zip(self.class_names, self.confusion))
        )


def autocast(device: torch.device, amp: str) -> AbstractContextManager[Any]:
    """bf16 autocast when asked for, on whichever device the run uses."""
    if amp == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def evaluate_model(
    model: nn.Module,
    split: Split,
    *,
    transform: InputTransform,
    batch_size: int,
    amp: str = "none",
    channels_last: bool = False,
    flip_tta: bool = False,
    context: distributed.Context | None = None,
) -> Evaluation:
    """Accuracy and confusion of `model` in eval mode over `split` (already on the model's device).
    With `flip_tta`, the logits are the mean of the image's and its mirror image's (test-time
    augmentation, twice the forward cost). Under torchrun each rank takes a contiguous share of the
    examples and the counts are summed."""
    context = context or distributed.Context(device=split.images.device)
    num_classes = len(CLASS_NAMES)
    shares = torch.arange(len(split), device=split.images.device).tensor_split(context.world_size)
    mine = shares[context.rank]
    confusion = torch.zeros(
        num_classes * num_classes, dtype=torch.int64, device=split.images.device
    )
    # Loss, zero-logit examples, |logit| sum.
    sums = torch.zeros(3, dtype=torch.float64, device=split.images.device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for indices in mine.split(batch_size):
            inputs = transform(split.images[indices])
            if channels_last:
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            labels = split.labels[indices]
            with autocast(split.images.device, amp):
                logits = model(inputs).float()
                if flip_tta:
                    logits = (logits + model(inputs.flip(-1)).float()) / 2
            confusion += torch.bincount(
                labels * num_classes + logits.argmax(1), minlength=num_classes**2
            )
            sums[0] += F.cross_entropy(logits, labels, reduction="sum").double()
            sums[1] += (logits == 0).all(dim=1).sum()
            sums[2] += logits.abs().sum().double()
    model.train(was_training)
    distributed.all_reduce_sum(confusion, context)
    distributed.all_reduce_sum(sums, context)
    matrix = confusion.view(num_classes, num_classes).tolist()
    return Evaluation(
        confusion=tuple(tuple(row) for row in matrix),
        loss_sum=float(sums[0]),
        zero_logit_examples=int(sums[1]),
        abs_logit_sum=float(sums[2]),
    )


@dataclass(frozen=True)
class TrainedModel:
    model: nn.Module
    config: TrainConfig
    epoch: int
    path: Path

    @property
    def transform(self) -> InputTransform:
        return InputTransform(self.config.image_size, self.config.normalize)


def load_trained_model(
    path: str | os.PathLike[str], *, device: torch.device | str = "cpu"
) -> TrainedModel:
    """The network of a checkpoint, in eval mode, rebuilt from the variant saved in it."""
    state = load_checkpoint(path)
    config = config_from_dict(state["config"])
    warn_if_not_finite(state["model"], path)
    try:
        model = build_nin(parse_variant(config.variant))
    except NinlabError as error:
        raise NinlabError(
            f"{path}: the checkpoint's stored variant is not usable ({error})"
        ) from None
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        raise NinlabError(
            f"{path}: the saved weights do not fit variant {config.variant!r} as this ninlab "
            f"builds it ({one_line(error)}); evaluate it with the ninlab version that trained "
            f"it, or train it again with 'ninlab train --variant {config.variant}'"
        ) from None
    return TrainedModel(model.to(device).eval(), config, int(state["epoch"]), Path(path))


def evaluate(trained: TrainedModel, split: Split, *, batch_size: int = 256) -> Evaluation:
    """Accuracy and confusion of a trained network over `split`, seen as it was trained: its input
    size and normalisation, precision, memory layout and test-time flips, on the network's
    device."""
    device = next(trained.model.parameters()).device
    return evaluate_model(
        trained.model,
        Split(split.images.to(device), split.labels.to(device)),
        transform=trained.transform,
        batch_size=batch_size,
        amp=trained.config.amp,
        channels_last=trained.config.channels_last,
        flip_tta=trained.config.flip_tta,
    )


@dataclass(frozen=True)
class Prediction:
    path: Path
    class_index: int
    probabilities: tuple[float, ...]

    @property
    def class_name(self) -> str:
        return CLASS_NAMES[self.class_index]

    @property
    def probability(self) -> float:
        return self.probabilities[self.class_index]


def load_image(path: str | os.PathLike[str], *, invert: bool = False) -> torch.Tensor:
    """An image file of any size and mode as a 28x28 uint8 grayscale tensor, upright as its EXIF
    orientation says (a phone's photo), its gray levels read as its mode says (`_gray_bytes`),
    brought to Fashion-MNIST's size with PIL's bilinear filter (`resize_like_pil`, the training
    resize); then, in training's steps, resized to the network's input and scaled. `invert` turns
    dark-on-light into light-on-dark."""
    regular_file(path, what="image", fix="give a PNG, JPEG or other image file")
    try:
        with Image.open(path) as image:
            gray = _gray_bytes(ImageOps.exif_transpose(image), path)
    except (OSError, UnidentifiedImageError, ValueError, EOFError) as error:
        raise NinlabError(
            f"cannot read image {path} ({error}); give a PNG, JPEG or other file PIL can open"
        ) from None
    except Image.DecompressionBombError as error:
        raise NinlabError(
            f"image {path} is too large to read safely ({error}); give a smaller image"
        ) from None
    if invert:
        gray = 255 - gray
    pixels = resize_like_pil(torch.from_numpy(gray.copy()), (SOURCE_SIZE, SOURCE_SIZE))
    return pixels.to(torch.uint8)


# The full scales (the white) a gray level may have: 8, 16 and 32 bits, and for a float image
# first 0..1, what torchvision's ToTensor gives.
_INTEGER_SCALES = (255.0, 65535.0, 4294967295.0)
_FLOAT_SCALES = (1.0, *_INTEGER_SCALES)


def _gray_bytes(image: Image.Image, path: str | os.PathLike[str]) -> np.ndarray:
    """The image as 8-bit gray levels. Pillow's convert("L") clips wider modes at 255 (all but the
    darkest pixels turn white), so those are scaled from their full scale instead: 16-bit gray
    ("I;16...", a 16-bit PNG) from 0..65535; 32-bit integers ("I") and floats ("F"), whose type
    says nothing of their range, from the smallest of their usual scales that holds the brightest
    pixel (a mode-"I" image of 8-bit values is read as 8-bit). Every other mode by Pillow."""
    if not (image.mode.startswith("I") or image.mode == "F"):
        return np.asarray(image.convert("L"), dtype=np.uint8)
    wide = np.asarray(image, dtype=np.float64)
    if not np.isfinite(wide).all() or (wide.size and wide.min() < 0):
        raise NinlabError(
            f"image {path} (mode {image.mode}) holds negative or non-finite values; ninlab reads "
            "gray levels from 0 (black) up"
        )
    brightest = float(wide.max()) if wide.size else 0.0
    scales = (65535.0,) if image.mode.startswith("I;16") else _INTEGER_SCALES
    scales = _FLOAT_SCALES if image.mode == "F" else scales
    scale = next((s for s in scales if s >= brightest), scales[-1])
    return np.rint(np.clip(wide, 0, scale) * (255 / scale)).astype(np.uint8)


def predict_images(
    trained: TrainedModel, paths: Sequence[str | os.PathLike[str]], *, invert: bool = False
) -> list[Prediction]:
    """Class probabilities for each image, after the same resize and scaling as in training."""
    device = next(trained.model.parameters()).device
    images = torch.stack([load_image(path, invert=invert) for path in paths]).to(device)
    with torch.no_grad(), autocast(device, trained.config.amp):
        logits = trained.model(trained.transform(images)).float()
    finite = torch.isfinite(logits).all(dim=1).tolist()
    if not all(finite):
        # A class picked from nan scores is index 0, printed as "T-shirt/top (nan)": no answer.
        first = paths[finite.index(False)]
        raise NinlabError(
            f"the network's scores for {first} are not finite numbers (nan or inf), so it has no "
            "prediction: its weights are not finite (see the warning above) or overflow on this "
            "image; predict with another checkpoint"
        )
    probabilities = logits.softmax(dim=1).tolist()
    return [
        Prediction(Path(path), int(np.argmax(row)), tuple(row))
        for path, row in zip(paths, probabilities)
    ]
