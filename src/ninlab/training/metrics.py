"""A run's metrics files: one row per completed epoch, as metrics.jsonl and metrics.csv."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from ninlab.outputs import json_text, write_text_atomically

__all__ = ["METRICS_FIELDS", "write_metrics"]

METRICS_FIELDS = (
    "epoch",
    "step",
    "lr",
    "train_loss",
    "train_accuracy",
    "test_loss",
    "test_accuracy",
    "train_seconds",
    "examples_per_s",
    "eval_seconds",
    "elapsed_seconds",
)


def write_metrics(output_dir: Path, history: list[dict[str, Any]]) -> None:
    """metrics.jsonl and metrics.csv, rewritten whole from the checkpoint's history each epoch, so a
    resumed run never duplicates or loses a row."""
    # Every text file of a run (config, metrics) is needed to follow or reproduce it: durable.
    rows = "".join(
        json_text(row, what=f"metrics.jsonl's epoch {row['epoch']}") + "\n" for row in history
    )
    write_text_atomically(output_dir / "metrics.jsonl", rows, durable=True)
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=METRICS_FIELDS)
    writer.writeheader()
    writer.writerows(history)
    write_text_atomically(output_dir / "metrics.csv", table.getvalue(), durable=True)
