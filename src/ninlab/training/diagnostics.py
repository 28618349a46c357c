"""What a run says about itself beyond its metrics: how fast it goes and how long it has left (with
the CPU preset's advice when that is long), and why an epoch sat at chance level."""

from __future__ import annotations

import math
import time

from ninlab.models import parse_variant
from ninlab.training.data import CLASS_NAMES
from ninlab.training.evaluate import Evaluation
from ninlab.training.presets import PRESETS, TrainConfig
from ninlab.training.progress import Reporter, format_duration

__all__ = ["StepClock", "chance_warning", "report_throughput", "sat_at_chance"]

# Throughput is timed over a few steps once the first ones (oneDNN/cuDNN set-up) are out of the way.
_SETTLE_STEPS = 5
_TIMED_STEPS = 5
# Beyond this, a CPU run is told about the CPU preset.
_LONG_CPU_RUN_S = 30 * 60
# Mean |logit| below which a network at chance is said to have lost its signal (d2l's NiN after an
# epoch at 96x96, lr 0.05: 0.012).
_FADED_LOGIT = 0.05


# -- speed -----------------------------------------------------------------------------------------


class StepClock:
    """Wall-clock time of this process's steps: each step's, the epoch's examples per second so
    far, and the median of a few steps once the first ones are out of the way."""

    def __init__(self) -> None:
        self._steps = 0  # by this process: a resumed run times its own first steps too
        self._timed: list[float] = []

    def start_epoch(self) -> None:
        self._epoch_start = time.perf_counter()
        self._epoch_examples = 0

    def start_step(self) -> None:
        self._step_start = time.perf_counter()

    def end_step(self, global_count: int) -> float:
        """The step's seconds."""
        self._now = time.perf_counter()
        seconds = self._now - self._step_start
        if _SETTLE_STEPS <= self._steps < _SETTLE_STEPS + _TIMED_STEPS:
            self._timed.append(seconds)
        self._steps += 1
        self._epoch_examples += global_count
        return seconds

    def epoch_examples_per_s(self) -> float:
        return self._epoch_examples / (self._now - self._epoch_start)

    def just_settled(self) -> float | None:
        """The median seconds per step, on the step that ends the timed ones; None on all others."""
        if self._steps != _SETTLE_STEPS + _TIMED_STEPS:
            return None
        return sorted(self._timed)[len(self._timed) // 2]


def report_throughput(
    say: Reporter,
    config: TrainConfig,
    seconds_per_step: float,
    *,
    steps_left: int,
    epochs_left: int,
    test_examples: int,
    device_type: str,
) -> None:
    """The measured speed and the time to go (the steps left, and the test-set evaluations of the
    epochs left); on a CPU, when that is long, the advice to use the CPU preset."""
    examples_per_s = config.batch_size / seconds_per_step
    remaining_train_s = steps_left * seconds_per_step
    # Evaluation is a forward pass alone: about a third of a training step's arithmetic per image.
    remaining_eval_s = epochs_left * test_examples / (3 * examples_per_s)
    remaining_s = remaining_train_s + remaining_eval_s
    say.info(
        f"measured: {examples_per_s:,.0f} examples/s ({seconds_per_step * 1000:,.0f} ms per step "
        f"of {config.batch_size}); about {format_duration(remaining_s)} to go"
    )
    cpu = PRESETS["cpu"]
    if (
        device_type == "cpu"
        and remaining_s > _LONG_CPU_RUN_S
        and config.image_size > cpu.image_size
    ):
        say.warn(
            f"on this CPU the whole run takes about {format_duration(remaining_s)}. The CPU preset "
            f"(--preset cpu: {cpu.variant} at {cpu.image_size}x{cpu.image_size}, bf16, "
            f"{cpu.epochs} epochs) reaches >= 88% test accuracy in under 10 minutes on 2 cores."
        )


# -- learning --------------------------------------------------------------------------------------


def sat_at_chance(train_accuracy: float, test_accuracy: float) -> bool:
    """Both accuracies near one in ten: the epoch learnt nothing."""
    return train_accuracy < 1.5 / len(CLASS_NAMES) and test_accuracy < 1.5 / len(CLASS_NAMES)


def chance_warning(
    epoch: int, train_accuracy: float, evaluation: Evaluation, loss: float, config: TrainConfig
) -> str:
    """Why an epoch sat at chance, from what the test set shows (dead final ReLUs or a faded
    signal), and what to change, given the run's own `config` (never the recipe it already
    uses)."""
    text = (
        f"epoch {epoch} sat at chance level: train accuracy {train_accuracy:.3f}, test accuracy "
        f"{evaluation.accuracy:.3f} (chance is {1 / len(CLASS_NAMES):.3f}), train loss {loss:.3f} "
        f"(ln 10 = {math.log(10):.3f})."
    )
    init = parse_variant(config.variant).init
    if evaluation.zero_logit_examples:
        text += (
            f" {evaluation.zero_logit_examples} of {evaluation.examples} test images give all-zero "
            "logits: the ReLU that ends NiN's last block is dead for them, so their loss is ln 10 "
            "and their gradient zero; once it is dead for every image the run cannot recover."
        )
    elif evaluation.mean_abs_logit < _FADED_LOGIT:
        text += (
            f" The logits are tiny (mean |logit| {evaluation.mean_abs_logit:.4f}): the signal "
            "reaching the last layer has faded, so the gradients are tiny too and the run may take "
            "epochs to leave this plateau, or never does."
        )
        if init == "xavier":
            text += (
                " That is d2l's recipe on some seeds: its Xavier-uniform init alone shrinks the "
                "signal 8x in the first 11x11 conv (fan-out 96 x 121)."
            )
    default = PRESETS["default"]
    if init != parse_variant(default.variant).init or config.normalize != default.normalize:
        return text + (
            " Restart with another --seed, or use --preset default (Kaiming init, normalised "
            "input), which learns on every seed tried."
        )
    # The run has the default preset's init and input already: its step size is what is left.
    return text + (
        f" Restart with another --seed, or a lower --lr (this run's is {config.lr:g})"
        + (", or add --warmup-epochs 1" if config.warmup_epochs == 0 else "")
        + "."
    )
