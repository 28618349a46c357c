"""A model is predicted and measured in its own dtype (float16, bfloat16, float64), not cast to
float32: parameter bytes per dtype, FLOPs, and prediction == measurement on this machine."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ninlab.analysis.measure import measure
from ninlab.analysis.predict import predict_memory
from ninlab.analysis.refusals import cannot_run
from ninlab.analysis.step import StepSpec, model_dtype, step_spec
from ninlab.analysis.summary import summarize
from ninlab.errors import NinlabError


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * 3 * 3, 5),
    )


@pytest.mark.parametrize(
    ("dtype", "itemsize"), [(torch.float16, 2), (torch.bfloat16, 2), (torch.float64, 8)]
)
def test_parameter_bytes_are_the_models_own_dtype(dtype: torch.dtype, itemsize: int) -> None:
    summary = summarize(nn.Linear(8, 4).to(dtype), input_size=(8,), batch_size=2)
    assert summary.dtype == {2: str(dtype).removeprefix("torch."), 8: "float64"}[itemsize]
    assert summary.totals.parameter_bytes == 36 * itemsize  # was 144 (float32) for any dtype
    assert summary.totals.forward_flops == 2 * 2 * 8 * 4


def test_an_lstm_in_half_counts_the_same_flops_as_in_float32() -> None:
    """Unless float32 runs oneDNN's fused LSTM kernel (on AMD EPYC), whose products the count
    leaves out, as FlopCounterMode does: then its total says so."""
    lstm = nn.LSTM(8, 16, batch_first=True)
    full = summarize(lstm, input_size=(5, 8), batch_size=2, mode="infer").totals
    half = summarize(lstm.half(), input_size=(5, 8), batch_size=2, mode="infer").totals
    cell_products = 2 * 2 * 5 * 4 * 16 * (8 + 16)  # batch 2, 5 steps, 4 gates, input and hidden
    assert half.forward_flops == cell_products and half.parameter_bytes == 2 * (
        4 * 16 * (8 + 16 + 2)
    )
    assert (full.forward_flops, full.uncounted_products) in (
        (cell_products, ()),
        (0, ("recurrent layers (oneDNN's or cuDNN's RNN kernel)",)),
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["train", "infer"])
def test_prediction_equals_measurement_in_the_models_dtype(dtype: torch.dtype, mode: str) -> None:
    model = cnn().to(dtype)
    spec = StepSpec(input_size=(3, 8, 8), mode=mode, optimizer="adam")  # type: ignore[arg-type]
    report = predict_memory(model, spec, batch_size=2)
    measured = measure(model, spec, batch_size=2)
    assert report.spec.dtype == measured.spec.dtype == dtype
    assert measured.baseline.parameters_bytes == sum(p.numel() for p in model.parameters()) * (
        dtype.itemsize
    )
    assert report.live_peak_bytes == measured.live_peak_bytes
    assert report.held_peak_bytes == pytest.approx(measured.allocator_peak_bytes, rel=0.01)
    assert next(model.parameters()).dtype == dtype  # the user's model is not cast


def test_a_given_dtype_still_casts_and_float64_is_accepted() -> None:
    model = cnn()
    spec = step_spec(StepSpec(input_size=(3, 8, 8), dtype=torch.float64), model=model)
    assert spec.dtype == torch.float64
    report = predict_memory(model, spec, batch_size=2)
    assert report.live_peak_bytes == measure(model, spec, batch_size=2).live_peak_bytes
    assert next(model.parameters()).dtype == torch.float32


def test_a_mixed_model_takes_the_dtype_most_of_its_elements_have() -> None:
    model = nn.Sequential(nn.Linear(64, 64), nn.LayerNorm(64)).half()
    model[1].float()  # a float32 norm in a float16 model, as mixed-precision recipes keep it
    assert model_dtype(model) == torch.float16
    assert model_dtype(nn.ReLU()) == torch.float32  # nothing floating: float32
    assert StepSpec().for_model(model).dtype == torch.float16
    assert StepSpec(dtype="float32").for_model(model).dtype == torch.float32


def test_a_kernel_this_pytorch_lacks_for_the_dtype_is_named() -> None:
    """Every kernel of these models exists for float16 on CPU in the torch tested here; where one
    does not, PyTorch's error names it, and so does the one line."""
    error = RuntimeError("\"addmm_impl_cpu_\" not implemented for 'Half'")
    spec = StepSpec(input_size=(8,)).for_model(nn.Linear(8, 4).half())
    message = str(cannot_run(error, nn.Linear(8, 4).half(), spec))
    assert message.startswith("this PyTorch has no cpu kernel addmm_impl_cpu_ for Half tensors")
    assert message.endswith(
        "run the model in another dtype (dtype='float32' or 'bfloat16', --dtype)"
    )
    # A kernel missing for bfloat16 (avg_pool3d's, which LocalResponseNorm runs) is not
    # answered with bfloat16.
    error = NotImplementedError("\"avg_pool3d_out_frame\" not implemented for 'BFloat16'")
    message = str(cannot_run(error, nn.Linear(8, 4), spec))
    assert message.endswith("run the model in another dtype (dtype='float32', --dtype)")


class _SumsIntoFloat32(nn.Module):
    """Adds a linear layer's output into a float32 buffer for the rows it picks by value (so the
    step is measured, for real): under bf16 autocast the two differ."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = (x[:, 0] > 0).nonzero().squeeze(-1)
        return torch.zeros_like(x).index_add(0, rows, self.linear(x[rows]))


def test_a_dtype_error_of_the_model_under_autocast_is_named_as_such() -> None:
    """The model's own mismatch under autocast, not the input's: the line says so (it used to
    ask for "the input sizes and dtype its forward expects")."""
    with pytest.raises(NinlabError, match=r"^the model fails under bf16 autocast with a dtype "):
        predict_memory(_SumsIntoFloat32(), input_size=(8,), batch_size=4, amp="bf16")
