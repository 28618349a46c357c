"""The step to account for: its description (`StepSpec`) and its code (`train_step`,
`inference_step`), each written once.

The predictor runs these on fake tensors and the measurer on real ones, so both account for the
same program: what is alive when is decided by this code, not by two descriptions of it. A user's
own training step (`StepSpec.step`, a function `step(model, optimizer, inputs, targets)`) is run
the same way; the built-in `train_step` is only the default one. A
`StepSpec` is everything about a step but its batch size (batch fitting varies that); it is
validated when it is built, so every function that takes one can trust it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import operator
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from torch.nn import functional as F

from ninlab.errors import NinlabError
from ninlab.optimizers import OptimizerSpec, make_optimizer, parse_optimizer

__all__ = [
    "AMP_DTYPES",
    "DTYPES",
    "DDPSpec",
    "GradMode",
    "OptimizerFactory",
    "StepFunction",
    "StepSpec",
    "inference_step",
    "load_step",
    "optimizers_in",
    "step_failed",
    "step_spec",
    "train_step",
    "valid_batch_size",
]

# One training step as the user writes it: `step(model, optimizer, inputs, targets)`, where
# `optimizer` is what `StepSpec.make_optimizers` built (an optimizer, or what a factory returned).
StepFunction = Callable[[nn.Module, Any, torch.Tensor, torch.Tensor], object]
# Builds what a step function receives as its optimizer, from the model: one optimizer, or a tuple
# (two optimizers, an optimizer and its GradScaler): everything the step keeps across steps.
OptimizerFactory = Callable[[nn.Module], Any]
Mode = Literal["train", "infer"]
GradMode = Literal["no_grad", "inference_mode"]
Amp = Literal["bf16", "fp16"]
DeviceType = Literal["cpu", "cuda"]
MemoryFormat = Literal["contiguous", "channels_last"]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
}
AMP_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}
_AMP_NAMES = {"bfloat16": "bf16", "float16": "fp16", torch.bfloat16: "bf16", torch.float16: "fp16"}
_MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


@dataclass(frozen=True)
class DDPSpec:
    """The DistributedDataParallel settings that change a rank's memory."""

    bucket_cap_mb: float | None = None  # None: DDP's default, 25 MiB, with a 1 MiB first bucket
    gradient_as_bucket_view: bool = False


