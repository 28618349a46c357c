"""`refusals.cannot_run`: a step that fails is refused in one line naming its real cause."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from ninlab import measure, predict_memory
from ninlab.errors import NinlabError

# Each fails in the optimizer's own code, on fake tensors and real ones alike.
_FAILING_OPTIMIZERS: dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
    "capturable on CPU": lambda model: torch.optim.Adam(model.parameters(), capturable=True),
    "differentiable": lambda model: torch.optim.Adam(model.parameters(), differentiable=True),
    "SparseAdam, dense gradients": lambda model: torch.optim.SparseAdam(model.parameters()),
}


@pytest.mark.parametrize("call", [predict_memory, measure])
@pytest.mark.parametrize("kind", _FAILING_OPTIMIZERS)
def test_an_optimizer_that_fails_is_blamed_not_the_input(kind: str, call: Callable) -> None:
    # They were refused as "the model cannot run a train step on a batch of 16 inputs (...);
    # give the input sizes and dtype its forward expects".
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(NinlabError) as refused:
        call(model, input_size=(16,), batch_size=2, optimizer=_FAILING_OPTIMIZERS[kind])
    message = str(refused.value)
    assert message.startswith("the optimizer <lambda> fails on this model's parameters (")
    assert "input size" not in message and "\n" not in message


def test_a_model_that_rejects_its_input_is_still_told_about_the_input() -> None:
    model = nn.Linear(8, 4)
    with pytest.raises(NinlabError, match="give the input sizes and dtype its forward expects"):
        predict_memory(model, input_size=(16,), batch_size=2, optimizer="adam")
