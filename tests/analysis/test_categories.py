"""ninlab.analysis.categories: every category is described, in the order `Breakdown` counts them.
(Why each saved tensor is kept is checked on NiN's real step, in test_predict.py.)"""

from __future__ import annotations

from ninlab.analysis.categories import CATEGORIES, describe_categories
from ninlab.analysis.memory_report import Breakdown


def test_categories_are_described() -> None:
    described = dict(describe_categories())
    assert tuple(described) == CATEGORIES
    assert [f"{name}_bytes" for name in CATEGORIES] == list(Breakdown.__dataclass_fields__)
    assert all(described.values())
