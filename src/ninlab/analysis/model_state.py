"""The user's model, exactly as it was before a ninlab call, whatever the call did or raised.

A prediction runs the user's own code on the user's own modules with fake tensors swapped in, and
that code may write to the model: a forward caches a tensor in an attribute (a rotary or positional
cache), a step registers a parameter or buffer, a module registered under two names is swapped
back under one only. Parameters, buffers and flags would all look unchanged while the model holds
a fake tensor somewhere, and its next forward fails. So every call that runs the model keeps it
(`model_kept`): the state of each of its modules, by identity, is taken before and put back after,
in a `finally`: every attribute (parameters, buffers, submodules, hooks, train/eval, plain tensor
attributes, lists and dicts of them), and each tensor's `requires_grad` and `.grad`.

Tensors a module holds as plain attributes (`self.scale = torch.ones(4)`, an STFT window,
torchvision's detection anchors), not registered as buffers, are part of the model all the same:
`attribute_tensors` finds them, so the tracer can swap fake copies in for the step (and count
them, as the measurer does, with the buffers).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = [
    "AttributeTensor",
    "ModelState",
    "attribute_tensors",
    "captured_modules",
    "model_kept",
]

# What every module keeps in its `__dict__` for itself: not the owner's attributes.
_MODULE_OWN = frozenset(vars(nn.Module()))


@dataclass(frozen=True)
class AttributeTensor:
    """A tensor a module holds as a plain attribute (`key`), or as item `item` of a list, tuple
    or dict held there."""

    module: nn.Module
    key: str
    item: Any
    tensor: torch.Tensor

    def replace(self, tensor: torch.Tensor) -> None:
        """Put `tensor` where this one is (a tuple is rebuilt)."""
        if self.item is None:
            self.module.__dict__[self.key] = tensor
            return
        holder = self.module.__dict__[self.key]
        if isinstance(holder, tuple):
            items = list(holder)
            items[self.item] = tensor
            self.module.__dict__[self.key] = type(holder)(items)
        else:
            holder[self.item] = tensor


def attribute_tensors(model: nn.Module) -> list[AttributeTensor]:
    """Every tensor the model's modules hold as plain attributes, directly or one list, tuple
    or dict deep; not parameters, buffers or module internals, nor an attribute that holds one of
    the model's parameters or buffers itself (`nn.LSTM`'s `_flat_weights` lists its weights: they
    are the parameters, not more memory, and a fake copy of them counted the weights twice)."""
    registered = {id(tensor) for tensor in [*model.parameters(), *model.buffers()]}

    def plain(item: Any) -> bool:
        return isinstance(item, torch.Tensor) and id(item) not in registered

    found: list[AttributeTensor] = []
    for module in model.modules():
        for key, value in vars(module).items():
            if key in _MODULE_OWN:
                continue
            if plain(value):
                found.append(AttributeTensor(module, key, None, value))
            elif isinstance(value, (list, tuple)):
                found += [
                    AttributeTensor(module, key, index, item)
                    for index, item in enumerate(value)
                    if plain(item)
                ]
            elif isinstance(value, dict):
                found += [
                    AttributeTensor(module, key, name, item)
                    for name, item in value.items()
                    if plain(item)
                ]
    return found


def _contents(value: Any) -> Any:
    """A copy of a container's items, to put back into the same container; None otherwise."""
    if isinstance(value, dict):
        return dict(value)
    if isinstance(value, list):
        return list(value)
    if isinstance(value, set):
        return set(value)
    return None


def _put_back(value: Any, contents: Any) -> None:
    if isinstance(value, dict):
        value.clear()
        value.update(contents)
    elif isinstance(value, list):
        value[:] = contents
    elif isinstance(value, set):
        value.clear()
        value.update(contents)


@dataclass(frozen=True)
class ModelState:
    """Each module's attributes (and their containers' items), and each tensor's
    `requires_grad` and `.grad`, by identity."""

    modules: tuple[tuple[nn.Module, dict[str, Any], dict[str, Any]], ...]
    tensors: tuple[tuple[torch.Tensor, bool, torch.Tensor | None], ...]

    @staticmethod
    def of(model: nn.Module) -> ModelState:
        modules = []
        for module in model.modules():
            attributes = dict(vars(module))
            contents = {
                key: _contents(value)
                for key, value in attributes.items()
                if _contents(value) is not None
            }
            modules.append((module, attributes, contents))
        tensors = [*model.parameters(), *model.buffers()]
        tensors += [found.tensor for found in attribute_tensors(model)]
        return ModelState(tuple(modules), tuple((t, t.requires_grad, t.grad) for t in tensors))

    def restore(self) -> None:
        for module, attributes, contents in self.modules:
            state = vars(module)
            for key in [key for key in state if key not in attributes]:
                del state[key]
            state.update(attributes)
            for key, items in contents.items():
                _put_back(attributes[key], items)
        for tensor, requires_grad, grad in self.tensors:
            if tensor.requires_grad != requires_grad:
                tensor.requires_grad_(requires_grad)
            if tensor.grad is not grad:
                tensor.grad = grad


@contextlib.contextmanager
def model_kept(model: nn.Module) -> Iterator[None]:
    """Run the body, then put the model back exactly as it was, whatever the body did or
    raised."""
    state = ModelState.of(model)
    try:
        yield
    finally:
        state.restore()


def captured_modules(step: Any, model: nn.Module) -> list[nn.Module]:
    """The modules a step function reaches from outside the model (a frozen teacher in its
    closure, a global it names, an argument bound by `functools.partial`, an attribute of a
    callable object): their tensors are real, so the tracer must swap fakes in for them too."""
    own = {id(module) for module in model.modules()}
    found: dict[int, nn.Module] = {}
    for value in _reachable(step):
        if isinstance(value, nn.Module) and id(value) not in own and id(value) not in found:
            found[id(value)] = value
    # A captured module inside another captured one is swapped with it.
    inner = {id(sub) for module in found.values() for sub in list(module.modules())[1:]}
    return [module for key, module in found.items() if key not in inner]


def _reachable(step: Any) -> list[Any]:
    """What a step function can reach by name: its closure, the globals it names, a partial's
    arguments, a bound method's or callable object's attributes; one level deep."""
    values: list[Any] = []
    if isinstance(step, functools.partial):
        values += [step.func, *step.args, *step.keywords.values()]
        step = step.func
    if inspect.ismethod(step):
        values += list(vars(step.__self__).values()) if hasattr(step.__self__, "__dict__") else []
        step = step.__func__
    elif not inspect.isfunction(step):  # a callable object: what it holds
        return values + (list(vars(step).values()) if hasattr(step, "__dict__") else [])
    code = getattr(step, "__code__", None)
    if code is None:
        return values
    values += [cell.cell_contents for cell in step.__closure__ or () if _filled(cell)]
    names = getattr(step, "__globals__", {})
    values += [names[name] for name in code.co_names if name in names]
    return values


def _filled(cell: Any) -> bool:
    try:
        cell.cell_contents  # noqa: B018 - an empty cell raises
    except ValueError:
        return False
    return True
