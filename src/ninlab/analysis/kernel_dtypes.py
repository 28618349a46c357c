"""Whether this torch's CPU kernel runs an op on the dtypes of a call, where its fake kernel does.

A fake kernel checks shapes, and often promotes what the CPU kernel refuses: a kernel missing for
half precision (`log_ndtr`, `ndtri`, `zeta` of bfloat16 on torch 2.14.1), or a mix of dtypes
(`heaviside` of a bf16 activation and float32 values under autocast; a layer, group, batch or
instance norm of a float32 input with bf16 parameters; `nll_loss` and `cross_entropy` with a
class weight of another dtype than the input; binary cross-entropy, Huber loss or `grid_sample`
given a target or grid of another dtype). A prediction of such a step is for a step the real run
refuses. So the op is run once on small real tensors of the call's dtypes, per op and dtypes:

- a pointwise op on 0-d tensors (broadcasting keeps the call valid), for half precision or a mix;
- any other op given a mix of floating dtypes on zeros of the call's shapes, first with the
  leading axis of every tensor that shares the first's at 1 (the batch, in most calls: cheap),
  then at the call's own shapes where that shrink makes a call the kernel refuses for its shapes.

A kernel missing for a dtype raises its own error (`measure` words both the same way); a mix the
kernel refuses where the same call with every floating tensor in the first's dtype runs raises
one line naming the op, the dtypes and the cast that fixes it. Any other error is the fake
kernel's to give. A random op is not run (its draw would be the user's). Where a mix runs, its
outputs' dtypes are the CPU kernel's, which the recorder gives the fake outputs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from ninlab.analysis.torch_internals import DisableTorchDispatch, op_schema
from ninlab.errors import NinlabError, one_line
from ninlab.units import dtype_name

__all__ = ["OutputDtypes", "check_cpu_kernel_dtypes"]

_REDUCED_FLOATS = frozenset({torch.bfloat16, torch.float16})
_SEEDED = torch.Tag.nondeterministic_seeded
# The dtypes of a call's outputs as the CPU kernel makes them (None for an output that is no
# tensor), or None where the call was not run for them.
OutputDtypes = tuple[torch.dtype | None, ...] | None
# (op, the arguments' dtypes and other values) -> the error the call raises, or its outputs'
# dtypes (`OutputDtypes`).
_VERDICTS: dict[tuple[Any, ...], Exception | OutputDtypes] = {}


def check_cpu_kernel_dtypes(
    func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], *, pointwise: bool
) -> OutputDtypes:
    """Raise what the real step raises where the CPU kernel refuses the dtypes of this call;
    else, for an op given a mix of floating dtypes that is not pointwise (whose outputs' dtypes
    the fake kernel promotes as TensorIterator does), the dtypes the CPU kernel gives its outputs
    (None: not run), which a fake kernel may give otherwise (`huber_loss` of a bf16 input and a
    float32 target is bfloat16 on CPU, float32 on fake tensors)."""
    floats = {t.dtype for t in _tensors(args, kwargs) if t.dtype.is_floating_point}
    mixed = len(floats) > 1 and _SEEDED not in func.tags
    if not (mixed or (pointwise and floats & _REDUCED_FLOATS)):
        return None
    key = (func, _dtype_key(args), _dtype_key(tuple(kwargs.items())))
    try:
        verdict = _VERDICTS[key]
    except (KeyError, TypeError):  # TypeError: an argument that is no dict key
        verdict = _verdict(func, args, kwargs, pointwise=pointwise)
        with contextlib.suppress(TypeError):
            _VERDICTS[key] = verdict
    if isinstance(verdict, Exception):
        raise verdict
    return verdict


def _dtype_key(values: tuple[Any, ...]) -> tuple[Any, ...]:
    """`values` with each tensor as its dtype (the verdict holds for any shape)."""
    return tuple(
        value.dtype
        if isinstance(value, torch.Tensor)
        else _dtype_key(tuple(value))
        if isinstance(value, (list, tuple))
        else value
        for value in values
    )


def _verdict(
    func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], *, pointwise: bool
) -> Exception | OutputDtypes:
    floats = [t.dtype for t in _tensors(args, kwargs) if t.dtype.is_floating_point]
    if pointwise:
        sizes: list[Callable[[torch.Tensor], tuple[int, ...]]] = [lambda _: ()]
    else:
        sizes = [lambda tensor: tuple(tensor.shape)]
        shrunk = _batch_of_one(args, kwargs)
        if shrunk is not None:
            sizes.insert(0, shrunk)
    for size in sizes:
        outcome = _run(func, args, kwargs, size, None)
        if not isinstance(outcome, Exception):
            # 0-d operands promote otherwise than the call's (a bf16 map plus a float32 one is
            # float32; plus a float32 0-d tensor, bfloat16): a pointwise op's dtypes are its own.
            return None if pointwise else outcome
        if isinstance(outcome, NotImplementedError) and "not implemented for '" in str(outcome):
            return (
                outcome  # the kernel is missing for a dtype: its own words, as `measure` has them
            )
        if len(set(floats)) > 1 and not isinstance(
            _run(func, args, kwargs, size, floats[0]), Exception
        ):
            return _refused_mix(func, args, kwargs, outcome, floats[0])
    return None


def _tensors(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[torch.Tensor]:
    return [value for value in (*args, *kwargs.values()) if isinstance(value, torch.Tensor)]


def _batch_of_one(
    args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Callable[[torch.Tensor], tuple[int, ...]] | None:
    """Sizes with the leading axis at 1 for every tensor whose leading axis is the first
    tensor's: a call on the batch made small (None where that axis is not above 1). Where that
    is no valid call (a weight whose rows happen to be as many), the kernel's error is a shape's
    and the call is run again at its own sizes."""
    first = _tensors(args, kwargs)[0]
    if first.dim() == 0 or first.shape[0] < 2:
        return None
    batch = first.shape[0]

    def size(tensor: torch.Tensor) -> tuple[int, ...]:
        shape = tuple(tensor.shape)
        return (1, *shape[1:]) if shape[:1] == (batch,) else shape

    return size


def _run(
    func: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    size: Callable[[torch.Tensor], tuple[int, ...]],
    common: torch.dtype | None,
) -> Exception | tuple[torch.dtype | None, ...]:
    """The error of `func` run on real zeros of `size`, each floating one of `common` dtype if
    given (else its own), or where it runs, its outputs' dtypes."""

    def real(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return type(value)(map(real, value))
        if not isinstance(value, torch.Tensor):
            return value
        floating = common is not None and value.dtype.is_floating_point
        return torch.zeros(size(value), dtype=common if floating else value.dtype)

    with DisableTorchDispatch():
        try:
            output = func(*map(real, args), **{name: real(v) for name, v in kwargs.items()})
        except Exception as error:  # noqa: BLE001 - the kernel's own error, sorted by the caller
            return error
    outputs = output if isinstance(output, (tuple, list)) else (output,)
    return tuple(t.dtype if isinstance(t, torch.Tensor) else None for t in outputs)


def _refused_mix(
    func: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    error: Exception,
    dtype: torch.dtype,
) -> NinlabError:
    """One line naming the op, its floating tensors' dtypes and the cast that makes it run."""
    names = [argument.name for argument in op_schema(func).arguments]
    named = [*zip(names, args), *kwargs.items()]
    floating = [  # ATen names an op's first tensor `self`: the input, to a user
        ("input" if name == "self" else name, value.dtype)
        for name, value in named
        if isinstance(value, torch.Tensor) and value.dtype.is_floating_point
    ]
    given = ", ".join(f"{name} {dtype_name(d)}" for name, d in floating)
    others = [name for name, d in floating if d != dtype]
    listed = (
        " and ".join(others) if len(others) < 3 else f"{', '.join(others[:-1])} and {others[-1]}"
    )
    return NinlabError(
        f"{func.overloadpacket.__name__}: the CPU kernel refuses its tensors' mix of dtypes "
        f"({given}: {one_line(error)}), and the real step fails the same way; cast the "
        f"{listed} to {dtype_name(dtype)}, the {floating[0][0]}'s dtype"
    )
