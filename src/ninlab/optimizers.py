"""Optimizers by name, so a prediction, a measurement and a training run build the same one."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

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
            raise NinlabError(f"unknown optimizer {self.name!r}; choose one of {', '.join(OPTIMIZER_NAMES)}")


def make_optimizer(
    spec: OptimizerSpec, params: Iterable[torch.nn.Parameter], *, device_type: str | None = None
) -> torch.optim.Optimizer:
    """Build the optimizer. `device_type` names the device the parameters stand for, when that
    differs from where they are (a CUDA step emulated on CPU): "default" then picks as there."""
    params = list(params)
    flags: dict[str, bool] = {}
    if spec.implementation == "foreach" or (spec.implementation == "default" and device_type == "cuda"):
        flags = {"foreach": True}
    elif spec.implementation == "for-loop":
        flags = {"foreach": False}
    elif spec.implementation == "fused":
        if spec.name in ("rmsprop",):
            raise NinlabError(f"PyTorch has no fused {spec.name}; use implementation foreach or for-loop")
        flags = {"fused": True}
    common = {"lr": spec.lr, "weight_decay": spec.weight_decay, **flags}
    if spec.name == "sgd":
        return torch.optim.SGD(params, **common)
    if spec.name in ("sgd-momentum", "nesterov"):
        return torch.optim.SGD(params, momentum=spec.momentum, nesterov=spec.name == "nesterov", **common)
    if spec.name == "adam":
        return torch.optim.Adam(params, **common)
    if spec.name == "adamw":
        return torch.optim.AdamW(params, **common)
    if spec.name == "rmsprop":
        return torch.optim.RMSprop(params, **common)
    return torch.optim.Adagrad(params, **common)


def parse_optimizer(text: str) -> OptimizerSpec:
    """`adam`, or with settings: `adamw:weight_decay=0.01,implementation=foreach`."""
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
