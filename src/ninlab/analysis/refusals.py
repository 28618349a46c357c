"""Why a model cannot be traced, in one line naming the real cause.

A model a user brings can fail for reasons of its own: it is scripted, it needs its targets in
training mode, its forward branches on tensor values, or it simply rejects the batch. The tracer
raises whatever the model raised; `cannot_run` turns that into one `NinlabError` that says which
of these it was and what to do, never the model's raw exception and never an unrelated hint.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from ninlab.analysis.step import StepSpec
from ninlab.analysis.torch_internals import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    UnsupportedFakeTensorException,
    UnsupportedOperatorException,
)
from ninlab.errors import NinlabError, one_line
from ninlab.units import dtype_name

__all__ = ["NOT_TRACEABLE", "cannot_run", "check_traceable"]

# What a model raises on fake tensors when its forward needs tensor values: `if x.sum() > 0`,
# `.item()`, `nonzero()` (a shape that depends on data), or an op fake tensors do not implement.
NOT_TRACEABLE = (
    DataDependentOutputException,
    DynamicOutputShapeException,
    UnsupportedOperatorException,
    UnsupportedFakeTensorException,
)

_TARGET_WORDS = ("target", "label")


def check_traceable(model: nn.Module) -> None:
    """Refuse, before any work, a model ninlab cannot run its own way."""
    if isinstance(model, torch.jit.ScriptModule):
        raise NinlabError(
            f"the model is a scripted module ({type(model).__name__}): TorchScript runs its own "
            "interpreter, which fake tensors and module hooks cannot follow; give the Python "
            "nn.Module it was scripted from"
        )


def cannot_run(error: Exception, model: nn.Module, spec: StepSpec) -> NinlabError:
    """The one line that says why `model` could not run the step `spec` describes."""
    if isinstance(error, NinlabError):
        return error
    reason = one_line(error)
    if isinstance(error, NOT_TRACEABLE):
        return NinlabError(
            f"the model's forward depends on tensor values (data-dependent control flow or "
            f"shapes: {reason}), which a trace on fake tensors, shapes without data, cannot follow"
        )
    missing = _unfilled_arguments(model, len(spec.input_sizes))
    targets = [name for name in missing if any(word in name.lower() for word in _TARGET_WORDS)]
    if targets and spec.mode == "train":
        return NinlabError(
            f"the model needs its targets to run in training mode (its forward takes "
            f"{', '.join(targets)}; {reason}), and the built-in step gives it inputs only; "
            "summarize or predict it with mode 'infer' (--mode infer)"
        )
    required = _required_arguments(model)
    if required is not None and required > len(spec.input_sizes):
        return NinlabError(
            f"the model's forward takes {required} inputs and {len(spec.input_sizes)} were given; "
            "give one input size per argument (--input once per input)"
        )
    step = "train step" if spec.mode == "train" else "forward"
    sizes = " and ".join("x".join(map(str, size)) for size in spec.input_sizes)
    dtype = "" if spec.input_dtype is None else f" {dtype_name(spec.input_dtype)}"
    return NinlabError(
        f"the model cannot run a {step} on a batch of {sizes}{dtype} inputs ({reason}); "
        "give the input sizes and dtype its forward expects"
    )


def _parameters(model: nn.Module) -> list[inspect.Parameter]:
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return []
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p for p in signature.parameters.values() if p.kind in kinds]


def _unfilled_arguments(model: nn.Module, given: int) -> list[str]:
    """The forward's positional arguments beyond the `given` inputs."""
    return [p.name for p in _parameters(model)[given:]]


def _required_arguments(model: nn.Module) -> int | None:
    parameters = _parameters(model)
    if not parameters:
        return None
    return sum(1 for p in parameters if p.default is inspect.Parameter.empty)
