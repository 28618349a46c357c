"""Verification a user can ask for: "can I trust the prediction on my model?"

`predict_memory(..., verify=True)` predicts the step at a small batch as well (`verify_batch_size`)
and hands that prediction here: `verification` runs the same step for real at that batch on this
machine (`ninlab.analysis.measure`, which shares no counting code with the predictor) and sets
the two side by side, at both levels: the live peak must be equal, the allocator's within
`ALLOCATOR_TOLERANCE` (or above a prediction that is a lower bound). The answer, a
`Verification`, says "verified" or by how much and at which op each level is off
(`ninlab summary --verify`). A small batch keeps it to seconds on small models; the input is the
one the step describes. This module predicts nothing itself, so the predictor can call it.
"""

from __future__ import annotations

from torch import nn

from ninlab.analysis.measure import measure
from ninlab.analysis.memory_report import MemoryReport, Verification
from ninlab.analysis.step import valid_batch_size
from ninlab.errors import NinlabError

__all__ = ["VERIFY_BATCH_SIZE", "verification", "verify_batch_size"]

# The batch a verification runs at (or the one asked for, when smaller): large enough that a
# per-sample term shows, small enough to run in seconds.
VERIFY_BATCH_SIZE = 2


def verify_batch_size(batch_size: int) -> int:
    """The batch a prediction at `batch_size` is verified at."""
    return min(valid_batch_size(batch_size), VERIFY_BATCH_SIZE)


def verification(model: nn.Module, predicted: MemoryReport) -> Verification:
    """Run the step of `predicted` for real at its batch and compare both peaks with it."""
    if any(tensor.is_meta for tensor in (*model.parameters(), *model.buffers())):
        raise NinlabError(
            "verifying runs the step for real, and the model's weights are on the meta device "
            "(no data); build it with its weights to verify, or predict without verify"
        )
    measured = measure(model, predicted.spec, batch_size=predicted.batch_size)
    live_place = allocator_place = "a measured step (no per-op prediction)"
    if predicted.peak is not None:
        live_place = _place(predicted.peak.op, predicted.peak.phase)
    if predicted.allocator is not None:
        allocator_place = _place(predicted.allocator.op, predicted.allocator.phase)
    return Verification(
        batch_size=predicted.batch_size,
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


def _place(op: str, phase: str) -> str:
    """An op as the predictor ("aten.relu.default") or the profiler ("aten::relu") names it, and
    its phase, in the same words."""
    name = op.removeprefix("aten.").removeprefix("aten::").removesuffix(".default")
    return f"{name} in {phase}" if phase else name or "an op the profiler did not name"
