"""Small networks made of the layer kinds modern vision models add to the CNN zoo (`cnn_zoo.py`):
SiLU and squeeze-excitation with stochastic depth (EfficientNet's MBConv), 7x7 depthwise convs
with LayerNorm over channels-last activations (ConvNeXt), and attention (a ViT encoder, with
`nn.MultiheadAttention` and with `F.scaled_dot_product_attention`, also with a learned position
bias as its mask). The memory tests check each against a real run, at both levels. Three networks
of 200 to 450 modules are there for the prediction-speed budget
(`benchmarks/bench_predict_speed.py`): `deep_mbconv`, `dense_net` (DenseNet-121's blocks, every
layer concatenating all earlier features) and `vit_encoder` (12 ViT encoder blocks).

Every factory is keyword-only with defaults; `LAYER_ZOO` maps a name to its factory and a natural
input size (C, H, W), as `cnn_zoo.ZOO` does.
"""

from __future__ import annotations

from functools import partial

import torch
from cnn_zoo import ZooEntry
from torch import nn
from torch.nn import functional as F

__all__ = [
    "LAYER_ZOO",
    "VmapEnsemble",
    "attention_net",
    "convnext_ln",
    "deep_mbconv",
    "dense_net",
    "mbconv_silu",
    "vit_encoder",
]


