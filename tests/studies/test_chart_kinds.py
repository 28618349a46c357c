"""ninlab.studies.charts: every chart kind of `ninlab plot` has its source and its drawing, and
each is drawn from the result its table row names."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ninlab.analysis.memory_report import MemoryReport
from ninlab.analysis.step import StepSpec
from ninlab.analysis.summary import Summary
from ninlab.errors import NinlabError
from ninlab.studies.charts import CHART_KINDS, chart_source
from ninlab.studies.memory import BatchStudy
from ninlab.viz.charts import (
    CHART_BUILDERS,
    BatchChart,
    FlopsChart,
    TimelineChart,
    chart_of_kind,
)

SOURCE_TYPES = {
    "summary": Summary,
    "memory": MemoryReport,
    "batch study": BatchStudy,
}


def test_every_kind_is_drawn_and_nothing_else() -> None:
    assert set(CHART_BUILDERS) == set(CHART_KINDS)
    assert {kind.source for kind in CHART_KINDS.values()} == set(SOURCE_TYPES)


@pytest.mark.parametrize("mode", ["train", "infer"])
@pytest.mark.parametrize("kind", CHART_KINDS)
def test_each_kind_is_drawn_from_its_source_in_the_mode_asked(kind: str, mode: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 3 * 3, 10)
    )
    spec = StepSpec(input_size=(1, 8, 8), mode=mode)
    if mode not in CHART_KINDS[kind].modes:  # refused in one line, never drawn in another mode
        with pytest.raises(NinlabError, match=f"chart '{kind}' is of a training step only"):
            chart_source(kind, model, spec, batch_size=2, budget="1MiB", model_name="tiny")
        return
    source = chart_source(kind, model, spec, batch_size=2, budget="1MiB", model_name="tiny")
    assert isinstance(source, SOURCE_TYPES[CHART_KINDS[kind].source])
    if isinstance(source, MemoryReport):
        assert source.spec.mode == mode and source.model == "tiny"
    if isinstance(source, BatchStudy):
        assert source.mode == mode
    chart = chart_of_kind(kind, source, layer=None, model="tiny")
    assert chart.model == "tiny"
    if isinstance(chart, FlopsChart | BatchChart | TimelineChart):
        assert chart.mode == mode
    if isinstance(chart, FlopsChart):  # an inference has no backward FLOPs to draw
        assert (chart.total_backward_flops > 0) == (mode == "train")
        assert chart.total_forward_flops == 2 * 2 * (
            4 * 9 * 36 + 36 * 10
        )  # convs' and linear's MACs


def test_only_saved_is_of_a_training_step_alone() -> None:
    assert {kind for kind, chart in CHART_KINDS.items() if chart.modes != ("train", "infer")} == {
        "saved"
    }
