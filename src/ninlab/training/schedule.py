"""Learning rate as a pure function of the step, so resuming needs no scheduler state; a run's
`Schedule` (its length in steps, and its rate at each)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ninlab.training.pipeline import batches_per_epoch
from ninlab.training.presets import TrainConfig

__all__ = [
    "ONECYCLE_END_DIVISOR",
    "ONECYCLE_START_DIVISOR",
    "ONECYCLE_WARMUP_FRACTION",
    "Schedule",
    "learning_rate",
]

# torch.optim.lr_scheduler.OneCycleLR's defaults: start at max_lr/25, end at start/1e4, rise
# for 30%.
ONECYCLE_START_DIVISOR = 25.0
ONECYCLE_END_DIVISOR = 25.0 * 1e4
ONECYCLE_WARMUP_FRACTION = 0.3


def learning_rate(
    step: int, *, peak_lr: float, total_steps: int, warmup_steps: int, kind: str
) -> float:
    """The rate for optimizer step `step` (0-based).

    constant: linear warm-up from 0, then `peak_lr`. cosine: linear warm-up from 0, then half a
    cosine down to 0 at `total_steps`. onecycle: exactly `OneCycleLR(max_lr=peak_lr,
    total_steps=..., pct_start=warmup/total)`'s learning rate (its momentum cycling aside): cosine
    rise from peak/25 over the warm-up (30% of the run when none is given), cosine fall to
    peak/250000 at the last step.
    """
    if kind == "onecycle":
        rise_steps = warmup_steps or ONECYCLE_WARMUP_FRACTION * total_steps
        # OneCycleLR's phase boundaries: the peak is reached at step rise - 1, the end at total - 1.
        peak_step = max(0.0, float(rise_steps) - 1)
        start, end = peak_lr / ONECYCLE_START_DIVISOR, peak_lr / ONECYCLE_END_DIVISOR
        if step <= peak_step and peak_step > 0:
            return _cosine_between(start, peak_lr, step / peak_step)
        fraction = min(1.0, (step - peak_step) / max(1.0, total_steps - 1 - peak_step))
        return _cosine_between(peak_lr, end, fraction)
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    if kind == "constant":
        return peak_lr
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return peak_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def _cosine_between(first: float, last: float, fraction: float) -> float:
    return last + (first - last) / 2.0 * (1.0 + math.cos(math.pi * fraction))


@dataclass(frozen=True)
class Schedule:
    """The run's length in steps and the learning rate of each step: a pure function of the step,
    so a resume needs no scheduler state."""

    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    peak_lr: float
    kind: str

    @classmethod
    def of(cls, config: TrainConfig, num_examples: int, world_size: int) -> Schedule:
        steps_per_epoch = batches_per_epoch(
            num_examples, batch_size=config.batch_size, world_size=world_size
        )
        return cls(
            steps_per_epoch=steps_per_epoch,
            total_steps=steps_per_epoch * config.epochs,
            warmup_steps=round(config.warmup_epochs * steps_per_epoch),
            peak_lr=config.lr,
            kind=config.schedule,
        )

    def lr(self, step: int) -> float:
        return learning_rate(
            step,
            peak_lr=self.peak_lr,
            total_steps=self.total_steps,
            warmup_steps=self.warmup_steps,
            kind=self.kind,
        )
