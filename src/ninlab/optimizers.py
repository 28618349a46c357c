"""Optimizers by name, so a prediction, a measurement and a training run build the same one.

A name is a torch optimizer with a few settings of its own (`sgd-momentum` is SGD with momentum
0.9); any other keyword argument of that optimizer's signature may be given beside it
(`sgd:momentum=0.5`, `adam:amsgrad=true,betas=(0.8,0.99)`), and nothing else: a setting the
optimizer does not take is refused, never ignored, so what is predicted is what is built.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch

from ninlab.errors import NinlabError, one_line

__all__ = ["OPTIMIZER_NAMES", "OptimizerSpec", "make_optimizer", "parse_optimizer"]

# Each name: the torch optimizer and the settings the name itself implies. Every name sets
# weight_decay 0 (AdamW's own default is 0.01), so that names differ only in their state.
_NAMED: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any]]] = {
    "sgd": (torch.optim.SGD, {"weight_decay": 0.0}),
    "sgd-momentum": (torch.optim.SGD, {"momentum": 0.9, "weight_decay": 0.0}),
    "nesterov": (torch.optim.SGD, {"momentum": 0.9, "nesterov": True, "weight_decay": 0.0}),
    "adam": (torch.optim.Adam, {"weight_decay": 0.0}),
    "adamw": (torch.optim.AdamW, {"weight_decay": 0.0}),
    "rmsprop": (torch.optim.RMSprop, {"weight_decay": 0.0}),
    "adagrad": (torch.optim.Adagrad, {"weight_decay": 0.0}),
}
OPTIMIZER_NAMES = tuple(_NAMED)
Implementation = Literal["default", "foreach", "for-loop", "fused"]
# Keyword arguments that are not settings: the parameters, the implementation (its own field),
# and modes ninlab does not account for (a differentiable update, CUDA-graph capture).
_NOT_SETTINGS = ("params", "lr", "foreach", "fused", "differentiable", "capturable")
# Factors PyTorch accepts at 1 or above, where the update then diverges.
_BELOW_ONE = ("momentum", "dampening", "alpha")


@dataclass(frozen=True)
class OptimizerSpec:
    """An optimizer by name (`OPTIMIZER_NAMES`), its learning rate, its `settings` (any other
    keyword argument of the torch optimizer: momentum, betas, amsgrad, weight_decay, ...) and
    whether its update runs per tensor (for-loop), over lists of tensors (foreach) or as one
    kernel (fused). "default" lets PyTorch choose, as `torch.optim` does: foreach on CUDA,
    for-loop on CPU. Every setting is checked against the optimizer's own signature and values
    when the spec is made."""

    name: str = "sgd"
    lr: float = 0.05
    # Given as a mapping; held as (key, value) pairs in the order given, so the spec hashes.
    settings: Mapping[str, Any] | tuple[tuple[str, Any], ...] = ()
    implementation: Implementation = "default"

    def __post_init__(self) -> None:
        pairs = self.settings.items() if isinstance(self.settings, Mapping) else self.settings
        object.__setattr__(self, "settings", tuple((key, value) for key, value in pairs))
        if self.name not in _NAMED:
            raise NinlabError(
                f"unknown optimizer {self.name!r}; choose one of {', '.join(OPTIMIZER_NAMES)}"
            )
        optimizer_class = _NAMED[self.name][0]
        accepted = _accepted_settings(optimizer_class)
        for key, value in self.settings:
            if key not in accepted:
                raise NinlabError(
                    f"{self.name} ({optimizer_class.__name__}) takes no setting {key!r}; its "
                    f"settings are {', '.join(accepted)}"
                    + (", and implementation=" if key in ("foreach", "fused") else "")
                )
            _check_value(key, value)
        _check_value("lr", self.lr)
        if self.lr <= 0:
            raise NinlabError(f"optimizer setting lr must be positive, got {self.lr!r}")
        if self.implementation not in get_args(Implementation):
            raise NinlabError(
                f"optimizer setting implementation must be one of "
                f"{', '.join(get_args(Implementation))}, got {self.implementation!r}"
            )
        if self.implementation == "fused" and "fused" not in _signature(optimizer_class):
            raise NinlabError(
                f"PyTorch has no fused {self.name}; use implementation foreach or for-loop"
            )
        # The optimizer's own checks (nesterov without momentum, a beta of 2), made now on one
        # parameter rather than in a traceback when the step is built.
        try:
            optimizer_class([torch.zeros(1, requires_grad=True)], **self.keywords())
        except (ValueError, TypeError, RuntimeError) as error:
            raise NinlabError(f"{self.name} refuses these settings: {one_line(error)}") from None

    @property
    def optimizer_class(self) -> type[torch.optim.Optimizer]:
        return _NAMED[self.name][0]

    def keywords(self) -> dict[str, Any]:
        """The keyword arguments the optimizer is built with (but the implementation's)."""
        return {"lr": self.lr, **_NAMED[self.name][1], **dict(self.settings)}

    def used(self) -> dict[str, Any]:
        """Every hyperparameter of the optimizer as it is built, its defaults included: what a
        report shows."""
        defaults = {
            name: parameter.default
            for name, parameter in _signature(self.optimizer_class).items()
            if name not in ("self", *_NOT_SETTINGS)
        }
        return {
            "name": self.name,
            "class": self.optimizer_class.__name__,
            "lr": self.lr,
            **{key: _plain(value) for key, value in {**defaults, **self.keywords()}.items()},
            "implementation": self.implementation,
        }

    @property
    def label(self) -> str:
        """The name with the settings given beside it, as --optimizer takes it:
        "sgd:momentum=0.5"."""
        given = {key: _plain(value) for key, value in self.settings}
        if self.implementation != "default":
            given["implementation"] = self.implementation
        words = ",".join(f"{key}={_word(value)}" for key, value in given.items())
        return f"{self.name}:{words}" if words else self.name


def _signature(optimizer_class: type) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(optimizer_class.__init__).parameters)


