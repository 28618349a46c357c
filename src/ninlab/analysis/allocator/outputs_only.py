"""Which ops no rule names are known to allocate only their outputs on CPU: the closed world.

A kernel the predictor knows nothing about may hold blocks beyond its outputs (a dilated
convolution's backward took 9x the undilated one's; an upsampling, its input and output copied
into the layout it works in): printed as exact, such a step was up to 35% under. So an op without
a rule is taken as allocating only its outputs where that is known, and measured on its own by
the kernel probe (`ninlab.analysis.kernel_probe`) everywhere else. Known, in two ways:

* by what the op is: one that makes no tensor and changes none (`.item()`, the profiler's
  annotations), a view (its outputs alias its input: no storage), or an elementwise op
  (`torch.Tag.pointwise`: one TensorIterator loop over its outputs; the casts of its inputs that
  loop makes are counted beside it, by `ninlab.analysis.allocator.scalars`);
* by survey (`SURVEYED`): ops measured by the kernel probe at every call of the test corpus and
  of full-size torchvision models (`benchmarks/survey_kernels.py`, torch 2.14.1 CPU, 2 threads)
  and found to allocate their outputs and nothing else beyond what `scalars` counts.

An op outside these is measured at each call, once per machine (the probe's disk cache), and where
it cannot be measured the figure is a lower bound with the reason: never silently outputs-only.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch

from ninlab.analysis.torch_internals import op_named, op_schema

__all__ = ["SURVEYED", "allocates_only_its_outputs", "outputs_only_by_kind"]

SURVEYED: frozenset[str] = frozenset(
    f"aten.{name}"
    for name in (
        # copies, joins and padding (TensorIterator loops, any layout)
        "_to_copy.default",
        "copy_.default",
        "cat.default",
        "stack.default",
        "constant_pad_nd.default",
        "tril.default",
        "triu.default",
        # factories: the tensor they make and nothing else
        "empty.memory_format",
        "empty_like.default",
        "new_empty_strided.default",
        "new_zeros.default",
        "new_ones.default",
        "zeros.default",
        "zeros_like.default",
        "ones.default",
        "ones_like.default",
        "full.default",
        "full_like.default",
        "arange.default",
        "arange.start",
        "arange.start_step",
        "linspace.default",
        "scalar_tensor.default",
        # in place, or an alias the view machinery does not track: no new storage
        "fill_.Tensor",
        "bernoulli_.float",
        "masked_fill_.Scalar",
        "as_strided_.default",
        "transpose_.default",
        "squeeze_.dim",
        "_unsafe_view.default",
        "unsafe_split.Tensor",
        # indexing, backward scatters of slices, losses, activations with no pointwise tag
        "index.Tensor",
        "_index_put_impl_.default",
        "select_backward.default",
        "slice_backward.default",
        "nll_loss_forward.default",
        "nll_loss_backward.default",
        "hardswish.default",
        "hardswish_.default",
        "hardswish_backward.default",
        "hardsigmoid_backward.default",
        # a sum over dims: 2 of 2,005 calls held 8 bytes more once, not again when rerun
        "sum.dim_IntList",
    )
)
"""Ops that are neither views nor pointwise, each measured at every call of the survey and found
to allocate only its outputs (beyond the input casts `scalars` counts), by name. Ops the survey
found outputs-only only on contiguous tensors are `probed.PROBED_IN_ANOTHER_LAYOUT`'s; those it
found holding more at some call (a mean's count and its float copy of a bf16 input, `roll`'s
halves, `repeat`'s index temporaries, a bool `cumsum`'s int64 copy) are measured at every call."""


def allocates_only_its_outputs(op_name: str, args: Sequence[Any] = ()) -> bool:
    """Whether the op `op_name` (as a dispatch mode names it, "aten.cat.default") allocates only
    its outputs on CPU given these arguments, as far as ninlab knows. Given a complex tensor, only
    a view or an op that makes no tensor is known: the survey ran on real tensors, and a pointwise
    op making a real result of a complex input (`abs`, `angle`) computes it into a complex
    temporary first (`torch.fft.fft(x).abs()` of a 16x256 input: 32,768 bytes beyond its output,
    an inference 0.72 of its allocator peak, torch 2.14.1)."""
    if not (op_name in SURVEYED or outputs_only_by_kind(op_name)):
        return False
    return _aliases_or_makes_none(op_name) or not any(_complex(a) for a in args)


def _complex(argument: Any) -> bool:
    """Whether an argument is a complex tensor or a list of tensors holding one (`cat`'s)."""
    if isinstance(argument, (list, tuple)):
        return any(_complex(item) for item in argument)
    return isinstance(argument, torch.Tensor) and argument.is_complex()


# Ops tagged pointwise whose CPU kernel is no TensorIterator loop but a composition of ops with
# temporaries of their own: `mvlgamma(x, p)` adds `x.unsqueeze(-1)` to an `arange` of p
# halves, `lgamma_`s that and sums it (a p-times-larger temporary: 32,768 bytes beyond the
# output for a 16x256 float32 `x` and p=2, an inference 0.67 of its allocator peak, torch 2.8 to
# 2.14.1). Measured at each call.
_COMPOSED_WITH_TEMPORARIES = frozenset({"aten.mvlgamma.default", "aten.mvlgamma_.default"})


@functools.cache
def outputs_only_by_kind(op_name: str) -> bool:
    """Whether the op is of a kind that allocates only its outputs: one that makes no tensor and
    changes none, a view, or a pointwise op (one TensorIterator loop)."""
    op = op_named(op_name)
    return op is not None and (
        _aliases_or_makes_none(op_name)
        or (torch.Tag.pointwise in op.tags and op_name not in _COMPOSED_WITH_TEMPORARIES)
    )


@functools.cache
def _aliases_or_makes_none(op_name: str) -> bool:
    """Whether the op makes no storage whatever its arguments: a view, or one that makes no
    tensor and changes none."""
    op = op_named(op_name)
    if op is None:
        return False
    schema = op_schema(op)
    makes_no_tensor = not schema.is_mutable and not any(
        "Tensor" in str(result.type) for result in schema.returns
    )
    return makes_no_tensor or op.is_view
