"""Which part of a training step is running, read from the step itself as it runs.

A step is any function (`StepSpec.step`); nothing in it marks its parts, so they are read from
what PyTorch does: a module of the model is running (forward), `backward()` or
`torch.autograd.grad` is running or autograd is executing a node (backward), a module runs again
inside backward (recompute: activation checkpointing), `optimizer.step()` is running (optimizer),
`zero_grad()` of an optimizer is running (zero_grad).
What the step does between the model's forward and backward is the loss; anything else the step
does outside those (its zero_grad, a GradScaler's unscale and update) is the step's own.

The predictor's recorder and the measurer both label their ops with it; a label is not a count,
so measurement stays independent of prediction.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from typing_extensions import Self

from ninlab.analysis.torch_internals import (
    current_autograd_node,
    record_function_enter,
    record_function_exit,
)

__all__ = ["PHASES", "StepPhases"]

PHASES = ("zero_grad", "forward", "loss", "backward", "recompute", "optimizer", "step")
_BACKWARD_CALLS = {torch.Tensor.backward, torch.autograd.backward, torch.autograd.grad}
# Every torch optimizer marks its `step()` and `zero_grad()` for the profiler with an annotation
# ("Optimizer.step#SGD.step"), a GradScaler's step included: the annotation is the phase, its
# own two ops included.
_OPTIMIZER_ANNOTATIONS = {"Optimizer.step#": "optimizer", "Optimizer.zero_grad#": "zero_grad"}


class StepPhases(TorchFunctionMode):
    """A torch-function mode (it sees the backward calls and the optimizers' annotations) with
    global module hooks; `current` is the phase of an op dispatched now. `on_backward` runs as
    each outermost backward call begins, while its whole graph still exists (the recorder reads
    what autograd saved then)."""

    def __init__(self, model: nn.Module, *, on_backward: Callable[[], None] | None = None) -> None:
        super().__init__()
        self._modules = {id(module) for module in model.modules()}
        self._on_backward = on_backward
        self._forward_depth = 0
        self._backward_depth = 0
        self._optimizer_calls: list[tuple[str, Any]] = []  # (phase, annotation) running now
        self._after_forward = False  # the model's forward ran since the last backward
        self.backward_calls = 0  # outermost backward calls so far
        self._handles: list[Any] = []

    @property
    def current(self) -> str:
        if self._optimizer_calls:
            return self._optimizer_calls[-1][0]
        if self._backward_depth or current_autograd_node() is not None:
            return "recompute" if self._forward_depth else "backward"
        if self._forward_depth:
            return "forward"
        return "loss" if self._after_forward else "step"

    def __enter__(self) -> Self:
        def module_entered(module: nn.Module, *_: Any) -> None:
            if id(module) in self._modules:
                self._forward_depth += 1

        def module_left(module: nn.Module, *_: Any) -> None:
            if id(module) in self._modules:
                self._forward_depth -= 1
                self._after_forward = not self._backward_depth

        self._handles = [
            nn.modules.module.register_module_forward_pre_hook(module_entered),
            nn.modules.module.register_module_forward_hook(module_left, always_call=True),
        ]
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        for handle in self._handles:
            handle.remove()

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        packet = getattr(func, "overloadpacket", func)
        if packet is record_function_enter:
            name = str(args[0])
            phase = next(
                (p for prefix, p in _OPTIMIZER_ANNOTATIONS.items() if name.startswith(prefix)), None
            )
            if phase is not None:
                self._optimizer_calls.append((phase, None))
                handle = func(*args, **kwargs)
                self._optimizer_calls[-1] = (phase, handle)
                return handle
        if (
            packet is record_function_exit
            and self._optimizer_calls
            and args[0] is self._optimizer_calls[-1][1]
        ):
            try:
                return func(*args, **kwargs)
            finally:
                self._optimizer_calls.pop()
        if func not in _BACKWARD_CALLS:
            return func(*args, **kwargs)
        if not self._backward_depth:
            self.backward_calls += 1
            if self._on_backward is not None:
                self._on_backward()
        self._backward_depth += 1
        try:
            return func(*args, **kwargs)
        finally:
            self._backward_depth -= 1
            self._after_forward = False
