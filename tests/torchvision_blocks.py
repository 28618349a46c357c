"""torchvision's EfficientNet blocks, retyped as torchvision writes them (torchvision is not
installable beside this torch): `Conv2dNormActivation` (ops/misc.py) with SiLU(inplace=True),
`SqueezeExcitation` (ops/misc.py) with an in-place SiLU, `StochasticDepth` (ops/stochastic_depth.py,
mode "row"), `MBConv` and EfficientNetV2's `FusedMBConv` (models/efficientnet.py) with their
in-place residual `result += input`, and the classifier's in-place dropout.

They differ from `layer_zoo.mbconv_silu` where it matters to memory: the residual add and the
SE's activation are in place, and the first block's stochastic depth is 0 (torchvision scales it
with the block's position), so that block returns its branch itself.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["tiny_efficientnet"]


def stochastic_depth(
    input: torch.Tensor, p: float, mode: str, training: bool = True
) -> torch.Tensor:
    if not training or p == 0.0:
        return input
    survival_rate = 1.0 - p
    size = [input.shape[0]] + [1] * (input.ndim - 1) if mode == "row" else [1] * input.ndim
    noise = torch.empty(size, dtype=input.dtype, device=input.device)
    noise = noise.bernoulli_(survival_rate)
    if survival_rate > 0.0:
        noise.div_(survival_rate)
    return input * noise


class StochasticDepth(nn.Module):
    def __init__(self, p: float, mode: str) -> None:
        super().__init__()
        self.p, self.mode = p, mode

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return stochastic_depth(input, self.p, self.mode, self.training)


class Conv2dNormActivation(nn.Sequential):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        activation_layer: type[nn.Module] | None = nn.SiLU,
    ) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(
                in_channels,
                out_channels,
                kernel_size,
                stride,
                (kernel_size - 1) // 2,
                groups=groups,
                bias=False,
            ),
            nn.BatchNorm2d(out_channels),
        ]
        if activation_layer is not None:
            layers.append(activation_layer(inplace=True))
        super().__init__(*layers)


class SqueezeExcitation(nn.Module):
    def __init__(self, input_channels: int, squeeze_channels: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(input_channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, input_channels, 1)
        self.activation = nn.SiLU(inplace=True)
        self.scale_activation = nn.Sigmoid()

    def _scale(self, input: torch.Tensor) -> torch.Tensor:
        scale = self.avgpool(input)
        scale = self.fc1(scale)
        scale = self.activation(scale)
        scale = self.fc2(scale)
        return self.scale_activation(scale)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        scale = self._scale(input)
        return scale * input


class MBConv(nn.Module):
    def __init__(
        self,
        expand_ratio: int,
        kernel: int,
        stride: int,
        input_channels: int,
        out_channels: int,
        sd_prob: float,
    ) -> None:
        super().__init__()
        self.use_res_connect = stride == 1 and input_channels == out_channels
        expanded = input_channels * expand_ratio
        layers: list[nn.Module] = []
        if expanded != input_channels:
            layers.append(Conv2dNormActivation(input_channels, expanded, kernel_size=1))
        layers.append(
            Conv2dNormActivation(
                expanded, expanded, kernel_size=kernel, stride=stride, groups=expanded
            )
        )
        layers.append(SqueezeExcitation(expanded, max(1, input_channels // 4)))
        layers.append(
            Conv2dNormActivation(expanded, out_channels, kernel_size=1, activation_layer=None)
        )
        self.block = nn.Sequential(*layers)
        self.stochastic_depth = StochasticDepth(sd_prob, "row")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        result = self.block(input)
        if self.use_res_connect:
            result = self.stochastic_depth(result)
            result += input
        return result


class FusedMBConv(nn.Module):
    def __init__(
        self,
        expand_ratio: int,
        kernel: int,
        stride: int,
        input_channels: int,
        out_channels: int,
        sd_prob: float,
    ) -> None:
        super().__init__()
        self.use_res_connect = stride == 1 and input_channels == out_channels
        expanded = input_channels * expand_ratio
        layers: list[nn.Module] = []
        if expanded != input_channels:
            layers.append(
                Conv2dNormActivation(input_channels, expanded, kernel_size=kernel, stride=stride)
            )
            layers.append(
                Conv2dNormActivation(expanded, out_channels, kernel_size=1, activation_layer=None)
            )
        else:
            layers.append(
                Conv2dNormActivation(
                    input_channels, out_channels, kernel_size=kernel, stride=stride
                )
            )
        self.block = nn.Sequential(*layers)
        self.stochastic_depth = StochasticDepth(sd_prob, "row")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        result = self.block(input)
        if self.use_res_connect:
            result = self.stochastic_depth(result)
            result += input
        return result


def tiny_efficientnet(*, num_classes: int = 10, stochastic_depth_prob: float = 0.2) -> nn.Module:
    """EfficientNet as torchvision builds it, at a tiny width: a FusedMBConv stage (V2) and an
    MBConv stage, stochastic depth growing with the block's position from 0."""
    # (block, expand ratio, kernel, stride, in channels, out channels, layers)
    setting = ((FusedMBConv, 1, 3, 1, 16, 16, 2), (MBConv, 4, 5, 2, 16, 24, 2))
    total = sum(layers for *_, layers in setting)
    features: list[nn.Module] = [Conv2dNormActivation(3, 16, kernel_size=3, stride=2)]
    position = 0
    for block, expand, kernel, stride, in_channels, out_channels, layers in setting:
        stage = []
        for index in range(layers):
            sd_prob = stochastic_depth_prob * position / total
            stage.append(
                block(
                    expand,
                    kernel,
                    stride if index == 0 else 1,
                    in_channels if index == 0 else out_channels,
                    out_channels,
                    sd_prob,
                )
            )
            position += 1
        features.append(nn.Sequential(*stage))
    features.append(Conv2dNormActivation(24, 96, kernel_size=1))
    return nn.Sequential(
        nn.Sequential(*features),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(1),
        nn.Sequential(nn.Dropout(p=0.2, inplace=True), nn.Linear(96, num_classes)),
    )
