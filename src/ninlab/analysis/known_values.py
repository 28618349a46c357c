"""The real values of the fake tensors whose values ninlab knows, so that a step's checks on them
are answered as the real run answers them.

A step is recorded on fake tensors, which have shapes and no data; a model that reads a value
(`if (mask == 1).all():`) cannot be followed. But some values are known without data: those of
the inputs ninlab makes whose every value is set (an all-ones attention mask, a bool mask:
`step.determined_input`), of factory ops (`arange`, `zeros`, `full`), and of any deterministic
op whose tensor arguments all have known values (position ids, `arange(n) + offset`, and the
mask computed from them). `KnownValues` computes those ops again on real CPU tensors beside the
fake ones (below `SIZE_LIMIT` elements, so a large tensor costs nothing), and answers a read of
one (`item()`, `bool()`) with the real value: the branch the real run takes. A tensor written in
place by an op it does not follow loses its value, with every view of its storage.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any

import torch
from torch.utils.weak import WeakIdKeyDictionary

from ninlab.analysis.fake_fast_path import tensors_in
from ninlab.analysis.torch_internals import (
    DisableTorchDispatch,
    FakeTensor,
    op_schema,
    storage_address,
    tree_flatten,
)

# The most elements an op's outputs may have for its values to be computed: an attention mask of
# a batch of 64 sequences of 4,096 tokens, which costs a millisecond.
SIZE_LIMIT = 1 << 18
_CPU = torch.device("cpu")
# What `tree_flatten` takes as leaves among an op's arguments and outputs (None included).
_LEAVES = (torch.Tensor, type(None), bool, int, float, complex)


@functools.cache
def _writes(func: Any) -> tuple[tuple[int, str], ...]:
    """The positions and names of the arguments `func` writes in place (an in-place op's self,
    `out=`)."""
    return tuple(
        (i, argument.name)
        for i, argument in enumerate(op_schema(func).arguments)
        if argument.alias_info is not None and argument.alias_info.is_write
    )


def _leaves(value: Any) -> list[Any]:
    """`tree_flatten(value)`'s leaves, without it for a leaf or a plain tuple or list of leaves
    (almost every op's arguments and outputs): each call of it leaves a cycle (a closure calling
    itself) for the garbage collector, which the recording of every op would pay."""
    if isinstance(value, _LEAVES):
        return [value]
    if type(value) in (tuple, list) and all(isinstance(item, _LEAVES) for item in value):
        return list(value)
    return tree_flatten(value)[0]


def _written(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[torch.Tensor]:
    """The fake tensors `func` writes in place in this call."""
    written = []
    for i, name in _writes(func):
        argument = args[i] if i < len(args) else kwargs.get(name)
        written += [t for t in _leaves(argument) if isinstance(t, FakeTensor)]
    return written


@functools.cache
def _follows(func: Any) -> bool:
    """Whether an op's outputs are set by its arguments' values: not random, not uninitialised
    (`empty`), not a resize or a change of storage."""
    name = func.name()
    return (
        torch.Tag.nondeterministic_seeded not in func.tags
        and "empty" not in name
        and not name.startswith(("aten::resize", "aten::set_"))
    )


def _on_cpu(value: Any) -> Any:
    """An argument as the op takes it on real CPU tensors (an emulated CUDA step's device)."""
    return _CPU if isinstance(value, torch.device) else value


# Ops whose integer outputs hold only values of their first argument (views, copies): the
# bounds of an input's drawn values hold for them too.
_SAME_VALUES = frozenset(
    {
        "aten::view",
        "aten::_unsafe_view",
        "aten::reshape",
        "aten::clone",
        "aten::contiguous",
        "aten::alias",
        "aten::detach",
        "aten::t",
        "aten::transpose",
        "aten::permute",
        "aten::select",
        "aten::slice",
        "aten::expand",
        "aten::squeeze",
        "aten::unsqueeze",
        "aten::flatten",
        "aten::_to_copy",
        "aten::lift_fresh",
    }
)


class KnownValues:
    """The real values of the fake tensors whose values are known, kept as each op runs, and the
    bounds of integer ones drawn from a known range (an index batch's `input_range`)."""

    def __init__(self) -> None:
        self._values: WeakIdKeyDictionary = WeakIdKeyDictionary()
        # The known tensors by the address of their storage as their value was noted, so that an
        # op writing a storage forgets its tensors without a look at every known one (Adam's
        # step counts are known, and each of its in-place ops writes a storage).
        self._on_storage: dict[int, list[weakref.ref[torch.Tensor]]] = {}
        # The ids of every tensor ever noted: one not among them has no value of its own, known
        # without the weak lookup in `_values` (most tensors of a step).
        self._noted: set[int] = set()
        self._bounds: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def note(self, fake: torch.Tensor, value: torch.Tensor) -> None:
        """`fake`'s values are `value`'s (a real CPU tensor of its shape)."""
        self._values[fake] = value
        self._noted.add(id(fake))
        address = storage_address(fake.untyped_storage())
        self._on_storage.setdefault(address, []).append(weakref.ref(fake))

    def note_bounds(self, fake: torch.Tensor, low: int, high: int) -> None:
        """`fake`'s values all lie in [low, high] (an integer input drawn from its range)."""
        self._bounds[fake] = (low, high)

    def bounds(self, tensor: torch.Tensor) -> tuple[int, int] | None:
        """The least and the greatest of an integer tensor's values, where they are known."""
        if tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.numel() == 0:
            return None
        bounds = self._bounds.get(tensor) if isinstance(tensor, FakeTensor) else None
        if bounds is not None:
            return bounds
        value = self.value(tensor)
        if value is None:
            return None
        with DisableTorchDispatch():
            return int(value.min()), int(value.max())

    def value(self, tensor: torch.Tensor) -> torch.Tensor | None:
        """The real values of `tensor` (a fake tensor, or a real one), or None if unknown."""
        if not isinstance(tensor, FakeTensor):
            return tensor if type(tensor) in (torch.Tensor, torch.nn.Parameter) else None
        value = self._values.get(tensor) if self._values else None
        if value is None:
            return tensor.constant  # FakeTensorMode's own: a real scalar made into a tensor
        return value

    def answer(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The real result of an op that reads values (`item()`, `equal`), where its tensors'
        values are all known; None otherwise."""
        real = self._run(func, args, kwargs)
        return None if real is None or isinstance(real, torch.Tensor) else real

    def follow(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        """After `func` made `output` (fake): note its outputs' values where its arguments' are
        known, or forget the values of what it wrote in place."""
        outputs = _leaves(output)
        fakes = [t for t in outputs if isinstance(t, FakeTensor)]
        writes = _writes(func)
        if writes and self._bounds:
            written = {storage_address(t.untyped_storage()) for t in _written(func, args, kwargs)}
            bounded = list(self._bounds)
            for fake in [f for f in bounded if storage_address(f.untyped_storage()) in written]:
                del self._bounds[fake]  # written in place: its values are no longer the drawn ones
        self._follow_bounds(func, args, fakes)
        if not fakes and not writes:
            return
        followed = (
            sum(t.numel() for t in fakes) <= SIZE_LIMIT
            and _follows(func)
            and self._all_known(args, kwargs)
        )
        real = self._run(func, args, kwargs) if followed else None
        if real is None:
            if writes and self._values:
                self._forget(_written(func, args, kwargs))
            return
        reals = _leaves(real)
        if len(reals) != len(outputs):
            return
        for fake, value in zip(outputs, reals):
            if (
                isinstance(fake, FakeTensor)
                and isinstance(value, torch.Tensor)
                and value.shape == fake.shape
                and value.dtype == fake.dtype
            ):
                self.note(fake, value)

    def _follow_bounds(self, func: Any, args: tuple[Any, ...], fakes: list[torch.Tensor]) -> None:
        """The bounds of a bounded tensor's views and copies (`_SAME_VALUES`) are its own."""
        if not self._bounds or not fakes or not args or not isinstance(args[0], FakeTensor):
            return
        bounds = self._bounds.get(args[0])
        if bounds is None or op_schema(func).name not in _SAME_VALUES:
            return
        for fake in fakes:
            if not (fake.dtype.is_floating_point or fake.dtype.is_complex):
                self._bounds[fake] = bounds

    def _forget(self, written: list[torch.Tensor]) -> None:
        """Forget the values of `written` and of every known tensor on one of their storages.
        A tensor's storage changes only by an op that writes it (`set_`), which forgets it here,
        so a known tensor is still on the storage it was noted on."""
        storages = {storage_address(t.untyped_storage()) for t in written}
        for tensor in written:
            self._values.pop(tensor, None)
        for address in storages:
            for ref in self._on_storage.pop(address, ()):
                fake = ref()
                # Not one noted again since, on another storage.
                if fake is not None and storage_address(fake.untyped_storage()) in storages:
                    self._values.pop(fake, None)

    def _all_known(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """Whether every tensor among an op's arguments has known values: most ops of a step have
        one that does not, and this look, far cheaper than `_run`'s flattening, spares them it."""
        tensors = tensors_in(args) + (tensors_in(tuple(kwargs.values())) if kwargs else [])
        return all(
            t.constant is not None if self._never_noted(t) else self.value(t) is not None
            for t in tensors
        )

    def _never_noted(self, tensor: torch.Tensor) -> bool:
        """A fake tensor never noted: its values are its constant's, if it has one."""
        return isinstance(tensor, FakeTensor) and id(tensor) not in self._noted

    def _run(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """`func` on the real values of its arguments, or None where one is unknown or the op
        fails on them."""
        flat, spec = tree_flatten((args, kwargs))
        reals = []
        for item in flat:
            if not isinstance(item, torch.Tensor):
                reals.append(_on_cpu(item))
                continue
            real = self.value(item)
            if real is None:
                return None
            reals.append(real)
        real_args, real_kwargs = spec.unflatten(reals)
        try:
            with DisableTorchDispatch(), torch.no_grad():
                return func(*real_args, **real_kwargs)
        except Exception:  # noqa: BLE001 - an op the real tensors refuse: its values are unknown
            return None
