"""One way to keep rules by op, as `torch.utils.flop_counter` keeps its formulas: a decorator
registers a rule for the ops it names in a table, and refuses an op that has a rule already, so
no rule is silently replaced or left unused. FLOP rules (`ninlab.analysis.flops`) and allocator
rules (`ninlab.analysis.allocator.registry`) are kept this way."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, TypeVar

__all__ = ["rule_decorator"]

Rule = TypeVar("Rule", bound=Callable[..., Any])


def rule_decorator(table: dict[Any, Rule], what: str) -> Callable[..., Callable[[Rule], Rule]]:
    """A decorator factory: `@decorator(op, ...)` puts the decorated rule in `table` for each op;
    an op that has a rule already (in the table, or twice in one call) is refused with a
    ValueError naming the op, `what` it has ("a FLOP rule") and that rule, and nothing is
    registered."""

    def rule_for(*ops: Hashable) -> Callable[[Rule], Rule]:
        def register(rule: Rule) -> Rule:
            for index, op in enumerate(ops):
                taken = table.get(op, rule if op in ops[:index] else None)
                if taken is not None:
                    raise ValueError(
                        f"{op} has {what} already: {taken.__module__}.{taken.__qualname__}"
                    )
            table.update(dict.fromkeys(ops, rule))
            return rule

        return register

    return rule_for
