import random

import pytest
import torch
from torch import nn

import ninlab.analysis.trace as trace_module
from ninlab.analysis.predict import predict_memory
from ninlab.analysis.summary import summarize
from ninlab.errors import NinlabError
from ninlab.models import build_nin
from ninlab.studies.costs import study_costs
from ninlab.viz.render import summary_json
from ninlab.viz.render_memory import memory_json


@pytest.fixture
def traces(monkeypatch):
    """How many steps are really recorded (not handed back by `sharing_recordings`)."""
    made = []
    record = trace_module._record_step
    monkeypatch.setattr(
        trace_module,
        "_record_step",
        lambda *args, **kwargs: made.append(args[1].mode) or record(*args, **kwargs),
    )
    return made


class _GrowsAHistory(nn.Module):
    """Each call appends a row to a tensor attribute: no two steps run the same shapes."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(16, 4)
        self.history = torch.zeros(0, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x)
        self.history = torch.cat([self.history, out.mean(0, keepdim=True).detach()])
        return out + self.history.mean(0)


class _DrawsADropout(nn.Module):
    """Drops out with a rate drawn from Python's random numbers at each call."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.dropout(self.linear(x), random.random(), self.training)


@pytest.mark.parametrize(
    ("build", "input_size", "recorded"),
    [
        # The training step, then the summary's forward (the inference's too): 2, not 5.
        (build_nin, (1, 224, 224), ["train", "infer"]),
        # Not steady: the summary records its own first forward and backward.
        (_GrowsAHistory, (16,), ["train", "infer", "train"]),
        (_DrawsADropout, (16,), ["train", "infer"]),
    ],
)
def test_the_costs_are_the_three_answers_each_step_traced_once(build, input_size, recorded, traces):
    random.seed(0)
    separate = [
        summary_json(summarize(build(), input_size=input_size, batch_size=2)),
        memory_json(predict_memory(build(), input_size=input_size, batch_size=2)),
        memory_json(predict_memory(build(), input_size=input_size, batch_size=2, mode="infer")),
    ]
    traces.clear()
    costs = study_costs(build(), input_size=input_size, batch_size=2)
    assert traces == recorded
    assert [summary_json(costs.summary), memory_json(costs.train), memory_json(costs.infer)] == (
        separate
    )


def test_a_random_draw_is_noted_in_an_inference_read_from_the_summarys_forward():
    costs = study_costs(_DrawsADropout(), input_size=(16,), batch_size=2, memory=("infer",))
    assert costs.train is None
    assert any("random numbers" in note for note in costs.infer.notes)


def test_the_summary_speaks_first_where_the_input_is_too_small():
    with pytest.raises(NinlabError, match=r"^input 1x60x60 is too small: layer 5 \(MaxPool2d\)"):
        study_costs(build_nin(), input_size=(1, 60, 60), batch_size=2)
