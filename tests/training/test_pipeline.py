import numpy as np
import pytest
import torch
from PIL import Image

from ninlab.training.pipeline import (
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    Augmentation,
    InputTransform,
    batch_indices,
    batches_per_epoch,
    epoch_permutation,
    pil_bilinear_weights,
    resize_like_pil,
)


def _pil(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    height, width = size
    return np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))


@pytest.mark.parametrize("size", [224, 96, 72, 67, 28, 20])
def test_resize_equals_pil_bit_for_bit_on_real_images(fashion_mnist, size):
    images = fashion_mnist.train.images[:64]
    ours = resize_like_pil(images, (size, size)).to(torch.uint8).numpy()
    book = np.stack([_pil(image.numpy(), (size, size)) for image in images])
    assert np.array_equal(ours, book)


def test_resize_equals_pil_when_shrinking_odd_shapes():
    rng = np.random.default_rng(0)
    for height, width, out in [(313, 517, (28, 28)), (50, 31, (96, 40)), (7, 300, (28, 13))]:
        image = rng.integers(0, 256, (height, width), dtype=np.uint8)
        ours = resize_like_pil(torch.from_numpy(image), out).to(torch.uint8).numpy()
        assert np.array_equal(ours, _pil(image, out))


@pytest.mark.canary
def test_plain_float_bilinear_differs_from_pil_which_is_why_the_pipeline_emulates_it(fashion_mnist):
    """PyTorch's bilinear interpolate is not PIL's resize, so the pipeline must emulate PIL."""
    images = fashion_mnist.train.images[:64]
    book = np.stack([_pil(image.numpy(), (96, 96)) for image in images])
    plain = torch.nn.functional.interpolate(
        images[:, None].float(), size=(96, 96), mode="bilinear"
    )[:, 0]
    assert not np.array_equal(plain.round().to(torch.uint8).numpy(), book)


def test_weights_are_pils_fixed_point_coefficients():
    weights = pil_bilinear_weights(28, 224)
    # An 8x enlargement: output pixel 4 sits at input 0.5625 -> taps 0.9375 and 0.0625 of 2**22.
    assert weights[4, 0].item() == round(0.9375 * 2**22) and weights[4, 1].item() == round(
        0.0625 * 2**22
    )
    assert torch.equal(pil_bilinear_weights(28, 28), torch.eye(28, dtype=torch.float64) * 2**22)
    assert (weights.sum(dim=1) == 2**22).all()


