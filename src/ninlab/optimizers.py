"""Optimizers by name, so a prediction, a measurement and a training run build the same one."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, get_args

import torch

from ninlab.errors import NinlabError

__all__ = ["OPTIMIZER_NAMES", "OptimizerSpec", "make_optimizer", "parse_optimizer"]

OPTIMIZER_NAMES = ("sgd", "sgd-momentum", "nesterov", "adam", "adamw", "rmsprop", "adagrad")
Implementation = Literal["default", "foreach", "for-loop", "fused"]


@dataclass(frozen=True)
class OptimizerSpec:
    """An optimizer and the settings that change its memory: state per parameter, and whether
    its update runs per tensor (for-loop), over lists of tensors (foreach) or as one kernel (fused).
    "default" lets PyTorch choose, as `torch.optim` does: foreach on CUDA, for-loop on CPU."""

    name: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    implementation: Implementation = "default"

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZER_NAMES:
            raise NinlabError(
                f"unknown optimizer {self.name!r}; choose one of {', '.join(OPTIMIZER_NAMES)}"
            )
        # PyTorch would refuse these too, but only when the optimizer is built, in a traceback.
        numbers = {"lr": self.lr, "momentum": self.momentum, "weight_decay": self.weight_decay}
        for key, value in numbers.items():
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise NinlabError(f"optimizer setting {key} must be a finite number, got {value!r}")
        if self.lr <= 0:
            raise NinlabError(f"optimizer setting lr must be positive, got {self.lr!r}")
        if not 0 <= self.momentum < 1:
            raise NinlabError(
                f"optimizer setting momentum must be in [0, 1), got {self.momentum!r}"
            )
        if self.weight_decay < 0:
            raise NinlabError(
                f"optimizer setting weight_decay must be non-negative, got {self.weight_decay!r}"
            )
        if self.implementation not in get_args(Implementation):
            raise NinlabError(
                f"optimizer setting implementation must be one of "
                f"{', '.join(get_args(Implementation))}, got {self.implementation!r}"
            )


def make_optimizer(
    spec: OptimizerSpec, params: Iterable[torch.nn.Parameter], *, device_type: str | None = None
) -> torch.optim.Optimizer:
    """Build the optimizer. `device_type` names the device the parameters stand for, when that
    differs from where they are (a CUDA step emulated on CPU): "default" then picks as there."""
    params = list(params)
    flags: dict[str, bool] = {}
    if spec.implementation == "foreach" or (
        spec.implementation == "default" and device_type == "cuda"
    ):
        flags = {"foreach": True}
    elif spec.implementation == "for-loop":
        flags = {"foreach": False}
    elif spec.implementation == "fused":
        if spec.name in ("rmsprop",):
            raise NinlabError(
                f"PyTorch has no fused {spec.name}; use implementation foreach or for-loop"
            )
        flags = {"fused": True}
    common = {"lr": spec.lr, "weight_decay": spec.weight_decay, **flags}
    if spec.name == "sgd":
        return torch.optim.SGD(params, **common)
    if spec.name in ("sgd-momentum", "nesterov"):
        return torch.optim.SGD(
            params, momentum=spec.momentum, nesterov=spec.name == "nesterov", **common
        )
    if spec.name == "adam":
        return torch.optim.Adam(params, **common)
    if spec.name == "adamw":
        return torch.optim.AdamW(params, **common)
    if spec.name == "rmsprop":
        return torch.optim.RMSprop(params, **common)
    return torch.optim.Adagrad(params, **common)


def parse_optimizer(text: str) -> OptimizerSpec:
    """`adam`, or with settings: `adamw:weight_decay=0.01,implementation=foreach`; an error names
    the text, which the command line takes as --optimizer."""
    try:
        return _parse_optimizer(text)
    except NinlabError as error:
        raise NinlabError(f"--optimizer {text!r}: {error}") from None


def _parse_optimizer(text: str) -> OptimizerSpec:
    name, _, settings = text.partition(":")
    values: dict[str, object] = {}
    for item in filter(None, settings.split(",")):
        key, _, value = item.partition("=")
        key = key.strip().replace("-", "_")
        try:
            if key in ("lr", "momentum", "weight_decay"):
                values[key] = float(value)
            elif key == "implementation" and value in ("default", "foreach", "for-loop", "fused"):
                values[key] = value
            else:
                raise ValueError
        except ValueError:
            raise NinlabError(
                f"cannot read optimizer setting {item!r}; use lr=, momentum=, weight_decay= or "
                "implementation=default|foreach|for-loop|fused"
            ) from None
    return OptimizerSpec(name=name.strip().lower(), **values)  # type: ignore[arg-type]
