"""The casts TensorIterator makes of an op's inputs: blocks of every op, not of a kernel family.

On CPU, TensorIterator computes a pointwise op in one common dtype (`torch.result_type` of its
inputs; a float for the ops that divide or take roots of integers), and an input of another
dtype is first copied into a temporary of the common dtype (`TensorIteratorBase::compute_types`,
`op.tensor().to(common_dtype)`): a float gradient times a bool mask copies the mask into float32
(max's and amax's backward), a float32 plus a bfloat16 tensor copies the bfloat16 one. The copy
is `numel x itemsize` of the common dtype, freed when the op ends. Ops that read a mask or
condition as bool (`masked_fill`, `where`'s condition) do not cast it; `where` casts its two
value tensors to their result type the same way. A full reduction whose output dtype is not its
input's (`sum` of a bool mask into int64) copies its input into the output dtype first
(`make_reduction`'s `self.to(in_dtype)`).

Python numbers are the same mechanism one step earlier: `x / 3.0`, `step += 1`, Adam's
`exp_avg_sq.sqrt() / bias_correction2_sqrt` and the `Scalar` overloads the backward calls
(`grad.div(numel)` of `mean`) wrap the number into a 0-d CPU tensor (a float as float64, an int
as int64: 8 bytes) just before the op and free it after; a dispatch mode is handed the number
back, so the trace sees no tensor. The wrapped number is then cast like any input (4 bytes for a
float32 op). Read off the profiler's allocation records on torch 2.13.0 CPU: 12 bytes above the
outputs at each such `aten::div`, `aten::add_` and `aten::mul_` of Adam, 4 and then 8 bytes of
Adagrad's, 320 bytes at the bool-mask `aten::mul` of `w.amax(1)`'s backward for a (10, 8)
float32 `w`, 640 at the `aten::sum` of its (10, 8) bool mask. The blocks are held together with
the op's outputs, so they are counted above the op's high point (`input_cast_bytes`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch

from ninlab.analysis.torch_internals import op_schema

__all__ = ["input_cast_bytes"]

# A Python number's type: the dtype it is wrapped in, and the dtype it counts as in type
# promotion (a float as the default dtype, like a wrapped number in `torch.result_type`).
_WRAPPED: dict[type, torch.dtype] = {
    bool: torch.bool,
    int: torch.int64,
    float: torch.float64,
    complex: torch.complex128,
}

# The ops whose `Scalar` overload wraps its number into a tensor and calls the `Tensor` one, and
# the argument that number is (`rsub(x, 1)` is `sub(1, x)`; `pow(2, x)` wraps its base).
_ARITHMETIC = ("add", "sub", "rsub", "mul", "div", "remainder", "fmod")
_COMPARISONS = ("eq", "ne", "lt", "le", "gt", "ge")
_WRAPS_SCALAR = {**dict.fromkeys((*_ARITHMETIC, *_COMPARISONS), "other"), "pow": "self"}

# Arguments a pointwise kernel reads in their own dtype (a bool mask or condition).
_NOT_PROMOTED = frozenset({"condition", "mask"})

# Pointwise ops whose kernel takes its inputs in mixed dtypes, casting none: `ldexp`'s integer
# exponent is read as it is (its own kernel from torch 2.13; before, a composite of `pow` and
# `mul`, recorded as those: a float32 input's int64 exponent was counted 16,384 bytes of cast
# for a 16x256 one, an inference 1.2 of its allocator peak, torch 2.14.1).
_MIXED_INPUTS = frozenset({"masked_fill", "masked_fill_", "ldexp", "ldexp_"})

# Reductions that copy their input into the output dtype first.
_CASTING_REDUCTIONS = frozenset({"sum", "nansum", "mean", "prod"})


@functools.cache
def _promoted_positions(func: Any) -> tuple[tuple[int, str, bool], ...]:
    """The positions and names of the arguments a pointwise op casts to its common dtype, each
    with whether it may hold a Python number: the `Tensor` ones (a Python number given for one
    is wrapped) and the number of a wrapping `Scalar` overload."""
    schema = op_schema(func)
    if torch.Tag.pointwise not in getattr(func, "tags", ()) or _op_name(func) in _MIXED_INPUTS:
        return ()
    wrapped = (
        _WRAPS_SCALAR.get(_op_name(func).rstrip("_")) if schema.overload_name == "Scalar" else None
    )
    return tuple(
        (i, argument.name, str(argument.type) == "number")
        for i, argument in enumerate(schema.arguments)
        if argument.name not in _NOT_PROMOTED
        and (str(argument.type) == "Tensor" or argument.name == wrapped)
    )


@functools.cache
def _op_name(func: Any) -> str:
    return op_schema(func).name.split("::")[-1]


def _category(dtype: torch.dtype) -> int:
    """A dtype's kind in type promotion: bool, integer, floating, complex."""
    if dtype == torch.bool:
        return 0
    if dtype.is_complex:
        return 3
    return 2 if dtype.is_floating_point else 1


