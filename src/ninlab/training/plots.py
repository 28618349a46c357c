"""The two pictures of a training run: learning curves (as d2l plots them) and a
confusion matrix."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ninlab.agg import matplotlib  # noqa: F401 - Agg, and $MPLBACKEND checked, before pyplot

# isort: split
import matplotlib.pyplot as plt

from ninlab.outputs import atomic_write

__all__ = ["plot_confusion", "plot_curves"]


def _save(figure: Any, path: Path) -> None:
    try:
        with atomic_write(path, durable=False) as out:
            # The format by the name's suffix, as savefig does when given a file name.
            figure.savefig(out, format=path.suffix.removeprefix(".") or None, dpi=120)
    finally:
        plt.close(figure)


def plot_curves(history: Sequence[dict[str, Any]], path: Path, *, epochs: int, title: str) -> None:
    """Train loss, train accuracy and test accuracy against epoch on one axis, like d2l's Animator;
    the x axis spans the whole run (`epochs`) so a run in progress shows how far it has come."""
    done = [row["epoch"] for row in history]
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.plot(done, [row["train_loss"] for row in history], "-o", label="train loss")
    axis.plot(done, [row["train_accuracy"] for row in history], "m--s", label="train acc")
    axis.plot(done, [row["test_accuracy"] for row in history], "g-.^", label="test acc")
    axis.set_xlabel("epoch")
    axis.set_ylabel("loss (cross-entropy) / accuracy (fraction)")
    axis.set_xlim(0.5, epochs + 0.5)
    axis.set_ylim(bottom=0)
    axis.grid(True, alpha=0.3)
    axis.legend()
    axis.set_title(title, fontsize=9)
    figure.tight_layout()
    _save(figure, path)


def plot_confusion(
    confusion: Sequence[Sequence[int]], class_names: Sequence[str], path: Path, *, title: str
) -> None:
    """Counts with true class down and predicted class across; the diagonal is the correct ones."""
    size = len(class_names)
    figure, axis = plt.subplots(figsize=(7.5, 6.5))
    image = axis.imshow(confusion, cmap="Blues")
    figure.colorbar(image, ax=axis, label="test images")
    peak = max(max(row) for row in confusion) or 1
    for i in range(size):
        for j in range(size):
            value = confusion[i][j]
            axis.text(
                j,
                i,
                str(value),
                ha="center",
                va="center",
                fontsize=7,
                color="white" if value > peak / 2 else "black",
            )
    axis.set_xticks(range(size), class_names, rotation=45, ha="right")
    axis.set_yticks(range(size), class_names)
    axis.set_xlabel("predicted class")
    axis.set_ylabel("true class")
    axis.set_title(title, fontsize=9)
    figure.tight_layout()
    _save(figure, path)
