"""NiN as data: a configuration, one builder, and a registry of named configurations.

d2l's NiN (http://d2l.ai/chapter_convolutional-modern/nin.html) is a stack of NiN blocks (one
k x k convolution followed by 1x1 convolutions, each with a ReLU), 3x3 stride-2 max pooling between
blocks, dropout before the last block, whose channels are the classes, and global average pooling.
Networks for small inputs may pool 2x2 with stride 2 instead, which halves a side exactly.
Every variant the chapter's exercises ask about is a different `NiNConfig`, never a different
builder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ninlab.dotted import import_function
from ninlab.errors import NinlabError, checked_flag, one_line, shorten

__all__ = [
    "MAX_CHANNELS",
    "MAX_NUM_1X1",
    "Block",
    "ModelSpecError",
    "NiNConfig",
    "build_nin",
    "get_config",
    "list_configs",
    "nin_block",
    "parse_variant",
    "register_config",
    "resolve_model",
]

POOL = "M"  # 3x3 max pooling with stride 2, as between d2l's blocks
POOL_2X2 = "P"  # 2x2 max pooling with stride 2: 28 -> 14 -> 7, where 3x3/2 gives 28 -> 13 -> 6
DROPOUT = "D"  # dropout with the configuration's probability


@dataclass(frozen=True)
class Block:
    """One NiN block: a k x k convolution, then `num_1x1` 1x1 convolutions (None: the config's).

    `out_channels=None` makes the block end in the configuration's `num_classes` channels, as d2l's
    last block does.
    """

    out_channels: int | None
    kernel_size: int
    stride: int = 1
    padding: int = 0
    num_1x1: int | None = None

    def __post_init__(self) -> None:
        # PyTorch would build a kernel of 0 or a padding of -1 and fail mid-forward, or take a
        # stride of 1.5 as 1.
        for name, lowest, highest, optional in (
            ("out_channels", 1, MAX_CHANNELS, True),
            ("kernel_size", 1, MAX_KERNEL, False),
            ("stride", 1, MAX_KERNEL, False),
            ("padding", 0, MAX_KERNEL, False),
            ("num_1x1", 0, MAX_NUM_1X1, True),
        ):
            value = getattr(self, name)
            if value is None and optional:
                continue
            if not _whole(value) or not lowest <= value <= highest:
                raise ModelSpecError(
                    f"a Block's {name} must be a whole number from {lowest} to {highest:,}"
                    f"{' (or None: the configuration' + chr(39) + 's)' if optional else ''}, "
                    f"got {shorten(repr(value))}"
                )


Layer = Block | Literal["M", "P", "D"]


@dataclass(frozen=True)
class NiNConfig:
    """Everything that distinguishes one NiN from another."""

    layers: tuple[Layer, ...]
    num_1x1: int = 2
    num_classes: int = 10
    in_channels: int = 1
    global_pool: Literal["avg", "max"] = "avg"
    batch_norm: bool = False
    dropout: float = 0.5
    # d2l initialises every conv and linear weight with Xavier-uniform (d2l.init_cnn).
    init: Literal["xavier", "kaiming", "default"] = "xavier"
    description: str = ""

    def __post_init__(self) -> None:
        # Checked here, for every configuration, rather than by PyTorch mid-build (a dropout of 2)
        # or never (an init name it would ignore).
        if not isinstance(self.layers, tuple) or not any(
            isinstance(layer, Block) for layer in self.layers
        ):
            raise ModelSpecError(
                "layers must be a tuple of Blocks and 'M', 'P' or 'D' holding at least one Block, "
                f"got {shorten(repr(self.layers))}"
            )
        for layer in self.layers:
            if not isinstance(layer, Block) and layer not in (POOL, POOL_2X2, DROPOUT):
                raise ModelSpecError(
                    f"unknown layer {shorten(repr(layer))} in a NiN configuration; use a Block, "
                    "'M', 'P' or 'D'"
                )
        for name in ("num_1x1", "num_classes", "in_channels"):
            if not _whole(getattr(self, name)):
                raise ModelSpecError(
                    f"{name} must be a whole number, got {shorten(repr(getattr(self, name)))}"
                )
        if not isinstance(self.batch_norm, bool):
            raise ModelSpecError(f"batch_norm must be True or False, got {self.batch_norm!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)):
            raise ModelSpecError(f"dropout must be a number, got {shorten(repr(self.dropout))}")
        if not isinstance(self.description, str):
            raise ModelSpecError(
                f"description must be a string, got {shorten(repr(self.description))}"
            )
        problems = [
            (
                0 <= self.num_1x1 <= MAX_NUM_1X1,
                f"num_1x1 must be 0 to {MAX_NUM_1X1}, got {self.num_1x1}",
            ),
            (
                1 <= self.num_classes <= MAX_CHANNELS,
                f"num_classes must be 1 to {MAX_CHANNELS:,}, got {self.num_classes:,}",
            ),
            (
                1 <= self.in_channels <= MAX_CHANNELS,
                f"in_channels must be 1 to {MAX_CHANNELS:,}, got {self.in_channels:,}",
            ),
            (
                math.isfinite(self.dropout) and 0 <= self.dropout <= 1,
                f"dropout must be between 0 and 1, got {self.dropout}",
            ),
            (self.init in _INITS, f"init must be one of {', '.join(_INITS)}, got {self.init!r}"),
            (
                self.global_pool in _POOLS,
                f"global_pool must be 'avg' or 'max', got {self.global_pool!r}",
            ),
        ]
        for ok, problem in problems:
            if not ok:
                raise ModelSpecError(problem)


# Bounds of a variant's settings, so a typo (num_1x1=5000) is one line rather than minutes of
# work: 64 1x1 convolutions per block is 16 times the deepest NiN of the chapter's exercises,
# and a million channels (a classifier of a million classes) is 13.8 GB of weights in one
# convolution of d2l's NiN, which the accountant describes without building.
MAX_NUM_1X1 = 64
MAX_CHANNELS = 1_000_000
# A kernel, stride or padding past it spans no image a machine holds (a side of 65,536 pixels).
MAX_KERNEL = 65_536
_INITS = ("xavier", "kaiming", "default")
_POOLS = ("avg", "max")


def nin_block(
    in_channels: int,
    out_channels: int,
    *,
    kernel_size: int,
    stride: int,
    padding: int,
    num_1x1: int,
    batch_norm: bool = False,
) -> nn.Sequential:
    """d2l's `nin_block`: conv k x k, then `num_1x1` pointwise convs, each followed by a ReLU."""
    layers: list[nn.Module] = []
    channels = in_channels
    for kernel, conv_stride, conv_padding in [(kernel_size, stride, padding)] + [
        (1, 1, 0)
    ] * num_1x1:
        # With batch norm the conv bias is redundant (BN subtracts the mean), so it is dropped.
        layers.append(
            nn.Conv2d(
                channels, out_channels, kernel, conv_stride, conv_padding, bias=not batch_norm
            )
        )
        if batch_norm:
            layers.append(nn.BatchNorm2d(out_channels))
        layers.append(nn.ReLU())
        channels = out_channels
    return nn.Sequential(*layers)


def _init_weights(module: nn.Module, init: str) -> None:
    if not isinstance(module, (nn.Conv2d, nn.Linear)):
        return
    if init == "xavier":
        nn.init.xavier_uniform_(module.weight)
    elif init == "kaiming":
        nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def build_nin(config: NiNConfig | None = None) -> nn.Sequential:
    """Build the network a configuration describes (d2l's NiN when called with no argument)."""
    if config is not None and not isinstance(config, NiNConfig):
        raise ModelSpecError(
            f"build_nin takes a NiNConfig, not {shorten(repr(config))}; a name is built by "
            "resolve_model(name), or give get_config(name)"
        )
    config = config or get_config("nin-d2l")
    modules: list[nn.Module] = []
    channels = config.in_channels
    for layer in config.layers:
        if layer == POOL:
            modules.append(nn.MaxPool2d(3, stride=2))
        elif layer == POOL_2X2:
            modules.append(nn.MaxPool2d(2, stride=2))
        elif layer == DROPOUT:
            modules.append(nn.Dropout(config.dropout))
        elif isinstance(layer, Block):
            out_channels = (
                layer.out_channels if layer.out_channels is not None else config.num_classes
            )
            modules.append(
                nin_block(
                    channels,
                    out_channels,
                    kernel_size=layer.kernel_size,
                    stride=layer.stride,
                    padding=layer.padding,
                    num_1x1=config.num_1x1 if layer.num_1x1 is None else layer.num_1x1,
                    batch_norm=config.batch_norm,
                )
            )
            channels = out_channels
        else:
            raise ModelSpecError(
                f"unknown layer {layer!r} in a NiN configuration; use a Block, 'M', 'P' or 'D'"
            )
    if channels != config.num_classes:
        # A network whose last block is not the classifier (e.g. the exercise that removes the
        # final squeeze) needs a linear head after the global pool.
        modules += [
            _global_pool(config.global_pool),
            nn.Flatten(),
            nn.Linear(channels, config.num_classes),
        ]
    else:
        modules += [_global_pool(config.global_pool), nn.Flatten()]
    net = nn.Sequential(*modules)
    net.apply(lambda m: _init_weights(m, config.init))
    return net


def _whole(value: object) -> bool:
    """Whether `value` is a whole number (an int, not a bool: True is no channel count)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _global_pool(kind: str) -> nn.Module:
    if kind == "avg":
        return nn.AdaptiveAvgPool2d((1, 1))
    if kind == "max":
        return nn.AdaptiveMaxPool2d((1, 1))
    raise ModelSpecError(f"unknown global pool {kind!r}; use 'avg' or 'max'")


class ModelSpecError(NinlabError):
    """A model name, variant or factory path that cannot be turned into a module."""


_REGISTRY: dict[str, NiNConfig] = {}


def register_config(name: str, config: NiNConfig) -> NiNConfig:
    """Add a named configuration; names are unique, so a second registration is an error."""
    if name in _REGISTRY:
        raise ModelSpecError(f"a model named {name!r} is already registered")
    _REGISTRY[name] = config
    return config


def get_config(name: str) -> NiNConfig:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ModelSpecError(
            f"unknown model {name!r}; choose one of {', '.join(sorted(_REGISTRY))} "
            "or give a factory as package.module:function"
        ) from None


def list_configs() -> dict[str, NiNConfig]:
    return dict(_REGISTRY)


_D2L_LAYERS: tuple[Layer, ...] = (
    Block(96, kernel_size=11, stride=4, padding=0),
    POOL,
    Block(256, kernel_size=5, stride=1, padding=2),
    POOL,
    Block(384, kernel_size=3, stride=1, padding=1),
    POOL,
    DROPOUT,
    Block(None, kernel_size=3, stride=1, padding=1),
)

register_config(
    "nin-d2l", NiNConfig(_D2L_LAYERS, description="d2l.ai's NiN, exactly as the chapter builds it")
)
register_config(
    "nin-d2l-1x1",
    NiNConfig(
        _D2L_LAYERS, num_1x1=1, description="d2l's NiN with one 1x1 conv per block (exercise 2)"
    ),
)
register_config(
    "nin-d2l-0x1",
    NiNConfig(
        _D2L_LAYERS, num_1x1=0, description="d2l's NiN with no 1x1 convs: a plain conv stack"
    ),
)
register_config(
    "nin-d2l-bn",
    NiNConfig(
        _D2L_LAYERS, batch_norm=True, description="d2l's NiN with batch norm after every conv"
    ),
)
register_config(
    "nin-d2l-no-squeeze",
    NiNConfig(
        _D2L_LAYERS[:-1],
        description=(
            "d2l's NiN without the final 384->classes block: global pool, then a linear head"
        ),
    ),
)


def _yes_no(text: str) -> bool:
    words = {
        "1": True,
        "true": True,
        "yes": True,
        "on": True,
        "0": False,
        "false": False,
        "no": False,
        "off": False,
    }
    try:
        return words[text.lower()]
    except KeyError:
        raise ValueError(text) from None


_OVERRIDE_TYPES: dict[str, Callable[[str], object]] = {
    "num_1x1": int,
    "num_classes": int,
    "in_channels": int,
    "global_pool": str,
    "batch_norm": _yes_no,
    "dropout": float,
    "init": str,
}


def parse_variant(spec: str) -> NiNConfig:
    """`name` or `name:key=value,key=value`, e.g. `nin-d2l:num_1x1=1,batch_norm=true`."""
    name, _, overrides = spec.partition(":")
    config = get_config(name)
    if not overrides:
        return config
    changes: dict[str, object] = {}
    for item in overrides.split(","):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in _OVERRIDE_TYPES:
            raise ModelSpecError(
                f"cannot read variant setting {item!r} in {spec!r}; "
                f"use key=value with a key among {', '.join(_OVERRIDE_TYPES)}"
            )
        try:
            changes[key] = _OVERRIDE_TYPES[key](value.strip())
        except ValueError:
            kind = "true or false" if key == "batch_norm" else f"a valid {key}"
            raise ModelSpecError(
                f"variant setting {key}={value!r} is not {kind} (in {spec!r})"
            ) from None
    try:
        return dataclasses.replace(config, **changes)  # type: ignore[arg-type]
    except ModelSpecError as error:
        raise ModelSpecError(f"variant {spec!r}: {error}") from None


def resolve_model(spec: str, *, weights: bool = True) -> nn.Module:
    """A registry name, a variant (`name:key=value,...`) or a factory
    path `package.module:function`.

    A factory is called with no arguments and must return an `nn.Module`; a module the path
    names that is one already (`package.module:model`) is that model. `weights=False`
    builds a registry model on the meta device: its shapes without its memory, all the
    accountant needs (a factory is called as it is, since it may need its weights).
    """
    if not isinstance(spec, str):
        raise ModelSpecError(
            f"a model is named by text (a registry name, a variant or package.module:function), "
            f"not {shorten(repr(spec))}; a model built already is used as it is"
        )
    checked_flag("weights", weights)
    name = spec.partition(":")[0]
    if name in _REGISTRY:
        config = parse_variant(spec)
        with contextlib.nullcontext() if weights else torch.device("meta"):
            return build_nin(config)
    if ":" not in spec:
        get_config(spec)  # raises the error that lists the registry
    factory = import_function(
        spec, what="model", expects="a function that returns an nn.Module", error=ModelSpecError
    )
    if isinstance(factory, nn.Module):
        # A model built at import (`model = Net()` in the module): the model, not a factory;
        # called, it would run its forward with no input.
        return factory
    try:
        model = factory()
    except (Exception, SystemExit) as error:  # noqa: BLE001 - whatever the user's factory raises, in one line
        raise ModelSpecError(
            f"factory {spec!r} failed when called with no arguments ({one_line(error)})"
        ) from None
    if not isinstance(model, nn.Module):
        raise ModelSpecError(
            f"factory {spec!r} returned {type(model).__name__}, not an nn.Module; make it return "
            "the model"
        )
    return model


# -- NiN-like networks in the spirit of VGG-11/16/19 (the chapter's last exercise) ----------------
# VGG's design decisions, kept: 3x3 convolutions with padding 1 only (no 11x11 or 5x5 stem), five
# stages whose widths double from 64 to 512 with pooling halving the resolution after each, and
# depth varied by the number of convolutions per stage (VGG-11: 1,1,2,2,2; VGG-16: 2,2,3,3,3;
# VGG-19: 2,2,4,4,4). NiN's, kept: each stage is one NiN block, its first convolution 3x3 and the
# others 1x1, and VGG's three fully connected layers become a last block (3x3 conv to the classes,
# two 1x1 convs) and global average pooling. Each network so has as many weight layers as its
# VGG namesake. Pooling is NiN's 3x3 stride 2, so the smallest input is 63x63.
_VGG_WIDTHS = (64, 128, 256, 512, 512)
_VGG_CONVS = {
    "nin-vgg11": (1, 1, 2, 2, 2),
    "nin-vgg16": (2, 2, 3, 3, 3),
    "nin-vgg19": (2, 2, 4, 4, 4),
}


def _vgg_like_layers(convs_per_stage: tuple[int, ...]) -> tuple[Layer, ...]:
    layers: list[Layer] = []
    for width, convs in zip(_VGG_WIDTHS, convs_per_stage):
        layers += [Block(width, kernel_size=3, stride=1, padding=1, num_1x1=convs - 1), POOL]
    return (*layers, DROPOUT, Block(None, kernel_size=3, stride=1, padding=1, num_1x1=2))


for _name, _convs in _VGG_CONVS.items():
    register_config(
        _name,
        NiNConfig(
            _vgg_like_layers(_convs),
            description=(
                f"NiN-like {_name.removeprefix('nin-vgg')}-weight-layer network after VGG: five "
                "stages (64..512 channels) of a 3x3 conv and "
                f"{', '.join(str(c - 1) for c in _convs)} 1x1 convs, 3x3/2 pooling, a NiN head"
            ),
        ),
    )


# -- NiN at Fashion-MNIST's own 28x28 (issue 24) ------------------------------------------------
# The book's first block (11x11 stride 4) is made for 224x224 ImageNet pictures; fed Fashion-MNIST
# upsampled to 67 it works at about 16x16, below the images' own 28x28, and the upsampling adds
# compute but no information. This NiN keeps the chapter's design (NiN blocks of one k x k conv and
# two 1x1 convs, pooling between them, a last block whose channels are the classes, global average
# pooling, no fully connected layer) at the native size: 3x3 convs with padding 1, 2x2 pooling that
# halves 28 -> 14 -> 7 -> 3, and widths 32/96/256 (the book's: 96/256/384), so a step costs
# about 0.9x what nin-d2l-bn at 72x72 costs. Batch norm after every conv; no dropout.
register_config(
    "nin-28",
    NiNConfig(
        (
            Block(32, kernel_size=3, stride=1, padding=1),
            POOL_2X2,
            Block(96, kernel_size=3, stride=1, padding=1),
            POOL_2X2,
            Block(256, kernel_size=3, stride=1, padding=1),
            POOL_2X2,
            Block(None, kernel_size=3, stride=1, padding=1),
        ),
        batch_norm=True,
        dropout=0.0,
        description=(
            "NiN for 28x28 inputs: blocks of a 3x3 conv and two 1x1 convs, 32/96/256 channels, "
            "2x2 pooling, batch norm, a 10-channel last block and global average pooling"
        ),
    ),
)
