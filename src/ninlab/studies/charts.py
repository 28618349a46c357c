"""The charts `ninlab plot` draws, as one table (`CHART_KINDS`: what each shows and the result it
is drawn from), and `chart_source`, the one question each kind asks the accountant.
`ninlab.viz.charts.chart_of_kind` draws a kind from that result."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from ninlab.analysis.memory_report import MemoryReport
from ninlab.analysis.predict import predict_memory
from ninlab.analysis.step import Mode, StepSpec
from ninlab.analysis.summary import Summary, default_mode, summarize
from ninlab.errors import NinlabError
from ninlab.studies.memory import BatchStudy, study_batch

__all__ = ["CHART_KINDS", "ChartKind", "ChartSetting", "ChartSource", "chart_source"]

# What a chart is drawn from: the summary (of the step's mode, or an inference where nothing
# trains), the memory of the step as given, or the batch study of the step as given.
ChartSource = Literal["summary", "memory", "batch study"]
# What a kind reads beyond the model, its inputs, dtype and mode: "step", the rest of the step
# (optimizer, autocast, device, grad mode, DDP, memory format, a step function); "budget";
# "layer", the layer a picture is of. A setting a kind does not read is refused, not ignored.
ChartSetting = Literal["step", "budget", "layer"]


@dataclass(frozen=True)
class ChartKind:
    description: str
    source: ChartSource
    reads: tuple[ChartSetting, ...] = ()
    modes: tuple[Mode, ...] = ("train", "infer")  # the steps it can draw


CHART_KINDS: dict[str, ChartKind] = {
    "geometry": ChartKind(
        "one layer's input grid: the windows of the last output row and column, and the pixels "
        "never read",
        "summary",
        reads=("layer",),
    ),
    "receptive-field": ChartKind(
        "receptive field and jump of every conv and pooling layer", "summary"
    ),
    "flops": ChartKind("FLOPs per layer, forward and (for a training step) backward", "summary"),
    "timeline": ChartKind(
        "memory alive after each op of a training step (or --mode infer), by category, peak marked",
        "memory",
        reads=("step",),
    ),
    "saved": ChartKind(
        "bytes each layer keeps for backward, by reason",
        "memory",
        reads=("step",),
        modes=("train",),
    ),
    "batch": ChartKind(
        "peak memory of a training step (or --mode infer) against batch size, a budget line and "
        "the largest batch that fits",
        "batch study",
        reads=("step", "budget"),
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
    """The result chart `kind` is drawn from, for `model` and the step `spec` describes, in the
    step's mode; a kind that cannot draw that mode (`ChartKind.modes`) is refused."""
    chart = CHART_KINDS[kind]
    if spec.mode not in chart.modes:
        raise NinlabError(  # only two modes: a kind that cannot draw one draws training steps
            f"chart {kind!r} is of a training step only ({chart.description}); use mode 'train' "
            "(--mode train), or chart 'timeline' for an inference's memory"
        )
    if chart.source == "summary":
        # Where nothing trains there is only an inference to summarize.
        mode = "infer" if default_mode(model) == "infer" else spec.mode
        return summarize(
            model, spec.replace(mode=mode), batch_size=batch_size, model_name=model_name
        )
    if chart.source == "batch study":
        return study_batch(model, spec, budget=budget)
    return predict_memory(model, spec, batch_size=batch_size, model_name=model_name)
