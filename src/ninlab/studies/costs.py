"""What one model costs at one batch, each step traced once: its summary, and the memory of its
training step and of its inference (`ninlab summary`, the HTML report, the benchmarks' "whole
analysis"). The three public questions asked one after the other trace the forward twice and the
training step twice; asked here, the recordings are shared (`trace.sharing_recordings`) and the
answers are the same, figure for figure."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from ninlab.analysis.lazy import is_lazy_model
from ninlab.analysis.memory_report import MemoryReport
from ninlab.analysis.predict import predict_memory
from ninlab.analysis.step import StepSpec, batch_size_of, step_spec
from ninlab.analysis.summary import Summary, default_mode, summarize
from ninlab.analysis.trace import record_step, sharing_recordings

__all__ = ["ModelCosts", "study_costs"]


@dataclass(frozen=True)
class ModelCosts:
    summary: Summary
    train: MemoryReport | None  # None where not asked for
    infer: MemoryReport | None


def study_costs(
    model: nn.Module,
    spec: StepSpec | None = None,
    *,
    batch_size: int | None = None,
    model_name: str | None = None,
    memory: Sequence[Literal["train", "infer"]] = ("train", "infer"),
    **fields: Any,
) -> ModelCosts:
    """`summarize(model, spec)`, and `predict_memory` of the training step `spec` describes and
    of its inference (`memory` names which), as those calls give them, errors included.

    The training step is traced first, so that the summary reads its forward and backward from
    it (where its first step ran what its recorded one did); the summary's forward is the
    inference's recording. A step that fails to trace fails again, in its own words, where it
    is asked for after the summary, which speaks first."""
    if spec is None and fields.get("mode") is None:
        fields["mode"] = default_mode(model)  # as `summarize` takes it
    spec = step_spec(spec, model=model, **fields)
    batch_size = batch_size_of(spec, batch_size)
    name = model_name or type(model).__name__
    train_spec = spec.replace(mode="train")
    with sharing_recordings():
        # A lazy model is traced as a copy made for each call: nothing to share.
        if "train" in memory and not is_lazy_model(model):
            with contextlib.suppress(Exception):
                record_step(model, train_spec, batch_size)
        return ModelCosts(
            summary=summarize(model, spec, batch_size=batch_size, model_name=name),
            train=predict_memory(model, train_spec, batch_size=batch_size, model_name=name)
            if "train" in memory
            else None,
            infer=predict_memory(model, spec.inference(), batch_size=batch_size, model_name=name)
            if "infer" in memory
            else None,
        )
