"""`phases.StepPhases`: the phase of each op, read from the running step, and the backward calls
it tells the recorder of."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ninlab.analysis.measure import measure
from ninlab.analysis.phases import StepPhases
from ninlab.analysis.predict import predict_memory


class _Recomputed(torch.autograd.Function):
    """A reversible layer as Reformer writes it: the forward keeps no graph, the backward runs
    the layer again under grad and calls backward on it inside its own, keeping that graph."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        ctx.layer = layer
        ctx.save_for_backward(x)
        with torch.no_grad():
            return layer(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (x,) = ctx.saved_tensors
        with torch.enable_grad():
            x = x.detach().requires_grad_()
            ctx.layer(x).backward(grad, retain_graph=True)
        return x.grad * 2, None


class _Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.narrow = nn.Linear(32, 32)
        self.wide = nn.Linear(32, 512)
        self.back = nn.Linear(512, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # `* 0.25`: the Python number autograd keeps is a CPU tensor no dispatch mode sees.
        return self.back(torch.tanh(self.wide(self.narrow(x) * 0.25)))


class _Reversible(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(16, 32)
        self.layer = _Layer()
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(_Recomputed.apply(self.stem(x), self.layer))


def test_a_backward_inside_a_backward_is_told_with_its_roots() -> None:
    model = _Reversible()
    told: list[int] = []
    with StepPhases(model, on_backward=lambda roots: told.append(len(roots))) as phases:
        model(torch.randn(2, 16)).sum().backward()
    assert told == [1, 1]  # the step's backward, then the recomputation's
    assert phases.backward_calls == 1  # outermost calls only


def test_what_a_recomputation_inside_backward_saves_is_counted() -> None:
    """What the recomputed graph saved was read at outermost backward calls only, before it
    existed: the Python number it keeps (the graph retained) was missing, 8 live bytes under at
    the peak, printed as exact (Hugging Face's Reformer, every setup)."""
    torch.manual_seed(0)
    model = _Reversible()
    report = predict_memory(model, input_size=(16,), batch_size=2)
    measured = measure(model, report.spec, batch_size=2)
    assert report.live_trust.exact
    assert report.live_peak_bytes == measured.live_peak_bytes == 284_272
    assert report.allocator_peak_bytes == measured.allocator_peak_bytes
