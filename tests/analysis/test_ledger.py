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
