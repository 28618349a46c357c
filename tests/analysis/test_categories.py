"""ninlab.analysis.categories: one table describes every category (name, meaning, colour), in the
order `Breakdown` counts them. (Why each saved tensor is kept is checked on NiN's real step, in
test_predict.py.)"""

from __future__ import annotations

import re

import pytest
from matplotlib.colors import is_color_like

from ninlab.analysis.categories import (
    CATEGORIES,
    CATEGORY_COLORS,
    CATEGORY_MEANINGS,
    CATEGORY_TABLE,
)
from ninlab.analysis.memory_report import Breakdown


def test_every_category_has_a_meaning_and_its_own_colour() -> None:
    assert len(set(CATEGORIES)) == len(CATEGORY_TABLE) == 13
    for category in CATEGORY_TABLE:
        assert category.meaning.strip(), category.name
        assert re.fullmatch(r"#[0-9A-F]{6}", category.color) and is_color_like(category.color)
    assert len(set(CATEGORY_COLORS.values())) == len(CATEGORIES)
    assert tuple(CATEGORY_MEANINGS) == tuple(CATEGORY_COLORS) == CATEGORIES


def test_breakdown_has_a_field_per_category_in_order() -> None:
    assert [f"{name}_bytes" for name in CATEGORIES] == list(Breakdown.__dataclass_fields__)


def test_breakdown_from_counts_fills_each_category_by_name() -> None:
    counts = [1 << index for index in range(len(CATEGORIES))]
    breakdown = Breakdown.from_counts(counts)
    assert [breakdown.of(name) for name in CATEGORIES] == counts
    assert breakdown.counts() == tuple(counts)
    assert breakdown.total_bytes == (1 << len(CATEGORIES)) - 1
    with pytest.raises(ValueError):
        Breakdown.from_counts(counts[:-1])
