import pytest
import torch

from ninlab.training.presets import TrainConfig
from ninlab.training.schedule import Schedule, learning_rate


def test_constant_with_warmup():
    rates = [
        learning_rate(s, peak_lr=0.1, total_steps=10, warmup_steps=4, kind="constant")
        for s in range(10)
    ]
    assert rates == pytest.approx([0.025, 0.05, 0.075, 0.1] + [0.1] * 6)


def test_cosine_after_warmup_reaches_zero_at_the_end():
    rates = [
        learning_rate(s, peak_lr=0.2, total_steps=12, warmup_steps=2, kind="cosine")
        for s in range(13)
    ]
    assert rates[:3] == pytest.approx([0.1, 0.2, 0.2])
    assert rates[7] == pytest.approx(0.1)  # half way through the cosine
    assert rates[12] == pytest.approx(0.0, abs=1e-12)


def test_onecycle_matches_pytorchs_onecycle_lr():
    total = 50
    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=0.1, total_steps=total, cycle_momentum=False, three_phase=False
    )
    theirs = []
    for _ in range(total):
        theirs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    ours = [
        learning_rate(s, peak_lr=0.1, total_steps=total, warmup_steps=0, kind="onecycle")
        for s in range(total)
    ]
    assert ours == pytest.approx(theirs, rel=1e-12, abs=1e-15)


def test_onecycle_with_a_given_warmup_is_onecycle_lr_with_that_pct_start():
    total, warmup = 40, 10
    optimizer = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=0.3, total_steps=total, pct_start=warmup / total, cycle_momentum=False
    )
    theirs = []
    for _ in range(total):
        theirs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    ours = [
        learning_rate(s, peak_lr=0.3, total_steps=total, warmup_steps=warmup, kind="onecycle")
        for s in range(total)
    ]
    assert ours == pytest.approx(theirs, rel=1e-12, abs=1e-15)


def test_a_runs_schedule_counts_the_global_batches_and_rounds_the_warmup():
    config = TrainConfig(batch_size=128, epochs=3, lr=0.2, warmup_epochs=0.5, schedule="cosine")
    # 1,000 images in global batches of 128: 8 steps an epoch (the last one short), whatever
    # the ranks
    for world_size in (1, 2):
        schedule = Schedule.of(config, 1000, world_size)
        assert (schedule.steps_per_epoch, schedule.total_steps, schedule.warmup_steps) == (8, 24, 4)
    assert [schedule.lr(step) for step in range(25)] == [
        learning_rate(step, peak_lr=0.2, total_steps=24, warmup_steps=4, kind="cosine")
        for step in range(25)
    ]
