"""The user's own training step (`StepSpec.step`): predicted equals measured at the live-storage
level, byte for byte, for the steps people run besides the built-in one; and the one-line answers
for steps that cannot be predicted."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from ninlab.analysis.measure import measure
from ninlab.analysis.predict import predict_memory
from ninlab.analysis.step import StepSpec, load_step
from ninlab.errors import NinlabError

INPUT = (3, 12, 12)
BATCH = 6


# Allocator figures depend on the thread count (oneDNN's choices): two, as in CI.
pytestmark = pytest.mark.usefixtures("two_threads")


def net() -> nn.Sequential:
    """Three blocks: conv + batch norm + ReLU + pool, conv + ReLU + dropout, and the head."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2)),
        nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Dropout(0.3)),
        nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)),
    )


def frozen_first_block() -> nn.Sequential:
    model = net()
    model[0].requires_grad_(False)
    return model


def frozen_bias() -> nn.Sequential:
    model = net()
    model[1][0].bias.requires_grad_(False)
    return model


# -- steps as users write them -------------------------------------------------------------------


def plain(model: nn.Module, optimizer: Any, inputs: torch.Tensor, targets: torch.Tensor) -> None:
    optimizer.zero_grad()
    F.cross_entropy(model(inputs), targets).backward()
    optimizer.step()


def accumulate(
    model: nn.Module, optimizer: Any, inputs: torch.Tensor, targets: torch.Tensor
) -> None:
    micro_batches = 3
    optimizer.zero_grad()
    for x, y in zip(inputs.chunk(micro_batches), targets.chunk(micro_batches)):
        loss = F.cross_entropy(model(x), y) / micro_batches
        loss.backward()
    optimizer.step()


