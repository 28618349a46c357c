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
import inspect
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from numbers import Number
from typing import Any, Literal

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.parameter import is_lazy

from ninlab.dotted import import_function
from ninlab.errors import NinlabError, one_line, shorten
from ninlab.optimizers import OptimizerSpec, make_optimizer, parse_optimizer
from ninlab.units import dtype_name

__all__ = [
    "AMP_DTYPES",
    "DTYPES",
    "INPUT_DTYPES",
    "DDPSpec",
    "GradMode",
    "LossKind",
    "OptimizerFactory",
    "StepFunction",
    "StepInputs",
    "StepSpec",
    "batch_size_of",
    "builtin_loss",
    "builtin_loss_kind",
    "builtin_loss_words",
    "builtin_targets",
    "builtin_targets_shape",
    "call_model",
    "check_trains",
    "class_labels",
    "deep_copied_a_fake",
    "determined_input",
    "example_inputs",
    "inference_step",
    "input_dtype_words",
    "load_step",
    "model_arguments",
    "model_dtype",
    "optimizer_state",
    "optimizers_in",
    "output_tensors",
    "step_arguments",
    "step_failed",
    "step_spec",
    "train_step",
    "valid_batch_size",
    "valid_model",
]

# What a step receives as its inputs and calls the model with: one tensor (`model(x)`), one per
# positional argument (`model(*inputs)`), or one per keyword (`model(**inputs)`: named inputs,
# as Hugging Face models take `input_ids=`, `attention_mask=`, `labels=`).
StepInputs = torch.Tensor | tuple[torch.Tensor, ...] | dict[str, torch.Tensor]
# One training step as the user writes it: `step(model, optimizer, inputs, targets)`, where
# `optimizer` is what `StepSpec.make_optimizers` built (an optimizer, or what a factory returned).
StepFunction = Callable[[nn.Module, Any, StepInputs, torch.Tensor | None], object]
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
    "float64": torch.float64,
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
_DEFAULT_RANGE = (0, 2)
# One sample's size; or several, one per input.
InputSizes = tuple[int, ...] | tuple[tuple[int, ...], ...]
_AMP_NAMES = {"bfloat16": "bf16", "float16": "fp16", torch.bfloat16: "bf16", torch.float16: "fp16"}
_MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


