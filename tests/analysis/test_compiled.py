"""torch.compile'd code is traced as its eager program, and the prediction says so (`compiled.py`).

Nothing here compiles: torch.compile wraps at once and compiles at the first real call, and a
prediction runs the step under a dispatch mode, where torch.compile runs the eager code.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ninlab import fit_batch, predict_memory
from ninlab.analysis.compiled import compiled_code

INPUT = (16,)


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 5))


@torch.compile
def _gated(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x) * torch.sigmoid(x)


class _CallsACompiledFunction(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(_gated(self.up(x)))


@torch.compiler.disable
def _not_compiled(x: torch.Tensor) -> torch.Tensor:
    return x.relu()


class _CallsADisabledFunction(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _not_compiled(self.up(x))


def test_a_compiled_model_is_predicted_as_its_eager_program_and_says_so() -> None:
    model = net()
    compiled = torch.compile(model)
    report = predict_memory(compiled, input_size=INPUT, batch_size=8)
    eager = predict_memory(model, input_size=INPUT, batch_size=8)
    assert eager.live_trust.exact and eager.allocator_trust.exact
    assert report.live_peak_bytes == eager.live_peak_bytes
    assert report.allocator_peak_bytes == eager.allocator_peak_bytes
    for trust in (report.live_trust, report.allocator_trust):
        assert trust.kind == "estimate"
        assert "torch.compile'd code (the model)" in trust.words()
        assert "model._orig_mod, the module given to torch.compile" in trust.words()
    inference = predict_memory(compiled, input_size=INPUT, batch_size=8, mode="infer")
    assert inference.live_trust.kind == "estimate"


def test_compiled_code_is_found_where_the_step_reaches_it() -> None:
    inner = net()
    inner[0] = torch.compile(inner[0])  # type: ignore[assignment]
    assert compiled_code(inner) and "module '0'" in compiled_code(inner)[0]
    in_place = net()
    in_place.compile()  # compiles the module's call in place: no wrapper
    assert "(the model)" in compiled_code(in_place)[0]
    assert "function _gated" in compiled_code(_CallsACompiledFunction())[0]

    def step(model: nn.Module, optimizer: Any, inputs: torch.Tensor, targets: Any) -> Any:
        optimizer.zero_grad()
        loss = F.cross_entropy(_gated(model(inputs)), targets)
        loss.backward()
        optimizer.step()
        return loss

    assert compiled_code(net()) == ()
    assert "function _gated" in compiled_code(net(), step)[0]
    report = predict_memory(net(), input_size=INPUT, batch_size=4, step=step)
    assert report.allocator_trust.kind == "estimate"


def test_a_function_torch_compile_is_told_not_to_compile_is_not_compiled_code() -> None:
    # This test module holds `_gated` too, which every model defined here may call.
    (reason,) = compiled_code(_CallsADisabledFunction())
    assert "function _gated" in reason and "_not_compiled" not in reason


def test_a_fit_of_a_compiled_model_is_an_estimate() -> None:
    fit = fit_batch(torch.compile(net()), input_size=INPUT, budget="100KB")
    assert fit.trust.kind == "estimate" and "torch.compile'd code" in fit.trust.words()
