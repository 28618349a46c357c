"""The storage ledger and the harvest of what autograd saved for backward."""

import pytest
import torch

from ninlab.analysis.step import StepSpec
from ninlab.analysis.trace import record_step
from ninlab.models import build_nin


@pytest.fixture(scope="module")
def nin():
    return build_nin()


def test_saved_for_backward_names_the_reasons(nin):
    step = record_step(nin, StepSpec((1, 224, 224), optimizer="sgd"), 2)
    saved = {(s.module, s.node, s.field) for s in step.recording.saved_for_backward}
    storages = step.recording.storages
    assert ("0.0", "ConvolutionBackward0", "input") in saved
    assert ("0.1", "ReluBackward0", "result") in saved
    assert ("1", "MaxPool2DWithIndicesBackward0", "result1") in saved  # the int64 indices
    assert ("", "NllLossBackward0", "target") in saved
    assert ("", "LogSoftmaxBackward0", "result") in saved
    indices = next(
        s for s in step.recording.saved_for_backward if s.module == "1" and s.field == "result1"
    )
    assert storages[indices.storage_key].dtype == torch.int64
    assert storages[indices.storage_key].nbytes == 8 * 2 * 96 * 26 * 26
    # conv 0.2 keeps the ReLU output 0.1 keeps: one storage, counted once.
    relu = next(s for s in step.recording.saved_for_backward if s.module == "0.1")
    conv = next(
        s for s in step.recording.saved_for_backward if s.module == "0.2" and s.field == "input"
    )
    assert relu.storage_key == conv.storage_key


class _Scaled(torch.nn.Module):
    """A linear layer's output times a Python float: autograd keeps the float, wrapped in a CPU
    tensor of 8 bytes that no op makes, until the product's backward (torchvision's Swin scales
    its queries so)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * 0.25


def test_a_saved_python_number_is_counted_from_its_op_to_its_backward():
    from ninlab.analysis.measure import measure
    from ninlab.analysis.predict import predict_memory

    model = _Scaled()
    step = record_step(model, StepSpec((6,), optimizer="sgd"), 3)
    (number,) = [s for s in step.recording.saved_for_backward if s.node == "MulBackward0"]
    record = step.recording.storages[number.storage_key]
    assert (number.field, record.dtype, record.nbytes) == ("other", torch.float64, 8)
    assert step.recording.ops[record.created_at].op == "aten.mul.Tensor"
    report = predict_memory(model, input_size=(6,), batch_size=3, optimizer="sgd")
    measured = measure(model, report.spec, batch_size=3)
    assert report.live_peak_bytes == measured.live_peak_bytes
