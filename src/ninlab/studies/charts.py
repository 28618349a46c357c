"""The charts `ninlab plot` draws, as one table (`CHART_KINDS`: what each shows and the result it
is drawn from), and `chart_source`, the one question each kind asks the accountant.
`ninlab.viz.charts.chart_of_kind` draws a kind from that result."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from ninlab.analysis.memory_report import MemoryReport
from ninlab.analysis.predict import predict_memory
from ninlab.analysis.step import StepSpec
from ninlab.analysis.summary import Summary, default_mode, summarize
from ninlab.studies.memory import BatchStudy, study_batch

__all__ = ["CHART_KINDS", "ChartKind", "ChartSource", "chart_source"]

# What a chart is drawn from: the summary (of the model's own step, whatever the step options'
# mode), the memory of the step as given, the memory of its training step, or the batch study.
ChartSource = Literal["summary", "memory", "training memory", "batch study"]


@dataclass(frozen=True)
class ChartKind:
    description: str
    source: ChartSource


CHART_KINDS: dict[str, ChartKind] = {
    "geometry": ChartKind(
        "one layer's input grid: the windows of the last output row and column, and the pixels "
        "never read",
        "summary",
    ),
    "receptive-field": ChartKind(
        "receptive field and jump of every conv and pooling layer", "summary"
    ),
    "flops": ChartKind("forward and backward FLOPs per layer", "summary"),
    "timeline": ChartKind(
        "memory alive after each op of a training step (or --mode infer), by category, peak marked",
        "memory",
    ),
    "saved": ChartKind("bytes each layer keeps for backward, by reason", "training memory"),
    "batch": ChartKind(
        "training peak memory against batch size, a budget line and the largest batch that fits",
        "batch study",
    ),
}


def chart_source(
    kind: str,
    model: nn.Module,
    spec: StepSpec,
    *,
    batch_size: int,
    budget: int | str,
    model_name: str,
) -> Summary | MemoryReport | BatchStudy:
    """The result chart `kind` is drawn from, for `model` and the step `spec` describes."""
    source = CHART_KINDS[kind].source
    if source == "summary":
        # The summary's own step whatever --mode says: backward FLOPs wherever a parameter trains.
        spec = spec.replace(mode="train") if default_mode(model) == "train" else spec.inference()
        return summarize(model, spec, batch_size=batch_size, model_name=model_name)
    if source == "batch study":
        return study_batch(model, spec.replace(mode="train"), budget=budget)
    if source == "training memory":
        spec = spec.replace(mode="train")
    return predict_memory(model, spec, batch_size=batch_size, model_name=model_name)