@dataclass(frozen=True)
class StepSpec:
    """One step: a training step (`mode="train"`: the built-in zero_grad, forward, cross-entropy,
    backward, `optimizer.step()`, or the user's own `step` function) or an inference, for one
    sample size, precision and device.

    Built from plain values (`optimizer="adam:weight_decay=0.01"`, `dtype="bfloat16"`,
    `amp="bf16"`, `ddp=True`) or typed ones; either way the fields hold the typed, checked form.
    `optimizer` may also be a factory, `make(model) -> optimizer or tuple`, for two optimizers,
    parameter groups or a GradScaler; the step receives what it returns.
    """

    input_size: tuple[int, ...] = (1, 224, 224)  # one sample, channels first
    mode: Mode = "train"
    optimizer: OptimizerSpec | OptimizerFactory = field(default_factory=OptimizerSpec)  # train only
    dtype: torch.dtype = torch.float32  # of parameters and input, as model.to(dtype) makes them
    amp: Amp | None = None  # forward and loss under autocast to this dtype
    device_type: DeviceType = "cpu"  # the device to account for, from any machine
    grad_mode: GradMode = "no_grad"  # infer only: the guard around the forward
    memory_format: MemoryFormat = "contiguous"  # of the input and 4-d parameters
    ddp: DDPSpec | None = None  # train only: DistributedDataParallel's gradient buckets
    step: StepFunction | None = None  # train only: the user's step; None: the built-in `train_step`

    def __post_init__(self) -> None:
        def normalise(name: str, value: object) -> None:
            object.__setattr__(self, name, value)

        normalise("input_size", _input_size(self.input_size))
        _choice("mode", self.mode, ("train", "infer"))
        if isinstance(self.optimizer, str):
            normalise("optimizer", parse_optimizer(self.optimizer))
        elif not isinstance(self.optimizer, OptimizerSpec) and not callable(self.optimizer):
            raise NinlabError(
                "optimizer must be a name such as 'adam', an OptimizerSpec or a function "
                f"make(model) -> optimizer, not {self.optimizer!r}"
            )
        if isinstance(self.dtype, str):
            _choice("dtype", self.dtype, tuple(DTYPES))
            normalise("dtype", DTYPES[self.dtype])
        elif self.dtype not in DTYPES.values():
            raise NinlabError(f"dtype must be one of {', '.join(DTYPES)}, not {self.dtype}")
        if self.amp is not None:
            normalise("amp", _AMP_NAMES.get(self.amp, self.amp))
            _choice("amp", self.amp, tuple(AMP_DTYPES))
        _choice("device type", self.device_type, ("cpu", "cuda"))
        _choice("grad mode", self.grad_mode, ("no_grad", "inference_mode"))
        _choice("memory format", self.memory_format, tuple(_MEMORY_FORMATS))
        if self.ddp is True:
            normalise("ddp", DDPSpec())
        elif self.ddp is False:
            normalise("ddp", None)
        if self.ddp is not None and self.mode != "train":
            raise NinlabError("DDP gradient buckets exist only in training; drop ddp or use mode 'train'")
        if self.step is not None:
            if not callable(self.step):
                raise NinlabError(f"step must be a function step(model, optimizer, inputs, targets), not {self.step!r}")
            if self.mode != "train":
                raise NinlabError("a step function is a training step; drop step or use mode 'train'")
            if self.amp is not None:
                raise NinlabError(
                    "amp sets the built-in step's autocast; a step function runs its own "
                    "(torch.autocast inside it): drop amp"
                )

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return AMP_DTYPES[self.amp] if self.amp else None

    @property
    def torch_memory_format(self) -> torch.memory_format:
        return _MEMORY_FORMATS[self.memory_format]

    @property
    def optimizer_name(self) -> str:
        """"adam", or the name of the optimizer factory."""
        if isinstance(self.optimizer, OptimizerSpec):
            return self.optimizer.name
        return _callable_name(self.optimizer)

    @property
    def step_name(self) -> str:
        """The step function's qualified name, or "built-in"."""
        return "built-in" if self.step is None else _callable_name(self.step)

    def step_function(self) -> StepFunction:
        """The training step to run: the user's, or the built-in one with this spec's autocast."""
        if self.step is not None:
            return self.step
        return functools.partial(train_step, autocast_dtype=self.autocast_dtype)

    def make_optimizers(self, model: nn.Module, *, device_type: str | None = None) -> Any:
        """What the step receives as its optimizer, built over `model`'s parameters as they are
        now (the predictor swaps in fake ones first): the named optimizer over the trainable
        parameters, or what the factory returns. `device_type` as for `make_optimizer`."""
        if isinstance(self.optimizer, OptimizerSpec):
            trainable = [p for p in model.parameters() if p.requires_grad]
            return make_optimizer(self.optimizer, trainable, device_type=device_type)
        try:
            built = self.optimizer(model)
        except Exception as error:  # noqa: BLE001 - whatever the user's factory raises, in one line
            raise NinlabError(f"the optimizer factory {self.optimizer_name} failed: {_one_line(error)}") from None
        if not optimizers_in(built):
            raise NinlabError(
                f"the optimizer factory {self.optimizer_name} returned no torch optimizer; return "
                "one, or a tuple holding them"
            )
        return built

    def replace(self, **changes: Any) -> StepSpec:
        """A copy with some fields changed, checked again."""
        return dataclasses.replace(self, **changes)

    def inference(self) -> StepSpec:
        """The inference of this step's model, input and precision."""
        return self.replace(mode="infer", ddp=None, step=None)

    def as_dict(self) -> dict[str, Any]:
        """The fields as plain values (dtypes by name), for JSON."""
        def name(dtype: torch.dtype | None) -> str | None:
            return str(dtype).removeprefix("torch.") if dtype is not None else None

        return {
            "mode": self.mode,
            "input_size": list(self.input_size),
            "dtype": name(self.dtype),
            "autocast_dtype": name(self.autocast_dtype),
            "device_type": self.device_type,
            "optimizer": self._optimizer_dict() if self.mode == "train" else None,
            "step_function": self.step_name if self.mode == "train" else None,
            "grad_mode": self.grad_mode if self.mode == "infer" else None,
            "memory_format": self.memory_format,
            "ddp": dataclasses.asdict(self.ddp) if self.ddp is not None else None,
        }

    def _optimizer_dict(self) -> dict[str, Any]:
        if isinstance(self.optimizer, OptimizerSpec):
            return dataclasses.asdict(self.optimizer)
        return {"factory": self.optimizer_name}

    @property
    def title(self) -> str:
        """The step in a few words, for a heading: "training step (adam)", "inference (no_grad)",
        "my_step (adam)"."""
        if self.mode == "train":
            name = "training step" if self.step is None else self.step_name
            return f"{name} ({self.optimizer_name})"
        return f"inference ({self.grad_mode})"

    def describe(self, batch_size: int | None = None) -> str:
        """The step in words, e.g. "training step (the second: optimizer state exists) with adam,
        float32 with bfloat16 autocast, cpu, batch 128"."""
        dtype = str(self.dtype).removeprefix("torch.")
        precision = dtype + (f" with {str(self.autocast_dtype).removeprefix('torch.')} autocast" if self.amp else "")
        if self.mode == "train":
            name = "training step" if self.step is None else f"step {self.step_name}"
            step = f"{name} (the second: optimizer state exists) with {self.optimizer_name}"
        else:
            step = self.title
        words = [step, precision, self.device_type]
        if self.memory_format != "contiguous":
            words.append(self.memory_format.replace("_", "-"))
        if self.ddp is not None:
            words.append("DDP")
        if batch_size is not None:
            words.append(f"batch {batch_size}")
        return ", ".join(words)


