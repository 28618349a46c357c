"""Measurements (`ninlab.analysis.measure`) beside the predictions of the same steps, as plain
text or JSON: `ninlab measure`'s output. Nothing here computes a number but the ratios."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ninlab.analysis.measure import Measurement
from ninlab.analysis.memory_report import MemoryReport
from ninlab.outputs import json_text
from ninlab.units import dtype_name
from ninlab.viz.table import TextTable

__all__ = ["measurement_json", "measurement_table", "measurement_text"]

# The columns of `measurement_table` in plain text: each one's width, left- or right-aligned.
_WIDTHS = (24, 10, 15, 15, 9, 0)


def _predicted(prediction: MemoryReport) -> dict[str, int]:
    return {"live": prediction.live_peak_bytes, "allocator": prediction.allocator_peak_bytes}


def measurement_table(
    results: Sequence[Measurement], predictions: Sequence[MemoryReport]
) -> TextTable:
    """Each step's measured peak at both levels beside the prediction, and where it was measured."""
    rows = []
    for result, prediction in zip(results, predictions):
        allocator_at = (
            f"{result.allocator_peak_op} ({result.allocator_peak_phase})"
            if result.allocator_peak_op
            else result.allocator_method
        )
        levels = (
            ("live", result.live_peak_bytes, f"{result.live_peak_op} ({result.live_peak_phase})"),
            ("allocator", result.allocator_peak_bytes, allocator_at),
        )
        predicted = _predicted(prediction)
        for level, nbytes, where in levels:
            ratio = predicted[level] / nbytes if nbytes else float("nan")
            rows.append(
                (
                    result.spec.title,
                    level,
                    f"{nbytes:,}",
                    f"{predicted[level]:,}",
                    f"{ratio:.4f}",
                    where,
                )
            )
    columns = (
        "step",
        "level",
        "measured_bytes",
        "predicted_bytes",
        "pred/meas",
        "measured peak at",
    )
    return TextTable(columns, frozenset(columns[2:5]), tuple(rows))


def _fixed_width(table: TextTable, row: Sequence[str]) -> str:
    cells = []
    for text, width, numeric in zip(row, _WIDTHS, table.is_numeric()):
        cells.append(f"{text:>{width}}" if numeric else f"{text:<{width}}")
    return " ".join(cells[:-1]) + "  " + cells[-1]


def measurement_text(
    model_name: str, results: Sequence[Measurement], predictions: Sequence[MemoryReport]
) -> str:
    """The setup, the table in fixed-width columns, what the levels mean, the predictions' notes
    and each step's baseline."""
    first = results[0]
    amp = first.spec.autocast_dtype
    precision = dtype_name(first.spec.dtype) + (f" + {dtype_name(amp)} autocast" if amp else "")
    size = " and ".join("x".join(map(str, size)) for size in first.spec.input_sizes)
    table = measurement_table(results, predictions)
    setup = (
        f"{model_name}, input {size}, batch {first.batch_size}, "
        f"{precision}, {first.device}, {first.num_threads} threads; second step measured"
    )
    lines = [
        setup,
        _fixed_width(table, table.columns),
        *(_fixed_width(table, row) for row in table.rows),
        "live: tensor storage, each storage once; allocator: every block the allocator handed out.",
    ]
    lines += [f"note: {note}" for prediction in predictions for note in prediction.notes]
    for result in results:
        base = result.baseline
        lines.append(
            f"{result.spec.title} baseline {base.total_bytes:,} bytes: "
            f"parameters {base.parameters_bytes:,}, buffers {base.buffers_bytes:,}, "
            f"gradients {base.gradients_bytes:,}, optimizer state {base.optimizer_state_bytes:,}, "
            f"input {base.input_bytes:,}, targets {base.targets_bytes:,}"
        )
    return "\n".join(lines) + "\n"


def _as_dict(result: Measurement, prediction: MemoryReport) -> dict[str, Any]:
    predicted = _predicted(prediction)
    return {
        "step": result.spec.mode,
        **result.spec.as_dict(),
        "batch_size": result.batch_size,
        "device": result.device,
        "num_threads": result.num_threads,
        "baseline_bytes": {**result.baseline.__dict__, "total_bytes": result.baseline.total_bytes},
        "live_peak_bytes": result.live_peak_bytes,
        "live_peak_at": {"op": result.live_peak_op, "phase": result.live_peak_phase},
        "allocator_peak_bytes": result.allocator_peak_bytes,
        "allocator_peak_at": {"op": result.allocator_peak_op, "phase": result.allocator_peak_phase},
        "allocator_method": result.allocator_method,
        "predicted_bytes": predicted,
        "predicted_over_measured": {
            level: nbytes / result.peaks()[level] for level, nbytes in predicted.items()
        },
    }


def measurement_json(results: Sequence[Measurement], predictions: Sequence[MemoryReport]) -> str:
    """Every number of each measurement and its prediction, exact."""
    pairs = zip(results, predictions)
    return json_text([_as_dict(result, prediction) for result, prediction in pairs], indent=2)
