"""ninlab.analysis.rule_registry: a rule table refuses a second rule for an op, whole."""

from __future__ import annotations

import pytest

from ninlab.analysis.rule_registry import rule_decorator


def first(x: int) -> int:
    return x


def second(x: int) -> int:
    return -x


def test_a_rule_is_registered_for_every_op_it_names() -> None:
    table: dict[str, object] = {}
    assert rule_decorator(table, "a rule")("aten.a", "aten.b")(first) is first
    assert table == {"aten.a": first, "aten.b": first}


def test_an_op_with_a_rule_is_refused_and_nothing_is_registered() -> None:
    table: dict[str, object] = {}
    rule = rule_decorator(table, "a test rule")
    rule("aten.a")(first)
    name = f"{__name__}.first"
    with pytest.raises(ValueError, match=rf"^aten\.a has a test rule already: {name}$"):
        rule("aten.c", "aten.a")(second)
    assert table == {"aten.a": first}  # aten.c, named before the refused op, is not in
    with pytest.raises(ValueError, match=r"^aten\.d has a test rule already: .*second$"):
        rule("aten.d", "aten.d")(second)
    assert table == {"aten.a": first}