def stochastic_depth(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """torchvision.ops.stochastic_depth, mode "row": drop whole samples of a residual branch."""
    if not training or p == 0.0:
        return x
    survival = 1.0 - p
    noise = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(survival)
    noise.div_(survival)
    return x * noise


class SqueezeExcitation(nn.Module):
    """Global average pool, 1x1 reduce + SiLU, 1x1 expand + sigmoid, scale the input."""

    def __init__(self, channels: int, squeezed: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeezed, 1)
        self.fc2 = nn.Conv2d(squeezed, channels, 1)
        self.activation = nn.SiLU()
        self.scale = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale(self.fc2(self.activation(self.fc1(self.pool(x)))))


class MBConv(nn.Module):
    """EfficientNet's block: 1x1 expand + BN + SiLU, kxk depthwise + BN + SiLU, SE, 1x1 project
    + BN, stochastic depth on the residual branch."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        kernel: int,
        stride: int,
        expand: int,
        drop: float,
    ) -> None:
        super().__init__()
        hidden = in_channels * expand
        self.use_residual = stride == 1 and in_channels == out_channels
        self.drop = drop
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [
                nn.Conv2d(in_channels, hidden, 1, bias=False),
                nn.BatchNorm2d(hidden),
                nn.SiLU(inplace=True),
            ]
        layers += [
            nn.Conv2d(hidden, hidden, kernel, stride, kernel // 2, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.SiLU(inplace=True),
            SqueezeExcitation(hidden, max(1, in_channels // 4)),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        if self.use_residual:
            out = stochastic_depth(out, self.drop, self.training) + x
        return out


def _mbconv_stages(
    width: int, stages: tuple[tuple[int, int, int, int, int], ...]
) -> list[nn.Module]:
    """(expand, out channels, repeats, stride, kernel) per stage, as EfficientNet lists them."""
    blocks: list[nn.Module] = []
    channels = width
    for expand, out_channels, repeats, stride, kernel in stages:
        for index in range(repeats):
            blocks.append(
                MBConv(
                    channels,
                    out_channels,
                    kernel=kernel,
                    stride=stride if index == 0 else 1,
                    expand=expand,
                    drop=0.1,
                )
            )
            channels = out_channels
    return blocks


def _efficientnet(
    *,
    in_channels: int,
    num_classes: int,
    width: int,
    stages: tuple[tuple[int, int, int, int, int], ...],
) -> nn.Module:
    blocks = _mbconv_stages(width, stages)
    last = stages[-1][1]
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, 2, 1, bias=False),
        nn.BatchNorm2d(width),
        nn.SiLU(inplace=True),
        *blocks,
        nn.Conv2d(last, 4 * last, 1, bias=False),
        nn.BatchNorm2d(4 * last),
        nn.SiLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(0.2),
        nn.Linear(4 * last, num_classes),
    )


def mbconv_silu(*, in_channels: int = 3, num_classes: int = 10, width: int = 16) -> nn.Module:
    """A tiny EfficientNet: SiLU everywhere, 3x3 and 5x5 depthwise convs (120 and 80 channels:
    not whole blocks of 16), squeeze-excitation and stochastic depth."""
    stages = ((1, 16, 1, 1, 3), (6, 20, 2, 2, 3), (4, 32, 2, 2, 5))
    return _efficientnet(
        in_channels=in_channels, num_classes=num_classes, width=width, stages=stages
    )


def deep_mbconv(*, in_channels: int = 3, num_classes: int = 10, width: int = 16) -> nn.Module:
    """mbconv_silu with 14 blocks: about 200 modules, for the prediction-speed budget."""
    stages = ((1, 16, 2, 1, 3), (4, 24, 3, 2, 3), (4, 32, 4, 2, 5), (4, 48, 5, 1, 3))
    return _efficientnet(
        in_channels=in_channels, num_classes=num_classes, width=width, stages=stages
    )


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor, as ConvNeXt does: permute to channels-last,
    normalise the last dimension, permute back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """7x7 depthwise conv, LayerNorm on channels-last activations, pointwise MLP (Linear, GELU,
    Linear), layer scale, residual add."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(channels, channels, 7, padding=3, groups=channels)
        self.norm = nn.LayerNorm(channels)
        self.fc1 = nn.Linear(channels, 4 * channels)
        self.activation = nn.GELU()
        self.fc2 = nn.Linear(4 * channels, channels)
        self.gamma = nn.Parameter(torch.full((channels,), 1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dwconv(x).permute(0, 2, 3, 1)
        out = self.fc2(self.activation(self.fc1(self.norm(out))))
        return x + (self.gamma * out).permute(0, 3, 1, 2)


def convnext_ln(*, in_channels: int = 3, num_classes: int = 10, width: int = 32) -> nn.Module:
    """A tiny ConvNeXt: 4x4 patchify stem + LayerNorm, two blocks, a LayerNorm'd 2x2 downsample,
    two blocks at twice the width, pooled LayerNorm head."""
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 4, 4),
        LayerNorm2d(width),
        ConvNeXtBlock(width),
        ConvNeXtBlock(width),
        LayerNorm2d(width),
        nn.Conv2d(width, 2 * width, 2, 2),
        ConvNeXtBlock(2 * width),
        ConvNeXtBlock(2 * width),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.LayerNorm(2 * width),
        nn.Linear(2 * width, num_classes),
    )


class SdpaAttention(nn.Module):
    """Multi-head self-attention written with `F.scaled_dot_product_attention` (timm's ViT); with
    `bias_tokens`, a learned position bias over that many tokens is its `attn_mask` (Swin's
    relative position bias), which sends the CPU to the math path."""

    def __init__(self, dim: int, heads: int, *, bias_tokens: int = 0) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.position_bias = (
            nn.Parameter(torch.zeros(heads, bias_tokens, bias_tokens)) if bias_tokens else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = (
            self.qkv(x)
            .reshape(batch, tokens, 3, self.heads, dim // self.heads)
            .permute(2, 0, 3, 1, 4)
        )
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=self.position_bias)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: LayerNorm, attention, residual; LayerNorm, MLP
    (GELU), residual."""

    def __init__(self, dim: int, heads: int, *, multihead: bool, bias_tokens: int = 0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.multihead = multihead
        self.attention: nn.Module = (
            nn.MultiheadAttention(dim, heads, batch_first=True)
            if multihead
            else SdpaAttention(dim, heads, bias_tokens=bias_tokens)
        )
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        y = self.attention(y, y, y, need_weights=False)[0] if self.multihead else self.attention(y)
        x = x + y
        return x + self.mlp(self.norm2(x))


class PatchEmbedding(nn.Module):
    def __init__(self, in_channels: int, dim: int, patch: int, tokens: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, dim, patch, patch)
        self.position = nn.Parameter(torch.zeros(1, tokens, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).flatten(2).transpose(1, 2) + self.position


class MeanTokens(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1)


def attention_net(
    *,
    in_channels: int = 3,
    num_classes: int = 10,
    dim: int = 64,
    heads: int = 4,
    image_size: int = 32,
    position_bias: bool = False,
) -> nn.Module:
    """A tiny ViT: 4x4 patches, one block with `nn.MultiheadAttention` and one with
    `F.scaled_dot_product_attention` (given a learned position bias as its mask when
    `position_bias`), mean over tokens, LayerNorm, linear head."""
    tokens = (image_size // 4) ** 2
    return nn.Sequential(
        PatchEmbedding(in_channels, dim, 4, tokens),
        EncoderBlock(dim, heads, multihead=True),
        EncoderBlock(dim, heads, multihead=False, bias_tokens=tokens if position_bias else 0),
        MeanTokens(),
        nn.LayerNorm(dim),
        nn.Linear(dim, num_classes),
    )


class DenseLayer(nn.Module):
    """torchvision's `_DenseLayer`: the concatenation of every earlier feature map, BN + ReLU +
    1x1 conv to `bottleneck` channels, BN + ReLU + 3x3 conv to `growth` new channels."""

    def __init__(self, in_channels: int, growth: int, bottleneck: int) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_channels, bottleneck, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bottleneck)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bottleneck, growth, 3, padding=1, bias=False)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        concatenated = torch.cat(features, 1)
        return self.conv2(self.relu2(self.norm2(self.conv1(self.relu1(self.norm1(concatenated))))))


class DenseBlock(nn.ModuleDict):
    """Each layer sees the block's input and every earlier layer's output; the block returns them
    all, concatenated."""

    def __init__(self, layers: int, in_channels: int, growth: int, bottleneck: int) -> None:
        super().__init__()
        for index in range(layers):
            self[f"denselayer{index + 1}"] = DenseLayer(
                in_channels + index * growth, growth, bottleneck
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


def _transition(in_channels: int, out_channels: int) -> nn.Sequential:
    """BN + ReLU + 1x1 conv halving the channels, 2x2 average pool."""
    return nn.Sequential(
        nn.BatchNorm2d(in_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(in_channels, out_channels, 1, bias=False),
        nn.AvgPool2d(2, 2),
    )


# DenseNet-121's layers per dense block.
_DENSENET121_BLOCKS = (6, 12, 24, 16)


def dense_net(
    *, in_channels: int = 3, num_classes: int = 10, growth: int = 12, stem: int = 24
) -> nn.Module:
    """DenseNet-121's structure (torchvision's, retyped): 7x7 stem + BN + ReLU + 3x3 max pool, four
    dense blocks of 6, 12, 24 and 16 layers with a 4x growth bottleneck, transitions halving the
    channels, BN + ReLU, global pool, linear. 435 modules; narrower than the real one (growth 12)
    so a real step at 64x64 stays quick."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, stem, 7, 2, 3, bias=False),
        nn.BatchNorm2d(stem),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, 1),
    ]
    channels = stem
    for position, count in enumerate(_DENSENET121_BLOCKS):
        layers.append(DenseBlock(count, channels, growth, 4 * growth))
        channels += count * growth
        if position < len(_DENSENET121_BLOCKS) - 1:
            layers.append(_transition(channels, channels // 2))
            channels //= 2
    layers += [
        nn.BatchNorm2d(channels),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(channels, num_classes),
    ]
    return nn.Sequential(*layers)


class DropPath(nn.Module):
    """Stochastic depth as a module (timm's DropPath): drops whole samples of a residual branch."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return stochastic_depth(x, self.p, self.training)


class ViTBlock(nn.Module):
    """timm's ViT block: LayerNorm, SDPA attention (qkv Linear, proj Linear), dropout, drop path,
    residual; LayerNorm, MLP (Linear, GELU, dropout, Linear, dropout), drop path, residual."""

    def __init__(self, dim: int, heads: int, *, drop: float, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attention = SdpaAttention(dim, heads)
        self.attention_drop = nn.Dropout(drop)
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, 4 * dim),
            nn.GELU(),
            nn.Dropout(drop),
            nn.Linear(4 * dim, dim),
            nn.Dropout(drop),
        )
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attention_drop(self.attention(self.norm1(x))))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class ClassToken(nn.Module):
    """Prepends a learned class token; the head reads it back."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.token = nn.Parameter(torch.zeros(1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.token.expand(x.shape[0], -1, -1), x], dim=1)


class FirstToken(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0]


def vit_encoder(
    *,
    in_channels: int = 3,
    num_classes: int = 10,
    dim: int = 96,
    heads: int = 3,
    depth: int = 12,
    image_size: int = 64,
) -> nn.Module:
    """A ViT-Tiny-like network: 8x8 patches, a class token, dropout, 12 encoder blocks (drop path
    rising to 0.1, as timm's drop_path_rate does), LayerNorm, a linear head on the class token.
    188 modules."""
    tokens = (image_size // 8) ** 2
    return nn.Sequential(
        PatchEmbedding(in_channels, dim, 8, tokens),
        ClassToken(dim),
        nn.Dropout(0.1),
        *(
            ViTBlock(dim, heads, drop=0.1, drop_path=0.1 * index / (depth - 1))
            for index in range(depth)
        ),
        nn.LayerNorm(dim),
        FirstToken(),
        nn.Linear(dim, num_classes),
    )


LAYER_ZOO: dict[str, ZooEntry] = {
    "mbconv_silu": ZooEntry(mbconv_silu, (3, 32, 32)),
    "convnext_ln": ZooEntry(convnext_ln, (3, 32, 32)),
    "attention_net": ZooEntry(attention_net, (3, 32, 32)),
    "attention_bias_net": ZooEntry(partial(attention_net, position_bias=True), (3, 32, 32)),
    "deep_mbconv": ZooEntry(deep_mbconv, (3, 32, 32)),
    "dense_net": ZooEntry(dense_net, (3, 64, 64)),
    "vit_encoder": ZooEntry(vit_encoder, (3, 64, 64)),
}


class SequenceClassifier(nn.Module):
    """An LSTM or GRU over (N, T, F) sequences, batch first, its last step to a linear head."""

    def __init__(
        self, cell: str, *, layers: int = 1, bidirectional: bool = False, hidden: int = 64
    ) -> None:
        super().__init__()
        self.rnn = getattr(nn, cell)(
            32, hidden, num_layers=layers, bidirectional=bidirectional, batch_first=True
        )
        self.head = nn.Linear(hidden * (2 if bidirectional else 1), 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1])


def _conv_net(*layers: nn.Module) -> nn.Module:
    """Convolutions, a global average pool and a linear head over their last channels."""
    last = [layer for layer in layers if hasattr(layer, "out_channels")][-1]
    pool = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}
    dims = len(last.kernel_size)
    return nn.Sequential(*layers, pool[dims](1), nn.Flatten(), nn.Linear(last.out_channels, 10))


def aspp_net() -> nn.Module:
    """DeepLab's ASPP branch: a 3x3 convolution of dilation 12 on a 10x10 map (oneDNN runs
    another kernel than for an undilated one), beside one of dilation 2."""
    return _conv_net(
        nn.Conv2d(3, 96, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(96, 64, 3, padding=12, dilation=12),
        nn.ReLU(),
        nn.Conv2d(64, 32, 3, padding=2, dilation=2),
    )


def conv_variants_net() -> nn.Module:
    """Transposed (with output padding), grouped, reflect-padded and odd-strided convolutions."""
    return _conv_net(
        nn.Conv2d(3, 32, 5, stride=3, padding=2, padding_mode="reflect"),
        nn.ReLU(),
        nn.ConvTranspose2d(32, 32, 3, stride=2, padding=1, output_padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=(1, 2), padding=1, groups=4),
    )


def patchify_net() -> nn.Module:
    """A ViT's patch embedding: a 16x16 convolution of stride 16 (wider than oneDNN's jit
    kernels take), then a 1x1."""
    return _conv_net(nn.Conv2d(3, 64, 16, stride=16), nn.GELU(), nn.Conv2d(64, 32, 1))


LAYER_ZOO.update(
    {
        "lstm": ZooEntry(partial(SequenceClassifier, "LSTM"), (20, 32)),
        "bilstm_2layer": ZooEntry(
            partial(SequenceClassifier, "LSTM", layers=2, bidirectional=True), (12, 32)
        ),
        "gru": ZooEntry(partial(SequenceClassifier, "GRU"), (20, 32)),
        "conv1d_net": ZooEntry(
            lambda: _conv_net(nn.Conv1d(8, 32, 5, padding=2), nn.ReLU(), nn.Conv1d(32, 32, 3, 2)),
            (8, 64),
        ),
        "conv3d_net": ZooEntry(
            lambda: _conv_net(nn.Conv3d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv3d(16, 16, 3, 2)),
            (3, 8, 16, 16),
        ),
        "aspp_net": ZooEntry(aspp_net, (3, 20, 20)),
        "conv_variants_net": ZooEntry(conv_variants_net, (3, 19, 17)),
        "patchify_net": ZooEntry(patchify_net, (3, 64, 64)),
    }
)


class VmapEnsemble(nn.Module):
    """An ensemble of `members` MLPs (16 -> `hidden` -> 10) run at once: their parameters stacked
    (`torch.func.stack_module_state`) and one member's module called on each slice under
    `torch.func.vmap` (`functional_call` on a meta copy of its structure), the mean of their
    logits out. Under vmap `addmm` of a batched weight is `mm`, `mul` and `add`, three tensors."""

    def __init__(self, members: int = 4, hidden: int = 32) -> None:
        super().__init__()
        mlps = [
            nn.Sequential(nn.Linear(16, hidden), nn.ReLU(), nn.Linear(hidden, 10))
            for _ in range(members)
        ]
        stacked, _ = torch.func.stack_module_state(mlps)  # type: ignore[arg-type]
        self.names = list(stacked)
        self.stacked = nn.ParameterDict(
            {name.replace(".", "_"): nn.Parameter(value) for name, value in stacked.items()}
        )
        # In a tuple, not a submodule: the structure vmap calls, holding no weights of its own.
        self.structure = (mlps[0].to("meta"),)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parameters = {name: self.stacked[name.replace(".", "_")] for name in self.names}

        def member(member_parameters: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
            return torch.func.functional_call(self.structure[0], member_parameters, (x,))

        return torch.func.vmap(member, in_dims=(0, None))(parameters, x).mean(0)