def test_transform_scales_like_to_tensor_then_normalises(fashion_mnist):
    images = fashion_mnist.train.images[:32]
    scaled = InputTransform(28)(images)
    assert scaled.shape == (32, 1, 28, 28) and scaled.dtype == torch.float32
    assert torch.equal(scaled[:, 0], images.float() / 255)  # 28 -> 28 is the identity, as in PIL
    normalised = InputTransform(72, normalize=True)(images)
    assert normalised.shape == (32, 1, 72, 72)
    expected = (InputTransform(72)(images) - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    torch.testing.assert_close(normalised, expected)


def _shifted(image: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """`image` moved down by dy and right by dx pixels, zeros coming in (an independent oracle:
    slicing, not the gather `Augmentation` uses)."""
    out = torch.zeros_like(image)
    height, width = image.shape
    out[max(dy, 0) : height + min(dy, 0), max(dx, 0) : width + min(dx, 0)] = image[
        max(-dy, 0) : height + min(-dy, 0), max(-dx, 0) : width + min(-dx, 0)
    ]
    return out


def test_augmentation_mirrors_and_shifts_each_image_within_its_range(fashion_mnist):
    images = fashion_mnist.train.images[:256]
    augmented = Augmentation(flip=True, translate=2)(images, seed=0, step=5)
    assert augmented.shape == images.shape and augmented.dtype == torch.uint8
    seen = set()
    for image, result in zip(images, augmented):
        matches = [
            (flip, dy, dx)
            for flip in (False, True)
            for dy in range(-2, 3)
            for dx in range(-2, 3)
            if torch.equal(result, _shifted(image.flip(-1) if flip else image, dy, dx))
        ]
        assert matches, "each image is a shifted copy of itself or of its mirror image"
        seen.update(matches)
    # 256 images draw every one of the 2 x 5 x 5 choices (each has probability 1/50).
    assert {flip for flip, _, _ in seen} == {False, True}
    assert {(dy, dx) for _, dy, dx in seen} == {(y, x) for y in range(-2, 3) for x in range(-2, 3)}


def test_augmentation_depends_on_seed_and_step_only_and_none_is_the_identity(fashion_mnist):
    images = fashion_mnist.train.images[:64]
    augment = Augmentation(flip=True, translate=3)
    first = augment(images, seed=1, step=7)
    assert torch.equal(first, augment(images, seed=1, step=7))  # a resumed run draws the same
    assert not torch.equal(first, augment(images, seed=1, step=8))
    assert not torch.equal(first, augment(images, seed=2, step=7))
    assert Augmentation()(images, seed=1, step=7) is images
    flipped = Augmentation(flip=True)(images, seed=0, step=0)
    mirrored = sum(torch.equal(a, b.flip(-1)) for a, b in zip(flipped, images))
    assert 16 < mirrored < 48  # about half of the 64


def test_epoch_permutation_depends_on_seed_and_epoch_only():
    first = epoch_permutation(1000, seed=3, epoch=1)
    assert torch.equal(first, epoch_permutation(1000, seed=3, epoch=1))
    assert not torch.equal(first, epoch_permutation(1000, seed=3, epoch=2))
    assert not torch.equal(first, epoch_permutation(1000, seed=4, epoch=1))
    assert torch.equal(first.sort().values, torch.arange(1000))


def test_ranks_split_every_global_batch_and_keep_the_short_last_one():
    permutation = epoch_permutation(300, seed=0, epoch=1)
    single = list(batch_indices(permutation, batch_size=128))
    assert [count for _, count in single] == [128, 128, 44]
    two = [list(batch_indices(permutation, batch_size=128, rank=r, world_size=2)) for r in range(2)]
    for (whole, count), (a, count_a), (b, count_b) in zip(single, two[0], two[1]):
        assert count == count_a == count_b
        assert torch.equal(torch.cat([a, b]), whole)
    resumed = list(batch_indices(permutation, batch_size=128, start_batch=2))
    assert len(resumed) == 1 and torch.equal(resumed[0][0], single[2][0])
    # A last batch that gives a rank a single example is dropped: batch norm cannot step on one.
    assert len(list(batch_indices(permutation[:257], batch_size=128, world_size=2))) == 2
    assert len(list(batch_indices(permutation[:259], batch_size=128, world_size=2))) == 2
    assert len(list(batch_indices(permutation[:260], batch_size=128, world_size=2))) == 3
    assert [count for _, count in batch_indices(permutation[:129], batch_size=128)] == [128]
    assert [count for _, count in batch_indices(permutation[:3], batch_size=1)] == [1, 1, 1]


@pytest.mark.parametrize(
    ("num_examples", "batch_size", "world_size"),
    [
        (300, 128, 1),
        (256, 128, 1),
        (257, 128, 1),
        (257, 128, 2),
        (259, 128, 2),
        (260, 128, 2),
        (5, 8, 2),
        (1, 8, 2),
        (3, 1, 1),
    ],
)
def test_batches_per_epoch_counts_what_batch_indices_yields(num_examples, batch_size, world_size):
    permutation = torch.arange(num_examples)
    yielded = list(batch_indices(permutation, batch_size=batch_size, world_size=world_size))
    assert batches_per_epoch(num_examples, batch_size=batch_size, world_size=world_size) == len(
        yielded
    )