def _accepted_settings(optimizer_class: type) -> tuple[str, ...]:
    return tuple(
        name for name in _signature(optimizer_class) if name not in ("self", *_NOT_SETTINGS)
    )


def _check_value(key: str, value: Any) -> None:
    numbers = value if isinstance(value, tuple) else (value,)
    for number in numbers:
        if isinstance(number, bool):
            continue
        if not isinstance(number, (int, float)) or not math.isfinite(number):
            raise NinlabError(f"optimizer setting {key} must be a finite number, got {value!r}")
    if key in _BELOW_ONE and not 0 <= value < 1:
        raise NinlabError(f"optimizer setting {key} must be in [0, 1), got {value!r}")


def _plain(value: Any) -> Any:
    """A setting as JSON holds it: a tuple as a list."""
    return list(value) if isinstance(value, tuple) else value


def _word(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "(" + ",".join(map(str, value)) + ")"
    return str(value)


def make_optimizer(
    spec: OptimizerSpec, params: Iterable[torch.nn.Parameter], *, device_type: str | None = None
) -> torch.optim.Optimizer:
    """Build the optimizer. `device_type` names the device the parameters stand for, when that
    differs from where they are (a CUDA step emulated on CPU): "default" then picks as there."""
    flags: dict[str, bool] = {}
    if spec.implementation == "foreach" or (
        spec.implementation == "default" and device_type == "cuda"
    ):
        flags = {"foreach": True}
    elif spec.implementation == "for-loop":
        flags = {"foreach": False}
    elif spec.implementation == "fused":
        flags = {"fused": True}
    return spec.optimizer_class(list(params), **spec.keywords(), **flags)


def parse_optimizer(text: str, *, argument: str = "optimizer") -> OptimizerSpec:
    """`adam`, or with settings: `adamw:weight_decay=0.01,implementation=foreach`,
    `adam:betas=(0.8,0.99),amsgrad=true`; an error names the text and the `argument` it was
    given as (the API's keyword; the command line's --optimizer)."""
    try:
        return _parse_optimizer(text)
    except NinlabError as error:
        raise NinlabError(f"{argument} {text!r}: {error}") from None


def _parse_optimizer(text: str) -> OptimizerSpec:
    name, _, settings = text.partition(":")
    name = name.strip().lower()
    if name not in _NAMED:
        OptimizerSpec(name)  # raises the error that lists the names
    defaults = {key: parameter.default for key, parameter in _signature(_NAMED[name][0]).items()}
    values: dict[str, Any] = {}
    # Settings are separated by commas outside parentheses: betas=(0.9,0.999) is one.
    for item in filter(None, re.split(r",(?![^(]*\))", settings)):
        key, equals, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not equals:
            raise NinlabError(f"cannot read optimizer setting {item!r}; write key=value")
        if key in values or key in values.get("settings", {}):
            raise NinlabError(f"optimizer setting {key!r} is given twice")
        if key in ("lr", "implementation"):
            values[key] = value.strip() if key == "implementation" else _number(key, value)
        elif key not in defaults or key in _NOT_SETTINGS:
            values.setdefault("settings", {})[key] = value  # refused by OptimizerSpec, by name
        else:
            values.setdefault("settings", {})[key] = _typed(key, value, defaults[key])
    return OptimizerSpec(name=name, **values)


def _typed(key: str, text: str, default: Any) -> Any:
    """A setting's text as the type of the optimizer's default for it."""
    text = text.strip()
    if isinstance(default, bool):
        words = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
        if text.lower() not in words:
            raise NinlabError(f"optimizer setting {key} must be true or false, got {text!r}")
        return words[text.lower()]
    if isinstance(default, tuple):
        parts = text.strip("()").split(",")
        if len(parts) != len(default):
            raise NinlabError(
                f"optimizer setting {key} takes {len(default)} numbers, e.g. "
                f"{key}=({','.join(map(str, default))}); got {text!r}"
            )
        return tuple(_number(key, part) for part in parts)
    return _number(key, text)


def _number(key: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise NinlabError(
            f"optimizer setting {key} must be a number, got {text.strip()!r}"
        ) from None
