"""The step to account for: its description (`StepSpec`), its inputs (`example_inputs`), its
built-in loss (`builtin_loss`) and its code (`train_step`, `inference_step`), each written once.

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
import operator
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from torch.nn import functional as F

from ninlab.dotted import import_function
from ninlab.errors import NinlabError, one_line
from ninlab.optimizers import OptimizerSpec, make_optimizer, parse_optimizer
from ninlab.units import dtype_name

__all__ = [
    "AMP_DTYPES",
    "DTYPES",
    "INPUT_DTYPES",
    "DDPSpec",
    "GradMode",
    "OptimizerFactory",
    "StepFunction",
    "StepSpec",
    "builtin_loss",
    "builtin_loss_words",
    "builtin_targets",
    "example_inputs",
    "inference_step",
    "load_step",
    "optimizer_state",
    "optimizers_in",
    "output_tensors",
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
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
AMP_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Inputs that are not the step's floating dtype: token ids for an embedding, masks.
INPUT_DTYPES: dict[str, torch.dtype] = {
    **DTYPES,
    "long": torch.int64,
    "int64": torch.int64,
    "int": torch.int32,
    "int32": torch.int32,
    "bool": torch.bool,
}
_AMP_NAMES = {"bfloat16": "bf16", "float16": "fp16", torch.bfloat16: "bf16", torch.float16: "fp16"}
_MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


@dataclass(frozen=True)
class DDPSpec:
    """The DistributedDataParallel settings that change a rank's memory."""

    bucket_cap_mb: float | None = None  # None: DDP's default, 25 MiB, with a 1 MiB first bucket
    gradient_as_bucket_view: bool = False