def step_spec(spec: StepSpec | None = None, **fields: Any) -> StepSpec:
    """`spec`, or a `StepSpec` built from `fields`: what every function that takes a step accepts,
    so `predict_memory(model, spec, ...)` and `predict_memory(model, optimizer="adam", ...)` agree."""
    if spec is None:
        return StepSpec(**fields)
    if fields:
        raise NinlabError(f"give a StepSpec or its fields ({', '.join(fields)}), not both")
    if not isinstance(spec, StepSpec):
        raise NinlabError(f"expected a StepSpec, got {type(spec).__name__}")
    return spec


def valid_batch_size(batch_size: int) -> int:
    """`batch_size` as an int, or one line saying why it cannot be one."""
    try:
        if isinstance(batch_size, bool):
            raise TypeError
        value = operator.index(batch_size)
    except TypeError:
        raise NinlabError(f"batch size must be a whole number, got {batch_size!r}") from None
    if value < 1:
        raise NinlabError(f"batch size must be at least 1, got {value}")
    return value


def load_step(path: str) -> StepFunction:
    """The step function `package.module:function` names, or one line saying what is wrong."""
    module_path, _, attribute = path.partition(":")
    if not module_path or not attribute:
        raise NinlabError(f"name a step as package.module:function, not {path!r}")
    try:
        module = importlib.import_module(module_path)
    except Exception as error:  # noqa: BLE001 - any import failure is the user's, in one line
        raise NinlabError(
            f"cannot import {module_path!r} for step {path!r} ({_one_line(error)}); check the "
            "module path and that it is on PYTHONPATH"
        ) from None
    if not hasattr(module, attribute):
        raise NinlabError(f"{module_path!r} has no {attribute!r}; name a function step(model, optimizer, inputs, targets)")
    step = getattr(module, attribute)
    if not callable(step):
        raise NinlabError(
            f"{path!r} is not a function but a {type(step).__name__}; name a function "
            "step(model, optimizer, inputs, targets)"
        )
    return step


def step_failed(spec: StepSpec, error: BaseException, where: str) -> NinlabError:
    """One line for a user's step function that raised: its own error, and where it ran."""
    return NinlabError(f"the step {spec.step_name} raised on {where}: {_one_line(error)}")


def optimizers_in(value: Any) -> list[torch.optim.Optimizer]:
    """The torch optimizers in what `StepSpec.make_optimizers` built (one, or a tuple or list)."""
    values = value if isinstance(value, (tuple, list)) else (value,)
    return [v for v in values if isinstance(v, torch.optim.Optimizer)]


def _callable_name(function: Callable[..., Any]) -> str:
    inner = getattr(function, "func", function)  # a functools.partial: the function it binds
    return getattr(inner, "__qualname__", None) or type(inner).__name__


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _input_size(size: Sequence[int]) -> tuple[int, ...]:
    try:
        sizes = tuple(int(s) for s in size)
    except (TypeError, ValueError):
        sizes = ()
    if len(sizes) < 2 or min(sizes) < 1:
        raise NinlabError(
            f"input size must be channels then spatial sizes, all >= 1 (e.g. 1x224x224), got {size!r}"
        )
    return sizes


def _choice(name: str, value: object, choices: Sequence[str]) -> None:
    if value not in choices:
        raise NinlabError(f"{name} must be one of {', '.join(choices)}, not {value!r}")


def _autocast(inputs: torch.Tensor, dtype: torch.dtype | None) -> AbstractContextManager[object]:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(inputs.device.type, dtype=dtype)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    autocast_dtype: torch.dtype | None = None,
) -> None:
    """The built-in training step: zero_grad(set_to_none=True), forward, cross-entropy, backward,
    optimizer step. A `StepSpec` without `step` runs this one, with its autocast."""
    optimizer.zero_grad(set_to_none=True)
    with _autocast(inputs, autocast_dtype):
        logits = model(inputs)
        loss = F.cross_entropy(logits, targets)
    # `logits` stays referenced until the step returns, as `y_hat` does in d2l's training loop.
    loss.backward()
    optimizer.step()


def inference_step(
    model: nn.Module,
    inputs: torch.Tensor,
    *,
    autocast_dtype: torch.dtype | None = None,
    grad_mode: GradMode = "no_grad",
) -> torch.Tensor:
    """The model's forward with no autograd graph; returns the logits."""
    guard = torch.inference_mode() if grad_mode == "inference_mode" else torch.no_grad()
    with guard, _autocast(inputs, autocast_dtype):
        return model(inputs)
