"""The user's model, exactly as it was before a ninlab call, whatever the call did or raised.

A prediction runs the user's own code on the user's own modules with fake tensors swapped in, and
that code may write to the model: a forward caches a tensor in an attribute (a rotary or positional
cache), a step registers a parameter or buffer, a module registered under two names is swapped
back under one only. Parameters, buffers and flags would all look unchanged while the model holds
a fake tensor somewhere, and its next forward fails. So every call that runs the model keeps it
(`model_kept`): the state of each of its modules, by identity, is taken before and put back after,
in a `finally`: every attribute (parameters, buffers, submodules, hooks, train/eval, plain tensor
attributes, lists and dicts of them), and each tensor's `requires_grad` and `.grad`.

The model's code may also keep tensors where no module holds them: a `functools.lru_cache` on
a method or function of its classes' modules (Hugging Face's BEiT, DPT, Data2Vec-Vision and
others cache their relative position index so, keyed by the window size alone, shared by every
instance). A prediction would leave fakes there, and every later real forward of that class
fails; a measurement would read a real one cached by an earlier forward into a step of fakes. So
those caches are emptied as a call starts and as it ends (`clear_model_caches`): a cache, recomputed
on its next call.
The same code may keep them in a dict or list at the top of its modules or classes
(`_TABLES[n] = torch.arange(n)`): each is put back as it was when the call ends, and one that holds
tensors alone, a cache, is emptied while the call runs (`_CodeContainers`).

Tensors a module holds as plain attributes (`self.scale = torch.ones(4)`, an STFT window,
torchvision's detection anchors), not registered as buffers, are part of the model all the same:
`attribute_tensors` finds them, so the tracer can swap fake copies in for the step (and count
them, as the measurer does, with the buffers).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = [
    "AttributeTensor",
    "Captured",
    "ModelState",
    "attribute_aliases",
    "attribute_tensors",
    "captured_containers",
    "captured_modules",
    "captured_tensors",
    "clear_model_caches",
    "model_kept",
    "model_namespaces",
    "reached_by_step",
    "swapped_in",
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
    or dict deep; not parameters, buffers or module internals. A parameter or buffer held again
    as an attribute (an RNN's `_flat_weights`, which its `__setattr__` keeps in step with the
    parameters it lists) is the parameter, not one of these (`attribute_aliases`): a fake copy of
    it would be counted twice (a GRU's weights, 12 KB over in a 26 KB prediction)."""
    registered = _registered(model)
    return [found for found in _attribute_slots(model) if id(found.tensor) not in registered]


def attribute_aliases(model: nn.Module) -> list[AttributeTensor]:
    """The plain attributes that hold one of the model's own parameters or buffers again; during
    a fake step each must hold that tensor's fake, or the real one reaches a fake kernel."""
    registered = _registered(model)
    return [found for found in _attribute_slots(model) if id(found.tensor) in registered]


def _registered(model: nn.Module) -> set[int]:
    return {id(tensor) for tensor in (*model.parameters(), *model.buffers())}


