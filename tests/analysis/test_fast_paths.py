"""PyTorch's fast inference paths of attention, taken as they are unwatched.

`nn.MultiheadAttention` and `nn.TransformerEncoderLayer` in eval mode without autograd run one
fused kernel, unless a torch-function mode is active (`has_torch_function` is then true for every
call). The canaries pin that decision on the installed torch; the rest checks that ninlab's
watchers (`StepPhases`, the recorder on fake tensors, the measurer) leave it as it is, and that
the prediction of such a program is its measurement at both levels.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.profiler import ProfilerActivity, profile

from ninlab.analysis.measure import measure
from ninlab.analysis.phases import StepPhases
from ninlab.analysis.predict import predict_memory
from ninlab.analysis.torch_internals import FakeTensorMode

_FUSED = {"aten::_native_multi_head_attention", "aten::_transformer_encoder_layer_fwd"}


class _Empty(TorchFunctionMode):
    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        return func(*args, **(kwargs or {}))


class _SelfAttention(nn.Module):
    def __init__(self, *, padding_mask: bool, batch_first: bool = True) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(32, 4, batch_first=batch_first)
        self.padding_mask = padding_mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = None
        if self.padding_mask:
            batch, length = x.shape[:2] if self.attention.batch_first else x.shape[1::-1]
            mask = torch.zeros(batch, length, dtype=torch.bool, device=x.device)
            mask[:, -2:] = True
        return self.attention(x, x, x, key_padding_mask=mask, need_weights=False)[0]


def _encoder(batch_first: bool) -> nn.Module:
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=batch_first)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)


def _fused_ops(model: nn.Module, x: torch.Tensor, *modes: Any) -> set[str]:
    with profile(activities=[ProfilerActivity.CPU]) as prof, torch.no_grad():
        for mode in modes:
            mode.__enter__()
        try:
            model(x)
        finally:
            for mode in reversed(modes):
                mode.__exit__(None, None, None)
    return {event.name for event in prof.events()} & _FUSED


@pytest.mark.canary
def test_canary_a_function_mode_turns_the_fast_path_off() -> None:
    """PyTorch's own decision: fused unwatched, unfused under any torch-function mode. If this
    fails, torch changed the rule, and StepPhases' reason for being no function mode with it."""
    model = _SelfAttention(padding_mask=False).eval()
    x = torch.randn(2, 6, 32)
    assert _fused_ops(model, x) == {"aten::_native_multi_head_attention"}
    assert _fused_ops(model, x, _Empty()) == set()


@pytest.mark.canary
def test_canary_fake_tensors_keep_the_fast_path() -> None:
    """A fake tensor has no torch function of its own, and the fused kernel runs on fakes: the
    trace takes the decision PyTorch takes."""
    with FakeTensorMode():
        fake = torch.empty(2, 6, 32)
        assert not torch.overrides.has_torch_function((fake,))


def test_step_phases_leave_the_fast_path_on() -> None:
    model = _SelfAttention(padding_mask=False).eval()
    assert _fused_ops(model, torch.randn(2, 6, 32), StepPhases(model)) == {
        "aten::_native_multi_head_attention"
    }
    encoder = _encoder(batch_first=True).eval()
    assert _fused_ops(encoder, torch.randn(2, 6, 32), StepPhases(encoder)) == {
        "aten::_native_multi_head_attention",
        "aten::_transformer_encoder_layer_fwd",
    }


@pytest.mark.parametrize(
    ("model", "fused"),
    [
        (_SelfAttention(padding_mask=False), True),
        (_SelfAttention(padding_mask=True), True),
        (_SelfAttention(padding_mask=True, batch_first=False), False),
        (_encoder(batch_first=True), True),
        (_encoder(batch_first=False), False),
    ],
    ids=["mha", "mha-padding-mask", "mha-sequence-first", "encoder", "encoder-sequence-first"],
)
@pytest.mark.parametrize("grad_mode", ["no_grad", "inference_mode"])
def test_attention_inference_is_predicted_as_measured(
    model: nn.Module, fused: bool, grad_mode: str
) -> None:
    """Live and allocator levels, exactly: the fused kernels' own temporaries come from the
    kernel probe (batch 4, 10 tokens of 32; e.g. MHA: 27,136 B live, 52,736 B allocator)."""
    model.eval()
    fields = {"input_size": (10, 32), "mode": "infer", "grad_mode": grad_mode}
    assert bool(_fused_ops(model, torch.randn(4, 10, 32))) == fused
    predicted = predict_memory(model, batch_size=4, **fields)
    measured = measure(model, batch_size=4, **fields)
    assert predicted.live_peak_bytes == measured.live_peak_bytes
    assert predicted.allocator_peak_bytes == measured.allocator_peak_bytes


def test_an_encoder_packing_its_padding_mask_is_measured_not_traced() -> None:
    """With a padding mask, `nn.TransformerEncoder`'s fast path packs the kept tokens into a
    nested tensor, whose size depends on the mask's values: the trace cannot follow it, and the
    prediction says it comes from measured steps instead of printing the unfused program's."""

    class PaddedEncoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            mask = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)
            mask[:, -3:] = True
            return self.encoder(x, src_key_padding_mask=mask)

    model = PaddedEncoder().eval()
    predicted = predict_memory(model, batch_size=4, input_size=(10, 32), mode="infer")
    assert predicted.fallback is not None
    assert "nested" in str(predicted.fallback) or "data" in str(predicted.fallback)
