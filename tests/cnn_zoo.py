"""Small CNNs beside NiN for the memory, FLOP and shape tests: each exercises a kind of layer NiN
lacks (batch norm and residual adds, depthwise convs and ReLU6, a big linear head, ceil-mode
pooling, grouped convs). They are small on purpose so a real forward and backward on 2 CPU cores
takes well under a second at the sizes in `ZOO`.

Every factory is keyword-only with defaults, so `ninlab.models.resolve_model("cnn_zoo:resnet_bn")`
works when tests/ is on the path. `ZOO` maps a name to its factory and a natural input size
(C, H, W).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "ZOO",
    "ZooEntry",
    "ceil_pool_net",
    "grouped_net",
    "mobilenet_relu6",
    "resnet_bn",
    "vgg_big_head",
]


class BasicBlock(nn.Module):
    """ResNet's basic block: two 3x3 conv+BN, a residual add (a 1x1 conv+BN shortcut when the
    shape changes), then ReLU. The add and the in-place ReLU are what NiN has no example of."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


def resnet_bn(*, in_channels: int = 3, num_classes: int = 10, width: int = 16) -> nn.Module:
    """A ResNet-8-like net: stem conv+BN+ReLU, three basic blocks (two downsampling), global
    average pool, linear."""
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, 1, 1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
        BasicBlock(width, width, 1),
        BasicBlock(width, 2 * width, 2),
        BasicBlock(2 * width, 4 * width, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4 * width, num_classes),
    )


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expand + BN + ReLU6, 3x3 depthwise + BN + ReLU6, 1x1 project + BN,
    with a residual add when stride is 1 and channels match."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = in_channels * expand
        self.use_residual = stride == 1 and in_channels == out_channels
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return x + out if self.use_residual else out


def mobilenet_relu6(*, in_channels: int = 3, num_classes: int = 10, width: int = 16) -> nn.Module:
    """A tiny MobileNetV2: stride-2 stem, inverted residuals (depthwise + ReLU6),
    dropout, linear."""
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, 2, 1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU6(inplace=True),
        InvertedResidual(width, width, 1, expand=1),
        InvertedResidual(width, 2 * width, 2, expand=4),
        InvertedResidual(2 * width, 2 * width, 1, expand=4),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(0.2),
        nn.Linear(2 * width, num_classes),
    )


# VGG as data (torchvision's habit): channels per conv, "M" for a 2x2 max pool.
_VGG_MINI: tuple[int | str, ...] = (16, "M", 32, "M", 64, 64, "M")


def vgg_big_head(
    *, in_channels: int = 3, num_classes: int = 10, image_size: int = 32, hidden: int = 1024
) -> nn.Module:
    """A VGG-style stack (3x3 conv + ReLU, 2x2 max pools) with a big classifier: two hidden linear
    layers with dropout, so parameters and their gradients/optimizer state dominate memory."""
    layers: list[nn.Module] = []
    channels = in_channels
    size = image_size
    for item in _VGG_MINI:
        if item == "M":
            layers.append(nn.MaxPool2d(2, 2))
            size //= 2
        else:
            assert isinstance(item, int)
            layers += [nn.Conv2d(channels, item, 3, padding=1), nn.ReLU(inplace=True)]
            channels = item
    layers += [
        nn.Flatten(),
        nn.Linear(channels * size * size, hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(0.5),
        nn.Linear(hidden, hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(0.5),
        nn.Linear(hidden, num_classes),
    ]
    return nn.Sequential(*layers)


def ceil_pool_net(*, in_channels: int = 3, num_classes: int = 10) -> nn.Module:
    """GoogLeNet-style pooling: 3x3 stride-2 max pools with ceil_mode=True on odd sizes, where the
    output size rounds up (30 -> 15, where floor mode gives 14), and a ceil-mode average pool
    (8 -> 4, floor mode 3). Its input is 34 x 34."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, 5, 1, 0),  # 34 -> 30
        nn.ReLU(),
        nn.MaxPool2d(3, 2, ceil_mode=True),  # 30 -> 15 (floor mode: 14)
        nn.Conv2d(16, 32, 3, 1, 1),
        nn.ReLU(),
        nn.MaxPool2d(3, 2, padding=1, ceil_mode=True),  # 15 -> 8 (same in floor mode)
        nn.AvgPool2d(3, 2, ceil_mode=True),  # 8 -> 4 (floor mode: 3)
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, num_classes),
    )


def grouped_net(*, in_channels: int = 3, num_classes: int = 10, groups: int = 4) -> nn.Module:
    """ResNeXt-style grouped 3x3 convs between 1x1 convs, and a LeakyReLU and global max pool."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 32, 3, 1, 1),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, 2, 1, groups=groups),
        nn.LeakyReLU(0.1),
        nn.Conv2d(64, 64, 1),
        nn.ReLU(),
        nn.Conv2d(64, 128, 3, 2, 1, groups=2 * groups),
        nn.ReLU(),
        nn.AdaptiveMaxPool2d(1),
        nn.Flatten(),
        nn.Linear(128, num_classes),
    )


@dataclass(frozen=True)
class ZooEntry:
    factory: Callable[[], nn.Module]
    input_size: tuple[int, ...]  # (C, H, W) that the factory's defaults expect; (T, F), (C, L)


ZOO: dict[str, ZooEntry] = {
    "resnet_bn": ZooEntry(resnet_bn, (3, 32, 32)),
    "mobilenet_relu6": ZooEntry(mobilenet_relu6, (3, 32, 32)),
    "vgg_big_head": ZooEntry(vgg_big_head, (3, 32, 32)),
    "ceil_pool_net": ZooEntry(ceil_pool_net, (3, 34, 34)),
    "grouped_net": ZooEntry(grouped_net, (3, 32, 32)),
}
