"""The allocator rules by op: a rule registers itself for the aten ops it knows with
`@allocation_rule(...)`, a second rule for the same op is refused, and `cpu_kernel_allocations` is
the one way to ask for an op call's blocks (for an op no rule names, one cached answer of
`outputs_only`: its outputs alone, or unknown and measured). Imports no rule: the package's
`__init__` imports them all."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, NamedTuple

from ninlab.analysis.allocator.blocks import KernelAllocation
from ninlab.analysis.allocator.outputs_only import allocates_only_its_outputs
from ninlab.analysis.rule_registry import rule_decorator

__all__ = [
    "ALLOCATION_RULES",
    "OUTPUTS_ONLY",
    "UNKNOWN_KERNEL",
    "AllocationRule",
    "KernelBlocks",
    "allocation_rule",
    "cpu_kernel_allocations",
]


class KernelBlocks(NamedTuple):
    """What one op call's CPU kernel allocates: `allocations` in order, outputs included (None:
    only its outputs), and `unmodelled`, non-empty where the blocks are not known (allocations
    None) or are only a lower bound (allocations given): why. A NamedTuple so the tracer unpacks
    it as `allocations, unmodelled`."""

    allocations: tuple[KernelAllocation, ...] | None
    unmodelled: str = ""


OUTPUTS_ONLY = KernelBlocks(None)
"""An op that allocates nothing but its outputs."""

UNKNOWN_KERNEL = KernelBlocks(None, "no rule knows this kernel's blocks")
"""An op without a rule that is not known to allocate only its outputs (`outputs_only`): the
predictor measures each call (`ninlab.analysis.kernel_probe`)."""

AllocationRule = Callable[[Sequence[Any]], KernelBlocks]
"""A rule: the op's positional arguments (real or fake tensors) to its blocks."""

_RULES: dict[str, AllocationRule] = {}
ALLOCATION_RULES: Mapping[str, AllocationRule] = MappingProxyType(_RULES)
"""Every registered rule, by the op name a dispatch mode gives (`str(func)`), read-only."""


allocation_rule = rule_decorator(_RULES, "an allocation rule")
"""`@allocation_rule("aten.convolution.default", ...)` registers the decorated rule for the op
names given; an op that has a rule already is refused, naming the op and its rule, and nothing is
registered."""


def cpu_kernel_allocations(func_name: str, args: Sequence[Any]) -> KernelBlocks:
    """The blocks `func_name` (as a dispatch mode names it, e.g. "aten.convolution.default")
    allocates on CPU for these arguments (real or fake tensors), by the op's registered rule; an op
    without one allocates only its outputs where that is known (`outputs_only`), else its blocks
    are unknown and each call is measured."""
    rule = _RULES.get(func_name)
    if rule is not None:
        return rule(args)
    return OUTPUTS_ONLY if allocates_only_its_outputs(func_name, args) else UNKNOWN_KERNEL