@dataclass(frozen=True)
class StepSpec:
    """One step: a training step (`mode="train"`: the built-in zero_grad, forward, the built-in
    loss, backward, `optimizer.step()`, or the user's own `step` function) or an inference, for one
    sample size, precision and device.

    Built from plain values (`optimizer="adam:weight_decay=0.01"`, `dtype="bfloat16"`,
    `amp="bf16"`, `ddp=True`) or typed ones; either way the fields hold the typed, checked form.
    `optimizer` may also be a factory, `make(model) -> optimizer or tuple`, for two optimizers,
    parameter groups or a GradScaler; the step receives what it returns.

    `input_size` is one sample of the model's input, of any rank (`(784,)`, `(1, 28, 28)`), or for
    a model of several inputs one size per input (`((1, 28, 28), (1, 28, 28))`); example tensors
    (a batch each, batch first) give their sizes, dtype and value range instead.
    """

    input_size: tuple[int, ...] | tuple[tuple[int, ...], ...] = (1, 224, 224)
    # The inputs' dtype: None is `dtype`; an integer one ("long": token ids) draws its values
    # from `input_range`, [low, high).
    input_dtype: torch.dtype | None = None
    input_range: tuple[int, int] = (0, 2)
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

        if _are_tensors(self.input_size):
            examples = _examples(self.input_size)
            normalise("input_size", examples.input_size)
            normalise("input_dtype", examples.input_dtype)
            normalise("input_range", examples.input_range)
        normalise("input_size", _input_sizes(self.input_size))
        if isinstance(self.input_dtype, str):
            _choice("input dtype", self.input_dtype, tuple(INPUT_DTYPES))
            normalise("input_dtype", INPUT_DTYPES[self.input_dtype])
        elif self.input_dtype is not None and self.input_dtype not in INPUT_DTYPES.values():
            raise NinlabError(
                f"input dtype must be one of {', '.join(INPUT_DTYPES)}, not {self.input_dtype}"
            )
        normalise("input_range", _input_range(self.input_range))
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
            raise NinlabError(
                "DDP gradient buckets exist only in training; drop ddp or use mode 'train'"
            )
        if self.step is not None:
            if not callable(self.step):
                raise NinlabError(
                    "step must be a function step(model, optimizer, inputs, targets), not "
                    f"{self.step!r}"
                )
            if self.mode != "train":
                raise NinlabError(
                    "a step function is a training step; drop step or use mode 'train'"
                )
            if self.amp is not None:
                raise NinlabError(
                    "amp sets the built-in step's autocast; a step function runs its own "
                    "(torch.autocast inside it): drop amp"
                )

    @property
    def input_sizes(self) -> tuple[tuple[int, ...], ...]:
        """One sample's size per input, however many inputs there are."""
        return self.input_size if isinstance(self.input_size[0], tuple) else (self.input_size,)  # type: ignore[return-value]

    @property
    def tensor_input_dtype(self) -> torch.dtype:
        return self.input_dtype or self.dtype

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return AMP_DTYPES[self.amp] if self.amp else None

    @property
    def torch_memory_format(self) -> torch.memory_format:
        return _MEMORY_FORMATS[self.memory_format]

    @property
    def optimizer_name(self) -> str:
        """ "adam", "sgd:momentum=0.5" (the settings given), or the name of the optimizer
        factory."""
        if isinstance(self.optimizer, OptimizerSpec):
            return self.optimizer.label
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
            raise NinlabError(
                f"the optimizer factory {self.optimizer_name} failed: {one_line(error)}"
            ) from None
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
            return dtype_name(dtype) if dtype is not None else None

        return {
            "mode": self.mode,
            "input_size": [list(size) for size in self.input_sizes]
            if len(self.input_sizes) > 1
            else list(self.input_size),
            "input_dtype": name(self.tensor_input_dtype),
            "input_range": list(self.input_range) if _is_integer(self.tensor_input_dtype) else None,
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
            return self.optimizer.used()
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
        dtype = dtype_name(self.dtype)
        precision = dtype + (
            f" with {dtype_name(self.autocast_dtype)} autocast" if self.amp else ""
        )
        if self.mode == "train":
            name = "training step" if self.step is None else f"step {self.step_name}"
            step = f"{name} (the second: optimizer state exists) with {self.optimizer_name}"
        else:
            step = self.title
        words = [step, precision, self.device_type]
        if self.input_dtype is not None and self.input_dtype != self.dtype:
            words.append(f"{dtype_name(self.input_dtype)} inputs")
        if self.memory_format != "contiguous":
            words.append(self.memory_format.replace("_", "-"))
        if self.ddp is not None:
            words.append("DDP")
        if batch_size is not None:
            words.append(f"batch {batch_size}")
        return ", ".join(words)


def step_spec(spec: StepSpec | None = None, **fields: Any) -> StepSpec:
    """`spec`, or a `StepSpec` built from `fields`: what every function that takes a step accepts,
    so `predict_memory(model, spec, ...)` and `predict_memory(model, optimizer="adam",
    ...)` agree."""
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
    return import_function(
        path, what="step", expects="a function step(model, optimizer, inputs, targets)"
    )


def step_failed(spec: StepSpec, error: BaseException, where: str) -> NinlabError:
    """One line for a user's step function that raised: its own error, and where it ran."""
    return NinlabError(f"the step {spec.step_name} raised on {where}: {one_line(error)}")


def optimizer_state(optimizers: Sequence[torch.optim.Optimizer]) -> list[torch.Tensor]:
    """Every tensor the optimizers keep per parameter (momentum, Adam's moments and step)."""
    return [
        value
        for optimizer in optimizers
        for per_parameter in optimizer.state.values()
        for value in per_parameter.values()
        if isinstance(value, torch.Tensor)
    ]


def optimizers_in(value: Any) -> list[torch.optim.Optimizer]:
    """The torch optimizers in what `StepSpec.make_optimizers` built (one, or a tuple or list)."""
    values = value if isinstance(value, (tuple, list)) else (value,)
    return [v for v in values if isinstance(v, torch.optim.Optimizer)]


def _callable_name(function: Callable[..., Any]) -> str:
    inner = getattr(function, "func", function)  # a functools.partial: the function it binds
    return getattr(inner, "__qualname__", None) or type(inner).__name__


def _input_sizes(size: Any) -> tuple[int, ...] | tuple[tuple[int, ...], ...]:
    """One size (a tuple of ints), or several (a tuple of them), each of rank 1 or more."""
    several = (
        isinstance(size, (tuple, list))
        and bool(size)
        and all(isinstance(s, (tuple, list)) for s in size)
    )
    sizes = tuple(_one_size(s, size) for s in size) if several else (_one_size(size, size),)
    return sizes if several else sizes[0]


def _one_size(size: Any, given: Any) -> tuple[int, ...]:
    try:
        if isinstance(size, (str, bytes)):
            raise TypeError
        sizes = tuple(int(s) for s in size)
    except (TypeError, ValueError):
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise NinlabError(
            "input size must be one sample's sizes, all >= 1 (e.g. 1x28x28 for an image, 784 for "
            f"a vector), or a list of such sizes for a model of several inputs; got {given!r}"
        )
    return sizes


def _input_range(value: Any) -> tuple[int, int]:
    try:
        low, high = (operator.index(v) for v in value)
    except (TypeError, ValueError):
        raise NinlabError(
            f"input range must be two whole numbers, low and high, got {value!r}"
        ) from None
    if high <= low:
        raise NinlabError(
            "input range must have low < high (values are drawn from [low, high)), got "
            f"{low}:{high}"
        )
    return low, high


def _is_integer(dtype: torch.dtype) -> bool:
    return not dtype.is_floating_point and not dtype.is_complex


def _are_tensors(value: Any) -> bool:
    items = value if isinstance(value, (tuple, list)) else (value,)
    return bool(items) and all(isinstance(item, torch.Tensor) for item in items)


@dataclass(frozen=True)
class _Examples:
    input_size: tuple[int, ...] | tuple[tuple[int, ...], ...]
    input_dtype: torch.dtype
    input_range: tuple[int, int]


def _examples(value: torch.Tensor | Sequence[torch.Tensor]) -> _Examples:
    """Example inputs (a batch each, batch first) as sizes, one dtype and a value range."""
    tensors = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    if any(t.dim() < 2 for t in tensors):
        raise NinlabError(
            "an example input holds a batch, batch first: give a tensor of rank 2 or more "
            f"(got shapes {', '.join(str(tuple(t.shape)) for t in tensors)})"
        )
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) > 1:
        raise NinlabError(f"example inputs must share one dtype, got {', '.join(map(str, dtypes))}")
    dtype = dtypes.pop()
    input_range = (0, 2)
    if (
        _is_integer(dtype)
        and dtype != torch.bool
        and all(t.numel() and t.device.type != "meta" for t in tensors)
    ):
        input_range = (min(int(t.min()) for t in tensors), max(int(t.max()) for t in tensors) + 1)
    sizes = tuple(tuple(t.shape[1:]) for t in tensors)
    return _Examples(sizes if len(sizes) > 1 else sizes[0], dtype, input_range)


