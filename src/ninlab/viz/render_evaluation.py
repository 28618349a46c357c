"""An `Evaluation` of a checkpoint (`ninlab.training.evaluate`) as a terminal table or JSON:
`ninlab evaluate`'s output. Nothing here computes a number."""

from __future__ import annotations

import dataclasses
import os

from rich.console import Console

from ninlab.outputs import json_text
from ninlab.training.evaluate import Evaluation, TrainedModel
from ninlab.viz.table import TextTable, rich_table

__all__ = ["evaluation_json", "evaluation_table", "print_evaluation"]


def evaluation_table(evaluation: Evaluation) -> TextTable:
    """Test images and accuracy per class, then all of them (the last row)."""
    rows = [
        (row.name, f"{row.examples:,}", "-" if row.accuracy is None else f"{row.accuracy:.4f}")
        for row in evaluation.per_class
    ]
    rows.append(("all", f"{evaluation.examples:,}", f"{evaluation.accuracy:.4f}"))
    return TextTable(
        ("class", "test images", "accuracy"), frozenset({"test images", "accuracy"}), tuple(rows)
    )


def print_evaluation(
    trained: TrainedModel,
    evaluation: Evaluation,
    *,
    checkpoint: str | os.PathLike[str],
    confusion_png: str | os.PathLike[str],
    console: Console | None = None,
) -> None:
    console = console or Console()
    title = f"{checkpoint} (epoch {trained.epoch}, {trained.config.variant})"
    table = rich_table(evaluation_table(evaluation), title=title, title_justify="center")
    table.rows[-1].style = "bold"  # all the classes together
    console.print(table)
    console.print(f"confusion matrix: {confusion_png}", highlight=False)


def evaluation_json(
    trained: TrainedModel,
    evaluation: Evaluation,
    *,
    checkpoint: str | os.PathLike[str],
    confusion_png: str | os.PathLike[str],
) -> str:
    return json_text(
        {
            "checkpoint": str(checkpoint),
            "epoch": trained.epoch,
            "variant": trained.config.variant,
            "examples": evaluation.examples,
            "accuracy": evaluation.accuracy,
            "loss": evaluation.loss,
            "per_class": [dataclasses.asdict(row) for row in evaluation.per_class],
            "confusion": evaluation.confusion,
            "confusion_png": str(confusion_png),
        },
        indent=2,
        what="the evaluation",
    )
