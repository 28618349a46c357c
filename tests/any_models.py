"""Models of every kind a user may bring, small on purpose (8-32 px, a few channels), for the tests
that hold ninlab's summary and memory prediction to PyTorch's own counts.

Each kind is one thing NiN is not: a vector input, a feature-map output, a tuple, dict,
namedtuple or dataclass of outputs, a recurrent layer, two inputs, token ids, frozen parameters,
lazy modules, and the models ninlab must refuse (scripted, needing targets, branching on values,
returning no tensor). Every factory takes no argument, so `resolve_model("any_models:siamese")`
works with tests/ on the path.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F


def mlp() -> nn.Module:
    """d2l's MLP chapter: flattened 784-pixel images in, (N, 10) logits out."""
    return nn.Sequential(nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10))


def autoencoder() -> nn.Module:
    """A feature map out, as segmentation nets and autoencoders give."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.ConvTranspose2d(4, 1, 4, stride=2, padding=1),
    )


class Heads(NamedTuple):
    logits: torch.Tensor
    box: torch.Tensor


@dataclass
class DetectorOutput:
    logits: torch.Tensor
    extras: dict[str, torch.Tensor]


class TwoHeads(nn.Module):
    """A trunk and two heads whose outputs come back as a tuple, list, dict, namedtuple or
    dataclass (`kind`), as auxiliary-head and detection models return them."""

    def __init__(self, kind: str = "tuple") -> None:
        super().__init__()
        self.kind = kind
        self.trunk = nn.Sequential(
            nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )
        self.classes = nn.Linear(4, 5)
        self.box = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> object:
        features = self.trunk(x)
        logits, box = self.classes(features), self.box(features)
        if self.kind == "tuple":
            return logits, box
        if self.kind == "list":
            return [logits, box]
        if self.kind == "dict":
            return {"logits": logits, "box": box}
        if self.kind == "namedtuple":
            return Heads(logits, box)
        return DetectorOutput(logits, {"box": box})


def lstm() -> nn.Module:
    """A recurrent layer alone: output (N, T, H) and the state (h, c), nested."""
    return nn.LSTM(12, 16, batch_first=True)


class Siamese(nn.Module):
    """Two images through one shared tower; their distance out."""

    def __init__(self) -> None:
        super().__init__()
        self.tower = nn.Sequential(
            nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 7 * 7, 8)
        )

    def forward(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        return F.pairwise_distance(self.tower(left), self.tower(right))


def siamese() -> nn.Module:
    return Siamese()


class TextCNN(nn.Module):
    """Token ids (int64) through an embedding and a 1-d convolution to (N, 3) logits."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 8)
        self.conv = nn.Conv1d(8, 6, 3)
        self.head = nn.Linear(6, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.conv(self.embed(tokens).transpose(1, 2)).relu()
        return self.head(x.amax(dim=2))


def text_cnn() -> nn.Module:
    return TextCNN()


def fine_tuned() -> nn.Module:
    """A small CNN whose first convolution is frozen, as in any fine-tuning setup."""
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)
    )
    model[0].weight.requires_grad_(False)
    return model


def lazy_cnn() -> nn.Module:
    """d2l's way: every layer lazy, its input size inferred at the first forward."""
    return nn.Sequential(
        nn.LazyConv2d(4, 3, padding=1),
        nn.LazyBatchNorm2d(),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.LazyLinear(10),
    )


def eager_cnn() -> nn.Module:
    """`lazy_cnn` with its shapes written out, for a 1x8x8 input."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 10),
    )


def nin_block(out_channels: int, kernel_size: int, strides: int, padding: int) -> nn.Module:
    """d2l's `nin_block`, exactly as the chapter writes it (PyTorch tab)."""
    return nn.Sequential(
        nn.LazyConv2d(out_channels, kernel_size, strides, padding),
        nn.ReLU(),
        nn.LazyConv2d(out_channels, kernel_size=1),
        nn.ReLU(),
        nn.LazyConv2d(out_channels, kernel_size=1),
        nn.ReLU(),
    )


class D2lNiN(nn.Module):
    """d2l's `NiN` class, its network as the chapter builds it (without d2l's Classifier base)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nin_block(96, kernel_size=11, strides=4, padding=0),
            nn.MaxPool2d(3, stride=2),
            nin_block(256, kernel_size=5, strides=1, padding=2),
            nn.MaxPool2d(3, stride=2),
            nin_block(384, kernel_size=3, strides=1, padding=1),
            nn.MaxPool2d(3, stride=2),
            nn.Dropout(0.5),
            nin_block(num_classes, kernel_size=3, strides=1, padding=1),
            nn.AdaptiveAvgPool2d((1, 1)),
            nn.Flatten(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def d2l_nin() -> nn.Module:
    return D2lNiN()


# -- models ninlab refuses, each for its own reason ------------------------------------------------


def scripted() -> nn.Module:
    with warnings.catch_warnings():  # torch.jit.script is deprecated, and users still bring one
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.script(nn.Sequential(nn.Linear(4, 2)))


class NeedsTargets(nn.Module):
    """A detection model's habit: in training mode, forward computes its own loss from targets."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        if self.training:
            if targets is None:
                raise ValueError("In training mode, targets should be passed")
            return F.cross_entropy(self.head(x), targets)
        return self.head(x)


def needs_targets() -> nn.Module:
    return NeedsTargets()


class BranchesOnValues(nn.Module):
    """Data-dependent control flow: which layer runs depends on the input's values."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 2), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) if x.sum() > 0 else self.b(x)


def branches_on_values() -> nn.Module:
    return BranchesOnValues()


class ReturnsNumber(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> float:
        return float(self.head(x).shape[0])


def returns_number() -> nn.Module:
    return ReturnsNumber()
