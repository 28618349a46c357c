"""Step functions as users write them, shared by the tests that check one thing about them and
the corpus (tests/corpus/corpus_cases.py) that predicts them against `measure`: one copy each."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F


def reentrant_step(model: nn.Module, optimizer: Any, inputs: torch.Tensor, targets: Any) -> Any:
    """The whole model recomputed by a reentrant checkpoint, whose autograd context keeps a copy
    of the generator's state: the loss it returns holds it through the next step."""
    optimizer.zero_grad()
    outputs = torch.utils.checkpoint.checkpoint(
        model, inputs.clone().requires_grad_(), use_reentrant=True
    )
    loss = F.cross_entropy(outputs, targets)
    loss.backward()
    optimizer.step()
    return loss
