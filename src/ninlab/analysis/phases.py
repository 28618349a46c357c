"""Which part of a training step is running, read from the step itself as it runs.

A step is any function (`StepSpec.step`); nothing in it marks its parts, so they are read from
what PyTorch does: a module of the model is running (forward), `backward()` or
`torch.autograd.grad` is running or autograd is executing a node (backward), a module runs again
inside backward (recompute: activation checkpointing), `optimizer.step()` is running (optimizer),
`zero_grad()` of an optimizer is running (zero_grad).
What the step does between the model's forward and backward is the loss; anything else the step
does outside those (its zero_grad, a GradScaler's unscale and update) is the step's own.

The phases are read without a torch-function mode: while any function mode is active PyTorch
turns off the fast inference paths of `nn.MultiheadAttention` and `nn.TransformerEncoder`
(`torch.overrides.has_torch_function` is true for every call), so a watcher that were one would
predict and measure a program that never runs unwatched. Global module hooks (which those fast
paths do not look at: they check the modules' own hook dicts), the backward entry points
wrapped for the step (they run what they wrap) and the optimizers' profiler annotations, handed
over by whoever sees them (a dispatch mode: `annotation`; the profiler's events:
`annotation_phase`), change no kernel.

The predictor's recorder and the measurer both label their ops with it; a label is not a count,
so measurement stays independent of prediction.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from typing_extensions import Self

from ninlab.analysis.torch_internals import (
    current_autograd_node,
    record_function_enter,
    record_function_exit,
)

__all__ = ["ANNOTATION_OPS", "PHASES", "StepPhases", "annotation_phase"]

PHASES = ("zero_grad", "forward", "loss", "backward", "recompute", "optimizer", "step")
# Every torch optimizer marks its `step()` and `zero_grad()` for the profiler with an annotation
# ("Optimizer.step#SGD.step"), a GradScaler's step included: the annotation is the phase, its
# own two ops included.
_OPTIMIZER_ANNOTATIONS = {"Optimizer.step#": "optimizer", "Optimizer.zero_grad#": "zero_grad"}
# The ops that open and close an annotation, every overload, as a dispatch mode sees them.
ANNOTATION_OPS = frozenset(
    getattr(packet, overload)
    for packet in (record_function_enter, record_function_exit)
    for overload in packet.overloads()
)


def annotation_phase(name: str) -> str | None:
    """The phase an annotation named `name` marks ("Optimizer.step#SGD.step": optimizer), or
    None for any other annotation."""
    return next(
        (phase for prefix, phase in _OPTIMIZER_ANNOTATIONS.items() if name.startswith(prefix)),
        None,
    )


# The backward entry points as they were before the first phases was entered, and the phases
# entered now (all of them see each backward call; the entry points are wrapped while there is
# one, whatever order they leave in).
_UNWRAPPED: dict[str, Callable[..., Any]] = {}
_ACTIVE: list[StepPhases] = []


def _backward_call(function: Callable[..., Any]) -> Callable[..., Any]:
    """`function` (torch.autograd.backward or grad), run as it is, counted as backward by every
    phases entered."""

    def backward_call(*args: Any, **kwargs: Any) -> Any:
        # backward(tensors, ...) or grad(outputs, ...)
        roots = args[0] if args else kwargs.get("tensors", kwargs.get("outputs"))
        roots = (roots,) if isinstance(roots, torch.Tensor) else tuple(roots or ())
        watching = list(_ACTIVE)
        for phases in watching:
            phases._backward_began(roots)
        try:
            return function(*args, **kwargs)
        finally:
            for phases in watching:
                phases._backward_ended()

    return backward_call


class StepPhases:
    """The phase of an op dispatched now (`current`), for a step run inside `with phases:`.

    Entered, it holds global module hooks and wraps `torch.autograd.backward` and
    `torch.autograd.grad` (what `Tensor.backward` calls). `on_backward` runs as each backward
    call begins, with the tensors it starts from, while their whole graph still exists (the
    recorder reads what autograd saved then): an outermost one, and one inside a backward, whose
    graph was made there (a reversible layer's or a reentrant checkpoint's recomputation);
    `on_change` runs whenever the phase may have changed (the measurer marks phases for the
    profiler with it)."""

    def __init__(
        self,
        model: nn.Module,
        *,
        on_backward: Callable[[Sequence[torch.Tensor]], None] | None = None,
        on_change: Callable[[str], None] | None = None,
    ) -> None:
        self._modules = {id(module) for module in model.modules()}
        self._on_backward = on_backward
        self._on_change = on_change
        self._forward_depth = 0
        self._backward_depth = 0
        self._annotations: list[str | None] = []  # open annotations: the phase each marks
        self._after_forward = False  # the model's forward ran since the last backward
        self.backward_calls = 0  # outermost backward calls so far
        self._handles: list[Any] = []

    @property
    def current(self) -> str:
        for phase in reversed(self._annotations):
            if phase is not None:
                return phase
        if self._backward_depth or current_autograd_node() is not None:
            return "recompute" if self._forward_depth else "backward"
        if self._forward_depth:
            return "forward"
        return "loss" if self._after_forward else "step"

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(self.current)

    def __enter__(self) -> Self:
        def module_entered(module: nn.Module, *_: Any) -> None:
            if id(module) in self._modules:
                self._forward_depth += 1
                self._changed()

        def module_left(module: nn.Module, *_: Any) -> None:
            if id(module) in self._modules:
                self._forward_depth -= 1
                self._after_forward = not self._backward_depth
                self._changed()

        self._handles = [
            nn.modules.module.register_module_forward_pre_hook(module_entered),
            nn.modules.module.register_module_forward_hook(module_left, always_call=True),
        ]
        if not _ACTIVE:
            _UNWRAPPED.update(backward=torch.autograd.backward, grad=torch.autograd.grad)
            torch.autograd.backward = _backward_call(_UNWRAPPED["backward"])
            torch.autograd.grad = _backward_call(_UNWRAPPED["grad"])
        _ACTIVE.append(self)
        self._changed()
        return self

    def __exit__(self, *exc: object) -> None:
        _ACTIVE.remove(self)
        if not _ACTIVE:
            torch.autograd.backward = _UNWRAPPED["backward"]
            torch.autograd.grad = _UNWRAPPED["grad"]
        for handle in self._handles:
            handle.remove()

    def _backward_began(self, roots: tuple[torch.Tensor, ...]) -> None:
        if not self._backward_depth:
            self.backward_calls += 1
        if self._on_backward is not None:
            self._on_backward(roots)
        self._backward_depth += 1
        self._changed()

    def _backward_ended(self) -> None:
        self._backward_depth -= 1
        self._after_forward = False
        self._changed()

    def annotation(self, func: Any, args: tuple[Any, ...], run: Callable[[], Any]) -> Any:
        """Run `run`, the dispatch of op `func` (one of `ANNOTATION_OPS`) on `args`, following
        the annotation it opens or closes (they nest: a `record_function` closes the latest one
        still open); an optimizer's annotation is its phase, its own two ops included."""
        if func.overloadpacket is record_function_enter:
            self._annotations.append(annotation_phase(str(args[0])))
            return run()
        try:
            return run()
        finally:
            if self._annotations:
                self._annotations.pop()
