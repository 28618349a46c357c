"""One training step and one inference step, written once.

The predictor runs these on fake tensors and the measurer on real ones, so both account for the
same program: what is alive when is decided by this code, not by two descriptions of it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import ContextManager, Literal

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["GradMode", "train_step", "inference_step", "no_phases"]

Phase = Callable[[str], ContextManager[None]]
GradMode = Literal["no_grad", "inference_mode"]


def no_phases(_name: str) -> ContextManager[None]:
    return contextlib.nullcontext()


def _autocast(inputs: torch.Tensor, dtype: torch.dtype | None) -> ContextManager[object]:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(inputs.device.type, dtype=dtype)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    autocast_dtype: torch.dtype | None = None,
    phase: Phase = no_phases,
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> None:
    """zero_grad(set_to_none=True), forward, cross-entropy, backward, optimizer step.

    `forward` replaces `model(inputs)` (the predictor calls the model with fake parameters).
    """
    run = forward or model
    with phase("zero_grad"):
        optimizer.zero_grad(set_to_none=True)
    with _autocast(inputs, autocast_dtype):
        with phase("forward"):
            logits = run(inputs)
        with phase("loss"):
            loss = F.cross_entropy(logits, targets)
    # `logits` stays referenced until the step returns, as `y_hat` does in d2l's training loop.
    with phase("backward"):
        loss.backward()
    with phase("optimizer"):
        optimizer.step()


def inference_step(
    model: nn.Module,
    inputs: torch.Tensor,
    *,
    autocast_dtype: torch.dtype | None = None,
    grad_mode: GradMode = "no_grad",
    phase: Phase = no_phases,
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """The model's forward with no autograd graph; returns the logits."""
    run = forward or model
    guard = torch.inference_mode() if grad_mode == "inference_mode" else torch.no_grad()
    with guard, _autocast(inputs, autocast_dtype), phase("forward"):
        return run(inputs)