def _combine(higher: torch.dtype | None, lower: torch.dtype | None) -> torch.dtype | None:
    """`torch.result_type`'s rule between two tiers (tensors with dims, 0-d tensors, wrapped
    numbers): a lower tier raises the result only where its kind ranks above."""
    if higher is None or lower is None:
        return higher or lower
    if _category(lower) > _category(higher):
        return torch.promote_types(higher, lower)
    return higher


def _promote(dtypes: Sequence[torch.dtype]) -> torch.dtype | None:
    return functools.reduce(torch.promote_types, dtypes) if dtypes else None


def _number_dtype(value: Any) -> torch.dtype:
    """The dtype a wrapped Python number counts as in type promotion."""
    wrapped = _WRAPPED[type(value)]
    if wrapped.is_complex:
        return torch.complex64 if torch.get_default_dtype() == torch.float32 else torch.complex128
    return torch.get_default_dtype() if wrapped.is_floating_point else wrapped


def _common_dtype(inputs: Sequence[Any], output: torch.Tensor | None) -> torch.dtype | None:
    """The dtype TensorIterator computes in, from the inputs' tiers; an op that yields a float
    from integers (true division, roots) computes in its output's float dtype."""
    tensors = [value for value in inputs if isinstance(value, torch.Tensor)]
    dims = _promote([t.dtype for t in tensors if t.dim() > 0])
    zeros = _promote([t.dtype for t in tensors if t.dim() == 0])
    numbers = _promote([_number_dtype(v) for v in inputs if not isinstance(v, torch.Tensor)])
    common = _combine(dims, _combine(zeros, numbers))
    if (
        common is not None
        and output is not None
        and output.dtype.is_floating_point
        and _category(common) < 2
    ):
        return output.dtype
    return common


def input_cast_bytes(
    func: Any, args: Sequence[Any], kwargs: dict[str, Any], outputs: Sequence[torch.Tensor]
) -> int:
    """Bytes of the Python numbers `func` takes as tensors in this call, and of its inputs'
    casts to the op's common dtype: alive at its high point, beside its outputs (0 where it
    casts none)."""
    output = outputs[0] if outputs else None
    if _op_name(func) in _CASTING_REDUCTIONS and args and isinstance(args[0], torch.Tensor):
        source = args[0]
        if output is None or output.dtype == source.dtype:
            return 0
        return source.numel() * output.dtype.itemsize
    inputs = []
    dtypes = set()
    numbers = False
    for i, name, _ in _promoted_positions(func):
        value = args[i] if i < len(args) else kwargs.get(name)
        if isinstance(value, torch.Tensor):
            inputs.append(value)
            dtypes.add(value.dtype)
        elif type(value) in _WRAPPED:
            inputs.append(value)
            numbers = True
    if not dtypes:
        return 0
    if not numbers and len(dtypes) == 1:
        # Most ops: tensors of one dtype, which is the common one, so nothing is cast; unless
        # integers make a float (true division), which `_common_dtype` computes.
        (dtype,) = dtypes
        if dtype.is_floating_point or output is None or not output.dtype.is_floating_point:
            return 0
    common = _common_dtype(inputs, output)
    if common is None:
        return 0
    total = 0
    for value in inputs:
        if isinstance(value, torch.Tensor):
            total += value.numel() * common.itemsize if value.dtype != common else 0
        else:
            wrapped = _WRAPPED[type(value)]
            total += wrapped.itemsize + (common.itemsize if common != wrapped else 0)
    return total
