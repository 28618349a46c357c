"""The input pipeline on the training device: shuffled index batches, then resize and scale.

d2l feeds NiN through a `DataLoader` whose workers turn every image into a PIL image, resize it
with `transforms.Resize` (PIL's bilinear filter) and scale it with `ToTensor`. Here the whole
dataset is one uint8 tensor on the device and a batch is an index gather followed by two small
matrix products that reproduce PIL's resize bit for bit (PIL's fixed-point filter coefficients,
its horizontal-then-vertical order and its rounding of the 8-bit intermediate image), so the
network sees exactly the numbers the book's pipeline gives it, with no per-image Python work.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.nn import functional as F

__all__ = [
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "Augmentation",
    "InputTransform",
    "batch_indices",
    "batches_per_epoch",
    "epoch_permutation",
    "pil_bilinear_weights",
    "resize_like_pil",
]

# Mean and standard deviation of the 60,000 training images scaled to [0, 1] (tests pin them).
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530

# Pillow's resampling works in fixed point with 22 fractional bits (PRECISION_BITS = 32 - 8 - 2
# in libImaging/Resample.c) and rounds by adding half a unit before the shift.
_PRECISION_BITS = 22


@functools.lru_cache(maxsize=64)
def _pil_bilinear_weights_cpu(in_size: int, out_size: int) -> torch.Tensor:
    scale = in_size / out_size
    # Pillow widens the triangle when shrinking (antialiasing); when enlarging it is plain bilinear.
    filter_scale = max(scale, 1.0)
    support = filter_scale
    weights = torch.zeros(out_size, in_size, dtype=torch.float64)
    for out_index in range(out_size):
        center = (out_index + 0.5) * scale
        first = max(int(center - support + 0.5), 0)
        stop = min(int(center + support + 0.5), in_size)
        taps = [max(0.0, 1.0 - abs((x - center + 0.5) / filter_scale)) for x in range(first, stop)]
        total = sum(taps)
        for x, tap in zip(range(first, stop), taps):
            # Bilinear taps are never negative, so Pillow's rounding is trunc(0.5 + k * 2**22).
            weights[out_index, x] = math.trunc(0.5 + (tap / total) * (1 << _PRECISION_BITS))
    return weights


@functools.lru_cache(maxsize=64)
def pil_bilinear_weights(
    in_size: int, out_size: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Pillow's integer coefficients (scaled by 2**22) of a 1-D bilinear resize, as a float64
    (out_size, in_size) matrix; float64 holds every product and sum exactly (all < 2**31).
    Cached per device, so a training step copies nothing to the GPU."""
    return _pil_bilinear_weights_cpu(in_size, out_size).to(device)


def _fixed_point_round(values: torch.Tensor) -> torch.Tensor:
    return values.add_(1 << (_PRECISION_BITS - 1)).mul_(2.0**-_PRECISION_BITS).floor_()


def resize_like_pil(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """`Image.resize((W, H), Image.BILINEAR)` for a batch of uint8 images (..., H_in, W_in), on
    their device; returns float64 pixel values 0..255, equal to Pillow's output."""
    height, width = size
    horizontal = pil_bilinear_weights(images.shape[-1], width, images.device)
    vertical = pil_bilinear_weights(images.shape[-2], height, images.device)
    rows = _fixed_point_round(
        images.to(torch.float64) @ horizontal.T
    )  # Pillow's 8-bit intermediate
    return _fixed_point_round(vertical @ rows)


@dataclass(frozen=True)
class InputTransform:
    """uint8 images (N, H, W) -> float32 network input (N, 1, S, S): resize as PIL, scale to [0, 1]
    as `ToTensor`, then optionally standardise with the training set's mean and std."""

    image_size: int
    normalize: bool = False

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        pixels = resize_like_pil(images, (self.image_size, self.image_size)).unsqueeze(-3)
        scaled = pixels.to(torch.float32).div_(255.0)
        if self.normalize:
            scaled = scaled.sub_(FASHION_MNIST_MEAN).div_(FASHION_MNIST_STD)
        return scaled


@dataclass(frozen=True)
class Augmentation:
    """Random horizontal flips and shifts of uint8 images (N, H, W), made before the resize, so the
    network still sees pixels Pillow could give it. A shift moves the image by up to `translate`
    pixels each way in both directions, filling with 0, Fashion-MNIST's black background.

    The draws are a function of (seed, step) alone, so a resumed run augments as the uninterrupted
    one did."""

    flip: bool = False
    translate: int = 0

    @property
    def active(self) -> bool:
        return self.flip or self.translate > 0

    def __call__(self, images: torch.Tensor, *, seed: int, step: int) -> torch.Tensor:
        if not self.active:
            return images
        count, height, width = images.shape
        # Seeded like `epoch_permutation`; a different multiplier keeps the two streams apart.
        generator = torch.Generator().manual_seed((seed * 1_000_033 + step) % 2**64)
        span = 2 * self.translate + 1
        # Each image's top-left corner in the padded image: translate is no shift.
        top = torch.randint(span, (count, 1, 1), generator=generator)
        left = torch.randint(span, (count, 1, 1), generator=generator)
        flipped = torch.rand(count, 1, 1, generator=generator) < 0.5 if self.flip else None
        rows = top + torch.arange(height).view(1, height, 1)
        columns = torch.arange(width).view(1, 1, width)
        if flipped is not None:
            columns = torch.where(flipped, width - 1 - columns, columns)
        columns = left + columns
        padded = F.pad(images, (self.translate,) * 4)
        batch = torch.arange(count).view(count, 1, 1)
        device = images.device
        return padded[batch.to(device), rows.to(device), columns.to(device)]


def epoch_permutation(
    num_examples: int, *, seed: int, epoch: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """The order of one epoch: a function of (seed, epoch) alone, so a resumed run and every rank of
    a distributed run draw the same one without sharing generator state."""
    # Modulo 2**64, the seeds a generator takes: the same as before for every seed that fitted.
    generator = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**64)
    return torch.randperm(num_examples, generator=generator).to(device)


def batch_indices(
    permutation: torch.Tensor,
    *,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    start_batch: int = 0,
) -> Iterator[tuple[torch.Tensor, int]]:
    """Yield (this rank's indices, global batch size) for each global batch from `start_batch` on.

    A global batch of `batch_size` is cut into `world_size` contiguous shards, so N processes see
    together exactly what one process with the same global batch sees. The last, smaller batch is
    kept (as d2l's DataLoader keeps it) unless a rank's share of it would be a single example:
    batch norm cannot take a training step on one (its variance is undefined).
    """
    total = permutation.shape[0]
    for start in range(start_batch * batch_size, total, batch_size):
        batch = permutation[start : start + batch_size]
        if batch.shape[0] < min(batch_size, _SMALLEST_LAST_SHARD * world_size):
            return
        shard = batch.tensor_split(world_size)[rank]
        yield shard, int(batch.shape[0])


def batches_per_epoch(num_examples: int, *, batch_size: int, world_size: int = 1) -> int:
    """How many batches `batch_indices` yields over a whole epoch of `num_examples`."""
    full, rest = divmod(num_examples, batch_size)
    return full + (1 if rest >= _SMALLEST_LAST_SHARD * world_size else 0)


_SMALLEST_LAST_SHARD = 2  # examples per rank in a last, smaller batch
