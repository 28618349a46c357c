"""What `ninlab train` prints before the first step is the prediction of the trainer's own step
function: measured for real, that function's peak is the printed one, byte for byte."""

import dataclasses

import torch

from ninlab.analysis.measure import measure
from ninlab.models import build_nin, parse_variant
from ninlab.training.presets import PRESETS, TrainConfig
from ninlab.training.train import optimize_batch, run_cost, step_spec_of


def test_the_printed_prediction_is_the_trainers_own_step_measured() -> None:
    # the trainer's choices that move the peak: channels-last, bf16 autocast, a label-smoothed
    # summed float32 loss, momentum
    config = TrainConfig(
        variant="nin-d2l-bn",
        image_size=67,
        batch_size=4,
        momentum=0.9,
        label_smoothing=0.1,
        amp="bf16",
        channels_last=True,
    )
    torch.manual_seed(0)
    model = build_nin(parse_variant(config.variant))
    cost = run_cost(model, config, device_type="cpu", world_size=1)
    spec = step_spec_of(config, device_type="cpu", world_size=1)
    assert spec.step.func is optimize_batch  # the function the training loop calls
    measured = measure(model, spec, batch_size=config.batch_size)
    assert cost.peak_live_bytes == measured.live_peak_bytes


def test_the_cpu_28_preset_prints_its_own_steps_peak() -> None:
    # nin-28 at 28x28: 2x2 pooling, no resize, no dropout; the preset's step at a small batch
    config = dataclasses.replace(PRESETS["cpu-28"], batch_size=4)
    torch.manual_seed(0)
    model = build_nin(parse_variant(config.variant))
    cost = run_cost(model, config, device_type="cpu", world_size=1)
    measured = measure(
        model, step_spec_of(config, device_type="cpu", world_size=1), batch_size=config.batch_size
    )
    assert cost.peak_live_bytes == measured.live_peak_bytes