def _attribute_slots(model: nn.Module) -> list[AttributeTensor]:
    found: list[AttributeTensor] = []
    for module in model.modules():
        for key, value in vars(module).items():
            if key in _MODULE_OWN:
                continue
            if isinstance(value, torch.Tensor):
                found.append(AttributeTensor(module, key, None, value))
            elif isinstance(value, (list, tuple)):
                found += [
                    AttributeTensor(module, key, index, item)
                    for index, item in enumerate(value)
                    if isinstance(item, torch.Tensor)
                ]
            elif isinstance(value, dict):
                found += [
                    AttributeTensor(module, key, name, item)
                    for name, item in value.items()
                    if isinstance(item, torch.Tensor)
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
    containers = _CodeContainers.of(model)
    clear_model_caches(model)
    try:
        yield
    finally:
        state.restore()
        containers.restore()
        clear_model_caches(model)


@dataclass(frozen=True)
class _CodeContainers:
    """The dicts and lists the model's code keeps at the top of its modules and classes (the
    namespaces `clear_model_caches` searches), each with its contents as a call starts: a
    forward that caches a tensor there (`_TABLES[n] = torch.arange(n)`) would leave a fake in
    it after a prediction, and every later real forward fails. Those that hold tensors alone, a
    cache, are emptied for the call (a real tensor an earlier forward cached cannot meet a
    step of fakes; the step fills it as a first step does), and each is put back as it was
    after, whatever the call wrote."""

    kept: tuple[tuple[dict[Any, Any] | list[Any], dict[Any, Any] | list[Any]], ...]

    @staticmethod
    def of(model: nn.Module) -> _CodeContainers:
        found: dict[int, dict[Any, Any] | list[Any]] = {}
        for namespace in model_namespaces(model):
            for name, value in list(namespace.items()):
                # Exactly a dict or a list: not a mapping class of the user's own, nor a
                # module's `__builtins__`.
                if type(value) in (dict, list) and not name.startswith("__"):
                    found[id(value)] = value
        kept = tuple((container, container.copy()) for container in found.values())
        for container, _ in kept:
            items = container.values() if isinstance(container, dict) else container
            if items and all(isinstance(item, torch.Tensor) for item in items):
                container.clear()
        return _CodeContainers(kept)

    def restore(self) -> None:
        for container, contents in self.kept:
            if isinstance(container, dict) and isinstance(contents, dict):
                same = container.keys() == contents.keys() and all(
                    container[key] is value for key, value in contents.items()
                )
                if not same:
                    container.clear()
                    container.update(contents)
            elif len(container) != len(contents) or any(
                now is not then for now, then in zip(container, contents)
            ):
                container[:] = contents


def clear_model_caches(model: nn.Module) -> None:
    """Empty the `functools.lru_cache`s of the model's code (see the module's docstring)."""
    for cache in _model_caches(model):
        cache.cache_clear()


def _model_caches(model: nn.Module) -> list[Any]:
    """The `functools.lru_cache`s of the model's code (see the module's docstring): in the
    namespaces of its modules' classes (a cached static or class method, or a method whose
    decorator wraps the cache, as transformers' `compile_compatible_method_lru_cache` does) and
    of the Python modules defining them. PyTorch's own are not the model's."""
    found: dict[int, Any] = {}
    for namespace in model_namespaces(model):
        for value in list(namespace.values()):
            for candidate in _cache_candidates(value):
                if callable(getattr(candidate, "cache_clear", None)) and hasattr(
                    candidate, "cache_info"
                ):
                    found[id(candidate)] = candidate
    return list(found.values())


def model_namespaces(model: nn.Module) -> list[Any]:
    """The namespaces of the model's code: its modules' classes and the Python modules defining
    them, PyTorch's own aside."""
    classes = {cls for module in model.modules() for cls in type(module).__mro__}
    names = {cls.__module__ for cls in classes if not _torchs(cls.__module__)}
    namespaces = [vars(cls) for cls in classes if not _torchs(cls.__module__)]
    return namespaces + [vars(sys.modules[name]) for name in names if name in sys.modules]


def _torchs(module_name: str) -> bool:
    return module_name == "torch" or module_name.startswith("torch.")


def _cache_candidates(value: Any) -> list[Any]:
    """`value`, the function a static or class method holds, and what a function's closure
    holds (a decorator's wrapped cache)."""
    function = (
        getattr(value, "__func__", value)
        if isinstance(value, (staticmethod, classmethod))
        else value
    )
    candidates = [value, function]
    for cell in getattr(function, "__closure__", None) or ():
        with contextlib.suppress(ValueError):  # a cell not yet filled
            candidates.append(cell.cell_contents)
    return candidates


def captured_modules(step: Any, model: nn.Module) -> list[nn.Module]:
    """The modules a step function reaches from outside the model (a frozen teacher in its
    closure, a global it names, an argument bound by `functools.partial`, an attribute of a
    callable object): their tensors are real, so the tracer must swap fakes in for them too."""
    own = {id(module) for module in model.modules()}
    found: dict[int, nn.Module] = {}
    for place in _reachable(step):
        value = place.value
        if isinstance(value, nn.Module) and id(value) not in own and id(value) not in found:
            found[id(value)] = value
    # A captured module inside another captured one is swapped with it.
    inner = {id(sub) for module in found.values() for sub in list(module.modules())[1:]}
    return [module for key, module in found.items() if key not in inner]


@dataclass(frozen=True)
class Captured:
    """A value a step function reaches by `name` from outside the model, and how to put another
    in its place."""

    name: str
    value: Any
    put: Callable[[Any], None]


def captured_tensors(step: Any, model: nn.Module) -> list[Captured]:
    """The plain tensors a step function reaches from outside the model, where
    `captured_modules` finds modules (class weights in its closure, a global scale): real
    tensors, which the tracer swaps fakes in for (`swapped_in`)."""
    own = {id(t) for t in (*model.parameters(), *model.buffers())}
    return [
        place
        for place in _reachable(step)
        if isinstance(place.value, torch.Tensor) and id(place.value) not in own
    ]


def captured_containers(step: Any) -> list[list[Any] | dict[Any, Any]]:
    """The lists and dicts a step function reaches from outside the model (a loss history it
    appends to), each once: what it writes into them is the user's state too."""
    found: dict[int, list[Any] | dict[Any, Any]] = {}
    for place in _reachable(step):
        if isinstance(place.value, (list, dict)):
            found.setdefault(id(place.value), place.value)
    return list(found.values())


@contextlib.contextmanager
def swapped_in(
    places: list[Captured],
    values: list[Any],
    containers: Sequence[list[Any] | dict[Any, Any]] = (),
) -> Iterator[None]:
    """`values` in `places` for the body, the originals put back after, whatever it raised; and
    `containers` with their contents as they were before it, so that what the body appended (a
    fake loss kept in a history list) or removed is not left in them."""
    contents = [(container, _contents(container)) for container in containers]
    try:
        for place, value in zip(places, values):
            place.put(value)
        yield
    finally:
        for container, before in contents:
            _put_back(container, before)
        for place in places:
            place.put(place.value)


# How far into captured lists, tuples and dicts the walk goes: depth (a list of dicts of tuples of
# tensors) and items in all (a captured dataset is not walked whole).
_CONTAINER_DEPTH = 4
_CONTAINER_ITEMS = 10_000


def reached_by_step(step: Any) -> list[Any]:
    """The values a step function reaches from outside the model (`_reachable`), each once."""
    found: dict[int, Any] = {}
    for place in _reachable(step):
        found.setdefault(id(place.value), place.value)
    return list(found.values())


def _reachable(step: Any) -> list[Captured]:
    """What a step function can reach by name (`_named`), and what the lists, tuples and dicts
    among those hold, walked to `_CONTAINER_DEPTH` and at most `_CONTAINER_ITEMS` items, each
    container once (a list holding itself ends)."""
    places: list[Captured] = []
    walked: set[int] = set()
    budget = _CONTAINER_ITEMS

    def walk(place: Captured, depth: int) -> None:
        nonlocal budget
        places.append(place)
        value = place.value
        if not isinstance(value, (list, tuple, dict)) or depth == _CONTAINER_DEPTH:
            return
        if id(value) in walked:
            return
        walked.add(id(value))
        for item in _items(place):
            if budget == 0:
                return
            budget -= 1
            walk(item, depth + 1)

    for place in _named(step):
        walk(place, 0)
    return places


def _items(place: Captured) -> list[Captured]:
    """The items of the list, tuple or dict in `place`, each with its own way to be replaced: a
    list's or dict's in place; a tuple's by a new tuple put in the tuple's place, and the very
    tuple put back once every item is its own again."""
    container = place.value
    if isinstance(container, dict):
        return [
            Captured(f"{place.name}[{key!r}]", value, functools.partial(container.__setitem__, key))
            for key, value in container.items()
        ]
    if isinstance(container, list):
        return [
            Captured(
                f"{place.name}[{index}]", value, functools.partial(container.__setitem__, index)
            )
            for index, value in enumerate(container)
        ]
    items = list(container)
    remake = getattr(type(container), "_make", tuple)  # a named tuple stays one

    def putter(index: int) -> Callable[[Any], None]:
        def put(value: Any) -> None:
            items[index] = value
            same = all(now is was for now, was in zip(items, container))
            place.put(container if same else remake(items))

        return put

    return [
        Captured(f"{place.name}[{index}]", value, putter(index))
        for index, value in enumerate(container)
    ]


def _named(step: Any) -> list[Captured]:
    """What a step function can reach by name: its closure, the globals it names, a partial's
    arguments, a bound method's or callable object's attributes."""
    places: list[Captured] = []
    if isinstance(step, functools.partial):
        partial = step
        places += [Captured("the partial's function", partial.func, lambda _: None)]
        places += [
            Captured(f"the partial's argument {index}", value, _partial_setter(partial, index))
            for index, value in enumerate(partial.args)
        ]
        places += [
            Captured(name, value, functools.partial(partial.keywords.__setitem__, name))
            for name, value in partial.keywords.items()
        ]
        step = step.func
    if inspect.ismethod(step):
        owner = step.__self__
        places += _attributes(owner) if hasattr(owner, "__dict__") else []
        step = step.__func__
    elif not inspect.isfunction(step):  # a callable object: what it holds
        return places + (_attributes(step) if hasattr(step, "__dict__") else [])
    code = getattr(step, "__code__", None)
    if code is None:
        return places
    for name, cell in zip(code.co_freevars, step.__closure__ or ()):
        if _filled(cell):
            places.append(
                Captured(
                    name, cell.cell_contents, functools.partial(setattr, cell, "cell_contents")
                )
            )
    names = getattr(step, "__globals__", {})
    places += [
        Captured(name, names[name], functools.partial(names.__setitem__, name))
        for name in code.co_names
        if name in names
    ]
    return places


def _attributes(owner: Any) -> list[Captured]:
    state = vars(owner)
    return [
        Captured(name, value, functools.partial(state.__setitem__, name))
        for name, value in state.items()
    ]


def _partial_setter(partial: functools.partial, index: int) -> Callable[[Any], None]:
    def put(value: Any) -> None:
        args = list(partial.args)
        args[index] = value
        partial.__setstate__((partial.func, tuple(args), partial.keywords, vars(partial) or None))

    return put


def _filled(cell: Any) -> bool:
    try:
        cell.cell_contents  # noqa: B018 - an empty cell raises
    except ValueError:
        return False
    return True
