"""The Python numbers an op takes as tensors: blocks of every op, not of a kernel family.

`x / 3.0`, `step += 1`, Adam's `exp_avg_sq.sqrt() / bias_correction2_sqrt`: the op's schema wants
a tensor, so PyTorch's Python binding wraps the number into a 0-d CPU tensor (a float as float64,
an int as int64: 8 bytes) just before the op and frees it after; a dispatch mode is handed the
number back, so the trace sees no tensor. Inside the op, TensorIterator casts an input whose
dtype is not the op's common dtype into a temporary of that dtype (4 bytes for a float32 op),
freed before the op returns. Read off the profiler's allocation records on torch 2.13.0 CPU: 12
bytes above the outputs at each such `aten::div`, `aten::add_` and `aten::mul_` of Adam, 4 and
then 8 bytes of Adagrad's. The blocks are held together with the op's outputs, so they are
counted above the op's high point (`wrapped_number_bytes`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch

from ninlab.analysis.torch_internals import op_schema

__all__ = ["wrapped_number_bytes"]

# A Python number's type: its rank in type promotion (bool, integer, floating, complex) and the
# dtype it is wrapped in.
_WRAPPED: dict[type, tuple[int, torch.dtype]] = {
    bool: (0, torch.bool),
    int: (1, torch.int64),
    float: (2, torch.float64),
    complex: (3, torch.complex128),
}


@functools.cache
def _tensor_positions(func: Any) -> tuple[tuple[int, str], ...]:
    """The positions and names of an op's arguments typed `Tensor` (not a list, not optional)."""
    return tuple(
        (i, argument.name)
        for i, argument in enumerate(op_schema(func).arguments)
        if str(argument.type) == "Tensor"
    )


def _rank(dtype: torch.dtype) -> int:
    if dtype == torch.bool:
        return 0
    if dtype.is_complex:
        return 3
    return 2 if dtype.is_floating_point else 1


def _common_dtype(rank: int, wrapped: torch.dtype, dtypes: Sequence[torch.dtype]) -> torch.dtype:
    """The dtype TensorIterator computes in: a wrapped number raises the tensors' dtype only
    where its kind ranks above theirs, and then to its kind's default dtype."""
    common = functools.reduce(torch.promote_types, dtypes)
    if rank <= _rank(common):
        return common
    if rank == 3:
        return torch.complex64 if torch.get_default_dtype() == torch.float32 else torch.complex128
    return torch.get_default_dtype() if rank == 2 else wrapped


def wrapped_number_bytes(func: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> int:
    """Bytes of the Python numbers `func` takes as tensors in this call, and of their casts to
    the op's dtype: alive at its high point, beside its outputs (0 where it takes none)."""
    positions = _tensor_positions(func)
    if not positions:
        return 0
    numbers = []
    for i, name in positions:
        value = args[i] if i < len(args) else kwargs.get(name)
        if type(value) in _WRAPPED:
            numbers.append(_WRAPPED[type(value)])
    if not numbers:
        return 0
    dtypes = [a.dtype for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
    if not dtypes:
        return 0
    total = 0
    for rank, wrapped in numbers:
        common = _common_dtype(rank, wrapped, dtypes)
        total += wrapped.itemsize + (common.itemsize if common != wrapped else 0)
    return total