def loss_expression(
    model: nn.Module, optimizer: Any, inputs: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """Label-smoothed summed float32 loss with an auxiliary term; gradients zeroed, not freed;
    the loss returned, so it is alive while the next step runs."""
    optimizer.zero_grad(set_to_none=False)
    logits = model(inputs)
    loss = F.cross_entropy(logits.float(), targets, label_smoothing=0.1, reduction="sum")
    loss = loss + 0.01 * logits.pow(2).mean()
    loss.backward()
    optimizer.step()
    return loss.detach()


def checkpointed(reentrant: bool) -> Callable[..., None]:
    def step(model: nn.Module, optimizer: Any, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        optimizer.zero_grad()
        hidden = model[0](inputs)  # the reentrant form needs an input that requires grad
        hidden = checkpoint(model[1], hidden, use_reentrant=reentrant)
        F.cross_entropy(model[2](hidden), targets).backward()
        optimizer.step()

    return step


def scaled(dtype: torch.dtype) -> Callable[..., None]:
    def step(
        model: nn.Module, optimizer_and_scaler: Any, inputs: torch.Tensor, targets: torch.Tensor
    ) -> None:
        optimizer, scaler = optimizer_and_scaler
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=dtype):
            loss = F.cross_entropy(model(inputs), targets)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    return step


def with_scaler(model: nn.Module) -> tuple[torch.optim.Optimizer, torch.amp.GradScaler]:
    return torch.optim.SGD(model.parameters(), lr=0.1), torch.amp.GradScaler("cpu")


def two_optimizers(
    model: nn.Module, optimizers: Any, inputs: torch.Tensor, targets: torch.Tensor
) -> None:
    for optimizer in optimizers:
        optimizer.zero_grad()
    F.cross_entropy(model(inputs), targets).backward()
    for optimizer in optimizers:
        optimizer.step()


def sgd_and_adam(model: nn.Module) -> tuple[torch.optim.Optimizer, ...]:
    rest = [*model[1].parameters(), *model[2].parameters()]
    return torch.optim.SGD(model[0].parameters(), lr=0.1, momentum=0.9), torch.optim.Adam(rest)


def head_only(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(model[2].parameters())


CASES = {
    "accumulation": (net, {"step": accumulate, "optimizer": "sgd-momentum"}),
    "loss expression": (net, {"step": loss_expression, "optimizer": "adam"}),
    "channels-last": (
        net,
        {"step": loss_expression, "optimizer": "sgd", "memory_format": "channels_last"},
    ),
    "frozen block, sgd": (frozen_first_block, {"optimizer": "sgd"}),
    "frozen block, momentum": (frozen_first_block, {"optimizer": "sgd-momentum"}),
    "frozen block, adam": (frozen_first_block, {"optimizer": "adam"}),
    "frozen tensor, momentum": (frozen_bias, {"step": plain, "optimizer": "sgd-momentum"}),
    "optimizer over a subset": (net, {"step": plain, "optimizer": head_only}),
    "checkpoint": (net, {"step": checkpointed(reentrant=False), "optimizer": "sgd"}),
    "checkpoint, reentrant": (net, {"step": checkpointed(reentrant=True), "optimizer": "sgd"}),
    "bf16 autocast, scaler": (net, {"step": scaled(torch.bfloat16), "optimizer": with_scaler}),
    "fp16 autocast, scaler": (net, {"step": scaled(torch.float16), "optimizer": with_scaler}),
    "two optimizers": (net, {"step": two_optimizers, "optimizer": sgd_and_adam}),
}


@pytest.mark.parametrize("case", CASES)
def test_prediction_equals_measurement(case: str) -> None:
    make, fields = CASES[case]
    spec = StepSpec(input_size=INPUT, **fields)
    predicted = predict_memory(make(), spec, batch_size=BATCH)
    measured = measure(make(), spec, batch_size=BATCH)
    assert predicted.fallback is None
    assert predicted.live_peak_bytes == measured.live_peak_bytes
    assert predicted.peak.phase == measured.live_peak_phase
    if case.startswith("frozen block"):
        # no gradient and no optimizer state for the frozen conv and batch norm (8*3*9+8+8+8)
        assert predicted.breakdown.optimizer_state_bytes in (
            0,
            measured.baseline.optimizer_state_bytes,
        )
        assert measured.baseline.gradients_bytes == measured.baseline.parameters_bytes - 4 * (
            8 * 3 * 9 + 8 + 8 + 8
        )


# A loss history the step appends to and trims, as a logging loop keeps the last few.
HISTORY: list[torch.Tensor] = []


def logged(model: nn.Module, optimizer: Any, inputs: Any, targets: Any) -> Any:
    optimizer.zero_grad()
    output = model(inputs)
    HISTORY.append(output.detach().clone())
    del HISTORY[:-2]
    loss = F.cross_entropy(output, targets)
    loss.backward()
    optimizer.step()
    return loss


@pytest.mark.parametrize("held", [0, 2])
def test_a_history_the_step_keeps_is_left_as_it_was_and_counted_as_held(held: int) -> None:
    # A prediction left its fake outputs in the list (the next call counted them, or failed);
    # a measurement did not count what the list held before it, the prediction counted what the
    # step had dropped from it: mismatches of a batch of logits, larger at each call.
    HISTORY[:] = [torch.zeros(BATCH, 10) for _ in range(held)]
    before = list(HISTORY)
    spec = StepSpec(input_size=INPUT, step=logged, optimizer="adam")
    for _ in range(2):
        predicted = predict_memory(net(), spec, batch_size=BATCH)
        assert len(HISTORY) == held and all(a is b for a, b in zip(HISTORY, before))
        measured = measure(net(), spec, batch_size=BATCH)
        assert len(HISTORY) == held and all(a is b for a, b in zip(HISTORY, before))
        assert predicted.live_trust.exact
        assert predicted.live_peak_bytes == measured.live_peak_bytes


def test_checkpointing_shows_the_recomputation_as_its_own_category() -> None:
    spec = StepSpec(input_size=INPUT, step=checkpointed(reentrant=False), optimizer="sgd")
    report = predict_memory(net(), spec, batch_size=BATCH)
    recomputed = report.timeline.series("recomputed")
    assert max(recomputed) > 0
    phases = [span.phase for span in report.timeline.phases]
    assert "recompute" in phases and phases.index("recompute") > phases.index("backward")
    # without checkpointing the block's activations are saved, not recomputed
    plain_report = predict_memory(net(), StepSpec(input_size=INPUT, step=plain), batch_size=BATCH)
    assert max(plain_report.timeline.series("recomputed")) == 0


def test_the_built_in_step_is_the_default_step_function() -> None:
    explicit = predict_memory(net(), StepSpec(input_size=INPUT, step=plain), batch_size=BATCH)
    built_in = predict_memory(net(), StepSpec(input_size=INPUT), batch_size=BATCH)
    # the same program but for the logits, which the built-in step keeps referenced until it returns
    assert built_in.live_peak_bytes - explicit.live_peak_bytes in (0, BATCH * 10 * 4)


# -- steps that cannot be predicted ----------------------------------------------------------------


def no_backward(
    model: nn.Module, optimizer: Any, inputs: torch.Tensor, targets: torch.Tensor
) -> None:
    F.cross_entropy(model(inputs), targets)
    optimizer.step()


def raises(model: nn.Module, optimizer: Any, inputs: torch.Tensor, targets: torch.Tensor) -> None:
    raise ValueError("my step is broken")


def reads_a_value(
    model: nn.Module, optimizer: Any, inputs: torch.Tensor, targets: torch.Tensor
) -> None:
    optimizer.zero_grad()
    loss = F.cross_entropy(model(inputs), targets)
    if loss.item() < 100:  # a branch on data: fake tensors have none
        loss.backward()
    optimizer.step()


def test_a_step_that_never_calls_backward_is_one_line() -> None:
    with pytest.raises(NinlabError, match=r"^the step no_backward never calls backward\(\)"):
        predict_memory(net(), input_size=INPUT, batch_size=2, step=no_backward)


def test_a_step_that_raises_gives_its_own_error() -> None:
    with pytest.raises(
        NinlabError,
        match=r"^the step raises raised on fake tensors: ValueError: my step is broken$",
    ):
        predict_memory(net(), input_size=INPUT, batch_size=2, step=raises)
    with pytest.raises(NinlabError, match=r"ValueError: my step is broken$"):
        measure(net(), input_size=INPUT, batch_size=2, step=raises)


def test_a_step_that_reads_data_is_measured_and_scaled_visibly() -> None:
    report = predict_memory(net(), input_size=INPUT, batch_size=BATCH, step=reads_a_value)
    assert report.fallback is not None and report.timeline is None
    assert report.notes[0].startswith("the step reads_a_value cannot run on fake tensors")
    assert "_local_scalar_dense" in report.notes[0]  # the op that needs real data: .item()
    # A small batch is measured itself (it was a line through batch 1 and 2, 20-28% low where
    # the peak moves to another phase): the figure is the measurement, and says so.
    assert report.fallback.batch_sizes == (BATCH,)
    assert report.live_trust.kind == report.allocator_trust.kind == "measured"
    measured = measure(net(), input_size=INPUT, batch_size=BATCH, step=reads_a_value)
    assert report.live_peak_bytes == measured.live_peak_bytes


def test_step_and_amp_do_not_mix() -> None:
    with pytest.raises(NinlabError, match="drop amp"):
        StepSpec(step=plain, amp="bf16")


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("no_such_module_xyz:step", "cannot import 'no_such_module_xyz'"),
        ("math:no_such_step", "'math' has no 'no_such_step'"),
        ("math:pi", "'math:pi' is not a function but a float"),
        ("math", "name a step as package.module:function"),
    ],
)
def test_loading_a_step_by_name_fails_in_one_line(path: str, message: str) -> None:
    with pytest.raises(NinlabError, match=message):
        load_step(path)
