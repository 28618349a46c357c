import pytest
import torch

from ninlab.training.schedule import learning_rate


def test_constant_with_warmup():
    rates = [
        learning_rate(s, peak_lr=0.1, total_steps=10, warmup_steps=4, kind="constant") for s in range(10)
    ]
    assert rates == pytest.approx([0.025, 0.05, 0.075, 0.1] + [0.1] * 6)


def test_cosine_after_warmup_reaches_zero_at_the_end():
    rates = [learning_rate(s, peak_lr=0.2, total_steps=12, warmup_steps=2, kind="cosine") for s in range(13)]
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