def _choice(name: str, value: object, choices: Sequence[str]) -> None:
    if value not in choices:
        raise NinlabError(f"{name} must be one of {', '.join(choices)}, not {value!r}")


def example_inputs(
    spec: StepSpec, batch_size: int, device: torch.device
) -> tuple[torch.Tensor, ...]:
    """One batch per input, as the step receives it: floating inputs random in the step's dtype
    (channels-last where asked and 4-d), integer ones drawn from `input_range`. Under a
    `FakeTensorMode` they are fake, with the same shapes, dtypes and strides."""
    dtype = spec.tensor_input_dtype
    inputs = []
    for size in spec.input_sizes:
        shape = (batch_size, *size)
        if dtype.is_floating_point:
            tensor = torch.randn(shape, dtype=dtype, device=device)
            if tensor.dim() == 4:
                tensor = tensor.contiguous(memory_format=spec.torch_memory_format)
        elif dtype == torch.bool:
            tensor = torch.zeros(shape, dtype=dtype, device=device)
        else:
            tensor = torch.randint(*spec.input_range, shape, dtype=dtype, device=device)
        inputs.append(tensor)
    return tuple(inputs)


def output_tensors(output: Any) -> list[torch.Tensor]:
    """Every tensor in a model's output: a tensor, or tuples, lists, dicts, namedtuples and
    dataclasses of them, nested, in order."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, Mapping):
        items: Any = output.values()
    elif isinstance(output, (tuple, list)):
        items = output
    elif dataclasses.is_dataclass(output) and not isinstance(output, type):
        items = [getattr(output, f.name) for f in dataclasses.fields(output)]
    else:
        return []
    return [tensor for item in items for tensor in output_tensors(item)]


def _logits(output: Any) -> bool:
    return isinstance(output, torch.Tensor) and output.dim() == 2 and output.is_floating_point()


def builtin_targets(output: Any, device: torch.device) -> torch.Tensor | None:
    """What the built-in loss compares the output with: class labels (zeros, one per sample) for
    (N, C) logits; None for any other output, whose loss needs none."""
    if not _logits(output):
        return None
    return torch.zeros((output.shape[0],), dtype=torch.long, device=device)


def builtin_loss(output: Any, targets: torch.Tensor | None) -> torch.Tensor:
    """The built-in step's loss, fitted to the output: cross-entropy of (N, C) logits against
    class labels; for anything else a stand-in, the sum of every floating output (a tuple's,
    dict's or dataclass's leaves included), so backward reaches every layer the output depends on.
    It is not the user's loss, and is reported as such (`builtin_loss_words`)."""
    if targets is not None:
        return F.cross_entropy(output, targets)
    floating = [t for t in output_tensors(output) if t.is_floating_point() and t.requires_grad]
    if not floating:
        raise NinlabError(
            "the model's output has no floating tensor that depends on its parameters, so a "
            "training step has nothing to backpropagate; use mode 'infer'"
        )
    loss = floating[0].sum()
    for tensor in floating[1:]:
        loss = loss + tensor.sum()
    return loss


