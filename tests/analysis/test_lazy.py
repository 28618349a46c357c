"""`lazy.copy_model`: the copy a measurement runs, of any model a prediction takes."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from ninlab.analysis.lazy import copy_model
from ninlab.analysis.measure import measure
from ninlab.analysis.predict import predict_memory
from ninlab.analysis.step import StepSpec


def _pruned() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 5))
    prune.l1_unstructured(model[0], "weight", amount=0.5)
    return model


def _old_weight_norm() -> nn.Module:
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 5))
    torch.nn.utils.weight_norm(model[0])
    return model


@pytest.mark.parametrize("build", [_pruned, _old_weight_norm])
def test_a_weight_computed_and_kept_by_a_hook_is_copied_and_measured(build) -> None:
    # Pruning's and the old weight_norm's `weight`, computed from the parameters, is no graph
    # leaf, which deepcopy refuses: a measurement refused the model ("cannot be copied").
    model = build()
    spec = StepSpec(input_size=(16,), optimizer="adam")
    copied = copy_model(model, spec)
    assert torch.equal(copied[0].weight, model[0].weight) and copied[0].weight.is_leaf
    predicted = predict_memory(model, spec, batch_size=4)
    measured = measure(model, spec, batch_size=4)
    assert predicted.live_trust.exact and predicted.allocator_trust.exact
    assert measured.live_peak_bytes == predicted.live_peak_bytes
    assert measured.allocator_peak_bytes == predicted.allocator_peak_bytes
