"""Verification a user can ask for: "can I trust the prediction on my model?"

`verify` runs the same step for real at a small batch on this machine (`ninlab.analysis.measure`,
which shares no counting code with the predictor) and sets it beside the prediction at that
batch, at both levels: the live peak must be equal, the allocator's within
`ALLOCATOR_TOLERANCE` (or above a prediction that is a lower bound). The answer, a
`Verification`, says "verified" or by how much and at which op each level is off; `verified`
hands a report back with it (`ninlab summary --verify`). A small batch
keeps it to seconds on small models; the input is the one the step describes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from ninlab.analysis.measure import measure
from ninlab.analysis.memory_report import MemoryReport, Verification
from ninlab.analysis.predict import predict_memory
from ninlab.analysis.step import StepSpec, step_spec, valid_batch_size, valid_model

__all__ = ["VERIFY_BATCH_SIZE", "verified", "verify"]

# The batch a verification runs at (or the one asked for, when smaller): large enough that a
# per-sample term shows, small enough to run in seconds.
VERIFY_BATCH_SIZE = 2


def verify(
    model: nn.Module, spec: StepSpec | None = None, *, batch_size: int, **fields: Any
) -> Verification:
    """Run the step `spec` describes for real at `batch_size` or `VERIFY_BATCH_SIZE`, whichever is
    smaller, and compare both peaks with the prediction at that batch."""
    spec = step_spec(spec, model=valid_model(model), **fields)
    small = min(valid_batch_size(batch_size), VERIFY_BATCH_SIZE)
    predicted = predict_memory(model, spec, batch_size=small)
    measured = measure(model, spec, batch_size=small)
    live_place = allocator_place = "a measured step (no per-op prediction)"
    if predicted.peak is not None:
        live_place = _place(predicted.peak.op, predicted.peak.phase)
    if predicted.allocator is not None:
        allocator_place = _place(predicted.allocator.op, predicted.allocator.phase)
    return Verification(
        batch_size=small,
        predicted_live_bytes=predicted.live_peak_bytes,
        measured_live_bytes=measured.live_peak_bytes,
        predicted_allocator_bytes=predicted.allocator_peak_bytes,
        measured_allocator_bytes=measured.allocator_peak_bytes,
        allocator_lower_bound=predicted.allocator_trust.kind == "at least",
        predicted_live_place=live_place,
        measured_live_place=_place(measured.live_peak_op, measured.live_peak_phase),
        predicted_allocator_place=allocator_place,
        measured_allocator_place=_place(measured.allocator_peak_op, measured.allocator_peak_phase),
    )


def verified(model: nn.Module, report: MemoryReport) -> MemoryReport:
    """`report` with its `verification`: its step run for real at a small batch (`verify`)."""
    check = verify(model, report.spec, batch_size=report.batch_size)
    return dataclasses.replace(report, verification=check)


def _place(op: str, phase: str) -> str:
    """An op as the predictor ("aten.relu.default") or the profiler ("aten::relu") names it, and
    its phase, in the same words."""
    name = op.removeprefix("aten.").removeprefix("aten::").removesuffix(".default")
    return f"{name} in {phase}" if phase else name or "an op the profiler did not name"
