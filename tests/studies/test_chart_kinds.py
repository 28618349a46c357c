"""ninlab.studies.charts: every chart kind of `ninlab plot` has its source and its drawing, and
each is drawn from the result its table row names."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ninlab.analysis.memory_report import MemoryReport
from ninlab.analysis.step import StepSpec
from ninlab.analysis.summary import Summary
from ninlab.studies.charts import CHART_KINDS, chart_source
from ninlab.studies.memory import BatchStudy
from ninlab.viz.charts import CHART_BUILDERS, chart_of_kind

SOURCE_TYPES = {
    "summary": Summary,
    "memory": MemoryReport,
    "training memory": MemoryReport,
    "batch study": BatchStudy,
}


def test_every_kind_is_drawn_and_nothing_else() -> None:
    assert set(CHART_BUILDERS) == set(CHART_KINDS)
    assert {kind.source for kind in CHART_KINDS.values()} == set(SOURCE_TYPES)


@pytest.mark.parametrize("kind", CHART_KINDS)
def test_each_kind_is_drawn_from_its_source(kind: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 3 * 3, 10)
    )
    spec = StepSpec(input_size=(1, 8, 8), mode="infer")
    source = chart_source(kind, model, spec, batch_size=2, budget="1MiB", model_name="tiny")
    assert isinstance(source, SOURCE_TYPES[CHART_KINDS[kind].source])
    if isinstance(source, MemoryReport):  # the step as given, or its training step
        expected = "train" if CHART_KINDS[kind].source == "training memory" else "infer"
        assert source.spec.mode == expected and source.model == "tiny"
    chart = chart_of_kind(kind, source, layer=None, model="tiny")
    assert chart.model == "tiny"