@dataclass(frozen=True)
class DDPSpec:
    """The DistributedDataParallel settings that change a rank's memory."""

    bucket_cap_mb: float | None = None  # None: DDP's default, 25 MiB, with a 1 MiB first bucket
    gradient_as_bucket_view: bool = False

    def __post_init__(self) -> None:
        cap = self.bucket_cap_mb
        if cap is not None and (
            isinstance(cap, bool)
            or not isinstance(cap, (int, float))
            or not math.isfinite(cap)
            or cap <= 0
        ):
            raise NinlabError(f"ddp bucket_cap_mb must be a positive number of MiB, not {cap!r}")
        if not isinstance(self.gradient_as_bucket_view, bool):
            raise NinlabError(
                "ddp gradient_as_bucket_view must be True or False, not "
                f"{self.gradient_as_bucket_view!r}"
            )


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
    a model of several inputs one size per input (`((1, 28, 28), (1, 28, 28))`), or a dict of
    them by name for a model called with keywords (`{"input_ids": (16,), "attention_mask":
    (16,)}`: `model(input_ids=..., attention_mask=...)`). Example tensors in any of these forms (a
    batch each, batch first) give their sizes, dtypes, integer value ranges and their batch
    (`example_batch`) instead. The batch is never part of `input_size`: torchinfo's
    `(128, 1, 224, 224)` is `input_size=(1, 224, 224)` at batch size 128.
    """

    input_size: InputSizes | Mapping[str, Sequence[int]] = (1, 224, 224)
    # Keyword names of the inputs, one per input (from a dict `input_size`); empty: positional.
    input_names: tuple[str, ...] = ()
    # The inputs' dtypes: None is `dtype`; one dtype for every input, or one per input (a tuple,
    # or a dict by name; None in it: `dtype`). An integer input ("long": token ids, indices)
    # draws its values from its `input_range`, [low, high): the default (0, 2) indexes any
    # embedding or node list of two or more rows.
    input_dtype: torch.dtype | tuple[torch.dtype | None, ...] | None = None
    input_range: tuple[int, int] | tuple[tuple[int, int], ...] = (0, 2)
    example_batch: int | None = None  # the batch of example tensors given as `input_size`
    mode: Mode = "train"
    optimizer: OptimizerSpec | OptimizerFactory = field(default_factory=OptimizerSpec)  # train only
    # Of parameters, buffers and floating inputs, as model.to(dtype) makes them. None: the
    # model's own (`model_dtype`), filled in by `for_model` where the model is known.
    dtype: torch.dtype | None = None
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
            normalise("input_names", examples.input_names)
            normalise("input_dtype", examples.input_dtype)
            normalise("input_range", examples.input_range)
            normalise("example_batch", examples.batch)
        if isinstance(self.input_size, Mapping):
            names = tuple(self.input_size)
            if self.input_names and tuple(self.input_names) != names:
                raise NinlabError(
                    f"input names {', '.join(self.input_names)} differ from the input sizes' "
                    f"names {', '.join(names)}; give the sizes by name only"
                )
            sizes = tuple(self.input_size.values())
            normalise("input_names", names)
            normalise("input_size", sizes if len(sizes) > 1 else sizes[0])
        normalise("input_size", _input_sizes(self.input_size))
        normalise("input_names", _input_names(self.input_names, len(self.input_sizes)))
        normalise("input_dtype", self._per_input("input dtype", self.input_dtype, _input_dtype))
        normalise("input_range", self._per_input("input range", self.input_range, _input_range))
        if self.example_batch is not None:
            normalise("example_batch", valid_batch_size(self.example_batch))
        _choice("mode", self.mode, ("train", "infer"))
        if isinstance(self.optimizer, str):
            normalise("optimizer", parse_optimizer(self.optimizer))
        elif isinstance(self.optimizer, torch.optim.Optimizer):
            # Built already, it holds the real parameters, not the fakes a prediction swaps in.
            name = type(self.optimizer).__name__
            raise NinlabError(
                f"optimizer is a {name} built already; give a function make(model) -> optimizer "
                f"that builds it over the model it is given, e.g. lambda model: "
                f"torch.optim.{name}(model.parameters(), ...), or a name such as 'adam'"
            )
        elif not isinstance(self.optimizer, OptimizerSpec) and not callable(self.optimizer):
            raise NinlabError(
                "optimizer must be a name such as 'adam', an OptimizerSpec or a function "
                f"make(model) -> optimizer, not {shorten(repr(self.optimizer))}"
            )
        if isinstance(self.dtype, str):
            _choice("dtype", self.dtype, tuple(DTYPES))
            normalise("dtype", DTYPES[self.dtype])
        elif self.dtype is not None and self.dtype not in DTYPES.values():
            raise NinlabError(f"dtype must be one of {', '.join(DTYPES)}, not {self.dtype}")
        for dtype, (low, high) in zip(self.input_dtypes, self.input_ranges):
            # torch.randint refuses values its dtype cannot hold, and a high bound beyond int64
            # (exclusive as it is): a traceback from measure.
            if _is_integer(dtype) and dtype is not torch.bool:
                info = torch.iinfo(dtype)
                if low < info.min or high - 1 > info.max or high > torch.iinfo(torch.int64).max:
                    raise NinlabError(
                        f"input range {low}:{high} does not fit {dtype_name(dtype)} "
                        f"({info.min} to {info.max}); give a range of values it holds"
                    )
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
        elif self.ddp is not None and not isinstance(self.ddp, DDPSpec):
            raise NinlabError(
                f"ddp must be True, False, None or a DDPSpec (its bucket size), not {self.ddp!r}"
            )
        if self.ddp is not None and self.mode != "train":
            raise NinlabError(
                "DDP gradient buckets exist only in training; drop ddp or use mode 'train'"
            )
        if self.step is not None:
            if not callable(self.step) or isinstance(self.step, nn.Module):
                # A module is callable, and as a step it fails inside the user's code, blamed.
                given = (
                    f"a model ({type(self.step).__name__}): give it as the model"
                    if isinstance(self.step, nn.Module)
                    else repr(self.step)
                )
                raise NinlabError(
                    f"step must be a function step(model, optimizer, inputs, targets), not {given}"
                )
            if _not_run_by_a_call(self.step):
                raise NinlabError(
                    f"the step {_callable_name(self.step)} is a generator or async function: "
                    "calling it runs none of its body; write it as a plain function"
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

    def _per_input(self, name: str, value: Any, one: Callable[[Any], Any]) -> Any:
        """`value` checked by `one`: one value for every input, or one per input (a tuple or
        list of them, or a dict by input name; None in it, or a name left out: the default)."""
        if isinstance(value, Mapping):
            unknown = [key for key in value if key not in self.input_names]
            if unknown:
                where = (
                    f"the inputs are {', '.join(self.input_names)}"
                    if self.input_names
                    else "the inputs have no names; give input_size as a dict by name"
                )
                raise NinlabError(f"{name} given for {', '.join(map(str, unknown))}, but {where}")
            value = [value.get(key) for key in self.input_names]
        if not _one_per_input(value):
            return one(value)
        if len(value) != len(self.input_sizes):
            raise NinlabError(
                f"{name} given for {len(value)} inputs, but there are {len(self.input_sizes)}; "
                "give one per input, or one for all"
            )
        return tuple(None if v is None else one(v) for v in value)

    @property
    def input_sizes(self) -> tuple[tuple[int, ...], ...]:
        """One sample's size per input, however many inputs there are."""
        return self.input_size if isinstance(self.input_size[0], tuple) else (self.input_size,)  # type: ignore[return-value]

    @property
    def input_dtypes(self) -> tuple[torch.dtype, ...]:
        """Each input's dtype: its own, or the step's (float32 before `for_model` fills it)."""
        step = self.dtype or torch.float32
        given = self.input_dtype
        if not isinstance(given, tuple):
            given = (given,) * len(self.input_sizes)
        return tuple(dtype or step for dtype in given)

    @property
    def input_ranges(self) -> tuple[tuple[int, int], ...]:
        """Each integer input's value range, [low, high)."""
        if isinstance(self.input_range[0], int):
            return (self.input_range,) * len(self.input_sizes)  # type: ignore[return-value]
        return tuple(r or _DEFAULT_RANGE for r in self.input_range)  # type: ignore[misc]

    def for_model(self, model: nn.Module) -> StepSpec:
        """This step with its dtype filled in from `model` where it was left to the model (None):
        the dtype of the model's floating parameters and buffers (`model_dtype`)."""
        return self if self.dtype is not None else self.replace(dtype=model_dtype(model))

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
        if self.step is None and not isinstance(built, torch.optim.Optimizer):
            # The built-in step calls one optimizer's zero_grad() and step(): a tuple met there
            # failed as an AttributeError blamed on the input sizes.
            kinds = " and ".join(type(value).__name__ for value in built)
            raise NinlabError(
                f"the optimizer factory {self.optimizer_name} returned a {type(built).__name__} "
                f"({kinds}), and the built-in step takes one optimizer; return one, or give a "
                "step function that uses what it returns (step=..., --step)"
            )
        return built

    def replace(self, **changes: Any) -> StepSpec:
        """A copy with some fields changed, checked again."""
        return dataclasses.replace(self, **changes)

    def at_any_batch(self) -> StepSpec:
        """This step with the example inputs' batch dropped, for a question asked at other
        batches (the largest that fits, the line through several, a verification at a small
        one): the examples still give the sizes, dtypes and value ranges of a sample."""
        return self if self.example_batch is None else self.replace(example_batch=None)

    def inference(self) -> StepSpec:
        """The inference of this step's model, input and precision."""
        return self.replace(mode="infer", ddp=None, step=None)

    def as_dict(self) -> dict[str, Any]:
        """The fields as plain values (dtypes by name), for JSON."""

        def name(dtype: torch.dtype | None) -> str | None:
            return dtype_name(dtype) if dtype is not None else None

        integer = [_is_integer(dtype) for dtype in self.input_dtypes]
        dtypes = [name(dtype) for dtype in self.input_dtypes]
        ranges = [list(r) if i else None for r, i in zip(self.input_ranges, integer)]
        several = len(self.input_sizes) > 1
        return {
            "mode": self.mode,
            "input_size": [list(size) for size in self.input_sizes]
            if several
            else list(self.input_size),
            "input_names": list(self.input_names) or None,
            "input_dtype": dtypes if len(set(dtypes)) > 1 else dtypes[0],
            "input_range": (ranges if len(set(map(str, ranges))) > 1 else ranges[0])
            if any(integer)
            else None,
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
        dtype = "the model's dtype" if self.dtype is None else dtype_name(self.dtype)
        precision = dtype + (
            f" with {dtype_name(self.autocast_dtype)} autocast" if self.amp else ""
        )
        if self.mode == "train":
            name = "training step" if self.step is None else f"step {self.step_name}"
            step = f"{name} (the second: optimizer state exists) with {self.optimizer_name}"
        else:
            step = self.title
        words = [step, precision, self.device_type]
        if self.input_names:
            words.append(f"inputs by name ({', '.join(self.input_names)})")
        if any(dtype != (self.dtype or torch.float32) for dtype in self.input_dtypes):
            words.append(f"{input_dtype_words(self.input_dtypes)} inputs")
        if self.memory_format != "contiguous":
            words.append(self.memory_format.replace("_", "-"))
        if self.ddp is not None:
            words.append("DDP")
        if batch_size is not None:
            words.append(f"batch {batch_size}")
        return ", ".join(words)


def step_spec(
    spec: StepSpec | None = None, *, model: nn.Module | None = None, **fields: Any
) -> StepSpec:
    """`spec`, or a `StepSpec` built from `fields`: what every function that takes a step accepts,
    so `predict_memory(model, spec, ...)` and `predict_memory(model, optimizer="adam",
    ...)` agree. Given the `model`, a dtype left to it is filled in (`StepSpec.for_model`)."""
    if model is not None:
        valid_model(model)
    if spec is None:
        unknown = [name for name in fields if name not in _FIELDS]
        if unknown:
            raise NinlabError(
                f"unknown step field{'s' * (len(unknown) > 1)} {', '.join(map(repr, unknown))}; "
                f"a step is described by {', '.join(_FIELDS)}"
            )
        spec = StepSpec(**fields)
    elif fields:
        raise NinlabError(f"give a StepSpec or its fields ({', '.join(fields)}), not both")
    elif not isinstance(spec, StepSpec):
        raise NinlabError(f"expected a StepSpec, got {type(spec).__name__}")
    return spec if model is None else spec.for_model(model)


_FIELDS = tuple(f.name for f in dataclasses.fields(StepSpec))


def valid_model(model: Any) -> nn.Module:
    """`model` if it is a module instance ninlab can account for, or one line saying what it is
    and what to give instead (a class, a registry name, a plain function)."""
    if isinstance(model, nn.Module):
        complex_tensors = [t for t in (*model.parameters(), *model.buffers()) if t.is_complex()]
        if complex_tensors:
            raise NinlabError(
                f"the model holds {dtype_name(complex_tensors[0].dtype)} parameters or buffers; "
                f"ninlab accounts for real dtypes ({', '.join(DTYPES)}) only, and casting would "
                "drop their imaginary parts: keep real and imaginary parts as two real tensors"
            )
        return model
    if isinstance(model, type) and issubclass(model, nn.Module):
        raise NinlabError(
            f"model is the class {model.__name__}, not a model: build one first, "
            f"{model.__name__}(...)"
        )
    if isinstance(model, str):
        raise NinlabError(
            f"model is the text {model!r}, not a model: build it first, "
            f"ninlab.resolve_model({model!r})"
        )
    if callable(model):
        raise NinlabError(
            f"model must be an nn.Module, not the function {_callable_name(model)}: a plain "
            "function has no parameters or modules to account for; wrap it in an nn.Module whose "
            "forward calls it"
        )
    raise NinlabError(f"model must be an nn.Module, not {type(model).__name__}")


def check_trains(model: nn.Module, spec: StepSpec) -> None:
    """Refuse a training step of a model with nothing to train, before any work."""
    if spec.mode == "train" and not any(p.requires_grad for p in model.parameters()):
        raise NinlabError(
            "the model has no trainable parameters, so a training step has nothing to update; "
            "use mode 'infer'"
        )


# The largest batch: beyond it, a batch's element counts near what a tensor can index
# (2**63), and no machine holds it.
_MOST_BATCH = 1 << 40


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
    if value > _MOST_BATCH:
        raise NinlabError(f"batch size must be at most 2**40 ({_MOST_BATCH:,}), got {value:,}")
    return value


def batch_size_of(spec: StepSpec, batch_size: int | None) -> int:
    """The batch to account for: `batch_size`, or that of the example tensors the inputs were
    given as; both given, they must agree."""
    if batch_size is None:
        if spec.example_batch is None:
            raise NinlabError(
                "give batch_size (--batch), or example tensors as the input, whose first size is "
                "their batch"
            )
        return spec.example_batch
    batch_size = valid_batch_size(batch_size)
    if spec.example_batch is not None and batch_size != spec.example_batch:
        raise NinlabError(
            f"batch size {batch_size} differs from the example inputs' batch, "
            f"{spec.example_batch}; drop batch_size, or give examples of batch {batch_size}"
        )
    return batch_size


def load_step(path: str) -> StepFunction:
    """The step function `package.module:function` names, or one line saying what is wrong."""
    return import_function(
        path, what="step", expects="a function step(model, optimizer, inputs, targets)"
    )


_MIXED_FAKE_MODES = "Mixing fake modes NYI"


def deep_copied_a_fake(error: BaseException) -> bool:
    """Whether `error` is PyTorch refusing a deep copy of a fake tensor made while a step ran:
    the copy gets a fake mode of its own, which the next op mixing the two refuses (its message
    names two objects by address)."""
    return _MIXED_FAKE_MODES in str(error)


def step_failed(spec: StepSpec, error: BaseException, where: str) -> NinlabError:
    """One line for a user's step function that raised: its own error, and where it ran. A step
    that used the targets it was handed as a tensor where they were None (the model's output is
    not logits, so no labels fit it) is told to make its own."""
    reason = one_line(error)
    if deep_copied_a_fake(error):
        return NinlabError(
            f"the step {spec.step_name} deep-copies the model's tensors while it runs "
            "(copy.deepcopy, AveragedModel), which a trace on fake tensors cannot follow; make "
            "the copy in an optimizer factory that returns it beside the optimizer "
            "(optimizer=lambda model: (torch.optim.SGD(...), AveragedModel(model)))"
        )
    if "NoneType" in reason:
        reason += (
            "; the step was given targets=None: ninlab makes class labels only for logits ((N, C), "
            "or an output's .logits), so for this model's output the step must make its own "
            "targets (e.g. torch.zeros_like(output), or from its inputs)"
        )
    return NinlabError(f"the step {spec.step_name} raised on {where}: {reason}")


def input_dtype_words(dtypes: Sequence[torch.dtype]) -> str:
    """Inputs' dtypes in words: "int64", or "float32 and int64" for inputs of several."""
    return " and ".join(dict.fromkeys(dtype_name(dtype) for dtype in dtypes))


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


def _not_run_by_a_call(function: Callable[..., Any]) -> bool:
    """Whether calling `function` returns a generator or coroutine without running its body."""
    inner = getattr(function, "func", function)
    return any(
        check(inner)
        for check in (
            inspect.isgeneratorfunction,
            inspect.iscoroutinefunction,
            inspect.isasyncgenfunction,
        )
    )


def _callable_name(function: Callable[..., Any]) -> str:
    inner = getattr(function, "func", function)  # a functools.partial: the function it binds
    return getattr(inner, "__qualname__", None) or type(inner).__name__


def _input_sizes(size: Any) -> InputSizes:
    """One size (a tuple of ints), or several (a tuple of them), each of rank 1 or more."""
    several = (
        isinstance(size, (tuple, list))
        and bool(size)
        and all(isinstance(s, (tuple, list)) for s in size)
    )
    # Among several inputs, one may be a value per sample (a class label: size ()).
    sizes = (
        tuple(_one_size(s, size, scalar=True) for s in size)
        if several
        else (_one_size(size, size),)
    )
    return sizes if several else sizes[0]


def _one_size(size: Any, given: Any, *, scalar: bool = False) -> tuple[int, ...]:
    try:
        if isinstance(size, (str, bytes)):
            raise TypeError
        sizes = tuple(_whole(s) for s in size)
    except (TypeError, ValueError):
        sizes = None
    if sizes == () and scalar:
        return sizes
    if not sizes or min(sizes) < 1:
        raise NinlabError(
            "input size must be one sample's sizes, all >= 1 (e.g. 1x28x28 for an image, 784 for "
            "a vector), example tensors, or a list of such sizes or tensors for a model of several "
            f"inputs; got {_words(given)}"
        )
    if max(sizes) > torch.iinfo(torch.int64).max:
        # A tensor's sizes are int64: making the batch raised inside the step, blamed on it.
        raise NinlabError(
            f"input size {_words(given)} has a size above 2**63 - 1, more than a tensor's "
            "sizes hold; give one sample's real sizes"
        )
    return sizes


def _whole(value: Any) -> int:
    """A size as an int: 28, "28" or 28.0, never True or 28.5 (which int() would cut to 28)."""
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise TypeError(value)
    return int(value)


def _words(value: Any) -> str:
    """A value as one short line: a tensor by its shape and dtype, never its numbers."""
    if isinstance(value, torch.Tensor):
        return f"a {dtype_name(value.dtype)} tensor of shape {tuple(value.shape)}"
    if isinstance(value, (tuple, list)):
        return f"({', '.join(_words(item) for item in value)})"
    return repr(value)


def _input_names(names: Any, count: int) -> tuple[str, ...]:
    """Keyword names, one per input, each an identifier used once; or none."""
    names = tuple(names)
    if not names:
        return ()
    bad = [name for name in names if not isinstance(name, str) or not name.isidentifier()]
    if bad:
        raise NinlabError(
            f"an input name must be a keyword argument of the model's forward, not {bad[0]!r}"
        )
    if len(names) != count or len(set(names)) != count:
        raise NinlabError(
            f"input names must name each of the {count} inputs once, got {', '.join(names)}"
        )
    return names


def _one_per_input(value: Any) -> bool:
    """Whether a dtype or range is given per input (a sequence of them), not one for all (a
    dtype, its name, or a (low, high) pair: a pair holding a number that is not whole, (0.5,
    2), is one range, refused as such, not two inputs' ranges)."""
    return isinstance(value, (tuple, list)) and not any(isinstance(v, Number) for v in value)


def _input_dtype(value: Any) -> torch.dtype | None:
    if value is None:
        return None
    if isinstance(value, str) and value in INPUT_DTYPES:
        return INPUT_DTYPES[value]
    if isinstance(value, torch.dtype) and value in INPUT_DTYPES.values():
        return value
    raise NinlabError(f"input dtype must be one of {', '.join(INPUT_DTYPES)}, not {value!r}")


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
    if isinstance(value, Mapping):
        items = tuple(value.values())
    else:
        items = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    return bool(items) and all(isinstance(item, torch.Tensor) for item in items)


@dataclass(frozen=True)
class _Examples:
    input_size: InputSizes
    input_names: tuple[str, ...]
    input_dtype: torch.dtype | tuple[torch.dtype, ...]
    input_range: tuple[int, int] | tuple[tuple[int, int], ...]
    batch: int


def _examples(
    value: torch.Tensor | Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
) -> _Examples:
    """Example inputs (a batch each, batch first) as sizes, names, dtypes, value ranges (an
    integer input's, from its values) and their batch."""
    names: tuple[str, ...] = ()
    if isinstance(value, Mapping):
        names, tensors = tuple(value), tuple(value.values())
    else:
        tensors = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    odd = [t for t in tensors if t.layout != torch.strided or t.is_nested or t.is_quantized]
    if odd:
        raise NinlabError(
            f"example inputs must be dense tensors, got a {_layout_words(odd[0])} one; ninlab "
            "accounts for dense inputs: give its dense form (x.to_dense()) or its input_size"
        )
    if any(t.requires_grad for t in tensors):
        raise NinlabError(
            "an example input requires grad, but the step's inputs never do (a batch from a data "
            "loader does not): give x.detach()"
        )
    shapes = ", ".join(str(tuple(t.shape)) for t in tensors)
    if any(t.dim() < 2 for t in tensors):
        raise NinlabError(
            "an example input holds a batch, batch first: give a tensor of rank 2 or more "
            f"(got shapes {shapes})"
        )
    batches = {t.shape[0] for t in tensors}
    if len(batches) > 1:
        raise NinlabError(
            f"example inputs must share their batch (the first size), got shapes {shapes}"
        )
    dtypes = tuple(t.dtype for t in tensors)
    ranges = tuple(_value_range(t) for t in tensors)
    sizes = tuple(tuple(t.shape[1:]) for t in tensors)
    return _Examples(
        input_size=sizes if len(sizes) > 1 else sizes[0],
        input_names=names,
        input_dtype=dtypes[0] if len(set(dtypes)) == 1 else dtypes,
        input_range=ranges[0] if len(set(ranges)) == 1 else ranges,
        batch=batches.pop(),
    )


def _layout_words(tensor: torch.Tensor) -> str:
    if tensor.is_nested:
        return "nested"
    if tensor.is_quantized:
        return "quantized"
    return str(tensor.layout).removeprefix("torch.")


def _value_range(tensor: torch.Tensor) -> tuple[int, int]:
    """The [low, high) an integer example's values span, so the values drawn for it stay valid
    indices; the default for any other."""
    countable = _is_integer(tensor.dtype) and tensor.dtype != torch.bool
    if countable and tensor.numel() and tensor.device.type != "meta":
        # torch.randint's high bound is an int64 too: an example holding int64's largest value
        # is drawn up to the one below it.
        return int(tensor.min()), min(int(tensor.max()) + 1, torch.iinfo(torch.int64).max)
    return _DEFAULT_RANGE


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype a model computes in: that of its floating parameters and buffers; for a model
    of several, the one most of their elements have (the others are cast to it, as
    model.to(dtype) would); float32 for a model with none."""
    elements: dict[torch.dtype, int] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.dtype.is_floating_point:
            elements[tensor.dtype] = elements.get(tensor.dtype, 0) + _elements(tensor)
    return max(elements, key=elements.__getitem__) if elements else torch.float32


def _elements(tensor: torch.Tensor) -> int:
    # A lazy module's parameter has no shape yet: it counts as one element of its dtype.
    return 1 if is_lazy(tensor) else tensor.numel()


def _choice(name: str, value: object, choices: Sequence[str]) -> None:
    if value not in choices:
        raise NinlabError(f"{name} must be one of {', '.join(choices)}, not {value!r}")


def example_inputs(
    spec: StepSpec, batch_size: int, device: torch.device
) -> tuple[torch.Tensor, ...]:
    """One batch per input, in order: floating inputs random in their dtype (channels-last where
    asked and 4-d), integer ones drawn from their `input_range` (set where it holds one value),
    bool ones False. Under a
    `FakeTensorMode` they are fake, with the same shapes, dtypes and strides. `step_arguments`
    gives them the form the step receives."""
    inputs = []
    for size, dtype, (low, high) in zip(spec.input_sizes, spec.input_dtypes, spec.input_ranges):
        shape = (batch_size, *size)
        tensor = determined_input(shape, dtype, (low, high), device)
        if tensor is None and dtype.is_floating_point:
            tensor = torch.randn(shape, dtype=dtype, device=device)
            if tensor.dim() == 4:
                tensor = tensor.contiguous(memory_format=spec.torch_memory_format)
        elif tensor is None:
            tensor = torch.randint(low, high, shape, dtype=dtype, device=device)
        inputs.append(tensor)
    return tuple(inputs)


def determined_input(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    value_range: tuple[int, int],
    device: torch.device,
) -> torch.Tensor | None:
    """An input batch whose every value its dtype and range set: bool ones False, integer ones
    of a range holding one value (an all-ones attention mask: `input_range=(1, 2)`); None for
    any other, drawn at random. The recorder knows these values (`KnownValues`)."""
    low, high = value_range
    if dtype == torch.bool:
        return torch.zeros(shape, dtype=dtype, device=device)
    if not dtype.is_floating_point and high - low == 1:
        return torch.full(shape, low, dtype=dtype, device=device)
    return None


def step_arguments(spec: StepSpec, inputs: Sequence[torch.Tensor]) -> StepInputs:
    """The inputs as the step receives them, as a user's loop passes them: a model of one
    positional input gets one tensor, of several a tuple, of named inputs a dict by name."""
    if spec.input_names:
        return dict(zip(spec.input_names, inputs))
    return inputs[0] if len(inputs) == 1 else tuple(inputs)


def model_arguments(inputs: StepInputs) -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
    """The positional and keyword arguments a model is called with for `inputs`."""
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    return ((inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)), {}


def call_model(model: nn.Module, inputs: StepInputs) -> Any:
    """`model(x)`, `model(*inputs)` or `model(**inputs)`, as `inputs` is one, several or named."""
    args, kwargs = model_arguments(inputs)
    return model(*args, **kwargs)


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


def _output_field(output: Any, name: str) -> torch.Tensor | None:
    """The tensor an output carries as `name`, a key or an attribute (a Hugging Face ModelOutput
    has both), or None."""
    if isinstance(output, torch.Tensor):
        return None
    value = output.get(name) if isinstance(output, Mapping) else getattr(output, name, None)
    return value if isinstance(value, torch.Tensor) else None


def _is_logits(tensor: Any, rank: int | None = None) -> bool:
    return (
        isinstance(tensor, torch.Tensor)
        and tensor.is_floating_point()
        and (tensor.dim() == rank if rank is not None else tensor.dim() >= 2)
    )


LossKind = Literal["output_loss", "cross_entropy", "output_logits", "stand_in"]


def builtin_loss_kind(output: Any) -> LossKind:
    """Which loss the built-in step takes for `output`: the loss it carries (`.loss`, as a
    Hugging Face model given its labels returns it), cross-entropy of (N, C) logits or of the
    `.logits` it carries (over their last axis) when it holds no other floating tensor, or a
    stand-in."""
    loss = _output_field(output, "loss")
    if loss is not None and loss.is_floating_point() and loss.dim() == 0:
        return "output_loss"
    if _is_logits(output, rank=2):
        return "cross_entropy"
    logits = _output_field(output, "logits")
    # Only where the output holds no other floating tensor: a head beside the logits (a
    # detector's boxes) would get no gradient from their cross-entropy, so it takes the stand-in.
    others = [t for t in output_tensors(output) if t is not logits and t.is_floating_point()]
    if _is_logits(logits) and not others:
        return "output_logits"
    return "stand_in"


def builtin_targets(output: Any, device: torch.device) -> torch.Tensor | None:
    """What the built-in loss compares the output with: class labels (zeros) for logits, one per
    sample ((N, C) logits) or per position (a `.logits` of (N, ..., C)); None for any other
    output, whose loss needs none."""
    return class_labels(builtin_targets_shape(output), device)


def class_labels(shape: tuple[int, ...] | None, device: torch.device) -> torch.Tensor | None:
    """The built-in loss's targets of `shape` (`builtin_targets_shape`): class labels, zeros;
    None where it takes none."""
    return None if shape is None else torch.zeros(shape, dtype=torch.long, device=device)


def builtin_targets_shape(output: Any) -> tuple[int, ...] | None:
    """The shape of `builtin_targets(output)`, making no tensor (None: the loss needs none)."""
    kind = builtin_loss_kind(output)
    if kind == "cross_entropy":
        return (output.shape[0],)
    if kind == "output_logits":
        logits = _output_field(output, "logits")
        return tuple(logits.shape[:-1])  # type: ignore[union-attr]
    return None


def builtin_loss(output: Any, targets: torch.Tensor | None) -> torch.Tensor:
    """The built-in step's loss, fitted to the output (`builtin_loss_kind`): the loss the output
    carries; cross-entropy of (N, C) logits, or of the output's `.logits` over their last axis,
    against `targets`; for anything else a stand-in, the sum of every floating output (a tuple's,
    dict's or dataclass's leaves included), so backward reaches every layer the output depends on.
    The stand-in is not the user's loss, and is reported as such (`builtin_loss_words`)."""
    kind = builtin_loss_kind(output)
    if kind == "output_loss":
        return _trainable(_output_field(output, "loss"))  # type: ignore[arg-type]
    if targets is not None and kind == "cross_entropy":
        return F.cross_entropy(_trainable(output), targets)
    if targets is not None and kind == "output_logits":
        logits = _trainable(_output_field(output, "logits"))  # type: ignore[arg-type]
        return F.cross_entropy(logits.flatten(0, -2), targets.flatten())
    floating = [t for t in output_tensors(output) if _trains(t)]
    if not floating:
        raise _nothing_to_train()
    loss = floating[0].sum()
    for tensor in floating[1:]:
        loss = loss + tensor.sum()
    return loss


def _trains(tensor: torch.Tensor) -> bool:
    return tensor.is_floating_point() and tensor.requires_grad


def _trainable(tensor: torch.Tensor) -> torch.Tensor:
    if not tensor.requires_grad:
        raise _nothing_to_train()
    return tensor


def _nothing_to_train() -> NinlabError:
    return NinlabError(
        "the model's output does not depend on any trainable parameter (its forward returns its "
        "input unchanged, or only frozen or detached tensors), so a training step has nothing to "
        "backpropagate; use mode 'infer'"
    )


def builtin_loss_words(output: Any) -> str:
    """What `builtin_loss` computes for `output`, for every output that shows a training step's
    numbers."""
    return {
        "output_loss": "the model's own loss (its output's loss)",
        "cross_entropy": "cross-entropy against class labels",
        "output_logits": "cross-entropy of the output's logits against class labels",
        "stand_in": "stand-in sum of outputs — not your loss",
    }[builtin_loss_kind(output)]


def _first_tensor(inputs: StepInputs) -> torch.Tensor:
    args, kwargs = model_arguments(inputs)
    return (*args, *kwargs.values())[0]


def _autocast(inputs: StepInputs, dtype: torch.dtype | None) -> AbstractContextManager[object]:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(_first_tensor(inputs).device.type, dtype=dtype)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    inputs: StepInputs,
    targets: torch.Tensor | None,
    *,
    autocast_dtype: torch.dtype | None = None,
) -> None:
    """The built-in training step: zero_grad(set_to_none=True), forward, the built-in loss
    (`builtin_loss`), backward, optimizer step. A `StepSpec` without `step` runs this one, with
    its autocast. The model is called with `inputs` (`call_model`)."""
    optimizer.zero_grad(set_to_none=True)
    with _autocast(inputs, autocast_dtype):
        logits = call_model(model, inputs)
        loss = builtin_loss(logits, targets)
    # `logits` stays referenced until the step returns, as `y_hat` does in d2l's training loop.
    loss.backward()
    optimizer.step()


def inference_step(
    model: nn.Module,
    inputs: StepInputs,
    *,
    autocast_dtype: torch.dtype | None = None,
    grad_mode: GradMode = "no_grad",
) -> Any:
    """The model's forward with no autograd graph; returns its output."""
    guard = torch.inference_mode() if grad_mode == "inference_mode" else torch.no_grad()
    with guard, _autocast(inputs, autocast_dtype):
        return call_model(model, inputs)
