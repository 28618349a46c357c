"""What a run says about itself: its measured speed and time to go, and why an epoch sat
at chance."""

import dataclasses
import math

from ninlab.training.diagnostics import (
    StepClock,
    chance_warning,
    report_throughput,
    sat_at_chance,
)
from ninlab.training.evaluate import Evaluation
from ninlab.training.presets import PRESETS, TrainConfig
from ninlab.training.progress import SilentReporter


class _Said(SilentReporter):
    def __init__(self) -> None:
        self.infos: list[str] = []
        self.warnings: list[str] = []

    def info(self, message: str) -> None:
        self.infos.append(message)

    def warn(self, message: str) -> None:
        self.warnings.append(message)


def test_the_clock_gives_the_median_of_the_timed_steps_once_on_the_step_that_ends_them():
    clock = StepClock()
    clock.start_epoch()
    settled = []
    for _ in range(12):
        clock.start_step()
        clock.end_step(8)
        settled.append(clock.just_settled())
    assert [i for i, value in enumerate(settled) if value is not None] == [9]  # the 10th step
    assert settled[9] >= 0 and clock.epoch_examples_per_s() > 0


def test_the_throughput_line_and_the_cpu_presets_advice_only_for_a_long_cpu_run():
    config = TrainConfig(image_size=224, batch_size=128, epochs=10)
    said = _Said()
    report_throughput(
        said, config, 2.0, steps_left=100, epochs_left=2, test_examples=640, device_type="cpu"
    )
    # 64 examples/s; 200 s of steps and 2 x 640 / 192 s of evaluation
    assert said.infos == ["measured: 64 examples/s (2,000 ms per step of 128); about 3.4 min to go"]
    assert said.warnings == []
    long = dict(steps_left=1000, epochs_left=10, test_examples=10_000)
    report_throughput(said, config, 2.0, **long, device_type="cuda")
    assert said.warnings == []
    report_throughput(said, config, 2.0, **long, device_type="cpu")
    assert len(said.warnings) == 1 and "--preset cpu" in said.warnings[0]
    small = dataclasses.replace(config, image_size=PRESETS["cpu"].image_size)
    report_throughput(said, small, 2.0, **long, device_type="cpu")
    assert len(said.warnings) == 1


def test_an_epoch_sits_at_chance_when_both_accuracies_are_below_one_and_a_half_in_ten():
    assert sat_at_chance(0.1, 0.149)
    assert not sat_at_chance(0.15, 0.1)
    assert not sat_at_chance(0.1, 0.15)


def test_the_chance_warning_tells_a_faded_signal_from_dead_relus():
    uniform = tuple(tuple(100 if j == 0 else 0 for j in range(10)) for _ in range(10))
    faded = Evaluation(
        confusion=uniform, loss_sum=1000 * math.log(10), zero_logit_examples=0, abs_logit_sum=120.0
    )
    text = chance_warning(1, 0.1, faded, math.log(10), PRESETS["d2l"])
    assert "mean |logit| 0.0120" in text and "Xavier-uniform" in text and "all-zero" not in text
    dead = dataclasses.replace(faded, zero_logit_examples=1000, abs_logit_sum=0.0)
    text = chance_warning(1, 0.1, dead, math.log(10), PRESETS["d2l"])
    assert "1000 of 1000 test images give all-zero logits" in text and "--preset default" in text


def test_the_chance_warning_advises_what_the_run_does_not_already_use():
    uniform = tuple(tuple(100 if j == 0 else 0 for j in range(10)) for _ in range(10))
    faded = Evaluation(
        confusion=uniform, loss_sum=1000 * math.log(10), zero_logit_examples=0, abs_logit_sum=120.0
    )
    text = chance_warning(1, 0.1, faded, math.log(10), PRESETS["default"])
    # The default preset already has Kaiming init and normalised input: neither is blamed or
    # advised; its learning rate is what is left to lower.
    assert "Xavier" not in text and "--preset default" not in text
    assert text.endswith("Restart with another --seed, or a lower --lr (this run's is 0.01).")
    no_warmup = dataclasses.replace(PRESETS["default"], warmup_epochs=0.0)
    text = chance_warning(1, 0.1, faded, math.log(10), no_warmup)
    assert text.endswith("a lower --lr (this run's is 0.01), or add --warmup-epochs 1.")