def builtin_loss_words(targets: torch.Tensor | None) -> str:
    """What `builtin_loss` computed, for every output that shows a training step's numbers."""
    if targets is not None:
        return "cross-entropy against class labels"
    return "stand-in sum of outputs — not your loss"


def _arguments(inputs: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)


def _autocast(
    inputs: Sequence[torch.Tensor], dtype: torch.dtype | None
) -> AbstractContextManager[object]:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(inputs[0].device.type, dtype=dtype)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    inputs: torch.Tensor | Sequence[torch.Tensor],
    targets: torch.Tensor | None,
    *,
    autocast_dtype: torch.dtype | None = None,
) -> None:
    """The built-in training step: zero_grad(set_to_none=True), forward, the built-in loss
    (`builtin_loss`), backward, optimizer step. A `StepSpec` without `step` runs this one, with
    its autocast. The model is called with `inputs` (a tensor, or one per argument)."""
    inputs = _arguments(inputs)
    optimizer.zero_grad(set_to_none=True)
    with _autocast(inputs, autocast_dtype):
        logits = model(*inputs)
        loss = builtin_loss(logits, targets)
    # `logits` stays referenced until the step returns, as `y_hat` does in d2l's training loop.
    loss.backward()
    optimizer.step()


def inference_step(
    model: nn.Module,
    inputs: torch.Tensor | Sequence[torch.Tensor],
    *,
    autocast_dtype: torch.dtype | None = None,
    grad_mode: GradMode = "no_grad",
) -> Any:
    """The model's forward with no autograd graph; returns its output."""
    inputs = _arguments(inputs)
    guard = torch.inference_mode() if grad_mode == "inference_mode" else torch.no_grad()
    with guard, _autocast(inputs, autocast_dtype):
        return model(*inputs)
